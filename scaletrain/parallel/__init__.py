"""Parallelism applied from outside the single-device model, in one documented order:

1. pipeline split (pp.py): the model becomes this rank's stage module(s);
2. tensor + sequence parallel (tp.py) on each stage;
3. context parallel (cp.py): swaps each block's attention kernel and RoPE rows;
4. activation checkpointing (ac.py);
5. torch.compile per block (compile.py);
6. FSDP2 / HSDP / replicate (fsdp.py) over dp_replicate x (dp_shard * cp).

The model's layers are never rewritten; every step addresses modules by name.
"""

from __future__ import annotations

from torch import nn

from scaletrain.config.schema import ParallelConfig
from scaletrain.parallel.ac import apply_ac
from scaletrain.parallel.compile import apply_compile
from scaletrain.parallel.dims import Meshes, ParallelDims
from scaletrain.parallel.fsdp import apply_fsdp


def parallelize(model: nn.Module, dims: ParallelDims, meshes: Meshes | None, cfg: ParallelConfig,
                compile_blocks: bool, seq_len: int) -> list[nn.Module]:
    """Apply every technique `dims` asks for; returns this rank's model parts (one module, or
    one per local pipeline stage), each keeping the full model's parameter names."""
    parts = [model]
    if dims.pp > 1:
        from scaletrain.parallel.pp import pipeline_split, virtual_stages

        parts = pipeline_split(model, meshes.pp.get_local_rank(), dims.pp, virtual_stages(cfg.pp_schedule))
    for part in parts:
        if dims.tp > 1:
            from scaletrain.parallel.tp import apply_tp

            apply_tp(part, meshes.tp)
        if dims.cp > 1:
            from scaletrain.parallel.cp import apply_cp

            apply_cp(part, meshes.cp, seq_len)
        apply_ac(part, cfg.ac, cfg.ac_every)
        if compile_blocks:
            apply_compile(part)
        if meshes is not None and meshes.fsdp is not None:
            # Under pipelining every micro-batch's backward needs the weights again: keep them.
            apply_fsdp(part, meshes.fsdp, reshard_after_forward=dims.pp == 1)
    return parts
