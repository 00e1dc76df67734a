"""Data parallelism with FSDP2 (`fully_shard`): sharded (FSDP), replicated (DDP-like) or both
(HSDP) over a 2-D ("dp_replicate", "dp_shard_cp") DeviceMesh (see parallel/dims.py).

Each transformer block is its own FSDP unit so its parameters are all-gathered just before
use and freed after; the root unit holds the embedding, final norm and output head.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` in place over `dp_mesh` (1-D: FSDP; 2-D replicate x shard: HSDP)."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # Under TP the root returns the replicated logits as a view of a DTensor's local tensor;
    # the trainer only applies out-of-place ops to them, which is what the warning asks.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    # The root keeps its parameters gathered after forward: backward needs them at once.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False)
    return model
