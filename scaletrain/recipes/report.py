"""Stage report of `scaletrain btx`: DIR/report.md, DIR/report.json and DIR/btx.png.

Every model of the recipe (seed, each branch, BTM, the mix before its finetune, BTX, upcycling,
dense) is evaluated by one `Evaluator` on the same validation batches; the table gives the loss
per domain and their unweighted mean next to the training behind each model, counted from
scratch (seed included): tokens, FLOPs (tokens x model/flops.py `flops_per_token` of each
stage's model, torchtitan convention, active parameters for an MoE), the stages' summed
training-step seconds and wall seconds, and for BTX and BTM the wall seconds had the branches
run at the same time on machines like this one (seed + slowest branch + the rest).

The routing picture: for the finetuned BTX model, per MoE layer, the share of each domain's
validation token slots (top-k per token) that each expert receives.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scaletrain.config.schema import Config, ModelConfig
from scaletrain.recipes.stages import write_json

REPORT_MD, REPORT_JSON, PICTURE = "report.md", "report.json", "btx.png"
CLAIM_GAP = 0.02  # the paper's claim checked per domain: BTX within 2% of that domain's own branch


def method_stages(domains: list[str]) -> dict[str, list[str]]:
    """Model name -> the stages that made it, from scratch, in order."""
    branches = [f"branch/{d}" for d in domains]
    out = {"seed": ["seed"], **{b: ["seed", b] for b in branches}, "btm": ["seed", *branches, "btm"],
           "mix": ["seed", *branches, "mix"], "btx": ["seed", *branches, "mix", "finetune"],
           "upcycle": ["seed", "upcycle_mix", "upcycle"], "dense": ["seed", "dense"]}
    return out


def method_totals(stages: dict[str, Any], domains: list[str]) -> dict[str, Any]:
    """Per model whose stages are all recorded: tokens, FLOPs, train and wall seconds summed
    over its stages, `tokens_after_seed` (what the baselines are matched on) and, for models
    built from branches, `wall_parallel_seconds` (the branches' wall time counted once, as
    their maximum). An external seed (--seed) adds its tokens_seen and nothing else."""
    out = {}
    for name, parts in method_stages(domains).items():
        if not all(p in stages for p in parts):
            continue
        rows = [stages[p] for p in parts]
        total = {k: round(sum(r.get(k) or 0 for r in rows), 3)
                 for k in ("tokens", "flops", "train_seconds", "wall_seconds")}
        total["tokens_after_seed"] = total["tokens"] - (stages["seed"].get("tokens") or 0)
        branch_walls = [stages[p]["wall_seconds"] for p in parts if p.startswith("branch/")]
        if len(branch_walls) > 1:
            total["wall_parallel_seconds"] = round(total["wall_seconds"] - sum(branch_walls) + max(branch_walls), 3)
        out[name] = total
    return out


def claims(evals: dict[str, Any], domains: list[str]) -> dict[str, Any]:
    """The paper's claim on this run: BTX's mean validation loss below the dense baseline's and
    BTM's, and on each domain within CLAIM_GAP of that domain's own branch (True/False, None
    when a model is missing)."""
    mean = {k: v["mean"] for k, v in evals.items()}
    out: dict[str, Any] = {"btx_beats_dense": None, "btx_beats_btm": None, "btx_near_branch": {}}
    if "btx" not in evals:
        return out
    for base in ("dense", "btm"):
        if base in mean:
            out[f"btx_beats_{base}"] = mean["btx"] < mean[base]
    for d in domains:
        own = evals.get(f"branch/{d}")
        if own:
            gap = evals["btx"]["losses"][d] / own["losses"][d] - 1
            out["btx_near_branch"][d] = {"gap": gap, "ok": gap <= CLAIM_GAP}
    return out


def write_report(cfg: Config, out: Path, models: dict[str, tuple[ModelConfig, Path]], state: dict[str, Any],
                 rank: int = 0, say: Callable[[str], None] = print) -> list[Path]:
    """Evaluate `models` (name -> (model config, final checkpoint), in report order) and write
    the report files into `out` from them and the recipe `state` (btx_state.json's content).
    Every rank evaluates (checkpoint reads are collective under torchrun); rank 0 writes.
    Returns the paths written."""
    from scaletrain.parallel.dims import init_distributed, read_env
    from scaletrain.recipes.evaluate import Evaluator

    init_distributed(read_env(cfg.train.device))
    domains = [d.name for d in cfg.data.domains]
    evaluator = Evaluator(cfg, rank)
    evals = {}
    for name, (model_cfg, ckpt) in models.items():
        say(f"report: evaluating {name} ({ckpt})")
        ev = evaluator(model_cfg, ckpt)
        evals[name] = {"checkpoint": str(ckpt), "losses": ev.losses, "mean": ev.mean, "routing": ev.routing or None}
    if rank != 0:
        return []
    load = os.getloadavg()
    experts = domains + (["seed"] if cfg.btx.seed_expert else [])  # what each expert of the mix was made from
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "domains": domains, "models": evals,
              "methods": state["methods"], "stages": state["stages"], "claims": claims(evals, domains),
              "experts": experts, "machine": {
                  "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                  "cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in load],
                  "device": str(evaluator.device)}}
    write_json(out / REPORT_JSON, report)
    paths = [out / REPORT_JSON]
    if "btx" in evals and evals["btx"]["routing"]:
        paths.append(plot_routing(evals["btx"]["routing"], experts, out / PICTURE))
    tmp = out / (REPORT_MD + ".tmp")
    tmp.write_text(format_report(report, cfg), encoding="utf-8")
    tmp.replace(out / REPORT_MD)
    return [out / REPORT_MD, *paths]


def routing_shares(routing: dict[str, dict[str, list[list[int]]]], kind: str) -> dict[str, list[list[float]]]:
    """Counts per domain -> `kind` ("first" | "slots") -> [layer][expert] (recipes/evaluate.py)
    -> the share of the domain's count in each layer, per domain."""
    return {d: [[c / max(1, sum(layer)) for c in layer] for layer in r[kind]] for d, r in routing.items()}


def plot_routing(routing: dict[str, dict[str, list[list[int]]]], experts: list[str], path: Path) -> Path:
    """DIR/btx.png: one heat map per MoE layer, domains x experts, the share of the domain's
    validation tokens whose first (highest-weighted) choice is the expert. Written under a
    temporary name and renamed."""
    from matplotlib.figure import Figure

    shares = routing_shares(routing, "first")
    domains = list(shares)
    n_layers = len(next(iter(shares.values())))
    fig = Figure(figsize=(max(6.0, 1.2 + 1.0 * len(experts) * n_layers), 1.6 + 0.55 * len(domains)), dpi=110,
                 layout="constrained")
    axes = fig.subplots(1, n_layers, squeeze=False)[0]
    for i, ax in enumerate(axes):
        grid = [shares[d][i] for d in domains]
        ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="Blues", aspect="auto")
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v > 0.6 else "black")
        ax.set_xticks(range(len(experts)), experts, fontsize=8)
        ax.set_yticks(range(len(domains)), domains if i == 0 else [""] * len(domains), fontsize=8)
        ax.set_title(f"layer {i}", fontsize=9)
        ax.set_xlabel("expert (trained on)", fontsize=8)
    axes[0].set_ylabel("validation domain", fontsize=8)
    fig.suptitle("BTX routing: share of each domain's tokens whose first choice is the expert", fontsize=10)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _f(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def format_report(r: dict[str, Any], cfg: Config) -> str:
    """report.md from the report dict (tables of models, stages and routing, the claim check)."""
    domains, models, methods = r["domains"], r["models"], r["methods"]
    m = r["machine"]
    lines = [f"# Branch-Train-MiX report\n",
             f"{r['date']} on {m['processor']} ({m['cpus']} CPUs, {m['platform']}; load average "
             f"{', '.join(map(str, m['load_average_1_5_15']))} when the report ran), evaluated on {m['device']}. "
             f"Validation: {cfg.train.eval_batches} batches x {cfg.data.batch_size} x {cfg.data.seq_len} tokens per "
             f"domain; loss in nats/token; mean = unweighted mean over the domains.\n",
             "## Validation loss and the training behind each model\n",
             f"| model | {' | '.join(domains)} | mean | tokens | tokens after seed | FLOPs | train s | wall s | "
             "wall s, branches in parallel |",
             "|---" * (len(domains) + 8) + "|"]
    for name, ev in models.items():
        t = methods.get(name, {})
        lines.append(f"| {name} | {' | '.join(_f(ev['losses'].get(d)) for d in domains)} | **{_f(ev['mean'])}** | "
                     f"{_f(t.get('tokens'), ',')} | {_f(t.get('tokens_after_seed'), ',')} | {_f(t.get('flops'), '.3g')}"
                     f" | {_f(t.get('train_seconds'), '.1f')} | {_f(t.get('wall_seconds'), '.1f')} | "
                     f"{_f(t.get('wall_parallel_seconds'), '.1f')} |")
    lines += ["", "mix = the mixed MoE before its finetune (new routers); btm = the branches' mean, not trained "
              "after the merge (Branch-Train-Merge as weight averaging); dense and upcycle train on as many tokens "
              "after the seed as the branches and the finetune together (compute-matched in tokens; an MoE token "
              "costs more FLOPs).\n", "## Stages\n",
              "| stage | steps | tokens | FLOPs | train s | wall s | attempts |", "|---|---|---|---|---|---|---|"]
    for name, s in r["stages"].items():
        lines.append(f"| {name}{' (external)' if s.get('external') else ''} | {_f(s.get('steps'), 'd')} | "
                     f"{_f(s.get('tokens'), ',')} | {_f(s.get('flops'), '.3g')} | {_f(s.get('train_seconds'), '.1f')} | "
                     f"{_f(s.get('wall_seconds'), '.1f')} | {_f(s.get('attempts'), 'd')} |")
    c = r["claims"]
    lines += ["", "## The paper's claim on this run\n"]
    if c["btx_beats_dense"] is None and c["btx_beats_btm"] is None and not c["btx_near_branch"]:
        lines.append("Not checked: BTX or the baselines are missing.")
    for base in ("dense", "btm"):
        if c[f"btx_beats_{base}"] is not None:
            lines.append(f"- BTX's mean below {base}'s ({_f(models['btx']['mean'])} vs {_f(models[base]['mean'])}): "
                         f"**{'yes' if c[f'btx_beats_{base}'] else 'no'}**")
    for d, g in c["btx_near_branch"].items():
        lines.append(f"- {d}: BTX {_f(models['btx']['losses'][d])} vs branch/{d} {_f(models[f'branch/{d}']['losses'][d])}"
                     f" ({g['gap']:+.2%}; within {CLAIM_GAP:.0%}: **{'yes' if g['ok'] else 'no'}**)")
    routing = (models.get("btx") or {}).get("routing")
    if routing:
        first, slots = routing_shares(routing, "first"), routing_shares(routing, "slots")
        e = r["experts"]
        lines += ["", f"## Routing of the finetuned BTX model ({PICTURE})\n",
                  "Share of each domain's validation tokens whose first (highest-weighted) choice is each expert, "
                  f"and share of its top-{cfg.model.moe_top_k} slots:\n",
                  f"| layer | domain | {' | '.join(f'first: {x}' for x in e)} | {' | '.join(f'slots: {x}' for x in e)} |",
                  "|---" * (2 * len(e) + 2) + "|"]
        for i in range(len(next(iter(first.values())))):
            for d in first:
                lines.append(f"| {i} | {d} | {' | '.join(f'{v:.2f}' for v in first[d][i])} | "
                             f"{' | '.join(f'{v:.2f}' for v in slots[d][i])} |")
    return "\n".join(lines) + "\n"
