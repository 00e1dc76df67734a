"""Steady-state statistics of a benchmark: warm-up exclusion and averaging of step times.

A benchmark runs `warmup` steps (compilation, allocator growth, autotuning, first-touch of
data) that are never counted, then `steps` measured steps. Throughput is the window average
(total tokens / total seconds of the measured window), which is what torchtitan's `tps`
reports per log window; the median and spread of single steps are reported beside it so a
noisy measurement is visible.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from scaletrain.errors import ConfigError
from scaletrain.train.metrics import mfu

MIN_MEASURED_STEPS = 20  # the floor for an average a result may be recorded from


@dataclass(frozen=True)
class StepStats:
    """Statistics of the measured steps. Times in seconds; rates per second over all ranks."""

    steps: int  # measured steps (warm-up excluded)
    window_s: float  # wall time of the whole measured window
    mean_s: float  # window_s / steps
    median_s: float
    stdev_s: float
    min_s: float
    max_s: float
    cv: float  # coefficient of variation of single steps (stdev / mean)
    tokens_per_s: float  # tokens per step * steps / window_s
    tflops: float  # tokens_per_s * FLOPs per token / 1e12
    mfu: float | None  # fraction 0..1 of n_devices * peak, None when the peak is unknown

    def as_dict(self) -> dict:
        return asdict(self)


def check_counts(warmup: int, steps: int, allow_short: bool = False) -> None:
    """ConfigError unless `warmup` >= 0 and `steps` >= MIN_MEASURED_STEPS (or >= 1 with
    `allow_short`, for smoke tests whose numbers are not recorded as results)."""
    if warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {warmup}.")
    floor = 1 if allow_short else MIN_MEASURED_STEPS
    if steps < floor:
        hint = "" if allow_short else " (use --smoke for a quick check that records nothing)"
        raise ConfigError(f"--steps must be >= {floor} measured steps, got {steps}{hint}.")


def steady_state(step_seconds: list[float], warmup: int, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float | None, n_devices: int = 1, window_s: float | None = None) -> StepStats:
    """Statistics over `step_seconds[warmup:]`.

    `step_seconds` holds every step's wall time including the warm-up steps; `window_s` is the
    measured window's wall time when it was timed as one interval (device synchronised at both
    ends); otherwise the sum of the measured steps. `tokens_per_step` is global (all data-parallel
    ranks); MFU divides by `n_devices * peak_flops`."""
    measured = [float(s) for s in step_seconds[warmup:]]
    if not measured:
        raise ConfigError(f"no measured steps: {len(step_seconds)} steps run, {warmup} of them warm-up.")
    if any(not math.isfinite(s) or s <= 0 for s in measured):
        raise ValueError(f"step times must be positive and finite, got {measured}")
    window = float(window_s) if window_s is not None else sum(measured)
    n = len(measured)
    mean = window / n
    stdev = statistics.stdev(measured) if n > 1 else 0.0
    tokens_per_s = tokens_per_step * n / window
    return StepStats(steps=n, window_s=window, mean_s=mean, median_s=statistics.median(measured), stdev_s=stdev,
                     min_s=min(measured), max_s=max(measured), cv=stdev / (sum(measured) / n),
                     tokens_per_s=tokens_per_s, tflops=tokens_per_s * flops_per_token / 1e12,
                     mfu=mfu(tokens_per_s, flops_per_token, peak_flops, n_devices))
