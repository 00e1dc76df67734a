"""`scaletrain btx --plan --gpus N --gpu NAME`: price every stage of a BTX recipe with the
planner's layout search (plan/search.py) before a GPU-hour is spent (docs/btx.md).

Each stage is priced as the best layout the search ranks for its model on its GPUs, at the
recipe's global batch (one for every stage, as the recipe keeps it when a branch runs on
another layout): stage seconds = steps x predicted step seconds. The point of the table is the
branch stage: k branches as k independent jobs on N/k GPUs each (no communication between
them; wall = branch_steps x step time on N/k GPUs) against the same tokens as one synchronous
job on all N GPUs (k x branch_steps steps at the step time on N GPUs). With perfect scaling
the two are equal; the planner predicts how much the smaller jobs gain from less
communication and better per-GPU efficiency.

MoE stages (the finetune and the upcycling baseline) are priced the same way, with the
planner's MoE terms (plan/cost_moe.py: routed experts' GEMMs and memory, the router, all-to-all
under expert parallelism, which the search also ranks). The mix is a host-side job: its memory
is given (recipes/mix.py `peak_bytes`), not a GPU time.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.schema import Config, ModelConfig
from scaletrain.errors import ConfigError
from scaletrain.parallel.dims import resolve_precision
from scaletrain.recipes.btx import matched_steps, n_experts
from scaletrain.recipes.mix import moe_config, peak_bytes


@dataclass
class PricedStage:
    """One priced row: `jobs` jobs at the same time of `gpus` GPUs each, `steps` steps each."""

    name: str
    gpus: int
    jobs: int
    steps: int
    step_seconds: float | None = None  # predicted; None when no layout fits (the note says why)
    layout: str = ""
    note: str = ""

    @property
    def seconds(self) -> float | None:
        """Predicted wall seconds of the stage (its jobs run at the same time)."""
        return None if self.step_seconds is None else self.steps * self.step_seconds

    @property
    def gpu_hours(self) -> float | None:
        return None if self.seconds is None else self.seconds * self.gpus * self.jobs / 3600


def best_step(model: ModelConfig, seq_len: int, global_batch: int, gpus: int, hw, precision: str, compile: bool):
    """(predicted step seconds, layout) of the fastest layout the planner predicts to fit, or
    (None, why not)."""
    from scaletrain.plan.cost import Workload
    from scaletrain.plan.memcheck import scaletrain_stack
    from scaletrain.plan.search import search

    w = Workload(model, seq_len, global_batch, precision)
    try:
        ranked = search(w, gpus, hw, scaletrain_stack(compile, precision, "tensorwise"), top=1).ranked
    except ConfigError as e:
        return None, str(e)
    if not ranked:
        return None, f"no layout fits on {gpus} GPUs"
    return ranked[0].time.total, ranked[0].layout.short()


def price_btx(cfg: Config, gpus: int, hw, global_batch_tokens: int | None = None) -> list[PricedStage]:
    """The priced stages of the recipe of `cfg` on `gpus` GPUs of `hw` (module docstring).
    `global_batch_tokens` defaults to the config as written on all `gpus`:
    data.batch_size x data.seq_len x train.grad_accum x gpus."""
    k, seq, b = len(cfg.data.domains), cfg.data.seq_len, cfg.btx
    if gpus < k or gpus % k:
        raise ConfigError(f"--gpus {gpus} must split evenly among the {k} branches (one job of --gpus / {k} GPUs "
                          "each); use a multiple of the number of domains.")
    tokens = global_batch_tokens or cfg.data.batch_size * seq * cfg.train.grad_accum * gpus
    if tokens % seq:
        raise ConfigError(f"--global-batch-tokens {tokens} is not a multiple of data.seq_len {seq}.")
    batch = tokens // seq
    precision = resolve_precision(cfg.train.precision, "cuda")  # priced on GPUs
    moe = moe_config(cfg.model, n_experts(cfg))
    step = {(m.moe_experts, n): best_step(m, seq, batch, n, hw, precision, bool(cfg.train.compile))
            for m, n in ((cfg.model, gpus), (cfg.model, gpus // k), (moe, gpus))}

    def priced(name: str, model: ModelConfig, n: int, jobs: int, steps: int) -> PricedStage:
        t, lay = step[model.moe_experts, n]
        return PricedStage(name, n, jobs, steps, t, lay if t is not None else "", "" if t is not None else lay)

    mix_gib = peak_bytes(cfg.model, n_experts(cfg)) / 2**30
    rows = [priced("seed", cfg.model, gpus, 1, b.seed_steps),
            priced(f"branches: {k} independent jobs", cfg.model, gpus // k, k, b.branch_steps),
            priced("  the same tokens as one synchronous job", cfg.model, gpus, 1, k * b.branch_steps),
            PricedStage("mix", 0, 1, 0, note=f"host job: ~{mix_gib:.1f} GiB of memory, seconds to minutes"),
            priced(f"finetune (MoE, {moe.moe_experts} experts, top-{moe.moe_top_k})", moe, gpus, 1, b.finetune_steps)]
    if b.baselines:
        rows += [priced("baseline dense (compute-matched)", cfg.model, gpus, 1, matched_steps(cfg)),
                 priced("baseline upcycle (MoE)", moe, gpus, 1, matched_steps(cfg))]
    return rows


def _hours(s: float | None) -> str:
    return "-" if s is None else f"{s / 3600:.2f}"


def format_plan(cfg: Config, rows: list[PricedStage], gpus: int, hw_name: str, tokens: int) -> str:
    """The table and the branch stage's saving, as printed by `btx --plan`."""
    k = len(cfg.data.domains)
    out = [f"BTX recipe of {cfg.model.flavor} ({k} domains) on {gpus} x {hw_name}, {tokens:,} tokens per step "
           f"({tokens // cfg.data.seq_len:,} sequences of {cfg.data.seq_len}); predicted by the planner's search",
           f"{'stage':42} {'GPUs':>10} {'steps':>7} {'step s':>8} {'hours':>7} {'GPU-h':>8}  layout / note"]
    for r in rows:
        gpus_txt = "-" if not r.gpus else (f"{r.jobs} x {r.gpus}" if r.jobs > 1 else str(r.gpus))
        out.append(f"{r.name:42} {gpus_txt:>10} {r.steps or '-':>7} "
                   f"{'-' if r.step_seconds is None else f'{r.step_seconds:.3f}':>8} {_hours(r.seconds):>7} "
                   f"{'-' if r.gpu_hours is None else f'{r.gpu_hours:.1f}':>8}  {r.layout or r.note}")
    par, sync = rows[1].seconds, rows[2].seconds
    if par and sync:
        out.append(f"branch stage: {_hours(par)} h as {k} independent jobs vs {_hours(sync)} h as one synchronous "
                   f"job on the same {gpus} GPUs: {1 - par / sync:+.1%} wall-clock saved (and no communication "
                   "between the jobs, which may run on different clusters at different times)")
    return "\n".join(out)
