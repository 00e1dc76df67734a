"""Where a training step's time goes, measured without adding host synchronisation.

The trainer calls `timer.mark(phase)` when a phase *ends* (`mark("forward")` after the loss is
computed); the time since the previous mark is booked to that phase. On CUDA each mark records
a CUDA event on the current stream, so phase times are GPU-timeline times (what the device
spent between those points) and reading them costs nothing until the window ends. On the CPU,
where every op runs synchronously, marks read `time.perf_counter()`.

`begin_step()` opens a step and `end_step()` closes it; the gap between one step's last mark
and the next step's first mark is booked as "between steps" (the host sync on the loss,
Python bookkeeping and, on CUDA, any GPU idle time while the host prepares the next step).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class PhaseTimer:
    """Per-phase times over many steps (train/metrics.py's Phases protocol). Times are reported
    in seconds per step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._steps: list[list[tuple[str, object]]] = []  # per step: (phase, event or time)
        self._current: list[tuple[str, object]] | None = None

    def _stamp(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin_step(self) -> None:
        self._current = [("", self._stamp())]

    def mark(self, phase: str) -> None:
        if self._current is not None:
            self._current.append((phase, self._stamp()))

    def end_step(self) -> None:
        if self._current is not None:
            self._steps.append(self._current)
            self._current = None

    @staticmethod
    def _elapsed_s(a: object, b: object) -> float:
        if isinstance(a, float):
            return b - a  # type: ignore[operator]
        return a.elapsed_time(b) / 1e3  # type: ignore[attr-defined]  # CUDA events: milliseconds

    def summary(self) -> dict[str, float]:
        """Mean seconds per step of every phase (first-seen order), plus "between steps".
        Synchronises the device once (the events must have completed)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = defaultdict(float)
        order: list[str] = []
        for i, step in enumerate(self._steps):
            for (_, t0), (phase, t1) in zip(step, step[1:]):
                if phase not in totals:
                    order.append(phase)
                totals[phase] += self._elapsed_s(t0, t1)
            if i + 1 < len(self._steps):
                totals["between steps"] += self._elapsed_s(step[-1][1], self._steps[i + 1][0][1])
        n = max(len(self._steps), 1)
        out = {phase: totals[phase] / n for phase in order}
        if len(self._steps) > 1:
            out["between steps"] = totals["between steps"] / (len(self._steps) - 1)
        return out
