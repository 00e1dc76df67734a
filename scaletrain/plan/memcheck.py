"""Pre-launch memory check: predicted per-rank peak vs the device's capacity.

The trainer calls `check_fits(cfg, world_size, device)` before building anything; it raises
ConfigError (the CLI prints it and exits 2) when the planner's memory model predicts the
run will not fit, with the breakdown and a concrete fix. This is the only plan/ import in
train/ (DESIGN.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError
from scaletrain.plan.cost import Layout, Stack, Workload, estimate_memory
from scaletrain.plan.hardware import GiB, Hardware


@dataclass
class MemoryEstimate:
    """Predicted peak bytes per rank, its parts (bytes) and the capacity it was checked against."""

    predicted_bytes: float
    breakdown: dict[str, float]
    capacity_bytes: float
    fits: bool

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.breakdown.items())
        return (f"predicted peak {self.predicted_bytes / GiB:.2f} GiB per rank ({parts} GiB) vs capacity "
                f"{self.capacity_bytes / GiB:.2f} GiB")


def device_capacity(device: torch.device, world_size: int) -> float:
    """Bytes one rank may use: CUDA total memory; on CPU the system RAM divided by the ranks
    on this node (LOCAL_WORLD_SIZE, default `world_size`)."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    return float(ram) / max(1, local)


def workload_for_config(cfg: Config, world_size: int, device_type: str) -> tuple[Workload, Layout]:
    """The cost model's (workload, layout) for a run config on `world_size` ranks of a device
    of `device_type` ("cuda" or "cpu"; precision "auto" resolves as the trainer does)."""
    from scaletrain.parallel.dims import resolve_dims

    dims = resolve_dims(cfg.parallel, world_size)
    par = cfg.parallel
    n_micro = par.pp_microbatches or dims.pp
    micro = cfg.data.batch_size // n_micro if dims.pp > 1 and cfg.data.batch_size >= n_micro else cfg.data.batch_size
    layout = Layout(dims.dp_replicate, dims.dp_shard, dims.tp, dims.pp, dims.cp, par.pp_schedule, 1, micro, par.ac)
    global_batch = cfg.data.batch_size * cfg.train.grad_accum * dims.dp
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    return Workload(cfg.model, cfg.data.seq_len, global_batch, precision), layout


def run_stack(cfg: Config) -> Stack:
    """The cost model's software switches for a scaletrain run: train.compile compiles the
    blocks and the loss; parallel/tp.py computes the loss on replicated logits (no
    vocabulary-parallel loss), so TP ranks hold the whole [tokens, vocab] loss buffers."""
    return Stack(fused=bool(cfg.train.compile), compiled_loss=bool(cfg.train.compile), loss_parallel=False)


def estimate_for_config(cfg: Config, world_size: int, device: torch.device) -> MemoryEstimate:
    """The planner's memory prediction for `cfg` on `world_size` ranks of `device`."""
    w, layout = workload_for_config(cfg, world_size, device.type)
    capacity = device_capacity(device, world_size)
    hw = Hardware(device.type, {}, capacity, 1.0, 1, 1.0, 0.0, 1.0, 0.0)
    mem = estimate_memory(w, layout, hw, run_stack(cfg))
    return MemoryEstimate(mem.total, mem.parts(), capacity, mem.total <= capacity)


def _suggestion(cfg: Config, est: MemoryEstimate) -> str:
    """Concrete fixes for the parts that dominate the predicted peak."""
    b, total = est.breakdown, est.predicted_bytes
    state = b["weights"] + b["grads"] + b["optimizer"]
    tips = []
    if b["activations"] >= 0.25 * total:
        if cfg.parallel.ac != "full":
            tips.append('set parallel.ac = "full" (recompute activations in backward)')
        if cfg.data.batch_size > 1:
            tips.append(f"lower data.batch_size (now {cfg.data.batch_size}) and raise train.grad_accum to keep the batch")
    if state >= 0.25 * total:
        tips.append("shard weights, gradients and optimizer state over more ranks: raise parallel.dp_shard "
                    "(-1 = all data-parallel ranks) or launch more ranks")
    tips.append("raise parallel.tp / parallel.pp / parallel.cp to split the model or the sequence")
    return "; ".join(tips)


def check_fits(cfg: Config, world_size: int, device: torch.device) -> MemoryEstimate:
    """Return the estimate when the predicted peak fits the capacity; raise ConfigError
    (breakdown, capacity, a fix, and "pass --force to run anyway") when it does not."""
    est = estimate_for_config(cfg, world_size, torch.device(device))
    if not est.fits:
        raise ConfigError(f"the run is predicted not to fit in memory: {est.describe()}. "
                          f"Try: {_suggestion(cfg, est)}. Pass --force to run anyway.")
    return est
