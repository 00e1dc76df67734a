"""Timing helpers of `plan calibrate`: the clock, best-of and median-of timings (seconds)."""

from __future__ import annotations

import statistics
import time

import torch


def timer():
    """Wall clock, except on a CPU-only single-threaded torch: there the process CPU time, which
    does not count the time the OS gave the core to other processes (shared machines)."""
    if not torch.cuda.is_available() and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def best_time(fn, budget_s: float = 0.4, min_iters: int = 3) -> float:
    """Best seconds per call of `fn` over about `budget_s` (one warm-up call first)."""
    fn()
    sync()
    now = timer()
    best, spent, n = float("inf"), 0.0, 0
    while n < min_iters or spent < budget_s:
        t0 = now()
        fn()
        sync()
        dt = now() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
        if n >= 200:
            break
    return best


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, reps: int = 5, warmup: int = 2, now=None) -> float:
    """Median seconds per call of `fn` over `reps` timed calls after `warmup` untimed ones: the
    statistic of a training step's reported time (a median of steps), for whole-block timings.
    `now`: the clock (default `timer()`)."""
    for _ in range(warmup):
        fn()
    sync()
    now = now or timer()
    times = []
    for _ in range(reps):
        t0 = now()
        fn()
        sync()
        times.append(now() - t0)
    return statistics.median(times)
