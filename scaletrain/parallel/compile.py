"""torch.compile applied per transformer block (in place, so parameter names are unchanged and
checkpoints stay loadable with or without compilation)."""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module, mode: str = "default") -> nn.Module:
    """Compile each block of `model.layers` in place with inductor `mode` (train.compile_mode:
    "default", "reduce-overhead" = CUDA graphs, "max-autotune-no-cudagraphs", "max-autotune");
    blocks share one compiled graph shape, so compile time is paid about once."""
    for block in model.layers.values():
        block.compile(mode=None if mode == "default" else mode)
    return model
