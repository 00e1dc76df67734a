"""Data parallelism with FSDP2 (`fully_shard`): sharded (FSDP), replicated (DDP-like) or both
(HSDP) over a 2-D ("dp_replicate", "dp_shard_cp") DeviceMesh (see parallel/dims.py).

Each transformer block is its own FSDP unit so its parameters are all-gathered just before
use and freed after; the root unit holds the embedding, final norm and output head. Under
expert parallelism each MoE layer's experts (already sharded over ep, parallel/ep.py) are one
more unit, on the ("dp_replicate", "efsdp") mesh of the data ranks outside their ep group.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from scaletrain.model.moe import GroupedExperts


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool = True,
               expert_mesh: DeviceMesh | None = None, data_ranks: int = 1) -> nn.Module:
    """Shard `model` in place over `dp_mesh` (1-D: FSDP; 2-D replicate x shard: HSDP).

    `expert_mesh` (expert parallelism): shard the experts over it instead. Their gradient is
    divided by the `data_ranks` (dp x cp) that each hold different tokens, not by that mesh's
    size: a rank's expert gradient already sums over its ep group's tokens (parallel/ep.py)."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # Under TP the root returns the replicated logits as a view of a DTensor's local tensor;
    # the trainer only applies out-of-place ops to them, which is what the warning asks.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

    for block in model.layers.values():
        if expert_mesh is not None:
            for experts in [m for m in block.modules() if isinstance(m, GroupedExperts)]:
                fully_shard(experts, mesh=expert_mesh, reshard_after_forward=reshard_after_forward)
                experts.set_gradient_divide_factor(data_ranks)
                # With more than one efsdp rank, sum in the collective and divide after (gloo
                # has no pre-multiplied sum). Not with one: torch 2.13 then divides twice.
                experts.set_force_sum_reduction_for_comms(expert_mesh.size(1) > 1)
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    # The root keeps its parameters gathered after forward: backward needs them at once.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False)
    return model
