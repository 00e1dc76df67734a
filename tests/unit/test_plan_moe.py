"""The planner's mixture-of-experts terms (plan/cost.py, plan/cost_moe.py, model/flops.py):
memory against the tensors of a built moe_debug model, the all-to-all bytes and times by hand,
expert parallelism in the layout checker and the search, and `plan validate` on the MoE rows."""

import dataclasses

import pytest
import torch

from scaletrain.config.schema import ParallelConfig
from scaletrain.errors import LayoutError
from scaletrain.model import build_model
from scaletrain.config.flavors import model_config_for
from scaletrain.model.flops import (head_activation_bytes, loss_activation_bytes, moe_dispatch_bytes, param_counts,
                                    saved_activation_bytes)
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.layout import check_layout
from scaletrain.plan import cost_moe
from scaletrain.plan.cost import PARAMS, Layout, Stack, Workload, ep_seconds, estimate, estimate_memory
from scaletrain.plan.hardware import GB, Hardware, get_hardware

CPU = Hardware("cpu", {"fp32": 1e11}, 64 * GB, 1e10, 1, 1e10, 0.0, 1e10, 0.0)


def _moe(**kw):
    return model_config_for("moe_debug", moe_shared_experts=1, **kw)  # dense layer 0, 3 MoE layers, 8 experts


def _per_rank(model, ep: int, shard: int) -> float:
    """Parameters one rank stores, counted from the built model's tensors as parallel/ep.py lays
    them out: routed experts [E, ...] split over ep along dim 0, then FSDP over the shard / ep
    other ranks; every other tensor FSDP-sharded over `shard` ranks."""
    out = 0.0
    for name, p in model.named_parameters():
        out += p.numel() / (ep * (shard // ep)) if ".experts." in name else p.numel() / shard
    return out


def test_state_memory_equals_the_built_model_s_tensors():
    cfg = _moe()
    model = build_model(cfg, seed=0)
    n = sum(p.numel() for p in model.parameters())
    assert n == param_counts(cfg)["total"]
    w = Workload(cfg, 32, 8, "fp32")
    mem = estimate_memory(w, Layout(micro_batch=2), CPU)
    assert (mem.weights, mem.optimizer) == (4 * n, 8 * n)  # fp32 weights, AdamW m and v
    # the optimizer state AdamW really allocates (the per-tensor step counters aside), and the gradients
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    model(tokens).float().logsumexp(-1).mean().backward()
    assert sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()) == 4 * n
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert state == mem.optimizer
    # sharded: experts over ep, then FSDP over the other dp_shard / ep ranks (HSDP replicas hold copies)
    for lay in (Layout(dp_shard=4, ep=2), Layout(dp_shard=8, ep=8), Layout(dp_replicate=2, dp_shard=2, ep=2)):
        mem = estimate_memory(w, dataclasses.replace(lay, micro_batch=1), CPU)
        assert mem.weights == pytest.approx(4 * _per_rank(model, lay.ep, lay.dp_shard), rel=1e-12), lay.short()
        assert mem.optimizer == pytest.approx(8 * _per_rank(model, lay.ep, lay.dp_shard), rel=1e-12), lay.short()
    # without FSDP (Megatron-style DDP) a rank keeps the dense weights and its E / ep experts whole
    ddp = estimate_memory(w, Layout(dp_replicate=4, ep=4), CPU, Stack(fsdp=False))
    kept = sum(p.numel() / (4 if ".experts." in name else 1) for name, p in model.named_parameters())
    assert ddp.weights == pytest.approx(4 * kept, rel=1e-12)


def test_activations_equal_autograd_s_saved_tensors():
    """The planner's saved activations of a built moe_debug (q/k norms, a dense first layer, MoE
    layers with a shared expert), fp32 on the CPU, against every tensor autograd saves in one
    forward. Not counted: the parameters, the RoPE tables and the token ids (the model's input)."""
    cfg = _moe()
    model = build_model(cfg, seed=0)
    b, s = 8, 128
    tokens = torch.randint(0, cfg.vocab_size, (b, s))
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), tokens]}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens)
    layers = sum(saved_activation_bytes(cfg, b, s, 4, decomposed_norm=True, layer=i) for i in range(cfg.n_layers))
    predicted = layers + head_activation_bytes(cfg, b, s, 4, decomposed_norm=True)
    assert sum(saved.values()) == pytest.approx(predicted, rel=1e-9)
    # ... which is what the memory model holds at the start of backward (with the loss's tensors)
    mem = estimate_memory(Workload(cfg, s, b, "fp32"), Layout(micro_batch=b), CPU)
    assert mem.phase == "loss"
    assert mem.activations == pytest.approx(predicted + loss_activation_bytes(cfg, b, s, 4), rel=1e-12)


def test_dispatch_bytes_and_all_to_all_time_by_hand():
    cfg = _moe()  # dim 64, top-2 of 8 experts
    # 2 x 16 = 32 tokens, 64 token slots; with ep 4 three quarters of them leave the rank
    b = moe_dispatch_bytes(cfg, 2, 16, 4, dtype_bytes=2)
    assert b == {"dispatch": 48 * 64 * 2, "combine": 6144, "combine_grad": 6144, "dispatch_grad": 6144,
                 "counts": 8 * 8 * 3 // 4}
    assert set(moe_dispatch_bytes(cfg, 2, 16, 1).values()) == {0}
    hw = get_hardware("h100_sxm")  # 8 GPUs per NVLink domain
    eff = PARAMS.comm_eff
    # inside a node: NVLink for all of it, one latency per peer
    assert cost_moe.all_to_all_seconds(7e9, 8, 1, hw, eff) == pytest.approx(7 * hw.intra_latency + 7e9 / (hw.intra_bw * eff))
    # 16 ranks on two nodes: 8 of the 15 peers are remote, their share goes through the rank's own NIC
    t = cost_moe.all_to_all_seconds(15e9, 16, 1, hw, eff)
    assert t == pytest.approx(15 * hw.inter_latency + 8e9 / (hw.inter_bw * eff))
    # a GB200 NVL72 domain holds 64 ranks: NVLink
    gb = get_hardware("gb200_nvl72")
    assert cost_moe.all_to_all_seconds(63e9, 64, 1, gb, eff) == pytest.approx(63 * gb.intra_latency + 63e9 / (gb.intra_bw * eff))
    # ep_seconds: counts + dispatch + combine forward, their gradients backward; imbalance scales the rows
    w = Workload(cfg, 16, 8, "bf16")
    lay = Layout(dp_shard=4, ep=4, micro_batch=2)
    a2a = lambda x: cost_moe.all_to_all_seconds(x, 4, 1, hw, eff)  # noqa: E731
    assert ep_seconds(w, lay, hw) == pytest.approx(a2a(48) + 2 * a2a(12288))
    heavy = ep_seconds(dataclasses.replace(w, expert_imbalance=1.5), lay, hw)
    assert heavy == pytest.approx(a2a(48) + 2 * a2a(1.5 * 12288))
    full = ep_seconds(w, dataclasses.replace(lay, ac="full"), hw)  # the recomputed forward dispatches again
    assert full == pytest.approx(2 * a2a(48) + 3 * a2a(12288))


def test_expert_gemms_run_at_the_per_expert_token_count():
    cfg = model_config_for("qwen3_30b_a3b")  # 128 experts of 768, top-8, dim 2048
    g = cost_moe.expert_gemms(cfg, 16384, 8)
    # 16384 tokens x 8 slots from each of 8 ranks onto this rank's 16 experts: 8192 rows each
    assert g["w13"] == (32.0, 8192.0, 768, 2048) and g["w2"] == (16.0, 8192.0, 2048, 768)
    assert g["router"] == (1.0, 16384, 128, 2048)
    assert cost_moe.expert_gemms(cfg, 16384, 8, imbalance=1.25)["w13"][1] == 10240.0
    fl = sum(2 * c * m * n * k for c, m, n, k in g.values())
    assert fl == pytest.approx(2 * 16384 * 2048 * (128 + 3 * 8 * 768))  # every slot once, plus the router


def test_moe_time_terms_and_placement():
    w = Workload(model_config_for("gpt_oss_120b"), 4096, 1280, "bf16")
    meg = Stack(fused=True, fsdp=False, fused_attention=True)
    inside = estimate(w, Layout(dp_replicate=64, micro_batch=4, ep=64), get_hardware("gb200_nvl72"), meg)
    across = estimate(w, Layout(dp_replicate=64, micro_batch=4, ep=64), get_hardware("b200"), meg)
    # the same all-to-all inside a 72-GPU NVLink domain and across eight 8-GPU nodes
    assert across.time.exposed["ep"] > 5 * inside.time.exposed["ep"] > 0
    ep8 = estimate(w, Layout(dp_replicate=64, micro_batch=4, ep=8), get_hardware("b200"), meg)
    # ep 8 stays in the node but all-reduces 8x more expert gradients over the network
    assert ep8.time.exposed["ep"] < across.time.exposed["ep"] and ep8.time.exposed["dp_replicate"] > 0
    # dense models have no MoE term; a balanced router costs less than an imbalanced one
    dense = estimate(Workload(model_config_for("llama3_8b"), 4096, 64), Layout(dp_shard=8), get_hardware("h100_sxm"))
    assert "ep" not in dense.time.exposed
    skewed = estimate(dataclasses.replace(w, expert_imbalance=1.3), ep8.layout, get_hardware("b200"), meg)
    assert skewed.time.total > ep8.time.total
    # MoE layers pay the launch-count prior x the fitted scale once per micro-batch (twice under full AC)
    b200 = get_hardware("b200")
    no_tax = estimate(w, ep8.layout, b200, meg, dataclasses.replace(PARAMS, moe_host_scale=0.0))
    per_layer = PARAMS.moe_host_scale * (PARAMS.ops_per_layer_fused + cost_moe.MOE_FFN_EXTRA_LAUNCHES) * 6e-6
    assert b200.host_overhead_s == 6e-6
    assert ep8.time.overhead - no_tax.time.overhead == pytest.approx(per_layer * 36 * ep8.microbatches)
    full = dataclasses.replace(ep8.layout, ac="full")
    full_tax = estimate(w, full, b200, meg).time.overhead - estimate(
        w, full, b200, meg, dataclasses.replace(PARAMS, moe_host_scale=0.0)).time.overhead
    assert full_tax == pytest.approx(2 * per_layer * 36 * ep8.microbatches)


def _launches(module: torch.nn.Module, x: torch.Tensor) -> int:
    """aten ops of module(x) forward + backward that launch a kernel (views and aliases excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"t", "view", "_unsafe_view", "select", "slice", "expand", "unsqueeze", "squeeze", "transpose",
             "detach", "alias", "reshape", "permute", "as_strided", "split", "split_with_sizes"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func.overloadpacket.__name__ not in views
            return func(*args, **(kwargs or {}))

    with Count():
        module(x).float().sum().backward()
    return Count.n


def test_moe_launch_count_of_the_host_prior_is_counted(monkeypatch):
    """cost_moe.MOE_FFN_EXTRA_LAUNCHES is what model/moe.py's MoE FFN (grouped-GEMM experts) under
    parallel/ep.py's exchange launches beyond a dense SwiGLU FFN, forward + backward, each
    all-to-all standing in as one kernel (a copy) in forward and one in backward."""
    from torch.distributed import _functional_collectives as funcol

    from scaletrain.model.moe import MoE
    from scaletrain.model.transformer import FeedForward
    from scaletrain.parallel.ep import TokenExchange

    class AllToAll(torch.autograd.Function):  # one rank: the collective is a copy, both ways
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return g.clone()

    monkeypatch.setattr(funcol, "all_to_all_single", lambda t, out, inp, group: t.clone())
    monkeypatch.setattr(funcol, "all_to_all_single_autograd", lambda t, out, inp, group: AllToAll.apply(t))
    cfg = model_config_for("moe_debug")
    torch.manual_seed(0)
    moe = MoE(cfg, 1)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    moe.experts.backend = "grouped"
    exchange = TokenExchange(None, 1)
    moe.experts.register_forward_pre_hook(exchange.dispatch)
    moe.experts.register_forward_hook(exchange.combine)
    dense = FeedForward(dataclasses.replace(cfg, moe_experts=0, ffn="swiglu"))
    x = torch.randn(2, 32, cfg.dim, requires_grad=True)
    assert _launches(moe, x) - _launches(dense, x.detach().requires_grad_()) == cost_moe.MOE_FFN_EXTRA_LAUNCHES


def test_layout_checker_expert_parallel_rules():
    moe, dense = model_config_for("moe_debug"), model_config_for("debug")
    par = ParallelConfig()
    check_layout(ParallelDims(1, 4, 1, 1, 1, ep=4), par, moe, 256, 8)
    check_layout(ParallelDims(2, 4, 1, 1, 1, ep=2), par, moe, 256, 8)
    with pytest.raises(LayoutError, match=r"does not divide model.moe_experts = 8.*\{1, 2\}"):
        check_layout(ParallelDims(1, 6, 1, 1, 1, ep=3), par, moe, 256, 8)
    with pytest.raises(LayoutError, match=r"dp_shard x parallel.cp = 2 x 1 = 2"):
        check_layout(ParallelDims(2, 2, 1, 1, 1, ep=4), par, moe, 256, 8)
    with pytest.raises(LayoutError, match="dense"):
        check_layout(ParallelDims(1, 2, 1, 1, 1, ep=2), par, dense, 256, 8)
    with pytest.raises(LayoutError, match="parallel.ep=0"):
        check_layout(ParallelDims(1, 2, 1, 1, 1, ep=0), par, moe, 256, 8)


def test_validate_prices_moe_rows_with_gqa_or_mla():
    from scaletrain.plan.validate import Case, case_for_row, read_rows

    rows = read_rows()
    moe = [r for r in rows if r["arch_type"] == "moe"]
    cases = [case_for_row(r) for r in moe]
    assert len(moe) >= 60 and all(isinstance(c, Case) for c in cases)
    by_model = {c.workload.model.n_layers: c.workload.model for c in cases}
    qwen, oss = by_model[48], by_model[36]
    # the CSV has no head width: the registered flavors of these shapes give it (and Qwen3's q/k norms)
    assert (qwen.head_dim, qwen.qk_norm, qwen.moe_experts, qwen.moe_top_k, qwen.moe_ffn_dim) == (128, True, 128, 8, 768)
    assert (oss.head_dim, oss.moe_experts, oss.moe_top_k, oss.moe_ffn_dim) == (64, 128, 4, 2880)
    assert {c.layout.ep for c in cases} >= {8, 16, 64}
    assert {c.hw.name for c in cases} == {"h100_sxm", "b200", "b300", "gb200_nvl72", "gb300_nvl72"}
    assert {(c.workload.precision, c.workload.fp8_recipe) for c in cases} >= {("bf16", "tensorwise"), ("fp8", "mxfp8"),
                                                                              ("fp8", "tensorwise")}
    # multi-head latent attention is priced, MoE or not (tests/unit/test_plan_mla.py prices it)
    dense = next(r for r in rows if r["arch_type"] == "dense" and isinstance(case_for_row(r), Case))
    for row in (moe[0], dense):
        assert case_for_row(dict(row, attention="mla")).workload.model.attention == "mla"
    # an expert-parallel degree the data-parallel ranks cannot hold is the source's inconsistency
    assert "source inconsistent" in case_for_row(dict(moe[0], ep="7"))


def test_megatron_moe_parallel_folding_prices_ep_drawn_from_tensor_parallel_ranks():
    """Megatron-Core's MoE parallel folding (expert tensor parallel 1): a published layout whose
    ep does not divide data x context parallel (Qwen3-30B-A3B on 8 GB200, tp 2, dp 4, ep 8) is
    priced, not called inconsistent: every rank routes its own T / tp tokens over ep consecutive
    ranks, so the all-to-all rows halve against the replicated-over-tp MoE of scaletrain."""
    from scaletrain.plan.validate import case_for_row, predict, read_rows

    row = next(r for r in read_rows() if r["model"].startswith("Qwen3_30B") and r["gpu_type"] == "GB200"
               and r["micro_batch"] == "4")
    case = case_for_row(dict(row, tp="2"))
    assert not isinstance(case, str) and case.stack.moe_folding
    assert (case.layout.tp, case.layout.dp, case.layout.ep) == (2, 4, 8)
    assert cost_moe.check_ep(case.workload.model, case.layout) is not None  # unfolded: ep 8 > dp 4
    assert cost_moe.ep_groups(case.layout, case.stack)["ep"] == (8, 1)
    assert 0 < predict(case).predicted_tokens_per_s_per_gpu < float("inf")
    w, hw = case.workload, case.hw
    folded = ep_seconds(w, case.layout, hw, PARAMS, case.stack)
    tp1 = dataclasses.replace(case.layout, tp=1, dp_replicate=8)
    whole = ep_seconds(w, tp1, hw, PARAMS, case.stack)
    b = moe_dispatch_bytes(w.model, tp1.micro_batch, w.seq_len, 8, 2)
    a2a = lambda x: cost_moe.all_to_all_seconds(x, 8, 1, hw, PARAMS.comm_eff)  # noqa: E731
    assert whole == pytest.approx(a2a(b["counts"]) + a2a(b["dispatch"] + b["combine"])
                                  + a2a(b["combine_grad"] + b["dispatch_grad"]))
    assert folded == pytest.approx(a2a(b["counts"]) + a2a((b["dispatch"] + b["combine"]) / 2)
                                   + a2a((b["combine_grad"] + b["dispatch_grad"]) / 2))
    # a tp 1 row is the same with or without folding (every published MoE row today)
    flat = dataclasses.replace(case.stack, moe_folding=False)
    assert ep_seconds(w, tp1, hw, PARAMS, flat) == pytest.approx(whole)
    assert estimate(w, tp1, hw, flat).time.total == pytest.approx(estimate(w, tp1, hw, case.stack).time.total)
    # folded MoE activations are split by tp: less memory than replicated MoE at tp 2
    assert estimate_memory(w, case.layout, hw, case.stack).total < estimate_memory(w, case.layout, hw, flat).total


def test_folded_expert_shard_matches_its_fsdp_group():
    """Under folding with FSDP (Megatron-FSDP) an expert is split over ep x its FSDP group of
    tp x dp_shard x cp / ep ranks: the memory count and the group the planner prices agree."""
    lay = Layout(dp_shard=8, tp=2, ep=8, micro_batch=1)
    for stack in (Stack(moe_folding=True), Stack(moe_folding=True, fsdp=False), Stack()):
        size, _ = cost_moe.ep_groups(lay, stack)["expert_shard"]
        assert cost_moe.expert_shard(lay, stack) == lay.ep * size
