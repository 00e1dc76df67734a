"""Initialising model parts that parallelize() built on the meta device, shard by shard.

The model (model/transformer.py) knows only its single-device initialisation: `init_plan()`
lists every parameter of the FULL model with its full shape and std, in the order the
single-device `init_weights()` draws them from the global RNG. This module walks that plan for
a part that parallelism has changed, so every layout starts from exactly the single-device
values while no rank ever holds more than one full tensor:

- a parameter the part does not hold (a pipeline stage) is still drawn and discarded, so the
  RNG stream stays aligned with the single-device model;
- a sharded parameter (a DTensor from tensor, expert or FSDP sharding) draws its full tensor
  and keeps its own shard (`distribute_tensor` without communication: every rank drew the same);
- names carry the wrappers' infixes (`unwrapped_name`), which are dropped before matching.
"""

from __future__ import annotations

import torch
from torch import nn

from scaletrain.model.transformer import materialize as model_materialize
from scaletrain.parallel import unwrapped_name


def _init_shard(param: torch.Tensor, std: float) -> None:
    """Draw the full N(0, std) tensor of DTensor `param` on its device and keep the local shard."""
    from torch.distributed.tensor import distribute_tensor

    local = param.to_local()
    full = torch.empty(param.shape, dtype=param.dtype, device=local.device).normal_(0.0, std)
    # src_data_rank=None: every rank drew the same tensor, so each just slices its own shard.
    local.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())


@torch.no_grad()
def init_part(part: nn.Module) -> None:
    """Initialise one materialised part (a Transformer, a pipeline stage of one, possibly
    wrapped and sharded) exactly as the single-device `Transformer.init_weights` would, from
    the global RNG (the caller seeds it): buffers first, then parameters in `init_plan()` order."""
    part.init_buffers()
    device = part.rope_cos.device
    params = {unwrapped_name(name): p for name, p in part.named_parameters()}
    for name, shape, std in part.init_plan():
        param = params.get(name)
        if param is None:
            if std is not None:
                torch.empty(shape, device=device).normal_(0.0, std)  # keep the RNG stream aligned
        elif std is None:
            nn.init.ones_(param)
        elif hasattr(param, "device_mesh"):
            _init_shard(param, std)
        else:
            nn.init.normal_(param, mean=0.0, std=std)


def materialize(parts: list[nn.Module], device: str | torch.device, seed: int) -> None:
    """Allocate model parts built on the meta device and parallelised on `device`, and
    initialise each from `seed` exactly as `model.build_model` would (`init_part`). The
    caller's RNG streams are untouched."""
    for part in parts:
        model_materialize(part, device, seed, init=init_part)
