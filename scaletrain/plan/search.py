"""Enumerate the parallel layouts of a workload on a GPU count and rank them.

Candidates are every factorisation `dp_replicate x dp_shard x tp x pp x cp = GPUs` (dp_shard all
of dp, or a node-aligned HSDP group), micro-batch 1..16 splitting the global batch evenly over
the data-parallel ranks, every schedule (interleaved 1F1B with 2..8 virtual stages) and AC
policy the config can express, and for an MoE model every expert-parallel degree `ep` dividing
both the experts and dp_shard x cp (expert parallelism re-uses those ranks; ep = 1 for a dense
model). Whether a candidate is legal is decided by the trainer's own
checker, parallel/layout.py `check_layout`, on the exact config `--write-config` would write
(`layout_config`), with the planner's preference that tensor parallelism stays inside one NVLink
domain; so every layout the search ranks is one `scaletrain train` accepts.

Ranking: layouts predicted to fit first, by tokens/s per GPU (4 significant digits); ties go to
the simpler layout (fewer context, tensor, pipeline and expert-parallel ranks, fewer replicas,
less memory, then the layout's description), so the order is deterministic. A layout predicted not to fit is never
the recommendation.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import get_args

from scaletrain.config.schema import AcMode, ParallelConfig
from scaletrain.errors import ConfigError, LayoutError
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.layout import check_layout
from scaletrain.plan.cost import Estimate, Layout, Stack, Workload, estimate
from scaletrain.plan.hardware import Hardware

AC_CHOICES = get_args(AcMode)  # parallel.ac values the trainer runs
MAX_MICRO_BATCH = 16
MAX_VIRTUAL_STAGES = 8


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _shard_choices(dp: int, gpus_per_node: int) -> list[int]:
    """dp_shard candidates: all of dp (plain FSDP) plus node-aligned HSDP group sizes."""
    out = {dp}
    s = gpus_per_node
    while s < dp:
        if dp % s == 0:
            out.add(s)
        s *= 2
    if dp <= gpus_per_node:
        out.update(d for d in divisors(dp))
    return sorted(out)


def layout_config(lay: Layout, n_micro: int) -> tuple[ParallelDims, ParallelConfig, int, int]:
    """(degrees, the config's `parallel` section, data.batch_size, train.grad_accum) that run
    `lay` with `n_micro` micro-batches per rank and step. With pp > 1 data.batch_size is the
    per-rank batch of one pipeline step (micro_batch * pp_microbatches) and the schedule splits
    it; otherwise data.batch_size is the micro-batch and grad_accum the count."""
    dims = ParallelDims(lay.dp_replicate, lay.dp_shard, lay.tp, lay.pp, lay.cp, lay.ep)
    pipelined = lay.pp > 1
    parallel = ParallelConfig(dp_replicate=lay.dp_replicate, dp_shard=lay.dp_shard, tp=lay.tp, pp=lay.pp, cp=lay.cp,
                              ep=lay.ep,
                              pp_schedule=lay.pp_schedule, pp_microbatches=n_micro if pipelined else 0,
                              pp_virtual_stages=lay.virtual_stages if lay.virtual_stages > 1 else 0, ac=lay.ac)
    batch = lay.micro_batch * (n_micro if pipelined else 1)
    return dims, parallel, batch, 1 if pipelined else n_micro


def is_legal(w: Workload, lay: Layout, n_micro: int, hw: Hardware) -> bool:
    """Whether the trainer's layout checker accepts the config that runs `lay`."""
    dims, parallel, batch, _ = layout_config(lay, n_micro)
    try:
        check_layout(dims, parallel, w.model, w.seq_len, batch, w.precision, gpus_per_node=hw.gpus_per_node)
    except LayoutError:
        return False
    return True


def _schedules(pp: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    return [("gpipe", 1), ("1f1b", 1)] + [("interleaved_1f1b", v) for v in range(2, MAX_VIRTUAL_STAGES + 1)]


def enumerate_layouts(w: Workload, gpus: int, hw: Hardware) -> list[Layout]:
    """Every layout of `w` on `gpus` GPUs that parallel/layout.py accepts (module docstring)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}.")
    out: list[Layout] = []
    for tp in divisors(gpus):
        for pp in divisors(gpus // tp):
            for cp in divisors(gpus // (tp * pp)):
                dp = gpus // (tp * pp * cp)
                if w.global_batch % dp:
                    continue
                local = w.global_batch // dp
                for dp_shard in _shard_choices(dp, hw.gpus_per_node):
                    eps = divisors(math.gcd(w.model.moe_experts, dp_shard * cp)) if w.model.moe_experts else [1]
                    for mb in (d for d in divisors(local) if d <= MAX_MICRO_BATCH):
                        for sched, v in _schedules(pp):
                            for ac, ep in itertools.product(AC_CHOICES, eps):
                                lay = Layout(dp // dp_shard, dp_shard, tp, pp, cp, sched, v, mb, ac, ep)
                                if is_legal(w, lay, local // mb, hw):
                                    out.append(lay)
    return out


@dataclass
class SearchResult:
    ranked: list[Estimate]  # fitting layouts, best first
    not_fitting: list[Estimate]  # best-throughput layouts that are predicted to run out of memory
    evaluated: int  # legal layouts priced
    fitting: int = 0  # of those, predicted to fit


def rank_key(e: Estimate) -> tuple:
    """Faster first (to 4 significant digits: a 0.01% difference is below the model's accuracy);
    ties to the simpler layout (fewer context, tensor, pipeline, expert-parallel ranks, replicas,
    virtual stages), then less memory, then the description: a deterministic order."""
    lay = e.layout
    return (-float(f"{e.tokens_per_s_per_gpu:.4g}"), lay.cp, lay.tp, lay.pp, lay.ep, lay.dp_replicate,
            lay.virtual_stages, round(e.memory.total), lay.short())


def search(w: Workload, gpus: int, hw: Hardware, stack: Stack = Stack(), top: int = 10) -> SearchResult:
    """Evaluate every legal layout; keep the `top` fitting ones (best tokens/s per GPU first)
    and the `top` fastest non-fitting ones (for the report). Raises ConfigError when no
    legal layout exists."""
    layouts = enumerate_layouts(w, gpus, hw)
    if not layouts:
        raise ConfigError(
            f"no valid layout of {w.model.flavor} on {gpus} GPUs with global batch {w.global_batch} sequences "
            f"of {w.seq_len} tokens: the batch must split over the data-parallel ranks and the model over the "
            "rest. Use a GPU count and global batch with common factors (e.g. powers of two).")
    estimates = [estimate(w, lay, hw, stack) for lay in layouts]
    fits = _dedupe(sorted((e for e in estimates if e.fits), key=rank_key))
    oom = _dedupe(sorted((e for e in estimates if not e.fits), key=rank_key))
    return SearchResult(fits[:top], oom[:top], len(estimates), sum(e.fits for e in estimates))


def _dedupe(ranked: list[Estimate]) -> list[Estimate]:
    """Drop layouts predicted identical (time and memory) to a simpler one ranked before them."""
    out: list[Estimate] = []
    seen: set[tuple] = set()
    for e in ranked:
        sig = (round(e.time.total, 9), round(e.memory.total), e.layout.tp, e.layout.pp, e.layout.ep, e.layout.ac)
        if sig not in seen:
            seen.add(sig)
            out.append(e)
    return out
