"""Activation checkpointing: recompute a block's activations in backward instead of storing them.

"full" wraps every block (only block inputs are kept: least memory, ~1/3 more compute);
"selective" wraps every second block (about half the activation memory saved for about half
the recompute). Parameter names are unchanged: the wrapper strips its prefix in state_dict.
"""

from __future__ import annotations

from torch import nn

AC_MODES = ("none", "full", "selective")


def apply_ac(model: nn.Module, mode: str) -> nn.Module:
    """Wrap blocks of `model.layers` with non-reentrant activation checkpointing."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode not in AC_MODES:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    if mode == "none":
        return model
    every = 1 if mode == "full" else 2
    for i, (name, block) in enumerate(list(model.layers.items())):
        if i % every == 0:
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
    return model
