"""Parallelism applied from outside the single-device model, in one documented order:

0. float8 linears (fp8.py, precision "fp8" only): the blocks' nn.Linear modules become
   torchao Float8Linear (same parameter names) before anything else wraps or shards them;
1. pipeline split (pp.py): the model becomes this rank's stage module(s);
2. tensor + sequence parallel (tp.py) on each stage;
3. context parallel (cp.py): swaps each block's attention kernel and RoPE rows;
4. activation checkpointing (ac.py);
5. torch.compile per block (compile.py);
6. FSDP2 / HSDP / replicate (fsdp.py) over dp_replicate x (dp_shard * cp).

Apart from step 0's module swap, the model's layers are never rewritten; every step addresses
modules by name.
"""

from __future__ import annotations

import torch
from torch import nn

from scaletrain.config.schema import ParallelConfig
from scaletrain.parallel.ac import apply_ac
from scaletrain.parallel.compile import apply_compile
from scaletrain.parallel.dims import Meshes, ParallelDims
from scaletrain.parallel.fsdp import apply_fsdp


def parallelize(model: nn.Module, dims: ParallelDims, meshes: Meshes | None, cfg: ParallelConfig,
                compile_blocks: bool, seq_len: int, precision: str = "fp32", fp8_recipe: str = "tensorwise",
                device: torch.device | str | None = None, compile_mode: str = "default") -> list[nn.Module]:
    """Apply every technique `dims` asks for; returns this rank's model parts (one module, or
    one per local pipeline stage), each keeping the full model's parameter names.

    `precision` is train.precision; only "fp8" changes the model here, with `fp8_recipe`, after
    checking that it can run on the training `device` (default: CUDA when present; ConfigError
    when not; the layout itself was checked by parallel/layout.py)."""
    fsdp = meshes is not None and meshes.fsdp is not None
    if precision == "fp8":
        from scaletrain.parallel.fp8 import apply_fp8, check_fp8

        check_fp8(fp8_recipe, device or ("cuda" if torch.cuda.is_available() else "cpu"))
        apply_fp8(model, fp8_recipe, fsdp=fsdp)
    parts = [model]
    if dims.pp > 1:
        from scaletrain.parallel.layout import virtual_stages
        from scaletrain.parallel.pp import pipeline_split

        parts = pipeline_split(model, meshes.pp.get_local_rank(), dims.pp, virtual_stages(cfg))
    for part in parts:
        if dims.tp > 1:
            from scaletrain.parallel.tp import apply_tp

            apply_tp(part, meshes.tp)
        if dims.cp > 1:
            from scaletrain.parallel.cp import apply_cp

            apply_cp(part, meshes.cp, seq_len)
        apply_ac(part, cfg.ac, cfg.ac_every)
        if compile_blocks:
            apply_compile(part, compile_mode)
        if fsdp:
            # Under pipelining every micro-batch's backward needs the weights again: keep them.
            apply_fsdp(part, meshes.fsdp, reshard_after_forward=dims.pp == 1)
    return parts
