"""Enumerate the valid parallel layouts of a workload on a GPU count and rank them.

A layout is valid when (DESIGN.md, parallel/dims.py): every degree divides the GPU count;
tp divides n_heads and n_kv_heads and seq_len (sequence parallel), and tp <= gpus_per_node
(tensor parallelism stays on NVLink); pp divides n_layers (pp * virtual stages for
interleaved 1F1B); seq_len % (2*cp) == 0 (load-balanced causal CP); the global batch splits
evenly over dp * micro_batch; a pipeline gets at least pp micro-batches (a multiple of pp
for interleaved). Ranking: layouts predicted to fit first, by tokens/s per GPU; a layout
predicted not to fit is never the recommendation.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.errors import ConfigError
from scaletrain.plan.cost import Estimate, Layout, Stack, Workload, estimate
from scaletrain.plan.hardware import Hardware

AC_CHOICES = ("none", "selective", "full")
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


def enumerate_layouts(w: Workload, gpus: int, hw: Hardware) -> list[Layout]:
    """Every valid layout of `w` on `gpus` GPUs (see the module docstring for the rules)."""
    m = w.model
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}.")
    out: list[Layout] = []
    for tp in divisors(gpus):
        if tp > hw.gpus_per_node or m.n_heads % tp or m.n_kv_heads % tp or w.seq_len % tp:
            continue
        for pp in divisors(gpus // tp):
            if m.n_layers % pp:
                continue
            for cp in divisors(gpus // (tp * pp)):
                if cp > 1 and w.seq_len % (2 * cp):
                    continue
                dp = gpus // (tp * pp * cp)
                if w.global_batch % dp:
                    continue
                local = w.global_batch // dp
                for dp_shard in _shard_choices(dp, hw.gpus_per_node):
                    for mb in (d for d in divisors(local) if d <= MAX_MICRO_BATCH):
                        n_micro = local // mb
                        if pp > 1 and n_micro < pp:
                            continue
                        for sched, v in _schedules(pp, m.n_layers, n_micro):
                            for ac in AC_CHOICES:
                                out.append(Layout(dp // dp_shard, dp_shard, tp, pp, cp, sched, v, mb, ac))
    return out


def _schedules(pp: int, n_layers: int, n_micro: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    out = [("gpipe", 1), ("1f1b", 1)]
    if n_micro % pp == 0:
        out += [("interleaved_1f1b", v) for v in range(2, MAX_VIRTUAL_STAGES + 1) if n_layers % (pp * v) == 0]
    return out


@dataclass
class SearchResult:
    ranked: list[Estimate]  # fitting layouts, best first
    not_fitting: list[Estimate]  # best-throughput layouts that are predicted to run out of memory
    evaluated: int


def search(w: Workload, gpus: int, hw: Hardware, stack: Stack = Stack(), top: int = 10) -> SearchResult:
    """Evaluate every valid layout; keep the `top` fitting ones (best tokens/s per GPU first)
    and the `top` fastest non-fitting ones (for the report). Raises ConfigError when no
    valid layout exists."""
    layouts = enumerate_layouts(w, gpus, hw)
    if not layouts:
        raise ConfigError(
            f"no valid layout of {w.model.flavor} on {gpus} GPUs with global batch {w.global_batch} sequences "
            f"of {w.seq_len} tokens: the batch must split over the data-parallel ranks. Use a GPU count and "
            "global batch with common factors (e.g. powers of two).")
    estimates = [estimate(w, lay, hw, stack) for lay in layouts]
    # Ties (e.g. cp=2 x micro-batch 1 vs cp=4 x micro-batch 2: the same tokens per rank) go to
    # the simpler layout: fewer context/tensor/pipeline ranks, fewer replicas.
    def key(e: Estimate) -> tuple:
        lay = e.layout
        return (-round(e.tokens_per_s_per_gpu, 6), round(e.memory.total), lay.cp, lay.tp, lay.pp, lay.dp_replicate)

    fits = _dedupe(sorted((e for e in estimates if e.fits), key=key))
    oom = _dedupe(sorted((e for e in estimates if not e.fits), key=key))
    return SearchResult(fits[:top], oom[:top], len(estimates))


def _dedupe(ranked: list[Estimate]) -> list[Estimate]:
    """Drop layouts predicted identical (time and memory) to a simpler one ranked before them."""
    out: list[Estimate] = []
    seen: set[tuple] = set()
    for e in ranked:
        sig = (round(e.time.total, 9), round(e.memory.total), e.layout.tp, e.layout.pp, e.layout.ac)
        if sig not in seen:
            seen.add(sig)
            out.append(e)
    return out
