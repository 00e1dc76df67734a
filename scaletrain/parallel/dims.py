"""Process environment (rank, world size, device) and parallel degrees -> DeviceMesh.

Ranks come from scaletrain/ranks.py (torchrun's RANK / LOCAL_RANK / WORLD_SIZE); a plain
`python -m scaletrain` run is rank 0 of a world of 1 and never creates a process group. Degrees are checked against the world size
before any process-group work so an impossible layout fails fast with a fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from scaletrain.config.schema import ModelConfig, ParallelConfig
from scaletrain.errors import ConfigError, LayoutError, ScaletrainError
from scaletrain.ranks import env_ranks


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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


def resolve_dims(cfg: ParallelConfig, world_size: int, model: ModelConfig | None = None, seq_len: int = 0,
                 batch_size: int = 0) -> ParallelDims:
    """Fill dp_shard = -1 with the rest of the world and check the product equals it.

    A mismatch raises LayoutError naming how to launch that many processes and up to two
    layouts of `world_size` processes closest to the one asked for; given `model` (and the
    data shape), only layouts that `check_layout` accepts for it are named."""
    fixed = cfg.dp_replicate * cfg.tp * cfg.pp * cfg.cp
    dp_shard = cfg.dp_shard
    if dp_shard == -1:
        if world_size % fixed:
            raise LayoutError(
                f"parallel.dp_replicate*tp*pp*cp = {fixed} does not divide the world size {world_size}; "
                + _layout_fixes(cfg, world_size, fixed, model, seq_len, batch_size)
            )
        dp_shard = world_size // fixed
    dims = ParallelDims(cfg.dp_replicate, dp_shard, cfg.tp, cfg.pp, cfg.cp, cfg.ep)
    if dims.world_size != world_size:
        raise LayoutError(
            f"parallel degrees multiply to {dims.world_size} (dp_replicate={dims.dp_replicate} x "
            f"dp_shard={dims.dp_shard} x tp={dims.tp} x pp={dims.pp} x cp={dims.cp}) but the world size is "
            f"{world_size}; set --parallel.dp_shard -1 to use the rest, or "
            + _layout_fixes(cfg, world_size, dims.world_size, model, seq_len, batch_size)
        )
    return dims


_DEGREES = ("dp_replicate", "dp_shard", "tp", "pp", "cp")


def _layout_fixes(cfg: ParallelConfig, world_size: int, wanted: int, model: ModelConfig | None, seq_len: int,
                  batch_size: int) -> str:
    """The fix half of a world-size mismatch message: launch `wanted` processes, or one of the
    layouts of `world_size` processes nearest to `cfg` (as --parallel.* flags)."""
    launch = (f"launch {wanted} processes (`scaletrain launch local --nproc-per-node {wanted} train ...` or "
              f"`torchrun --standalone --nproc-per-node {wanted} -m scaletrain train ...`)")
    if world_size == 1:
        launch = "this is a single process (no torchrun): " + launch
    layouts = []
    for degrees in _nearest_layouts(cfg, world_size, model, seq_len, batch_size):
        flags = " ".join(f"--parallel.{k} {v}" for k, v in degrees.items()
                         if v != getattr(cfg, k) and not (k == "dp_shard" and cfg.dp_shard == -1))
        shape = " x ".join(f"{k} {v}" for k, v in degrees.items() if v > 1) or "no parallelism"
        layouts.append(f"`{flags}` ({shape})")
    return f"{launch}, or use a layout of {world_size}: {' or '.join(layouts)}."


def _nearest_layouts(cfg: ParallelConfig, world_size: int, model: ModelConfig | None, seq_len: int,
                     batch_size: int, count: int = 2) -> list[dict[str, int]]:
    """Up to `count` assignments of the five degrees whose product is `world_size`, fewest
    factors of two away from `cfg` (a dp_shard of -1 may take any value) and, given `model`,
    accepted by `check_layout`. Always non-empty: pure dp_shard passes every check."""
    divisors = [d for d in range(1, math.isqrt(world_size) + 1) if world_size % d == 0]
    divisors = sorted({*divisors, *(world_size // d for d in divisors)})

    def factorizations(n: int, k: int):
        if k == 1:
            yield (n,)
            return
        for d in divisors:
            if n % d == 0:
                for rest in factorizations(n // d, k - 1):
                    yield (d, *rest)

    def distance(degrees: tuple[int, ...]) -> tuple[float, int, tuple[int, ...]]:
        asked = [getattr(cfg, k) for k in _DEGREES]
        steps = [abs(math.log2(v / a)) for v, a in zip(degrees, asked) if a > 0]
        return sum(steps), sum(s > 0 for s in steps), degrees

    found = []
    for degrees in sorted(factorizations(world_size, len(_DEGREES)), key=distance):
        candidate = dict(zip(_DEGREES, degrees))
        if model is not None:
            from scaletrain.parallel.layout import check_layout  # layout.py imports this module

            try:
                check_layout(ParallelDims(**candidate, ep=cfg.ep), replace(cfg, **candidate), model, seq_len, batch_size)
            except ScaletrainError:
                continue
        found.append(candidate)
        if len(found) == count:
            break
    return found


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
