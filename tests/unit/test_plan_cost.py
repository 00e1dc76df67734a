"""Cost-model formulas against hand-computed cases (plan/cost.py)."""

import pytest

from scaletrain.config.flavors import model_config_for
from scaletrain.model.flops import flops_per_token, param_counts
from scaletrain.plan.cost import PARAMS, Layout, Stack, Workload, axis_link, collective_time, estimate, estimate_memory, gemm_time
from scaletrain.plan.hardware import GB, get_hardware


def test_ring_collectives_alpha_beta():
    bw, a, eff = 100e9, 1e-5, PARAMS.comm_eff
    # all-gather over 4 ranks of a 1 GB buffer: 3 steps of latency + 3/4 of the bytes
    assert collective_time("all_gather", 1e9, 4, bw, a) == pytest.approx(3e-5 + 0.75e9 / (bw * eff))
    assert collective_time("reduce_scatter", 1e9, 4, bw, a) == pytest.approx(3e-5 + 0.75e9 / (bw * eff))
    # big all-reduce: the ring (2x the all-gather) beats the tree
    assert collective_time("all_reduce", 1e9, 4, bw, a) == pytest.approx(6e-5 + 1.5e9 / (bw * eff))
    # tiny all-reduce over many ranks: the tree's 2*log2(n) latency steps win
    n = 1024
    assert collective_time("all_reduce", 8.0, n, bw, a) == pytest.approx(2 * 10 * a + 16 / (bw * eff))
    assert collective_time("all_gather", 1e9, 1, bw, a) == 0.0
    assert collective_time("send", 1e6, 2, bw, a) == pytest.approx(a + 1e6 / (bw * eff))


def test_axis_placement_intra_vs_inter_node():
    hw = get_hardware("h100_sxm")  # 8 GPUs/node, 450 GB/s NVLink, 50 GB/s per-GPU IB
    lay = Layout(dp_shard=16, tp=8)
    assert axis_link(lay, ("tp",), hw) == (hw.intra_bw, hw.intra_latency)
    # dp_shard spans nodes with one member per node: one NIC per ring
    assert axis_link(lay, ("dp_shard", "cp"), hw) == (hw.inter_bw, hw.inter_latency)
    # 16-way FSDP without TP: 8 members per node drive 8 NICs in parallel
    assert axis_link(Layout(dp_shard=16), ("dp_shard", "cp"), hw)[0] == pytest.approx(min(hw.intra_bw, 8 * hw.inter_bw))
    assert axis_link(Layout(dp_shard=8), ("dp_shard", "cp"), hw)[0] == hw.intra_bw


def test_gemm_efficiency_curve_and_roofline():
    hw = get_hardware("h100_sxm")
    # the device's measured best-shape fraction (MAMF) x the fitted in-training factor x the shape curve
    eff = hw.mamf["bf16"] * PARAMS.mamf_scale * 1000 / (1000 + PARAMS.matmul_half_dim)
    assert gemm_time(1000, 1000, 1000, 1e15, hw) == pytest.approx(2e9 / (1e15 * eff))
    eff8 = hw.mamf["fp8"] * PARAMS.mamf_scale * 1000 / (1000 + PARAMS.matmul_half_dim)
    assert gemm_time(1000, 1000, 1000, 2e15, hw, precision="fp8") == pytest.approx(2e9 / (2e15 * eff8))
    # a skinny GEMM is memory bound: bytes / bandwidth (1-byte operands in fp8)
    assert gemm_time(1, 8192, 8192, 1e15, hw) == pytest.approx(2 * (8192 + 8192 * 8192 + 8192) / hw.hbm_bw)
    assert gemm_time(1, 8192, 8192, 1e18, hw, precision="fp8") == pytest.approx((8192 + 8192 * 8192 + 8192) / hw.hbm_bw)
    # a device the MAMF table does not list uses Params.mamf_default
    assert gemm_time(4000, 4000, 4000, 1e15, get_hardware("l40s")) == pytest.approx(
        1.28e11 / (1e15 * PARAMS.mamf_default * PARAMS.mamf_scale * 4000 / (4000 + PARAMS.matmul_half_dim)))


def _w(flavor="llama3_8b", seq=4096, gb=64, precision="bf16"):
    return Workload(model_config_for(flavor), seq, gb, precision)


def test_memory_sharding_by_hand():
    w = _w()
    hw = get_hardware("h100_sxm")
    p = param_counts(w.model)["total"]
    mem = estimate_memory(w, Layout(dp_shard=8), hw)
    # FSDP: fp32 weights, fp32 grads, Adam m+v sharded over dp_shard*cp
    assert mem.weights == pytest.approx(4 * p / 8)
    assert mem.grads == pytest.approx(4 * p / 8)
    assert mem.optimizer == pytest.approx(8 * p / 8)
    mem_cp = estimate_memory(w, Layout(dp_shard=4, cp=2), hw)
    assert mem_cp.optimizer == pytest.approx(8 * p / 8)
    mem_tp = estimate_memory(w, Layout(dp_shard=4, tp=2), hw)
    assert mem_tp.optimizer == pytest.approx(8 * p / 8)
    assert mem.fragmentation == pytest.approx(PARAMS.fragmentation * (mem.total - mem.fragmentation))


def test_activation_checkpointing_trades_memory_for_time():
    w, hw = _w(), get_hardware("h100_sxm")
    by_ac = {ac: estimate(w, Layout(dp_shard=8, ac=ac), hw) for ac in ("none", "selective", "full")}
    assert by_ac["full"].memory.activations < by_ac["selective"].memory.activations < by_ac["none"].memory.activations
    assert by_ac["full"].time.compute > by_ac["selective"].time.compute > by_ac["none"].time.compute


def test_pipeline_bubble_matches_formula():
    w, hw = _w(gb=32), get_hardware("h100_sxm")
    for sched, v in (("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 2)):
        e = estimate(w, Layout(pp=4, pp_schedule=sched, virtual_stages=v), hw)
        m = e.microbatches
        assert m == 32
        # no TP/CP/FSDP comm, so the stage time is the compute per micro-batch
        assert e.time.bubble / e.time.compute == pytest.approx((4 - 1) / (v * m))


def test_throughput_and_mfu_definitions():
    w, hw = _w(), get_hardware("h100_sxm")
    e = estimate(w, Layout(dp_shard=8), hw)
    assert e.tokens_per_s_per_gpu == pytest.approx(w.global_batch * w.seq_len / e.time.total / 8)
    assert e.mfu == pytest.approx(flops_per_token(w.model, w.seq_len) * e.tokens_per_s_per_gpu / hw.peak_flops["bf16"])
    assert 0.2 < e.mfu < 0.8


def test_framework_tax_dominates_tiny_models():
    w, hw = _w("debug", seq=256, gb=8), get_hardware("h100_sxm")
    e = estimate(w, Layout(dp_shard=1), hw)
    assert e.time.overhead > e.time.compute  # launch-bound: the GPU waits for the CPU
    fused = estimate(w, Layout(dp_shard=1), hw, Stack(fused=True))
    assert fused.time.total < e.time.total


# A measured CPU execution model as `plan calibrate` writes it on a CPU (calibrate.cpu_execution_model).
_CPU = {"gemm": [[1024, 64, 64, 5e10], [4096, 64, 64, 8e10], [1024, 512, 64, 4e10]],
        "attention": [[128, 1e10], [256, 2e10]], "elementwise": [[1e6, 5e9], [1e8, 1e10]],
        "ops": {"fwd_per_layer": 80, "bwd_per_layer": 140, "fixed": 50}, "op_s": 5e-6,
        "optimizer_fixed_s": 1e-4, "optimizer_s_per_param": 5e-9}


def _cpu_hw(**kw):
    import dataclasses

    base = get_hardware("h100_sxm")
    return dataclasses.replace(base, name="calibrated:cpu:test", calibrated=True, cpu=_CPU, **kw)


def test_cpu_model_only_for_calibrated_profiles():
    import dataclasses

    m = model_config_for("debug")
    w, lay = Workload(m, 128, 8, "fp32"), Layout(micro_batch=8)
    gpu = get_hardware("h100_sxm")
    # the cpu terms are ignored unless the profile is calibrated: a catalog entry is unchanged
    assert estimate(w, lay, dataclasses.replace(gpu, cpu=_CPU)).time.total == estimate(w, lay, gpu).time.total
    assert gemm_time(1024, 64, 64, 1e12, gpu) == gemm_time(1024, 64, 64, 1e12, dataclasses.replace(gpu, cpu=_CPU))
    hw = _cpu_hw()
    # measured rate at the nearest shape, no efficiency curve, no roofline floor
    assert gemm_time(4096, 64, 64, 1e12, hw) == pytest.approx(2 * 4096 * 64 * 64 / 8e10)
    assert gemm_time(1000, 500, 64, 1e12, hw) == pytest.approx(2 * 1000 * 500 * 64 / 4e10)
    e = estimate(w, lay, hw)
    # no fixed 20 ms: counted ops x measured seconds per op (2 layers + fixed), and the measured optimizer
    assert e.time.overhead == pytest.approx((2 * (80 + 140) + 50) * 5e-6)
    assert e.time.optimizer == pytest.approx(1e-4 + param_counts(m)["total"] * 5e-9)
    full = estimate(w, Layout(micro_batch=8, ac="full"), hw)
    assert full.time.overhead == pytest.approx((2 * (80 + 140 + 80) + 50) * 5e-6)
    assert full.time.compute > e.time.compute


# ---- memory: saved tensors and the three candidate peaks (docs/planner.md "Memory per GPU") ----


def _cpu_device():
    from scaletrain.plan.hardware import Hardware

    return Hardware("cpu", {"fp32": 1e11}, 64 * GB, 1e10, 1, 1e10, 0.0, 1e10, 0.0)


def test_saved_activation_bytes_by_hand():
    from scaletrain.model.flops import (backward_transient_bytes, head_activation_bytes, loss_activation_bytes,
                                        recompute_bytes, saved_activation_bytes)

    m = model_config_for("debug")  # d 64, q 64 (4 heads x 16), kv 32, f 192, vocab 512
    b, s, B = 2, 128, 4
    T = b * s  # 256 tokens
    norms = 2 * T * 64 * B + 2 * T * 4  # inputs x and h + 1/rms
    linear_in = 2 * T * 64 * B  # wq/wk/wv and w1/w3 inputs
    attn = 4 * T * 64 * B + b * 4 * s * 4  # q, k, v (repeated), O (= wo's input, a view) + logsumexp
    ffn = 4 * T * 192 * B  # w1 out, silu, w3 out, w2 input
    none = norms + linear_in + attn + ffn
    assert none == 1_316_864
    assert saved_activation_bytes(m, b, s, B) == none
    assert saved_activation_bytes(m, b, s, B, decomposed_norm=True) == none + 2 * T * 64 * B  # CPU eager RMSNorm
    assert saved_activation_bytes(m, b, s, B, fused=True) == none - T * 192 * B  # silu recomputed
    # TP 2 with sequence parallelism: the all-gathered linear inputs are saved whole
    assert saved_activation_bytes(m, b, s, B, tp=2) == (norms + attn + ffn) / 2 + linear_in
    sel = norms + T * 64 * B + T * 64 * B + ffn
    assert saved_activation_bytes(m, b, s, B, "selective") == sel
    assert saved_activation_bytes(m, b, s, B, "full") == T * 64 * B
    assert saved_activation_bytes(m, b, s, B, "full", tp=2) == T * 64 * B / 2
    # torchtitan op SAC: block input + wq, wv, w1, w2 outputs + O and logsumexp
    assert saved_activation_bytes(m, b, s, B, "op") == T * (64 + 64 + 32 + 192 + 64 + 64) * B + b * 4 * s * 4
    assert head_activation_bytes(m, b, s, B) == 2 * T * 64 * B + T * 4
    assert head_activation_bytes(m, b, s, B, decomposed_norm=True) == 3 * T * 64 * B + T * 4
    tv = T * 512
    assert loss_activation_bytes(m, b, s, B) == 12 * tv  # 3 fp32 [T, V]: log-probs, NLL grad, its grad
    assert loss_activation_bytes(m, b, s, 2) == 12 * tv  # whatever the logits dtype
    assert loss_activation_bytes(m, b, s, B, compiled=True) == 2 * B * tv  # logits + their gradient
    assert loss_activation_bytes(m, b, s, 2, vocab_shards=2) == 16 * tv / 2  # torch loss_parallel
    assert backward_transient_bytes(m, b, s, B) == T * (2 * 192 + 64) * B
    assert recompute_bytes(m, b, s, B, "none") == 0
    assert recompute_bytes(m, b, s, B, "full") == none - T * 64 * B
    assert recompute_bytes(m, b, s, B, "selective") == attn
    with pytest.raises(ValueError, match="activation checkpointing"):
        saved_activation_bytes(m, b, s, B, "some")


def test_memory_peak_is_the_largest_of_loss_layer_and_optimizer_moments():
    from scaletrain.model.flops import (backward_transient_bytes, head_activation_bytes, loss_activation_bytes,
                                        recompute_bytes, saved_activation_bytes)

    m = model_config_for("debug")
    c = param_counts(m)
    P, p_layer = c["total"], c["attention_per_layer"] + c["ffn_per_layer"] + c["norm_per_layer"]
    head_params = (c["output"] or c["embedding"]) + c["final_norm"]
    cpu = _cpu_device()
    w = Workload(m, 128, 2, "fp32")
    # no AC: the start of backward (all saved tensors + the final norm/head + 3 fp32 [T, V]) wins;
    # no gradient exists yet in a one-micro-batch step; eager CPU RMSNorm keeps the normalised x
    mem = estimate_memory(w, Layout(micro_batch=2), cpu)
    acts = 2 * saved_activation_bytes(m, 2, 128, 4, decomposed_norm=True)
    assert mem.phase == "loss" and mem.grads == 0 and mem.buffers == 0
    assert mem.activations == pytest.approx(acts + head_activation_bytes(m, 2, 128, 4, decomposed_norm=True)
                                            + loss_activation_bytes(m, 2, 128, 4))
    assert (mem.weights, mem.optimizer) == (4 * P, 8 * P)
    assert mem.allocated == pytest.approx(mem.total - mem.fragmentation)
    # full AC: one layer's backward, re-materialising it, with the head's and that layer's gradients
    full = estimate_memory(w, Layout(micro_batch=2, ac="full"), cpu)
    assert full.phase == "layer backward"
    assert full.grads == pytest.approx(4 * (p_layer + head_params))
    recompute = recompute_bytes(m, 2, 128, 4, "full", decomposed_norm=True)
    assert full.activations == pytest.approx(2 * 2 * 128 * 64 * 4 + recompute + backward_transient_bytes(m, 2, 128, 4))
    # tiny activations: the optimizer step (all gradients + foreach AdamW's fp32 temporary) wins
    opt = estimate_memory(Workload(m, 8, 1, "fp32"), Layout(micro_batch=1), cpu)
    assert opt.phase == "optimizer step" and opt.activations == 0
    assert (opt.grads, opt.buffers) == (4 * P, 4 * P)
    # the same on a GPU: fused AdamW (no temporary), fused RMSNorm kernel (no normalised x)
    gpu = estimate_memory(Workload(m, 8, 1, "fp32"), Layout(micro_batch=1), get_hardware("h100_sxm"))
    assert gpu.buffers == 0
    g = estimate_memory(w, Layout(micro_batch=2), get_hardware("h100_sxm"))
    assert g.activations == pytest.approx(mem.activations - 5 * 2 * 128 * 64 * 4)  # 2 norms x 2 layers + final
    # gradient accumulation: earlier micro-batches' gradients are alive at every moment
    acc = estimate_memory(Workload(m, 128, 4, "fp32"), Layout(micro_batch=2), cpu)
    assert acc.grads == 4 * P


def test_fsdp_gathered_units_and_loss_switches():
    m = model_config_for("debug")
    c = param_counts(m)
    p_layer = c["attention_per_layer"] + c["ffn_per_layer"] + c["norm_per_layer"]
    cpu = _cpu_device()
    w = Workload(m, 128, 4, "fp32")
    mem = estimate_memory(w, Layout(dp_shard=2, micro_batch=2), cpu)
    # current + prefetched layer and the root unit (embedding, output, final norm) all-gathered
    assert mem.buffers == pytest.approx(4 * (2 * p_layer + c["embedding"] + c["output"] + c["final_norm"]))
    assert mem.weights == pytest.approx(4 * c["total"] / 2)
    # replicate-only (HSDP with shard 1) is FSDP2 too: the same gathered copies
    rep = estimate_memory(w, Layout(dp_replicate=2, micro_batch=2), cpu)
    assert rep.buffers == mem.buffers and rep.weights == 4 * c["total"]
    # scaletrain computes the loss on replicated logits under TP; a compiled loss keeps 2 tensors
    tp = Layout(tp=2, micro_batch=2)
    w2 = Workload(m, 128, 2, "fp32")
    par = estimate_memory(w2, tp, cpu, Stack(loss_parallel=True))
    rep_logits = estimate_memory(w2, tp, cpu, Stack(loss_parallel=False))
    T, V = 256, 512
    assert rep_logits.activations - par.activations == pytest.approx(12 * T * V - 16 * T * V / 2)
    comp = estimate_memory(w2, Layout(micro_batch=2), cpu, Stack(fused=True, compiled_loss=True))
    eager = estimate_memory(w2, Layout(micro_batch=2), cpu, Stack(fused=True))
    assert eager.activations - comp.activations == pytest.approx(12 * T * V - 8 * T * V)


def test_pipeline_with_fsdp_holds_unsharded_fp32_gradients_of_the_stage():
    """torch.distributed.pipelining turns FSDP's gradient sync off until the last micro-batch
    (stage.py backward_maybe_with_nosync): the stage's gradients accumulate unsharded in fp32."""
    w, hw = _w(gb=32), get_hardware("h100_sxm")
    pp = estimate_memory(w, Layout(dp_shard=4, pp=2, micro_batch=1), hw)
    no_fsdp = estimate_memory(w, Layout(pp=2, micro_batch=1), hw)
    assert pp.grads == pytest.approx(no_fsdp.grads)  # 4 B x the stage's parameters, not / dp_shard
    assert pp.weights == pytest.approx(no_fsdp.weights / 4)


def test_interleaved_never_holds_more_micro_batches_than_the_step_has():
    w, hw = _w(gb=16), get_hardware("h100_sxm")
    few = Layout(pp=4, pp_schedule="interleaved_1f1b", virtual_stages=2, micro_batch=4)  # 4 micro-batches
    plain = Layout(pp=4, pp_schedule="1f1b", micro_batch=4)
    assert estimate_memory(w, few, hw).activations == pytest.approx(estimate_memory(w, plain, hw).activations)
