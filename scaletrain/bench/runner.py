"""`scaletrain bench`: steady-state throughput of a training config, measured in the trainer.

The benchmark builds the exact `Trainer` a `scaletrain train` run would build (same model,
parallelism, compile, optimizer, data) and calls its `train_step()`; it does not have a loop
of its own that could differ from training. Warm-up steps (compile, allocator, autotuning)
run first and are excluded; the measured window is timed as one interval with the device
synchronised at both ends; per-step times come from the host sync on each step's loss.
Then phase times (bench/phases.py) and, optionally, a profiler pass (bench/tax.py) follow;
neither perturbs the throughput window, which runs without them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scaletrain.bench.phases import PhaseTimer
from scaletrain.bench.stats import check_counts, steady_state
from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError, NumericsError
from scaletrain.train.metrics import NullPhases, mfu
from scaletrain.train.peaks import device_peak_flops

BENCH_MARKER = ".scaletrain-bench"  # a folder holding this file is a disposable bench folder


@dataclass
class BenchOptions:
    warmup: int = 10  # steps run before measuring (compile, allocator, autotuning)
    steps: int = 30  # measured steps (>= 20 unless smoke)
    phase_steps: int = 5  # steps timed per phase after the window (0 = skip)
    profile_steps: int = 0  # steps under torch.profiler for the framework tax (0 = skip)
    smoke: bool = False  # allow < 20 measured steps (tests, quick checks); results are marked


def bench_config(cfg: Config, opts: BenchOptions) -> Config:
    """A copy of `cfg` for benchmarking: enough steps, and nothing that is not part of a
    training step (checkpoints, evaluation, plots, TensorBoard, samples, progress bar)."""
    from scaletrain.train.rundir import steps_only_config

    return steps_only_config(cfg, opts.warmup + opts.steps + opts.phase_steps + opts.profile_steps)


def check_bench_dir(run_dir: Path) -> None:
    """A bench folder is overwritten on every run, so refuse a folder that holds anything but
    an earlier benchmark (a training run's checkpoints must never be lost to a typo)."""
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / BENCH_MARKER).exists():
        raise ConfigError(f"--run-dir {run_dir} is not empty and was not written by `scaletrain bench`; "
                          "benchmarks overwrite their folder, so choose a new or empty --run-dir.")


def layout_name(dims) -> str:
    """'single' or the degrees above 1, e.g. 'dp_shard=2 tp=2' ('dp_shard=4 ep=2': ep re-uses dp ranks)."""
    parts = [f"{k}={getattr(dims, k)}" for k in ("dp_replicate", "dp_shard", "tp", "pp", "cp", "ep") if getattr(dims, k) > 1]
    return " ".join(parts) or "single"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_step(trainer) -> tuple[float, float]:
    """Run one training step; returns (host seconds, loss). The step's host sync is the trainer's
    finite check before the optimizer; the optimizer's device work overlaps the next step's host
    work, so single-step times are host intervals and the window (synchronised) is the measure."""
    t0 = time.perf_counter()
    result = trainer.train_step()
    if result is None:
        raise NumericsError("a benchmark step was rolled back (non-finite loss); fix the config before timing it")
    loss = float(result[0])
    return time.perf_counter() - t0, loss


def _timed_steps(trainer, n: int, times: list[float], losses: list[float]) -> float:
    """Run `n` steps, appending each step's seconds and loss; returns the wall seconds of all
    `n` with the device synchronised at the end."""
    t0 = time.perf_counter()
    for _ in range(n):
        dt, loss = _one_step(trainer)
        times.append(dt)
        losses.append(loss)
    _sync(trainer.device)
    return time.perf_counter() - t0


def run_bench(cfg: Config, opts: BenchOptions, run_dir: Path) -> dict[str, Any]:
    """Build the trainer for `cfg` and measure it; returns a JSON-ready result dict (rates are
    global over all ranks, memory is this rank's; times in seconds, memory in bytes)."""
    from scaletrain.model.flops import param_counts
    from scaletrain.train.metrics import peak_memory_bytes, peak_reserved_bytes, reset_peak_memory
    from scaletrain.plan.memcheck import preflight
    from scaletrain.train.trainer import Trainer

    check_counts(opts.warmup, opts.steps, allow_short=opts.smoke)
    run_dir = Path(run_dir)
    check_bench_dir(run_dir)
    cfg = bench_config(cfg, opts)
    t_build = time.perf_counter()
    trainer = Trainer(cfg, run_dir, memory_check=preflight(), overwrite=True)
    if trainer.rank == 0:
        (run_dir / BENCH_MARKER).write_text("scratch folder of `scaletrain bench`; overwritten on every run\n")
    build_s = time.perf_counter() - t_build
    device = trainer.device

    times: list[float] = []
    losses: list[float] = []
    warmup_s = _timed_steps(trainer, opts.warmup, times, losses)
    reset_peak_memory(device)
    window_s = _timed_steps(trainer, opts.steps, times, losses)
    peak_alloc, peak_reserved = peak_memory_bytes(device), peak_reserved_bytes(device)

    stats = steady_state(times, opts.warmup, trainer.tokens_per_step, trainer.flops_per_token,
                         trainer.peak_flops, trainer.env.world_size, window_s=window_s)
    phases: dict[str, float] = {}
    if opts.phase_steps:
        timer = PhaseTimer(device)
        trainer.phases = timer
        for _ in range(opts.phase_steps):
            timer.begin_step()
            dt, loss = _one_step(trainer)
            timer.end_step()
            losses.append(loss)
        phases = timer.summary()
        trainer.phases = NullPhases()
    tax: dict[str, Any] = {}
    if opts.profile_steps:
        from scaletrain.bench.tax import profile_framework_tax

        tax = profile_framework_tax(trainer, opts.profile_steps, _one_step)
        losses.extend(tax.pop("losses"))
    trainer.metrics.close()

    c = trainer.cfg
    return {
        "config": {"model": c.model.flavor, "params": param_counts(c.model)["total"], "seq_len": c.data.seq_len,
                   "batch_size": c.data.batch_size, "grad_accum": c.train.grad_accum,
                   "precision": trainer.precision, "fp8_recipe": c.train.fp8_recipe if trainer.precision == "fp8" else None,
                   "compile": c.train.compile, "compile_mode": c.train.compile_mode if c.train.compile else None,
                   "ac": c.parallel.ac, "ffn": c.model.ffn, "activation_sparsity": c.model.activation_sparsity,
                   "layout": layout_name(trainer.dims),
                   "world_size": trainer.env.world_size},
        "device": device.type,
        "tokens_per_step": trainer.tokens_per_step,
        "flops_per_token": trainer.flops_per_token,
        "peak_flops": trainer.peak_flops,
        # torchtitan divides by the bf16 peak whatever the precision: the number to compare fp8 runs with it
        "mfu_vs_bf16_peak": mfu(stats.tokens_per_s, trainer.flops_per_token, device_peak_flops(device, "bf16"),
                                trainer.env.world_size),
        "warmup_steps": opts.warmup,
        "smoke": opts.smoke,
        "build_s": build_s,
        "warmup_s": warmup_s,
        **stats.as_dict(),
        "peak_allocated_bytes": peak_alloc,
        "peak_reserved_bytes": peak_reserved,
        "phases_s": phases,
        "framework_tax": tax,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
