"""MoE as a model: config checks, initialisation plan, parameter / FLOP / activation counts
against a built model, activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from conftest import main_exit
from scaletrain.config import load_config
from scaletrain.errors import ConfigError
from scaletrain.model import build_model, model_config_for
from scaletrain.model.flops import flops_per_token, forward_flops_per_layer, moe_ffn_activation_bytes, param_counts
from scaletrain.model.moe import MoE
from scaletrain.model.transformer import _feed_forward


@pytest.mark.parametrize("args,needle", [
    (["--model.moe_top_k", "9"], "model.moe_top_k = 9 must be between 1 and model.moe_experts = 8"),
    (["--model.moe_dense_layers", "4"], "model.moe_dense_layers = 4 leaves no MoE layer"),
    (["--model.moe_router", "topk"], "model.moe_router = 'topk' is not one of 'softmax', 'sigmoid'"),
    (["--model.moe_balance", "loss"], "model.moe_balance = 'loss' is not one of"),
    (["--model.moe_capacity_factor", "-1"], "model.moe_capacity_factor must be >= 0"),
    (["--model.ffn", "squared_relu"], "MoE experts are SwiGLU"),
    (["--model.moe_experts", "-2"], "model.moe_experts must be an integer >= 0"),
    (["--model.head_dim", "15"], "head_dim = 15 is odd"),
])
def test_bad_moe_config_names_the_key(args, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["--model.flavor", "moe_debug", *args])
    assert needle in str(info.value)


def test_cli_refuses_bad_moe_config_in_one_line(capsys):
    code, err = main_exit(capsys, "train", "--model.flavor", "moe_debug", "--model.moe_top_k", "0")
    assert code == 2 and "model.moe_top_k = 0 must be between 1" in err and "Traceback" not in err


def _moe_cfg(**kw):
    return model_config_for("moe_debug", qk_norm=True, moe_shared_experts=2, head_dim=24, tie_embeddings=True, **kw)


def test_init_plan_covers_every_parameter_and_buffer_starts_at_zero():
    model = build_model(_moe_cfg(), seed=1)
    plan = {name: shape for name, shape, _ in model.init_plan()}
    params = dict(model.named_parameters())
    assert plan.keys() == params.keys()
    assert all(tuple(params[n].shape) == shape for n, shape in plan.items())
    assert tuple(params["layers.1.feed_forward.experts.w1"].shape) == (8, 64, 64)
    assert tuple(params["layers.1.feed_forward.experts.w2"].shape) == (8, 64, 64)
    assert tuple(params["layers.1.feed_forward.router.gate.weight"].shape) == (8, 64)
    assert tuple(params["layers.1.feed_forward.shared.w1.weight"].shape) == (128, 64)
    assert "layers.0.feed_forward.w1.weight" in params  # moe_dense_layers = 1
    buffers = model.state_dict()
    assert torch.equal(buffers["layers.3.feed_forward.router.expert_bias"], torch.zeros(8))  # persistent


def test_param_counts_match_the_built_model():
    cfg = _moe_cfg()
    model = build_model(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # tied: counted once
    expert = 3 * 64 * 64  # one SwiGLU expert (dim 64, width 64)
    moe_layers = 3
    assert counts["active"] == counts["total"] - moe_layers * (8 - 2) * expert
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert routed == moe_layers * counts["experts_per_moe_layer"] == moe_layers * 8 * expert
    q_norms = sum(p.numel() for n, p in model.named_parameters() if "_norm.weight" in n and "attention." in n)
    assert q_norms == 4 * 2 * 24  # q_norm + k_norm of head_dim 24 in every layer


def test_flops_count_active_experts_by_hand():
    cfg = model_config_for("moe_debug")  # dim 64, 4 layers (1 dense), 8 experts of 64, top-2
    s = 128
    dense = forward_flops_per_layer(cfg, s, layer=0)
    moe = forward_flops_per_layer(cfg, s, layer=1)
    assert dense["ffn"] == 2 * s * 64 * 192 * 3
    assert moe["ffn"] == 2 * s * 64 * 64 * 3 * 2 and moe["router"] == 2 * s * 64 * 8
    assert moe["qkv"] == dense["qkv"] and "router" not in dense
    c = param_counts(cfg)
    assert flops_per_token(cfg, s) == 6 * c["active_non_embedding"] + 12 * 4 * 4 * 16 * s
    # The conventions differ by the norm weights (which torchtitan's counts as matmuls) only.
    norms = 4 * c["norm_per_layer"] + c["final_norm"]
    assert flops_per_token(cfg, s) - flops_per_token(cfg, s, "exact") == pytest.approx(6 * norms)


def test_qwen3_30b_a3b_against_megatron_bridge():
    """Megatron-Bridge's MoE FLOPs (src/megatron/bridge/training/utils/flop_utils.py,
    num_floating_point_operations, GQA branch; the convention of the published Qwen3-30B-A3B rows
    in scaletrain/plan/data/published_training_perf_dev.md), per token: 6 * (h*(q + 2*kv) + q*h) per
    layer for the projections, 6 * q * s/2 * 2 for causal attention (HALF the square), 6*h*f_e*3*k
    per MoE layer for the routed experts, 6*h*V for the head; no router, no norms. Ours (the
    torchtitan convention) differs by exactly the other half of the attention square, the router
    GEMMs and the norm weights."""
    cfg = model_config_for("qwen3_30b_a3b")
    L, h, q, kv, s, fe, k, V, E = 48, 2048, 32 * 128, 4 * 128, 4096, 768, 8, 151936, 128
    megatron = 6 * L * (h * (q + 2 * kv) + q * h) + 6 * L * q * s / 2 * 2 + 6 * h * fe * 3 * k * L + 6 * h * V
    attention_half = 6 * L * q * s
    router = 6 * L * h * E
    norms = 6 * (L * (2 * h + 2 * 128) + h)
    ours = flops_per_token(cfg, s)
    assert ours == pytest.approx(megatron + attention_half + router + norms, rel=1e-12)
    assert (round(megatron / 1e9, 2), round(ours / 1e9, 2)) == (23.01, 27.91)  # GFLOP per token


def test_moe_activation_bytes_match_saved_tensors_in_fp32():
    cfg = model_config_for("moe_debug", moe_shared_experts=1)
    with torch.device("meta"):
        ffn = _feed_forward(cfg, 1)
    ffn.to_empty(device="cpu")
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ffn.router.expert_bias.zero_()
    x = torch.randn(2, 16, cfg.dim, requires_grad=True)
    own = {p.untyped_storage().data_ptr() for p in ffn.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:  # weights and the layer's input are counted elsewhere
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ffn(x)
    assert sum(saved.values()) == moe_ffn_activation_bytes(cfg, 2, 16, dtype_bytes=4) == 134_336


def test_full_activation_checkpointing_counts_each_batch_once():
    from scaletrain.parallel.ac import apply_ac

    cfg = model_config_for("moe_debug")
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = []
    for ac in ("none", "full"):
        model = apply_ac(build_model(cfg, seed=5), ac)
        model(tokens).float().logsumexp(-1).mean().backward()  # "full" re-runs every block in backward
        stats.append([m.pop_stats() for m in model.modules() if isinstance(m, MoE)])
    for plain, checkpointed in zip(*stats):
        assert torch.equal(plain, checkpointed) and checkpointed[-1].item() == 1.0  # one forward pass
