"""Activation checkpointing: recompute activations in backward instead of storing them.

- "full": checkpoint whole blocks, every `every`-th one (1 = all: only block inputs are kept,
  least memory, about one extra forward of compute; k > 1 trades memory for speed).
- "selective": op-level, inside every block only the attention module is checkpointed: it
  keeps just its input, and backward recomputes q/k/v, RoPE and SDPA (cheap FLOPs, large
  activations); the FFN keeps its activations. Memory per mode: model/flops.py
  activation_bytes_per_layer.

Parameter names are unchanged: the wrapper's prefix is stripped in state_dict.
"""

from __future__ import annotations

from typing import get_args

from torch import nn

from scaletrain.config.schema import AcMode


def apply_ac(model: nn.Module, mode: str, every: int = 1) -> nn.Module:
    """Wrap blocks (full) or their attention modules (selective) of `model.layers` with
    non-reentrant activation checkpointing."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode not in get_args(AcMode):
        raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    if every < 1:
        raise ValueError(f"activation checkpointing every k-th block needs k >= 1, got {every}")
    if mode == "none":
        return model
    for name, block in list(model.layers.items()):
        if mode == "selective":
            block.attention = checkpoint_wrapper(block.attention, preserve_rng_state=False)
        elif int(name) % every == 0:  # global layer index: the same blocks under any pipeline split
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
    return model
