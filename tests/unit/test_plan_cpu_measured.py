"""Measured CPU block/head times (plan/cpu_measured.py) and how cost.py uses them."""

from __future__ import annotations

import dataclasses

import pytest

from scaletrain.config.flavors import model_config_for
from scaletrain.plan.cost import Layout, Stack, Workload, estimate
from scaletrain.plan.cpu_measured import _fit, block_seconds, head_seconds, measured_block_key
from scaletrain.plan.hardware import get_hardware


def _law(t, s):  # 0.5 ms dispatch + 10 us per token + 20 ns per token per context token
    return 5e-4 + 1e-5 * t + 2e-8 * t * s


POINTS = [[t, s, _law(t, s)] for s in (128, 256, 512) for t in (1024, 4096)]


def test_fit_reproduces_and_extrapolates_the_block_law():
    for t, s in ((1024, 128), (2048, 384), (16384, 512), (512, 1024)):
        assert block_seconds(POINTS, t, s) == pytest.approx(_law(t, s), rel=1e-9)
    head = [[t, 1e-3 + 2e-6 * t] for t in (1024, 4096)]
    assert head_seconds(head, 8192) == pytest.approx(1e-3 + 2e-6 * 8192)


def test_one_slow_point_is_averaged_not_reproduced():
    noisy = [list(p) for p in POINTS]
    noisy[2][2] *= 1.4  # (1024, 256) measured during a slow spell: +40%
    got = block_seconds(noisy, 1024, 256)
    assert _law(1024, 256) < got < 1.2 * _law(1024, 256)  # pulled towards the other five points
    assert block_seconds(noisy, 4096, 512) == pytest.approx(_law(4096, 512), rel=0.15)


def test_fit_keeps_coefficients_non_negative():
    # time falls with the context: an unconstrained fit would give a negative attention term
    pts = [[1024, 128, 0.010], [1024, 512, 0.009], [4096, 128, 0.040], [4096, 512, 0.036]]
    c, a, b = _fit([[1.0, t, t * s] for t, s, _ in pts], [x for *_, x in pts])
    assert min(c, a, b) >= 0 and b == 0
    assert block_seconds(pts, 2048, 256) == pytest.approx(0.019, rel=0.1)


def test_which_measured_block_prices_a_layout():
    cpu = {"blocks": {"none": [[1, 1, 1.0]], "full": [[1, 1, 1.0]], "selective": [[1, 1, 1.0]]}}
    assert measured_block_key(cpu, "none", False, 1, 1) == "none"
    assert measured_block_key(cpu, "full", False, 1, 1) == "full"
    assert measured_block_key(cpu, "op", False, 1, 1) is None  # torchtitan's op SAC is not measured
    assert measured_block_key(cpu, "none", False, 2, 1) is None  # TP shards the block: composed terms
    assert measured_block_key(cpu, "none", False, 1, 2) is None  # CP: its attention is not measured
    assert measured_block_key(cpu, "none", True, 1, 1) is None  # compiled, but not measured compiled
    cpu["blocks"]["compiled"] = [[1, 1, 0.5]]
    assert measured_block_key(cpu, "none", True, 1, 1) == "compiled"
    assert measured_block_key(cpu, "full", True, 1, 1) is None  # compiled blocks measured without AC
    assert measured_block_key(None, "none", False, 1, 1) is None


_CPU = {"gemm": [[1024, 64, 64, 5e10]], "attention": [[128, 1e10]], "elementwise": [[1e6, 5e9], [1e8, 1e10]],
        "ops": {"fwd_per_layer": 80, "bwd_per_layer": 140, "fixed": 50}, "op_s": 5e-6,
        "optimizer_fixed_s": 1e-4, "optimizer_s_per_param": 5e-9,
        "blocks": {"none": [[1024, 128, 0.010], [4096, 128, 0.040]],
                   "full": [[1024, 128, 0.015], [4096, 128, 0.060]],
                   "selective": [[1024, 128, 0.012], [4096, 128, 0.048]],
                   "compiled": [[1024, 128, 0.008], [4096, 128, 0.032]]},
        "head": [[1024, 0.004], [4096, 0.016]], "head_compiled": [[1024, 0.003], [4096, 0.012]], "head_ops": 45}


def _hw():
    return dataclasses.replace(get_hardware("h100_sxm"), name="calibrated:cpu:test", calibrated=True, cpu=_CPU)


def test_step_time_from_the_measured_block_and_head():
    m = model_config_for("debug")  # 2 layers
    w = Workload(m, 128, 16, "fp32")
    e = estimate(w, Layout(micro_batch=8), _hw())  # 2 micro-batches of 1024 tokens
    assert e.time.compute == pytest.approx(2 * (2 * 0.010 + 0.004))
    # no op term for measured blocks; outside them the ops not in the measured head: 50 - 45
    assert e.time.overhead == pytest.approx(2 * 5 * 5e-6)
    full = estimate(w, Layout(micro_batch=8, ac="full"), _hw())
    assert full.time.compute == pytest.approx(2 * (2 * 0.015 + 0.004))
    sel = estimate(Workload(m, 128, 8, "fp32"), Layout(micro_batch=8, ac="selective"), _hw())
    assert sel.time.compute == pytest.approx(2 * 0.012 + 0.004)
    comp = estimate(Workload(m, 128, 8, "fp32"), Layout(micro_batch=8), _hw(), Stack(fused=True, compiled_loss=True))
    assert comp.time.compute == pytest.approx(2 * 0.008 + 0.003)
    big = estimate(Workload(m, 128, 32, "fp32"), Layout(micro_batch=32), _hw())  # 4096 tokens
    assert big.time.compute == pytest.approx(2 * 0.040 + 0.016)


def test_tp_and_unmeasured_modes_use_the_composed_terms():
    """A layout no measured block describes (op-level SAC, TP, ...) is priced exactly as by a
    profile without blocks: the composed GEMM + attention + elementwise + op terms."""
    m = model_config_for("debug")
    w = Workload(m, 128, 8, "fp32")
    no_blocks = dataclasses.replace(_hw(), cpu={k: v for k, v in _CPU.items() if k != "blocks"})
    for lay in (Layout(micro_batch=8, ac="op"), Layout(tp=2, micro_batch=8)):
        a, b = estimate(w, lay, _hw()), estimate(w, lay, no_blocks)
        assert a.time.compute == pytest.approx(b.time.compute) and a.time.overhead == pytest.approx(b.time.overhead)
        assert a.time.overhead > 0  # the composed op term is back
    # under TP the head is sharded: the unsharded measured head does not apply either
    no_head = dataclasses.replace(_hw(), cpu={k: v for k, v in _CPU.items() if k not in ("blocks", "head")})
    tp = Layout(tp=2, micro_batch=8)
    assert estimate(w, tp, _hw()).time.compute == pytest.approx(estimate(w, tp, no_head).time.compute)


def test_compiled_cases_are_timed_last_on_the_wall_clock(monkeypatch):
    """Inductor's helper threads are charged to the process CPU clock, so every eager case is
    timed before any compiled one, and compiled ones use the wall clock."""
    import time

    from scaletrain.plan import calibrate_cpu

    calls = []
    monkeypatch.setattr(calibrate_cpu, "block_timings",
                        lambda model, tokens, variants=calibrate_cpu.EAGER_BLOCKS: calls.append(variants)
                        or {v: [[1024, 128, 0.01]] for v in variants})
    monkeypatch.setattr(calibrate_cpu, "head_timings",
                        lambda model, tokens, compiled=False: calls.append("head_compiled" if compiled else "head")
                        or ({"head_compiled": []} if compiled else {"head": [], "head_ops": 1}))
    out = calibrate_cpu._measured_blocks(model_config_for("debug"), (1024,), compile=True)
    assert calls == [calibrate_cpu.EAGER_BLOCKS, "head", ("compiled",), "head_compiled"]
    assert set(out["blocks"]) == {"none", "full", "selective", "compiled"} and "head_compiled" in out
    calls.clear()
    assert "compiled" not in calibrate_cpu._measured_blocks(model_config_for("debug"), (1024,), compile=False)["blocks"]
    assert calls == [calibrate_cpu.EAGER_BLOCKS, "head"]
    assert calibrate_cpu._clock_for(True) is time.perf_counter
