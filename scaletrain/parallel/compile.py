"""torch.compile applied per transformer block (in place, so parameter names are unchanged and
checkpoints stay loadable with or without compilation)."""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile each block of `model.layers` in place; blocks share one compiled graph shape,
    so compile time is paid about once."""
    for block in model.layers.values():
        block.compile()
    return model
