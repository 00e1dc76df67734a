"""The one answer to "is this layout legal for this model, batch, sequence and precision?".

`check_layout` is called before any process group starts by the trainer's pre-launch check,
`scaletrain launch`, the planner's layout search, `plan --write-config` and the memory
pre-flight (plan/memcheck.py), so a layout the planner emits is one the trainer runs, and a
layout the trainer refuses is never planned. It raises LayoutError naming the config keys and a
valid alternative. `resolve_dims` first fits the degrees to the world size (dp_shard = -1 takes
the rest) and, when they do not multiply to it, names the nearest layouts that pass
`check_layout`. The rules and why each exists:

- tensor parallel (tp.py): tp divides model.n_heads and model.n_kv_heads (heads are split
  across ranks) and data.seq_len (sequence parallelism splits the norm regions' sequence); no
  tied embeddings (the embedding is sharded by rows, the head by columns of the same weight);
  no fp8 (torchao's float8 tensor-parallel styles are not wired in);
- context parallel (cp.py): data.seq_len divides into 2*cp load-balanced chunks whose local
  part splits over tp: seq_len % (2 * cp * tp) == 0;
- pipeline parallel (pp.py): no tied embeddings (embedding and head live on different stages);
  model.n_layers divides into pp * v stages (v = parallel.pp_virtual_stages, >= 2 only for
  interleaved_1f1b); parallel.pp_microbatches (0 = pp) divides data.batch_size; 1f1b and
  interleaved need at least pp micro-batches; interleaved needs a multiple of
  max(1, microbatches // pp) (torch's ScheduleInterleaved1F1B rule);
- model support: MoE models run data parallel only, q/k norms (Qwen3) without tp, until
  expert parallelism and their tensor-parallel plans land;
- expert parallel (ep.py): parallel.ep shards the E routed experts of every MoE layer over ep
  of the dp_shard * cp ranks (the ranks holding different tokens), so ep divides both
  model.moe_experts and dp_shard * cp; a dense model takes ep = 1;
- `gpus_per_node` (optional, the planner and `scaletrain launch`): tp stays inside one NVLink
  domain, a preference of the planner rather than a rule of torch.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import get_args

from scaletrain.config.schema import ModelConfig, ParallelConfig, PpSchedule
from scaletrain.errors import LayoutError, ScaletrainError
from scaletrain.parallel.dims import ParallelDims

def _divisors(n: int, at_least: int = 1) -> list[int]:
    return [d for d in range(at_least, n + 1) if n % d == 0]


def virtual_stages(parallel: ParallelConfig) -> int:
    """Model chunks per pipeline rank: parallel.pp_virtual_stages, where 0 means 2 for the
    interleaved schedule and 1 otherwise."""
    if parallel.pp_virtual_stages:
        return parallel.pp_virtual_stages
    return 2 if parallel.pp_schedule == "interleaved_1f1b" else 1


def microbatch_count(parallel: ParallelConfig, pp: int | None = None) -> int:
    """parallel.pp_microbatches, where 0 means the pp degree."""
    return parallel.pp_microbatches or (pp if pp is not None else parallel.pp)


def _check_tp(tp: int, model: ModelConfig, seq_len: int, precision: str, gpus_per_node: int | None) -> None:
    if tp == 1:
        return
    if model.tie_embeddings:
        raise LayoutError(f"model.tie_embeddings = true cannot be used with parallel.tp = {tp}: the embedding is "
                          "sharded by rows and the output head by columns of the same weight; set "
                          "--model.tie_embeddings false (or parallel.tp 1).")
    for key in ("n_heads", "n_kv_heads"):
        heads = getattr(model, key)
        if heads % tp:
            valid = ", ".join(map(str, _divisors(math.gcd(model.n_heads, model.n_kv_heads))))
            raise LayoutError(f"model.{key} = {heads} is not divisible by parallel.tp = {tp}; tensor parallelism "
                              f"splits heads across ranks. Use tp in {{{valid}}}.")
    if seq_len % tp:
        raise LayoutError(f"data.seq_len = {seq_len} is not divisible by parallel.tp = {tp} (sequence parallelism "
                          f"splits the sequence of norm regions); use data.seq_len {seq_len // tp * tp or tp}.")
    if precision == "fp8":
        raise LayoutError(f"train.precision='fp8' with parallel.tp={tp} is not supported yet: torchao's float8 "
                          "tensor-parallel styles are not wired in; use parallel.tp 1 (FSDP, PP and CP work with "
                          "fp8) or train.precision bf16.")
    if gpus_per_node and tp > gpus_per_node:
        raise LayoutError(f"parallel.tp = {tp} spans more than one node ({gpus_per_node} GPUs each); tensor "
                          f"parallelism needs NVLink-class bandwidth: keep tp <= {gpus_per_node}.")


def _check_cp(cp: int, tp: int, seq_len: int) -> None:
    unit = 2 * cp * tp
    if cp > 1 and seq_len % unit:
        raise LayoutError(f"data.seq_len = {seq_len} is not divisible by 2*parallel.cp"
                          + (f"*parallel.tp = {unit}" if tp > 1 else f" = {unit}")
                          + " (context parallelism cuts the sequence into 2*cp load-balanced chunks); "
                          f"use data.seq_len {max(unit, seq_len // unit * unit)}.")


def _check_pp(pp: int, parallel: ParallelConfig, model: ModelConfig, batch_size: int) -> None:
    schedule = parallel.pp_schedule
    if schedule not in get_args(PpSchedule):
        raise LayoutError(f"parallel.pp_schedule={schedule!r} is unknown; choose one of {list(get_args(PpSchedule))}.")
    if parallel.pp_microbatches < 0 or parallel.pp_virtual_stages < 0:
        raise LayoutError(f"parallel.pp_microbatches={parallel.pp_microbatches} and parallel.pp_virtual_stages="
                          f"{parallel.pp_virtual_stages} must be >= 0 (0 = the default).")
    v = virtual_stages(parallel)
    if schedule == "interleaved_1f1b" and v < 2:
        raise LayoutError("parallel.pp_virtual_stages=1 with parallel.pp_schedule='interleaved_1f1b' is plain "
                          "1F1B; set parallel.pp_virtual_stages >= 2 (0 = 2) or parallel.pp_schedule='1f1b'.")
    if schedule != "interleaved_1f1b" and v > 1:
        raise LayoutError(f"parallel.pp_virtual_stages={v} needs parallel.pp_schedule='interleaved_1f1b' "
                          f"({schedule!r} runs one stage per rank); set parallel.pp_virtual_stages=0.")
    if pp == 1:
        return
    if model.tie_embeddings:
        raise LayoutError(f"model.tie_embeddings=true cannot be used with parallel.pp={pp}: the embedding lives "
                          "on the first pipeline stage and the output projection on the last, so one weight "
                          "cannot be shared; set model.tie_embeddings=false (or parallel.pp=1).")
    n_layers, stages = model.n_layers, pp * v
    if n_layers % stages:
        valid = [p for p in range(2, n_layers // v + 1) if n_layers % (p * v) == 0]
        extra = f" x {v} virtual stages per rank (parallel.pp_virtual_stages)" if v > 1 else ""
        raise LayoutError(f"model.n_layers={n_layers} is not divisible by parallel.pp={pp}{extra} = {stages} "
                          f"stages; choose parallel.pp in {valid or '[none: change model.n_layers]'}"
                          + (f" or parallel.pp_virtual_stages in {[k for k in _divisors(n_layers // pp, 2)]}"
                             if v > 1 and n_layers % pp == 0 else "") + ".")
    m = microbatch_count(parallel, pp)
    if batch_size % m:
        raise LayoutError(f"parallel.pp_microbatches={m}{' (0 = pp)' if not parallel.pp_microbatches else ''} does "
                          f"not divide data.batch_size={batch_size}; choose parallel.pp_microbatches in "
                          f"{[d for d in _divisors(batch_size) if d >= pp]} or change data.batch_size.")
    if schedule != "gpipe" and m < pp:
        # torch's Schedule1F1B raises for m < pp; ScheduleInterleaved1F1B accepts it with a worse bubble.
        raise LayoutError(f"parallel.pp_schedule={schedule!r} needs parallel.pp_microbatches >= parallel.pp (got "
                          f"{m} < {pp}); raise parallel.pp_microbatches or use pp_schedule='gpipe'.")
    rounds = max(1, m // pp)
    if schedule == "interleaved_1f1b" and m % rounds:  # torch's rule (m = 9, pp = 4 fails)
        raise LayoutError(f"parallel.pp_schedule='interleaved_1f1b' needs parallel.pp_microbatches to be a "
                          f"multiple of max(1, pp_microbatches // pp) = {rounds} (got {m} with parallel.pp={pp}); "
                          f"use a multiple of parallel.pp, e.g. {pp * rounds}.")


def _check_ep(dims: ParallelDims, model: ModelConfig) -> None:
    """parallel.ep shards the E routed experts of every MoE layer over ep of the dp_shard * cp
    ranks (the ranks that hold different tokens), so ep must divide both; a dense model has no
    experts to shard. Names the valid ep degrees."""
    if dims.ep == 1:
        return
    if model.moe_experts == 0:
        raise LayoutError(f"parallel.ep = {dims.ep} shards MoE experts, but this model is dense "
                          "(model.moe_experts = 0); use --parallel.ep 1 or an MoE model (e.g. --model.flavor moe_debug).")
    ranks = dims.dp_shard * dims.cp
    valid = [d for d in range(1, math.gcd(model.moe_experts, ranks) + 1) if math.gcd(model.moe_experts, ranks) % d == 0]
    if model.moe_experts % dims.ep:
        raise LayoutError(f"parallel.ep = {dims.ep} does not divide model.moe_experts = {model.moe_experts} (each ep "
                          f"rank holds moe_experts / ep whole experts); use --parallel.ep in {{{', '.join(map(str, valid))}}}.")
    if ranks % dims.ep:
        raise LayoutError(f"parallel.ep = {dims.ep} does not divide parallel.dp_shard x parallel.cp = {dims.dp_shard} x "
                          f"{dims.cp} = {ranks} (expert parallelism takes its ranks from those); use --parallel.ep in "
                          f"{{{', '.join(map(str, valid))}}}, or raise parallel.dp_shard to a multiple of {dims.ep}.")


def check_layout(dims: ParallelDims, parallel: ParallelConfig, model: ModelConfig | None, seq_len: int,
                 batch_size: int, precision: str = "bf16", gpus_per_node: int | None = None) -> None:
    """Raise LayoutError, naming the keys and a valid alternative, when `model` trained on
    `seq_len`-token sequences, `batch_size` sequences per data-parallel rank and step
    (data.batch_size) in `precision` cannot be split as `dims` and `parallel` (schedule,
    micro-batches, virtual stages) ask. Pure: runs before any process-group work. `model=None`
    checks the sequence split only (cp.py's positions)."""
    for name in ("dp_replicate", "dp_shard", "tp", "pp", "cp", "ep"):
        if getattr(dims, name) < 1:
            raise LayoutError(f"parallel.{name}={getattr(dims, name)} must be >= 1.")
    _check_cp(dims.cp, dims.tp, seq_len)
    if model is None:
        return
    _check_ep(dims, model)
    _check_tp(dims.tp, model, seq_len, precision, gpus_per_node)
    _check_pp(dims.pp, parallel, model, batch_size)


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
            try:
                check_layout(ParallelDims(**candidate, ep=cfg.ep), replace(cfg, **candidate), model, seq_len, batch_size)
            except ScaletrainError:
                continue
        found.append(candidate)
        if len(found) == count:
            break
    return found
