"""Planner output: ranked tables, the why, the scaling plot (PNG) and the winner as TOML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scaletrain.config.schema import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig
from scaletrain.plan.cost import Estimate, Workload
from scaletrain.plan.hardware import GiB, Hardware
from scaletrain.plan.search import SearchResult


def _time_parts(e: Estimate) -> dict[str, float]:
    t = e.time
    parts = {"compute": t.compute, "bubble": t.bubble, "overhead": t.overhead, "optimizer": t.optimizer}
    parts.update({f"{k} comm": v for k, v in t.exposed.items()})
    return parts


def _layout_cols(e: Estimate) -> str:
    lay = e.layout
    sched = "-" if lay.pp == 1 else (f"i1f1b/v{lay.virtual_stages}" if lay.virtual_stages > 1 else lay.pp_schedule)
    return (f"{lay.dp_replicate:>4} {lay.dp_shard:>5} {lay.tp:>3} {lay.pp:>3} {sched:<9} {e.microbatches:>4} "
            f"{lay.cp:>3} {lay.ac:<9} {lay.micro_batch:>3}")


HEADER = (f"{'#':>3} {'repl':>4} {'shard':>5} {'tp':>3} {'pp':>3} {'schedule':<9} {'mbs#':>4} {'cp':>3} {'ac':<9} "
          f"{'mb':>3} {'step s':>8} {'tok/s/GPU':>10} {'MFU':>6} {'mem GiB':>8}  fit")


def format_row(i: int | str, e: Estimate) -> str:
    mfu = f"{100 * e.mfu:5.1f}%" if e.mfu is not None else "   n/a"
    return (f"{i:>3} {_layout_cols(e)} {e.time.total:8.3f} {e.tokens_per_s_per_gpu:10.0f} {mfu} "
            f"{e.memory.total / GiB:8.1f}  {'yes' if e.fits else 'NO (OOM)'}")


def format_breakdowns(e: Estimate) -> str:
    mem = ", ".join(f"{k} {v / GiB:.1f}" for k, v in e.memory.parts().items())
    total = e.time.total
    tim = ", ".join(f"{k} {v:.3f} s ({100 * v / total:.0f}%)" for k, v in _time_parts(e).items() if v > 0)
    return f"    memory/GPU GiB: {mem}\n    time/step: {tim}"


def explain(result: SearchResult, hw: Hardware) -> str:
    """Why the winner wins and what each runner-up loses (the two largest time differences)."""
    if not result.ranked:
        return "No layout fits in memory: try more GPUs, a shorter sequence or a smaller global batch."
    win = result.ranked[0]
    wp = _time_parts(win)
    head = max(wp, key=wp.get)
    lines = [f"Winner: {win.layout.short()} -- {win.tokens_per_s_per_gpu:.0f} tokens/s/GPU; "
             f"{100 * wp['compute'] / win.time.total:.0f}% of its step is compute, the largest cost is {head}; "
             f"it uses {win.memory.total / GiB:.1f} of {hw.hbm_bytes / GiB:.1f} GiB."]
    for i, e in enumerate(result.ranked[1:5], start=2):
        ep = _time_parts(e)
        diffs = sorted(((ep.get(k, 0) - wp.get(k, 0), k) for k in set(ep) | set(wp)), reverse=True)
        why = ", ".join(f"+{d:.3f} s {k}" for d, k in diffs[:2] if d > 1e-4) or "equal time; more memory or a more complex layout"
        slower = 100 * (e.time.total / win.time.total - 1)
        lines.append(f"#{i} {e.layout.short()}: {slower:.1f}% slower ({why}).")
    if result.not_fitting and result.not_fitting[0].tokens_per_s_per_gpu > win.tokens_per_s_per_gpu:
        o = result.not_fitting[0]
        lines.append(f"Faster but does NOT fit: {o.layout.short()} ({o.tokens_per_s_per_gpu:.0f} tokens/s/GPU, "
                     f"needs {o.memory.total / GiB:.1f} GiB > {hw.hbm_bytes / GiB:.1f} GiB).")
    return "\n".join(lines)


def format_result(result: SearchResult, hw: Hardware, top: int = 5) -> str:
    lines = [HEADER]
    for i, e in enumerate(result.ranked[:top], start=1):
        lines.append(format_row(i, e))
        lines.append(format_breakdowns(e))
    for e in result.not_fitting[:2]:
        lines.append(format_row("x", e))
    lines.append(f"({result.evaluated} layouts evaluated; {len(result.ranked)} best fitting shown up to {top}; "
                 "x = predicted not to fit)")
    lines.append(explain(result, hw))
    return "\n".join(lines)


def winner_config(model: ModelConfig, w: Workload, e: Estimate, precision: str = "bf16") -> Config:
    """A full scaletrain Config running layout `e` unchanged. With pp > 1, data.batch_size is
    the per-rank batch of one pipeline step (micro_batch * pp_microbatches) and the schedule
    splits it; otherwise data.batch_size is the micro-batch and grad_accum the count."""
    lay = e.layout
    n_micro = e.microbatches
    model_cfg = ModelConfig(**{**model.__dict__, "max_seq_len": max(model.max_seq_len, w.seq_len)})
    cfg = Config(model=model_cfg)
    cfg.data = DataConfig(seq_len=w.seq_len, batch_size=lay.micro_batch * (n_micro if lay.pp > 1 else 1))
    cfg.train = TrainConfig(grad_accum=1 if lay.pp > 1 else n_micro, precision=precision)
    cfg.parallel = ParallelConfig(dp_replicate=lay.dp_replicate, dp_shard=lay.dp_shard, tp=lay.tp, pp=lay.pp,
                                  cp=lay.cp, pp_schedule=lay.pp_schedule,
                                  pp_microbatches=n_micro if lay.pp > 1 else 0, ac=lay.ac)
    return cfg


def write_winner(model: ModelConfig, w: Workload, e: Estimate, path: str | Path, precision: str = "bf16") -> Config:
    """Write the winner's config as TOML (atomically) and return it."""
    from scaletrain.config.load import write_config

    cfg = winner_config(model, w, e, precision)
    write_config(cfg, path)
    return cfg


@dataclass
class SweepPoint:
    gpus: int
    best: Estimate | None  # None when nothing fits


def format_sweep(points: list[SweepPoint]) -> str:
    base = next((p for p in points if p.best), None)
    lines = [f"{'GPUs':>6} {'tok/s total':>12} {'tok/s/GPU':>10} {'efficiency':>10} {'MFU':>6}  best layout"]
    for p in points:
        if p.best is None:
            lines.append(f"{p.gpus:>6} {'no layout fits':>12}")
            continue
        eff = p.best.tokens_per_s_per_gpu / base.best.tokens_per_s_per_gpu if base else 1.0
        mfu = f"{100 * p.best.mfu:5.1f}%" if p.best.mfu is not None else "   n/a"
        lines.append(f"{p.gpus:>6} {p.best.tokens_per_s_per_gpu * p.gpus:12.3g} {p.best.tokens_per_s_per_gpu:10.0f} "
                     f"{100 * eff:9.1f}% {mfu}  {p.best.layout.short()}")
    return "\n".join(lines)


def plot_sweep(points: list[SweepPoint], path: str | Path, title: str) -> None:
    """Two panels against GPU count (log2): total tokens/s with ideal linear scaling, and
    per-GPU efficiency relative to the smallest size; each point labelled with its layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in points if p.best is not None]
    if not pts:
        return
    g = [p.gpus for p in pts]
    total = [p.best.tokens_per_s_per_gpu * p.gpus for p in pts]
    per = [p.best.tokens_per_s_per_gpu for p in pts]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.plot(g, total, "o-", label="predicted")
    a.plot(g, [total[0] * x / g[0] for x in g], "--", color="gray", label="linear scaling")
    a.set_xscale("log", base=2), a.set_yscale("log")
    a.set_xlabel("GPUs"), a.set_ylabel("tokens/s (cluster)"), a.legend(), a.set_title(title)
    b.plot(g, [100 * x / per[0] for x in per], "o-")
    for p, x, y in zip(pts, g, per):
        lay = p.best.layout
        b.annotate(f"tp{lay.tp} pp{lay.pp} cp{lay.cp}\n{lay.ac}", (x, 100 * y / per[0]), fontsize=6,
                   textcoords="offset points", xytext=(0, 6), ha="center")
    b.set_xscale("log", base=2)
    b.set_xlabel("GPUs"), b.set_ylabel(f"tokens/s per GPU, % of {g[0]} GPUs"), b.set_title("per-GPU efficiency")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
