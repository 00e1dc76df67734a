"""The framework tax of a training step ("The Framework Tax", Fernandez et al. 2023): how much
of the wall clock the GPU sits idle because the host (Python, dispatch, kernel launches, host
syncs) cannot feed it fast enough. Small models are dominated by it.

`profile_framework_tax` runs a few training steps under `torch.profiler` and reduces the trace
to a handful of numbers (seconds per step unless stated):

- `wall_s`: step wall time (first step's start to the end of the last GPU work).
- `gpu_busy_s`: union of all GPU kernel / memcpy / memset intervals (overlapping streams are
  counted once); `gpu_idle_s` = wall - busy; `gpu_idle_fraction` = idle / wall.
- `launch_s`: host time inside CUDA launch calls (cudaLaunchKernel, cuLaunchKernel,
  cudaGraphLaunch, ...); `kernels_per_step`, `launches_per_step`.
- `ops_per_step`: aten operators dispatched by the host (every level), on CPU and GPU alike.

On a CPU-only run there is no device timeline: the GPU fields are None and `ops_per_step`
plus `wall_s` describe the host-side cost.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                "cudaGraphLaunch", "cudaLaunchCooperativeKernel", "hipLaunchKernel", "hipExtModuleLaunchKernel")
STEP_LABEL = "scaletrain_step"


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping [start, end) intervals (same unit in, out)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def summarize_trace(steps: list[tuple[float, float]], device_intervals: list[tuple[float, float]],
                    launch_durations: list[float], aten_ops: int, has_device: bool) -> dict[str, Any]:
    """Reduce profiler events to per-step numbers. Times in microseconds in, seconds out.

    `steps`: host (start, end) of each profiled step; `device_intervals`: (start, end) of each
    GPU kernel / copy; `launch_durations`: host time of each launch call."""
    if not steps:
        raise ValueError("no profiled steps")
    n = len(steps)
    start = min(s for s, _ in steps)
    end = max([e for _, e in steps] + [e for _, e in device_intervals])
    wall = (end - start) / n
    out: dict[str, Any] = {"profiled_steps": n, "wall_s": wall / 1e6, "ops_per_step": aten_ops / n,
                           "gpu_busy_s": None, "gpu_idle_s": None, "gpu_idle_fraction": None,
                           "launch_s": None, "kernels_per_step": None, "launches_per_step": None}
    if has_device:
        inside = [(max(s, start), min(e, end)) for s, e in device_intervals if e > start and s < end]
        busy = union_length(inside) / n
        out.update(gpu_busy_s=busy / 1e6, gpu_idle_s=(wall - busy) / 1e6,
                   gpu_idle_fraction=(wall - busy) / wall if wall > 0 else None,
                   launch_s=sum(launch_durations) / n / 1e6, kernels_per_step=len(device_intervals) / n,
                   launches_per_step=len(launch_durations) / n)
    return out


def _device_kind(evt) -> bool:
    return getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA


def profile_framework_tax(trainer, steps: int, step_fn: Callable[[Any], tuple[float, float]]) -> dict[str, Any]:
    """Profile `steps` training steps of `trainer`, each run by `step_fn(trainer)` -> (seconds,
    loss) (bench/runner.py's), and summarise the framework tax. The losses of those steps are
    returned under "losses" (the steps are real training steps)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    losses = []
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP_LABEL):
                _, loss = step_fn(trainer)
            losses.append(loss)
        if cuda:
            torch.cuda.synchronize(trainer.device)
    step_ranges, device, launches, ops = [], [], [], 0
    for evt in prof.events():
        tr = evt.time_range
        if _device_kind(evt):
            device.append((tr.start, tr.end))
        elif evt.name == STEP_LABEL:
            step_ranges.append((tr.start, tr.end))
        elif evt.name in LAUNCH_CALLS:
            launches.append(tr.end - tr.start)
        elif evt.name.startswith("aten::"):
            ops += 1
    out = summarize_trace(step_ranges, device, launches, ops, has_device=cuda)
    out["losses"] = losses
    return out
