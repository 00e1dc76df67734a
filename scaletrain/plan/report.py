"""Planner output: the ranked table, why the winner wins and what would change the ranking,
the GPU-count sweep (table and PNG), and the winner as a config TOML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scaletrain.config.schema import Config, DataConfig, ModelConfig, TokenizerConfig, TrainConfig
from scaletrain.plan.cost import Estimate, Workload
from scaletrain.plan.hardware import GiB, Hardware
from scaletrain.plan.search import SearchResult, layout_config

# What a user can do about each cost (the "what would change the ranking" hints).
REMEDY = {"compute": "faster GEMMs (fp8, a faster GPU)", "recompute": "more memory per GPU (less checkpointing)",
          "fp8 cast": "fused fp8 casts (torch.compile)", "bubble": "more micro-batches per step",
          "overhead": "fewer, larger kernels (torch.compile)", "optimizer": "more sharding of the optimizer state",
          "comm interference": "less communication overlapped with compute",
          "TP comm": "faster NVLink", "CP comm": "faster NVLink or fewer context ranks",
          "FSDP comm": "more network bandwidth", "DP all-reduce": "more network bandwidth",
          "PP sends": "more network bandwidth", "EP all-to-all": "expert parallelism inside one NVLink domain"}
COMM_NAMES = {"tp": "TP comm", "cp": "CP comm", "dp_shard": "FSDP comm", "dp_replicate": "DP all-reduce",
              "pp": "PP sends", "ep": "EP all-to-all"}
COMM = tuple(COMM_NAMES.values())


def time_parts(e: Estimate) -> dict[str, float]:
    """Seconds per step by cause; every communication entry is the part NOT hidden by compute."""
    t = e.time
    parts = {"compute": t.compute - t.recompute, "recompute": t.recompute, "fp8 cast": t.fp8_cast,
             "comm interference": t.interference, "bubble": t.bubble, "overhead": t.overhead,
             "optimizer": t.optimizer}
    parts.update({COMM_NAMES[k]: v for k, v in t.exposed.items()})
    return parts


def bottleneck(e: Estimate, hw: Hardware) -> str:
    """What limits this layout most: compute, exposed communication, pipeline bubble, recompute,
    or memory headroom (under 10% of the GPU left)."""
    parts = time_parts(e)
    comm = sum(v for k, v in parts.items() if k in COMM)
    groups = {"compute": parts["compute"] + parts["fp8 cast"], "exposed communication": comm + parts["comm interference"],
              "pipeline bubble": parts["bubble"], "recompute": parts["recompute"],
              "host overhead": parts["overhead"] + parts["optimizer"]}
    name = max(groups, key=groups.get)
    text = f"{name} ({100 * groups[name] / e.time.total:.0f}% of the step{', with fp8 casts' if parts['fp8 cast'] and name == 'compute' else ''})"
    free = hw.hbm_bytes - e.memory.total
    if free < 0.1 * hw.hbm_bytes:
        text += f"; memory headroom only {free / GiB:.1f} GiB"
    return text


COLUMNS = [("#", 3), ("replicas", 8), ("FSDP", 5), ("TP", 3), ("PP", 3), ("schedule", 15), ("CP", 3), ("EP", 3),
           ("micro", 5), ("micro-", 7), ("activation", 10), ("step", 7), ("tokens/s", 9), ("MFU", 6),
           ("memory", 7), ("fits", 4)]
COLUMNS2 = ["", "(DP)", "shard", "", "", "", "", "", "batch", "batches", "checkpoint", "time s", "per GPU", "", "GiB", ""]
LEFT = (5, 10)  # schedule and activation checkpointing read left-aligned


def header() -> str:
    top = " ".join(f"{n:>{w}}" if i not in LEFT else f"{n:<{w}}" for i, (n, w) in enumerate(COLUMNS))
    sub = " ".join(f"{n:>{w}}" if i not in LEFT else f"{n:<{w}}" for i, (n, (_, w)) in enumerate(zip(COLUMNS2, COLUMNS)))
    return f"{top}\n{sub}"


def format_row(i: int | str, e: Estimate) -> str:
    lay = e.layout
    sched = "-" if lay.pp == 1 else (f"interleaved x{lay.virtual_stages}" if lay.virtual_stages > 1 else lay.pp_schedule)
    mfu = f"{100 * e.mfu:5.1f}%" if e.mfu is not None else "   n/a"
    cells = [f"{i:>3}", f"{lay.dp_replicate:>8}", f"{lay.dp_shard:>5}", f"{lay.tp:>3}", f"{lay.pp:>3}", f"{sched:<15}",
             f"{lay.cp:>3}", f"{lay.ep:>3}", f"{lay.micro_batch:>5}", f"{e.microbatches:>7}", f"{lay.ac:<10}", f"{e.time.total:7.3f}",
             f"{e.tokens_per_s_per_gpu:9,.0f}", mfu, f"{e.memory.total / GiB:7.1f}", f"{'yes' if e.fits else 'NO':>4}"]
    return " ".join(cells)


def format_breakdowns(e: Estimate, hw: Hardware) -> str:
    """Time and memory of one layout; zero-cost items stay in when they explain the layout (the
    bubble of a pipeline, recompute under checkpointing, communication that is fully hidden)."""
    parts = time_parts(e)
    work = [k for k in ("compute", "recompute", "fp8 cast", "comm interference", "bubble", "overhead", "optimizer")
            if parts[k] > 0 or k == "compute" or (k == "bubble" and e.layout.pp > 1)
            or (k == "recompute" and e.layout.ac != "none")]
    comm = [k for k in COMM if k in parts]
    tim = " + ".join(f"{k} {parts[k]:.3f}" for k in work)
    exposed = ", ".join(f"{k} {parts[k]:.3f}" for k in comm) or "none"
    mem = ", ".join(f"{k} {v / GiB:.1f}" for k, v in e.memory.parts().items())
    return (f"      step {e.time.total:.3f} s = {tim} + exposed communication (not hidden by compute): {exposed}\n"
            f"      memory per GPU, GiB (peak at the {e.memory.phase or 'n/a'} moment): {mem} = "
            f"{e.memory.total / GiB:.1f} of {hw.hbm_bytes / GiB:.1f}\n"
            f"      bottleneck: {bottleneck(e, hw)}")


def _secs(x: float) -> str:
    return f"{1000 * x:.2f} ms" if abs(x) < 0.01 else f"{x:.3f} s"


def _slower(e: Estimate, win: Estimate) -> str:
    rel = e.time.total / win.time.total - 1
    if rel < 1e-9:
        return "an exact tie with #1, ranked after it as the less simple layout (more CP/TP/PP ranks or replicas)"
    if rel < 1e-4:
        return "within 0.01% of #1, a tie (ranked after it: the simpler or smaller layout wins near-ties)"
    if rel < 1e-3:
        return f"{100 * rel:.2f}% slower, a tie within the model's accuracy"
    return f"{100 * rel:.1f}% slower"


def explain(result: SearchResult, hw: Hardware) -> str:
    """Why the winner wins, and for each runner-up what it loses and what would change the ranking."""
    if not result.ranked:
        return "No layout fits in memory: try more GPUs, a shorter sequence or a smaller global batch."
    win = result.ranked[0]
    wp = time_parts(win)
    comm = {k: v for k, v in wp.items() if k in COMM and v > 0}
    comm_text = ", ".join(f"{k} {100 * v / win.time.total:.0f}%" for k, v in comm.items()) or "none"
    lines = [f"Why #1: {win.layout.short()} reaches {win.tokens_per_s_per_gpu:,.0f} tokens/s per GPU. Of its "
             f"{win.time.total:.2f} s step, {100 * wp['compute'] / win.time.total:.0f}% is model compute, "
             f"{100 * wp['recompute'] / win.time.total:.0f}% recompute, {100 * wp['bubble'] / win.time.total:.0f}% "
             f"pipeline bubble, exposed communication: {comm_text}. It needs {win.memory.total / GiB:.1f} of "
             f"{hw.hbm_bytes / GiB:.1f} GiB. Bottleneck: {bottleneck(win, hw)}."]
    for i, e in enumerate(result.ranked[1:5], start=2):
        ep = time_parts(e)
        diffs = sorted(((ep.get(k, 0) - wp.get(k, 0), k) for k in set(ep) | set(wp)), key=lambda d: (-d[0], d[1]))
        loses = [(d, k) for d, k in diffs if d > 1e-6][:2]
        why = ", ".join(f"+{_secs(d)} {k}" for d, k in loses) or "the same time in every part"
        gap = e.time.total - win.time.total
        change = ""
        if loses and gap > 0:
            d, k = loses[0]
            change = f"; it would win if its {k} shrank by more than {_secs(gap)} ({REMEDY.get(k, k)})"
        lines.append(f"#{i} {e.layout.short()}: {_slower(e, win)} ({why}){change}.")
    for o in result.not_fitting[:1]:
        if o.tokens_per_s_per_gpu > win.tokens_per_s_per_gpu:
            lines.append(f"Faster but does NOT fit: {o.layout.short()} ({o.tokens_per_s_per_gpu:,.0f} tokens/s per "
                         f"GPU) needs {o.memory.total / GiB:.1f} GiB; it would win on a GPU with "
                         f"{(o.memory.total - hw.hbm_bytes) / GiB:.1f} GiB more memory.")
    return "\n".join(lines)


def format_result(result: SearchResult, hw: Hardware, top: int = 5) -> str:
    shown = result.ranked[:top]
    lines = [f"{result.evaluated:,} legal layouts priced, {result.fitting:,} predicted to fit in memory; the "
             f"{len(shown)} fastest of those are shown. Layouts read: dp REPLICAS x FSDP-SHARDS, tp/pp/cp degrees, "
             "ep = expert parallel (MoE; its ranks are FSDP ranks), mb = micro-batch in sequences, "
             "ac = activation checkpointing.", header()]
    for i, e in enumerate(shown, start=1):
        lines.append(format_row(i, e))
        lines.append(format_breakdowns(e, hw))
    for e in result.not_fitting[:2]:
        lines.append(format_row("-", e))
    if result.not_fitting:
        lines.append("(- = the fastest layouts predicted NOT to fit in memory; never recommended)")
    lines.append(explain(result, hw))
    return "\n".join(lines)


def winner_config(model: ModelConfig, w: Workload, e: Estimate, compile: bool = False) -> Config:
    """A full scaletrain Config running layout `e` unchanged (search.layout_config), in the
    plan's precision (fp8 with its recipe) and with a tokenizer that fits the model: a BPE
    trained locally on data.source up to model.vocab_size tokens."""
    _, parallel, batch, grad_accum = layout_config(e.layout, e.microbatches)
    model_cfg = ModelConfig(**{**model.__dict__, "max_seq_len": max(model.max_seq_len, w.seq_len)})
    cfg = Config(model=model_cfg, parallel=parallel)
    cfg.tokenizer = TokenizerConfig(kind="bpe", vocab_size=model.vocab_size)
    cfg.data = DataConfig(seq_len=w.seq_len, batch_size=batch)
    cfg.train = TrainConfig(grad_accum=grad_accum, precision=w.precision, compile=compile,
                            **({"fp8_recipe": w.fp8_recipe} if w.precision == "fp8" else {}))
    return cfg


def plan_header(model: ModelConfig, w: Workload, e: Estimate, hw: Hardware, gpus: int) -> str:
    """TOML comments recording the plan that produced a written config."""
    return (f"# Written by `scaletrain plan`: {model.flavor} on {gpus} x {hw.name}, {w.seq_len}-token sequences, "
            f"{w.global_batch} sequences per step, {w.precision}.\n"
            f"# Layout {e.layout.short()}; predicted {e.time.total:.3f} s per step, "
            f"{e.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, {e.memory.total / GiB:.1f} GiB per GPU "
            f"(the trainer's pre-flight check predicts the same).\n"
            f"# Train it on {gpus} ranks (torchrun world size {gpus}): scaletrain train --config THIS_FILE\n"
            "# Tokenizer: a BPE trained locally on data.source up to model.vocab_size; for a pretrained one set\n"
            "# tokenizer.kind = \"file\" and tokenizer.path = \"/path/to/tokenizer.json\".\n")


def write_winner(model: ModelConfig, w: Workload, e: Estimate, path: str | Path, hw: Hardware, gpus: int,
                 compile: bool = False) -> Config:
    """Write the winner's config as TOML (atomically), headed by the plan that produced it."""
    from scaletrain.config.load import write_config

    cfg = winner_config(model, w, e, compile)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_config(cfg, path, header=plan_header(model, w, e, hw, gpus))
    return cfg


@dataclass
class SweepPoint:
    gpus: int
    best: Estimate | None  # None when nothing fits


def _efficiency_base(points: list[SweepPoint]) -> float | None:
    """The highest tokens/s per GPU of any size: 100% per-GPU efficiency (never exceeded)."""
    fits = [p.best.tokens_per_s_per_gpu for p in points if p.best]
    return max(fits) if fits else None


def format_sweep(points: list[SweepPoint]) -> str:
    base = _efficiency_base(points)
    lines = ["per-GPU efficiency = tokens/s per GPU / the best tokens/s per GPU of any size in this sweep",
             f"{'GPUs':>6} {'tokens/s total':>15} {'tokens/s/GPU':>13} {'efficiency':>10} {'MFU':>6}  best layout"]
    for p in points:
        if p.best is None:
            lines.append(f"{p.gpus:>6} {'does not fit':>15}")
            continue
        eff = p.best.tokens_per_s_per_gpu / base
        mfu = f"{100 * p.best.mfu:5.1f}%" if p.best.mfu is not None else "   n/a"
        lines.append(f"{p.gpus:>6} {p.best.tokens_per_s_per_gpu * p.gpus:15,.0f} {p.best.tokens_per_s_per_gpu:13,.0f} "
                     f"{100 * eff:9.1f}% {mfu}  {p.best.layout.short()}")
    return "\n".join(lines)


def plot_sweep(points: list[SweepPoint], path: str | Path, title: str) -> None:
    """Tokens/s per GPU and MFU against GPU count (log2); each fitting size is numbered on the
    curve and its winning layout listed under the plot (labels never overlap each other or the
    title); sizes where nothing fits are marked "does not fit" on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit = [p for p in points if p.best is not None]
    miss = [p.gpus for p in points if p.best is None]
    legend = [f"{i}: {p.gpus} GPUs - {p.best.layout.short()}" for i, p in enumerate(fit, start=1)]
    legend += [f"{g} GPUs: does not fit" for g in miss]
    fig = plt.figure(figsize=(12, 5 + 0.18 * len(legend)))
    grid = fig.add_gridspec(2, 2, height_ratios=[5, 0.18 * max(1, len(legend))])
    for col, (ylabel, values) in enumerate((("tokens/s per GPU", [p.best.tokens_per_s_per_gpu for p in fit]),
                                            ("MFU (%)", [100 * (p.best.mfu or 0) for p in fit]))):
        ax = fig.add_subplot(grid[0, col])
        g = [p.gpus for p in fit]
        if fit:
            ax.plot(g, values, "o-")
            for i, (x, y) in enumerate(zip(g, values), start=1):
                ax.annotate(str(i), (x, y), fontsize=8, textcoords="offset points", xytext=(0, 7), ha="center")
            ax.set_ylim(0, 1.15 * max(values))
        for x in miss:
            ax.axvline(x, color="lightgray", lw=0.8)
            ax.plot([x], [0], "x", color="red")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs"), ax.set_ylabel(ylabel)
        if miss:
            ax.text(0.01, 0.02, "x = does not fit", transform=ax.transAxes, fontsize=8, color="red")
    text_ax = fig.add_subplot(grid[1, :])
    text_ax.axis("off")
    text_ax.text(0, 1, "\n".join(legend), va="top", family="monospace", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
