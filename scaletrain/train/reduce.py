"""Global quantities of a step under any layout: the loss every rank reports, and the
gradient norm used for clipping (computed over all parameters of all stages and shards,
so it equals the single-device norm)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def global_mean(value: torch.Tensor, contributes: bool) -> torch.Tensor:
    """Mean of `value` over the ranks that contribute (e.g. last pipeline stages), known to all.

    Every (data-parallel, context-parallel) coordinate contributes one equally weighted value
    (equal token counts), tensor-parallel peers contribute identical copies, and pipeline
    stages other than the last contribute nothing.
    """
    return global_mean_and_any(value, contributes, False)[0]


def global_mean_and_any(value: torch.Tensor, contributes: bool, flag: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`global_mean(value, contributes)` and the number of ranks that raised `flag` (a 0-d
    float tensor), from the same all-reduce: a stop request rides along with the loss, so
    agreeing on it costs no collective of its own."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value, torch.full((), float(flag), dtype=torch.float32, device=value.device)
    weight = 1.0 if contributes else 0.0
    # torch.full rather than torch.tensor: a fill kernel, not a host-to-device copy (no host sync)
    triple = torch.stack([value.detach().float() * weight, torch.full((), weight, dtype=torch.float32, device=value.device),
                          torch.full((), float(flag), dtype=torch.float32, device=value.device)])
    dist.all_reduce(triple)
    return triple[0] / triple[1], triple[2]


def clip_grad_norm(parts: list[nn.Module], max_norm: float, pp_group=None) -> torch.Tensor:
    """Clip the gradients of every parameter in `parts` to a global L2 norm of `max_norm`
    (no clipping when <= 0) and return that norm (a plain tensor).

    FSDP/TP gradients are DTensors whose norm already spans their mesh. Gradients on different
    meshes (expert parallelism puts the experts on their own) are normed per mesh, in parameter
    order (the same on every rank of a stage, so the collectives line up), and combined; pipeline
    stages then combine their squared norms over `pp_group`.
    """
    params = [p for part in parts for p in part.parameters() if p.grad is not None]
    by_mesh: dict[object, list[nn.Parameter]] = {}
    for p in params:
        by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    norms = []
    for group in by_mesh.values() or [[]]:
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0, foreach=True)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    if pp_group is not None:
        sq = norm.float() ** 2
        dist.all_reduce(sq, group=pp_group)
        norm = sq.sqrt()
    for group in by_mesh.values():  # the foreach kernels take one mesh at a time
        torch.nn.utils.clip_grads_with_norm_(group, max_norm if max_norm > 0 else math.inf, norm, foreach=True)
    return norm
