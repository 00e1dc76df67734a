"""Cost-model formulas against hand-computed cases (plan/cost.py)."""

import math

import pytest

from scaletrain.model.flavors import model_config_for
from scaletrain.model.flops import flops_per_token, param_counts
from scaletrain.plan.cost import PARAMS, Layout, Stack, Workload, axis_link, collective_time, estimate, estimate_memory, gemm_time
from scaletrain.plan.hardware import CATALOG, GB, get_hardware


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
    eff = PARAMS.matmul_eff_max * 1000 / (1000 + PARAMS.matmul_half_dim)
    assert gemm_time(1000, 1000, 1000, 1e15, hw) == pytest.approx(2e9 / (1e15 * eff))
    # a skinny GEMM is memory bound: bytes / bandwidth
    assert gemm_time(1, 8192, 8192, 1e15, hw) == pytest.approx(2 * (8192 + 8192 * 8192 + 8192) / hw.hbm_bw)


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


def test_catalog_has_sources_and_sane_units():
    for name in ("a100_40gb", "a100_80gb", "h100_sxm", "h100_pcie", "h200", "b200", "mi300x", "l40s"):
        hw = CATALOG[name]
        assert hw.source and hw.peak_flops["bf16"] > 1e14
        assert 10 * GB < hw.hbm_bytes < 300 * GB and hw.inter_bw <= hw.intra_bw
        assert math.isfinite(hw.attn_eff) and 0 < hw.attn_eff < 1


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
