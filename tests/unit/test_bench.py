"""scaletrain bench: warm-up exclusion and averaging, phase timing, profiler trace reduction,
the torchtitan peer's job translation and log parsing, results file."""

from __future__ import annotations

import math

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest

from scaletrain.bench import peer, phases, stats, tax
from scaletrain.bench.results import append_result, format_report, read_results
from scaletrain.config import load_config
from scaletrain.errors import ConfigError


def test_steady_state_excludes_warmup_and_averages_the_window():
    times = [5.0, 3.0, 1.0, 2.0, 3.0]  # two warm-up steps (compile) then 1, 2, 3 s
    s = stats.steady_state(times, warmup=2, tokens_per_step=100, flops_per_token=10.0, peak_flops=1000.0,
                           n_devices=2)
    assert s.steps == 3 and s.window_s == 6.0 and s.mean_s == 2.0 and s.median_s == 2.0
    assert s.min_s == 1.0 and s.max_s == 3.0
    assert s.tokens_per_s == pytest.approx(300 / 6)  # 3 steps x 100 tokens in 6 s
    assert s.tflops == pytest.approx(50 * 10 / 1e12)
    assert s.mfu == pytest.approx(50 * 10 / (1000 * 2))
    assert s.stdev_s == pytest.approx(1.0) and s.cv == pytest.approx(0.5)


def test_steady_state_uses_the_synchronised_window_when_given():
    s = stats.steady_state([9.0, 1.0, 1.0], warmup=1, tokens_per_step=10, flops_per_token=1.0, peak_flops=None,
                           window_s=2.5)  # the device finished 0.5 s after the last host sync
    assert s.mean_s == 1.25 and s.tokens_per_s == pytest.approx(20 / 2.5) and s.mfu is None


def test_step_counts_are_checked():
    stats.check_counts(0, 20)
    stats.check_counts(3, 1, allow_short=True)
    with pytest.raises(ConfigError, match="--steps must be >= 20"):
        stats.check_counts(10, 19)
    with pytest.raises(ConfigError, match="--warmup"):
        stats.check_counts(-1, 30)
    with pytest.raises(ConfigError, match="no measured steps"):
        stats.steady_state([1.0, 2.0], warmup=2, tokens_per_step=1, flops_per_token=1, peak_flops=None)


def test_phase_timer_books_time_to_the_phase_that_ends(monkeypatch):
    import torch

    clock = iter([0.0, 1.0, 3.0, 6.0,   # step 1: begin, data ends at 1, forward at 3, backward at 6
                  7.0, 8.0, 10.0, 13.0])  # step 2 starts 1 s after step 1's last mark
    monkeypatch.setattr(phases.time, "perf_counter", lambda: next(clock))
    t = phases.PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        t.begin_step()
        for name in ("data", "forward", "backward"):
            t.mark(name)
        t.end_step()
    assert t.summary() == {"data": 1.0, "forward": 2.0, "backward": 3.0, "between steps": 1.0}


def test_union_length_counts_overlaps_once():
    assert tax.union_length([]) == 0.0
    assert tax.union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4.0


def test_summarize_trace_gpu_idle_and_launches():
    steps = [(0.0, 1000.0), (1000.0, 2000.0)]  # us
    kernels = [(100.0, 600.0), (500.0, 900.0), (1200.0, 2100.0)]  # last one ends after the host
    out = tax.summarize_trace(steps, kernels, [10.0, 20.0, 30.0], aten_ops=50, has_device=True)
    # window 0..2100 us = 1050 us/step; busy = 800 + 900 = 1700 us = 850 us/step
    assert out["wall_s"] == pytest.approx(1050e-6) and out["gpu_busy_s"] == pytest.approx(850e-6)
    assert out["gpu_idle_s"] == pytest.approx(200e-6) and out["gpu_idle_fraction"] == pytest.approx(200 / 1050)
    assert out["launch_s"] == pytest.approx(30e-6) and out["kernels_per_step"] == 1.5 and out["ops_per_step"] == 25
    cpu = tax.summarize_trace(steps, [], [], aten_ops=10, has_device=False)
    assert cpu["gpu_busy_s"] is None and cpu["wall_s"] == pytest.approx(1000e-6)


def _titan_ffn_width(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """torchtitan 0.2.2's FeedForward hidden width for `dim` (llama3/model/model.py): the oracle."""
    h = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


@pytest.mark.parametrize("dim,ffn_dim", [(2048, 8192), (64, 192), (4096, 14336), (8192, 28672), (512, 1024),
                                         (768, 2048), (3072, 1000)])
def test_titan_ffn_args_reproduce_our_ffn_width(dim, ffn_dim):
    args = peer.titan_ffn_args(dim, ffn_dim)
    assert _titan_ffn_width(dim, args["multiple_of"], args["ffn_dim_multiplier"]) == ffn_dim


def test_titan_job_matches_the_config():
    cfg = load_config("configs/anchor_1b.toml", ["--parallel.ac", "selective"])
    job = tomllib.loads(peer.job_toml(cfg, steps=40, log_freq=5, dump_folder="/tmp/x"))
    t = job["training"]
    assert (t["local_batch_size"], t["seq_len"], t["steps"], t["max_norm"]) == (8, 2048, 40, 1.0)
    assert job["optimizer"] == {"name": "AdamW", "lr": 3e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
                                "weight_decay": 0.1, "implementation": "fused"}
    assert job["compile"]["enable"] is True and job["activation_checkpoint"]["mode"] == "selective"
    assert job["model"]["flavor"] == peer.FLAVOR and job["model"]["converters"] == []
    args = peer.model_args(cfg)
    assert (args["dim"], args["n_layers"], args["n_heads"], args["n_kv_heads"], args["vocab_size"]) == (2048, 16, 32, 8, 2048)
    fp8 = tomllib.loads(peer.job_toml(load_config("configs/anchor_1b.toml", ["--train.precision", "fp8",
                                                                             "--train.fp8_recipe", "rowwise"]), 40, 5, "/x"))
    assert fp8["model"]["converters"] == ["quantize.linear.float8"]
    assert fp8["quantize"]["linear"]["float8"]["recipe_name"] == "rowwise"


TITAN_LOG = """\
[titan] 2026-11-23 10:00:00,000 - root - INFO - Training starts at step 1
[titan] 2026-11-23 10:00:10,000 - root - INFO - step:  1  loss:  7.9  grad_norm:  3.1  memory: 26.06GiB(32.9%)  tps: 1,162  tflops: 7.75  mfu: 0.78%
[titan] 2026-11-23 10:00:11,000 - root - INFO - step:  5  loss:  5.7  grad_norm:  1.1  memory: 33.45GiB(42.2%)  tps: 46,724  tflops: 311.62  mfu: 31.51%
[titan] 2026-11-23 10:00:12,000 - root - INFO - \x1b[31mstep: 10  loss:  3.6  grad_norm:  0.9  memory: 33.45GiB(42.2%)  tps: 74,000  tflops: 496.00  mfu: 50.00%\x1b[39m
[titan] 2026-11-23 10:00:13,000 - root - INFO - step: 15  loss:  2.9  grad_norm:  0.8  memory: 33.45GiB(42.2%)  tps: 76,000  tflops: 500.00  mfu: 52.00%
"""


def test_parse_titan_log_steady_windows():
    r = peer.parse_titan_log(TITAN_LOG, warmup=5)  # windows 6-10 and 11-15
    assert r["steps"] == 10 and r["tokens_per_s"] == pytest.approx(75_000)
    assert r["mfu"] == pytest.approx(0.51) and r["peak_reserved_bytes"] == pytest.approx(33.45 * 2**30)
    assert r["loss_last"] == 2.9 and len(r["windows"]) == 4
    with pytest.raises(ConfigError, match="no window after step 15"):
        peer.parse_titan_log(TITAN_LOG, warmup=15)


def test_check_peer_errors(monkeypatch):
    cfg = load_config("configs/anchor_1b.toml", [])
    monkeypatch.setattr(peer, "installed_version", lambda: None)
    with pytest.raises(ConfigError, match="needs torchtitan 0.2.2 installed"):
        peer.check_peer(cfg, 1)
    monkeypatch.setattr(peer, "installed_version", lambda: "0.3.0")
    with pytest.raises(ConfigError, match="0.3.0 is installed"):
        peer.check_peer(cfg, 1)
    monkeypatch.setattr(peer, "installed_version", lambda: "0.2.2")
    peer.check_peer(cfg, 1)
    sq = load_config("configs/anchor_1b.toml", ["--model.ffn", "squared_relu"])
    with pytest.raises(ConfigError, match="SwiGLU FFN only"):
        peer.check_peer(sq, 1)
    with pytest.raises(ConfigError, match="more than one device"):
        peer.check_peer(cfg, 2)


def test_results_file_appends_rows(tmp_path):
    path = tmp_path / "sub" / "results.jsonl"
    append_result(path, {"a": 1, "nan": math.inf})
    append_result(path, {"a": 2})
    rows = read_results(path)
    assert [r["a"] for r in rows] == [1, 2]


def test_format_report_names_every_headline_number():
    r = {"config": {"model": "anchor_1b", "params": 981_534_720, "layout": "single", "world_size": 1,
                    "batch_size": 8, "seq_len": 2048, "grad_accum": 1, "precision": "bf16", "fp8_recipe": None,
                    "compile_mode": "default", "ac": "none", "ffn": "swiglu", "activation_sparsity": "none"},
         "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "date_utc": "2026-11-23",
         "warmup_steps": 10, "warmup_s": 30.0, "build_s": 5.0, "steps": 30, "window_s": 6.6, "smoke": False,
         "tokens_per_s": 74_000.0, "tokens_per_step": 16384, "tflops": 493.5, "flops_per_token": 6.67e9,
         "mfu": 0.499, "peak_flops": 989e12, "mean_s": 0.22, "median_s": 0.22, "min_s": 0.21, "max_s": 0.23,
         "cv": 0.01, "peak_allocated_bytes": 30 * 2**30, "peak_reserved_bytes": 33 * 2**30,
         "phases_s": {"forward": 0.07, "backward": 0.14}, "framework_tax": {}}
    text = format_report(r)
    for needle in ("74,000", "493.5", "49.9%", "33.00 GiB reserved", "forward", "NVIDIA H100"):
        assert needle in text
