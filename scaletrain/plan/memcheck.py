"""Pre-launch memory check: predicted per-rank peak vs the device's capacity.

The trainer calls the `memory_check` it is given (`preflight(force)`: `check_fits`, or with
--force `estimate_for_config`) before building anything; `check_fits` raises ConfigError (the
CLI prints it and exits 2) when the planner's memory model predicts the run will not fit, with
the breakdown and a concrete fix. Every caller that builds a Trainer (cli train, bench, btx,
plan check) passes it, so train/ never imports the planner.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError
from scaletrain.ranks import env_ranks
from scaletrain.plan.cost import Layout, Memory, Stack, Workload, estimate_memory
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
    on this node (torchrun's LOCAL_WORLD_SIZE; `world_size` when not launched by torchrun)."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = env_ranks().local_world_size or world_size
    return float(ram) / max(1, local)


def workload_for_config(cfg: Config, world_size: int, device_type: str) -> tuple[Workload, Layout]:
    """The cost model's (workload, layout) for a run config on `world_size` ranks of a device
    of `device_type` ("cuda" or "cpu"; precision "auto" resolves as the trainer does). The layout
    is checked by parallel/layout.py first (LayoutError), so nothing illegal is ever priced."""
    from scaletrain.parallel.dims import resolve_precision
    from scaletrain.parallel.layout import check_layout, microbatch_count, resolve_dims, virtual_stages

    dims = resolve_dims(cfg.parallel, world_size)
    par = cfg.parallel
    precision = resolve_precision(cfg.train.precision, device_type)
    check_layout(dims, par, cfg.model, cfg.data.seq_len, cfg.data.batch_size, precision)
    n_micro = microbatch_count(par, dims.pp)
    micro = cfg.data.batch_size // n_micro if dims.pp > 1 else cfg.data.batch_size
    layout = Layout(dims.dp_replicate, dims.dp_shard, dims.tp, dims.pp, dims.cp, par.pp_schedule, virtual_stages(par),
                    micro, par.ac, dims.ep)
    global_batch = cfg.data.batch_size * cfg.train.grad_accum * dims.dp
    return Workload(cfg.model, cfg.data.seq_len, global_batch, precision, cfg.train.fp8_recipe), layout


def scaletrain_stack(compile: bool, precision: str, fp8_recipe: str) -> Stack:
    """The cost model's software switches for a scaletrain run: train.compile compiles the
    blocks and the loss; parallel/tp.py computes the loss on replicated logits (no
    vocabulary-parallel loss), so TP ranks hold the whole [tokens, vocab] loss buffers;
    parallel/cp.py all-gathers K and V without overlap; parallel/fp8.py gathers fp8 weights
    under FSDP with the tensorwise recipe; PyTorch SDPA (flash-attention-2 class) attention."""
    return Stack(fused=compile, compiled_loss=compile, loss_parallel=False, cp_comm="allgather",
                 fp8_all_gather=precision == "fp8" and fp8_recipe == "tensorwise")


def run_stack(cfg: Config) -> Stack:
    """scaletrain_stack of a run config."""
    return scaletrain_stack(bool(cfg.train.compile), cfg.train.precision, cfg.train.fp8_recipe)


def memory_for_config(cfg: Config, world_size: int, device_type: str) -> Memory:
    """The planner's per-rank memory prediction (bytes) for `cfg` on `world_size` ranks."""
    w, layout = workload_for_config(cfg, world_size, device_type)
    hw = Hardware(device_type, {}, 0.0, 1.0, 1, 1.0, 0.0, 1.0, 0.0)  # the memory model needs the device kind only
    return estimate_memory(w, layout, hw, run_stack(cfg))


def estimate_for_config(cfg: Config, world_size: int, device: torch.device) -> MemoryEstimate:
    """The planner's memory prediction for `cfg` on `world_size` ranks of `device`."""
    mem = memory_for_config(cfg, world_size, device.type)
    capacity = device_capacity(device, world_size)
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


def preflight(force: bool = False) -> Callable[[Config, int, torch.device], float]:
    """The Trainer's `memory_check`: (cfg, world size, device) -> the predicted peak bytes per
    rank; unless `force`, a run predicted not to fit raises ConfigError (`check_fits`)."""
    check = estimate_for_config if force else check_fits
    return lambda cfg, world_size, device: check(cfg, world_size, device).predicted_bytes
