"""Process environment (rank, world size, device) and parallel degrees -> DeviceMesh.

Ranks come from scaletrain/ranks.py (torchrun's RANK / LOCAL_RANK / WORLD_SIZE); a plain
`python -m scaletrain` run is rank 0 of a world of 1 and never creates a process group.
Degrees are resolved against the world size and checked by parallel/layout.py before any
process-group work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from scaletrain.errors import ConfigError
from scaletrain.ranks import env_ranks


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:<local_rank> when CUDA is present, else cpu."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but no CUDA device is visible; use --train.device cpu.")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_precision(precision: str, device_type: str) -> str:
    """train.precision with "auto" resolved: bf16 on CUDA, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cuda" else "fp32"


def read_env(device_preference: str = "auto") -> DistEnv:
    """Rank and world size from torchrun's environment (1 process when absent) and the device."""
    r = env_ranks()
    return DistEnv(r.rank, r.local_rank, r.world_size, pick_device(device_preference, r.local_rank))


def init_distributed(env: DistEnv) -> None:
    """Create the default process group (NCCL on CUDA, gloo on CPU) for world size > 1."""
    if not env.distributed or dist.is_initialized():
        return
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    dist.init_process_group(backend="nccl" if env.device.type == "cuda" else "gloo")


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees; their product is the world size."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    cp: int
    ep: int = 1  # expert parallel: a divisor of dp_shard * cp (it re-uses those ranks), not a world factor

    @property
    def dp(self) -> int:
        """Data-parallel degree: number of distinct batches per step."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp


MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # outermost -> innermost


@dataclass
class Meshes:
    """Sub-meshes of the world mesh (pp, dp_replicate, dp_shard, cp, tp) that each technique
    uses, and this rank's coordinate on the axes the trainer needs."""

    world: object
    fsdp: object | None  # ("dp_replicate", "dp_shard_cp"): gradients and shards; None when 1 rank
    tp: object | None
    cp: object | None
    pp: object | None
    dp_rank: int  # which slice of the global batch this rank reads
    cp_rank: int
    pp_rank: int
    # Expert parallelism (ep > 1): the dp_shard_cp axis re-split as (efsdp, ep), ep innermost.
    ep: object | None = None  # the ranks one MoE layer's experts are spread over (all-to-all group)
    expert_fsdp: object | None = None  # ("dp_replicate", "efsdp"): FSDP of each rank's experts


def build_meshes(dims: ParallelDims, device_type: str) -> Meshes:
    """The world DeviceMesh in MESH_DIMS order (tp innermost so it stays inside a node) and
    its sub-meshes. Context-parallel ranks share a batch but hold different tokens, so FSDP
    shards and reduces gradients over dp_shard x cp together ("dp_shard_cp")."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = tuple(getattr(dims, name) for name in MESH_DIMS)
    world = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    fsdp = ep = expert_fsdp = None
    if dims.dp * dims.cp > 1:
        # One flattened dp axis (replicate-major), re-split as (dp_replicate, dp_shard_cp).
        flat = world["dp_replicate", "dp_shard", "cp"]._flatten(mesh_dim_name="dp_all")
        fsdp = flat._unflatten(0, (dims.dp_replicate, dims.dp_shard * dims.cp), ("dp_replicate", "dp_shard_cp"))
        if dims.ep > 1:
            # ...and as (dp_replicate, efsdp, ep): ep consecutive dp_shard_cp ranks share one
            # layer's experts; each expert shard is FSDP-sharded over the efsdp ranks.
            efsdp = dims.dp_shard * dims.cp // dims.ep
            sparse = flat._unflatten(0, (dims.dp_replicate, efsdp, dims.ep), ("dp_replicate", "efsdp", "ep"))
            ep, expert_fsdp = sparse["ep"], sparse["dp_replicate", "efsdp"]
    coord = dict(zip(MESH_DIMS, world.get_coordinate()))
    dp_rank = coord["dp_replicate"] * dims.dp_shard + coord["dp_shard"]
    return Meshes(world, fsdp, world["tp"] if dims.tp > 1 else None, world["cp"] if dims.cp > 1 else None,
                  world["pp"] if dims.pp > 1 else None, dp_rank, coord["cp"], coord["pp"], ep, expert_fsdp)
