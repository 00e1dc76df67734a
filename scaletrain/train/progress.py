"""Live progress of a training run: step, loss, tok/s, MFU and ETA.

Modes (MetricsConfig.progress): "rich" draws a live bar on stdout, "plain" prints one
`format_log_line` (+ ETA) every `log_interval` steps (0 = `auto_log_interval`: about 50
lines per run) and at the last step, "none" prints
nothing, "auto" is rich when stdout is a terminal and plain otherwise (log files, CI,
SLURM). Everything goes to stdout so that logs and bar interleave in one stream. Only
rank 0 prints.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, get_args

from scaletrain.config.schema import ProgressMode
from scaletrain.train.metrics import format_log_line, format_mfu



def auto_log_interval(total_steps: int, lines: int = 50) -> int:
    """Steps between log lines for about `lines` lines per run: total_steps / lines rounded
    to the nearest (in log scale) 1, 2 or 5 x 10^k, at least 1. 100 steps -> 2, 3,000 -> 50."""
    target = total_steps / lines
    if target <= 1:
        return 1
    nice = [m * 10**k for k in range(int(math.log10(target)) + 2) for m in (1, 2, 5)]
    return min(nice, key=lambda n: abs(math.log(n / target)))


def format_eta(seconds: float | None) -> str:
    """`H:MM:SS` for a duration in seconds; "--:--" when not yet known."""
    if seconds is None:
        return "--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Context manager showing training progress; `update(step, record)` after each step.

    ETA = (total_steps - step) x the mean wall time per step over the last `window` updates,
    measured between `update` calls (so evals and checkpoints are included). The interval
    ending at the first update is skipped: it carries start-up, compilation and warm-up.
    """

    def __init__(self, total_steps: int, mode: str, rank: int, start_step: int = 0,
                 log_interval: int = 1, window: int = 20,
                 clock: Callable[[], float] = time.monotonic):
        if mode not in get_args(ProgressMode):
            raise ValueError(f"progress mode must be one of {get_args(ProgressMode)}, got {mode!r}")
        if rank != 0:
            mode = "none"
        elif mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode
        self.total_steps = total_steps
        self.log_interval = log_interval if log_interval > 0 else auto_log_interval(total_steps)
        self._clock = clock
        self._step_times: deque[float] = deque(maxlen=window)  # seconds per step
        self._last_step = start_step
        self._last_time: float | None = None
        self._seen_first = False
        self._start_step = start_step
        self._bar = None
        self._task = None

    def __enter__(self) -> Progress:
        self._last_time = self._clock()
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TextColumn("eta {task.fields[eta]}"),
                console=Console(file=sys.stdout),
                refresh_per_second=4,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.total_steps,
                                            completed=self._start_step, stats="", eta="--:--")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def eta_seconds(self, step: int) -> float | None:
        """Seconds left until `total_steps`, or None before a post-warm-up step was timed."""
        if not self._step_times:
            return None
        per_step = sum(self._step_times) / len(self._step_times)
        return max(0, self.total_steps - step) * per_step

    def update(self, step: int, record: dict[str, Any]) -> None:
        """Report that `step` finished with metrics `record` (keys as in metrics.py)."""
        now = self._clock()
        if self._last_time is not None and step > self._last_step:
            per_step = (now - self._last_time) / (step - self._last_step)
            if self._seen_first:
                self._step_times.append(per_step)
            self._seen_first = True
        self._last_time, self._last_step = now, step
        eta = format_eta(self.eta_seconds(step))
        if self.mode == "plain":
            if step % self.log_interval == 0 or step == self.total_steps:
                line = format_log_line({"step": step, **record}, self.total_steps)
                print(f"{line} | eta {eta}", flush=True)
        elif self.mode == "rich" and self._bar is not None:
            self._bar.update(self._task, completed=step, stats=_short_stats(record), eta=eta)

    def note(self, msg: str) -> None:
        """Print a message (eval result, checkpoint saved, ...) above the bar; rank 0 only."""
        if self.mode == "none":
            return
        if self._bar is not None:
            self._bar.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, flush=True)


def _short_stats(record: dict[str, Any]) -> str:
    """The bar's field text: loss, tok/s and MFU (percent or n/a)."""
    parts = []
    if record.get("loss") is not None:
        parts.append(f"loss {float(record['loss']):.4f}")
    if record.get("tokens_per_s") is not None:
        parts.append(f"{float(record['tokens_per_s']):,.0f} tok/s")
    parts.append(format_mfu(record.get("mfu")))
    return " | ".join(parts)
