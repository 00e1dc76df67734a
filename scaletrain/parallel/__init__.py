"""Parallelism applied from outside the single-device model, in one documented order:

0. float8 linears (fp8.py, precision "fp8" only): the blocks' nn.Linear modules become
   torchao Float8Linear (same parameter names) before anything else wraps or shards them;
1. pipeline split (pp.py): the model becomes this rank's stage module(s);
2. tensor + sequence parallel (tp.py) on each stage; MoE FFNs replicated over tp (ep.py);
3. context parallel (cp.py): swaps each block's attention kernel and RoPE rows; MoE layers sum
   their per-sequence expert counts over cp (ep.py);
4. expert parallel (ep.py): experts sharded over ep, tokens exchanged by all-to-all;
5. activation checkpointing (ac.py);
6. torch.compile per block (compile.py);
7. FSDP2 / HSDP / replicate (fsdp.py) over dp_replicate x (dp_shard * cp); with ep > 1 the
   experts over dp_replicate x (dp_shard * cp / ep).

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

# What the wrappers parallelize() applies insert into parameter names: activation
# checkpointing's `checkpoint_wrapper` (ac.py) and a compiled module's `_orig_mod`.
WRAPPER_INFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A parameter name of a parallelised part as the plain model names it (the state_dict's)."""
    for infix in WRAPPER_INFIXES:
        name = name.replace(infix, "")
    return name


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
    moe = model.cfg.moe_experts > 0
    if moe and (dims.tp > 1 or dims.cp > 1 or dims.ep > 1):
        from scaletrain.parallel import ep as moe_parallel
    for part in parts:
        if dims.tp > 1:
            from scaletrain.parallel.tp import apply_tp

            apply_tp(part, meshes.tp)
            if moe:
                moe_parallel.apply_moe_tp(part, meshes.tp)
        if dims.cp > 1:
            from scaletrain.parallel.cp import apply_cp

            apply_cp(part, meshes.cp, seq_len)
            if moe:
                moe_parallel.apply_moe_cp(part, meshes.cp)
        if dims.ep > 1:
            moe_parallel.apply_ep(part, meshes.ep)
        apply_ac(part, cfg.ac, cfg.ac_every)
        if compile_blocks:
            apply_compile(part, compile_mode)
        if fsdp:
            # Under pipelining every micro-batch's backward needs the weights again: keep them.
            apply_fsdp(part, meshes.fsdp, reshard_after_forward=dims.pp == 1, expert_mesh=meshes.expert_fsdp,
                       data_ranks=dims.dp * dims.cp)
    return parts
