"""Parallelism applied from outside the single-device model, in one documented order:
activation checkpointing -> torch.compile -> FSDP (tensor, pipeline and context parallelism
slot in before AC when they land)."""

from __future__ import annotations

import torch
from torch import nn

from scaletrain.config.schema import ParallelConfig
from scaletrain.parallel.ac import apply_ac
from scaletrain.parallel.compile import apply_compile
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.fsdp import apply_fsdp


def parallelize(model: nn.Module, dims: ParallelDims, cfg: ParallelConfig, compile_blocks: bool,
                device: torch.device) -> nn.Module:
    """Apply AC, compile and data parallelism to `model` for the resolved `dims`."""
    apply_ac(model, cfg.ac)
    if compile_blocks:
        apply_compile(model)
    if dims.dp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dims.dp_replicate, dims.dp_shard),
                                mesh_dim_names=("dp_replicate", "dp_shard"))
        apply_fsdp(model, mesh)
    return model
