"""Fit the cost model's global parameters to published rows, and cross-validate the fit.

`fit(cases)` re-derives every parameter named in cost.FITTED from the given rows only: a
deterministic coordinate search over each parameter's grid (GRID, physically plausible ranges),
starting from the neutral START (never from the shipped values, which are themselves a fit on
the whole development set), minimising the mean absolute log error of tokens/s per GPU. It runs
in two stages: the parameters every model shares from the dense rows, then the MoE-only term
(MOE_ONLY) from the MoE rows with those fixed, so the MoE rows (one publication, whose
container versions differ by up to 1.8x on identical configurations) never move the GEMM,
attention, elementwise and overlap physics the dense rows determine. The shipped cost.PARAMS
are `fit(all development rows)` (tests/unit/test_plan_fit.py re-runs it).

`cross_validate(cases, by)` holds out one group at a time ("source": a publication, "model": an
architecture), fits on the other groups and predicts the held-out rows with that fit, so no
fitted parameter has seen the rows it is judged on. Its report gives, per group and overall, the
median and p90 of the held-out |errors| beside the in-sample ones (all rows, one fit).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from scaletrain.plan.cost import FITTED, PARAMS, Params
from scaletrain.plan.validate import Case, pct, predict

# Candidate values of each fitted parameter (cost.Params documents what each one means).
GRID: dict[str, tuple[float, ...]] = {
    "mamf_scale": tuple(round(0.60 + 0.025 * i, 3) for i in range(19)),  # 0.60 .. 1.05
    "matmul_half_dim": (0.0, 25.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0),
    "attn_eff_scale": tuple(round(0.30 + 0.05 * i, 2) for i in range(19)),  # 0.30 .. 1.20
    "elementwise_passes_eager": tuple(float(x) for x in range(2, 17)),
    "elementwise_passes_fused": tuple(0.5 * x for x in range(2, 21)),  # 1 .. 10
    "overlap_interference": tuple(round(0.05 * i, 2) for i in range(13)),  # 0 .. 0.6
    "moe_host_scale": tuple(float(i) for i in range(21)),  # 0 .. 20 x the launch-count prior
}
# Where every fit starts: the middle of each grid, so a fit depends on its rows only; except
# moe_host_scale, which starts at 1: the MoE layer's host time is then its launch-count prior
# (cost_moe.moe_host_prior_s, counted, not fitted). Only MoE rows move it, and a fit without any
# (a held-out group holding them all) prices MoE layers with the prior, not without the term.
START = Params(mamf_scale=0.85, matmul_half_dim=100.0, attn_eff_scale=0.75, elementwise_passes_eager=8.0,
               elementwise_passes_fused=4.0, overlap_interference=0.3, moe_host_scale=1.0)
MAX_SWEEPS = 6


def log_errors(cases: list[Case], p: Params) -> list[float]:
    """log(predicted / measured) tokens/s per GPU of every case under `p`."""
    return [math.log(predict(c, p).predicted_tokens_per_s_per_gpu / c.measured_tokens_per_s_per_gpu) for c in cases]


def objective(cases: list[Case], p: Params) -> float:
    """Mean |log(predicted / measured)|: every row counts, none dominates (an L1 fit)."""
    return statistics.fmean(abs(e) for e in log_errors(cases, p))


# Parameters that only MoE layers use: fitted on the MoE rows alone, after the shared ones.
MOE_ONLY = ("moe_host_scale",)


def fit(cases: list[Case], start: Params = START, names: tuple[str, ...] = FITTED) -> Params:
    """The Params minimising `objective`: the shared parameters over the dense rows of `cases`,
    then the MOE_ONLY ones over its MoE rows (a stage without rows keeps its START values)."""
    if not cases:
        raise ValueError("fit needs at least one row")
    moe = [c for c in cases if c.workload.model.moe_experts]
    dense = [c for c in cases if not c.workload.model.moe_experts]
    p = start
    for rows, group in ((dense, [n for n in names if n not in MOE_ONLY]), (moe, [n for n in names if n in MOE_ONLY])):
        if rows and group:
            p = coordinate_fit(rows, p, tuple(group))
    return p


def coordinate_fit(cases: list[Case], start: Params, names: tuple[str, ...]) -> Params:
    """The Params minimising `objective` over `cases` by coordinate search on GRID over `names`.
    Deterministic: parameters are visited in the given order and a tie keeps the value visited
    first."""
    best, best_obj = start, objective(cases, start)
    for _ in range(MAX_SWEEPS):
        moved = False
        for name in names:
            for value in GRID[name]:
                trial = dataclasses.replace(best, **{name: value})
                obj = objective(cases, trial)
                if obj < best_obj - 1e-12:
                    best, best_obj, moved = trial, obj, True
        if not moved:
            break
    return best


def group_key(by: str) -> Callable[[Case], str]:
    """Grouping of rows for cross-validation: "source" (publication) or "model" (architecture)."""
    if by == "source":
        return lambda c: c.source_id
    if by == "model":
        return lambda c: "x".join(str(a) for a in c.arch)
    raise ValueError(f"unknown cross-validation grouping {by!r}; use 'source' or 'model'")


@dataclass
class GroupResult:
    group: str
    label: str  # a readable name (the source id, or the first model name of an architecture)
    rows: int
    held_out: list[float]  # relative errors of this group's rows predicted by the fit without them
    in_sample: list[float]  # the same rows predicted by the fit on all rows
    params: Params  # the fit without this group
    moe: list[bool]  # per row: a mixture-of-experts model


@dataclass
class CVReport:
    by: str
    groups: list[GroupResult]
    all_rows: Params  # the fit on every row (in-sample)

    def overall(self, which: str, moe: bool | None = None) -> tuple[float, float] | None:
        """(median, p90) |relative error| of the `which` ("held_out" / "in_sample") predictions of
        every row, or of the dense (moe=False) or MoE (moe=True) rows only; None when there are none."""
        errs = [abs(e) for g in self.groups for e, m in zip(getattr(g, which), g.moe) if moe is None or m == moe]
        return (statistics.median(errs), pct(errs, 0.9)) if errs else None


def rel_errors(cases: list[Case], p: Params) -> list[float]:
    return [math.expm1(e) for e in log_errors(cases, p)]


def cross_validate(cases: list[Case], by: str = "source", start: Params = START) -> CVReport:
    """Leave-one-group-out: for each group, fit on the others and predict it."""
    key = group_key(by)
    groups: dict[str, list[Case]] = {}
    for c in cases:
        groups.setdefault(key(c), []).append(c)
    everything = fit(cases, start)
    out = []
    for g, members in groups.items():
        rest = [c for c in cases if key(c) != g]
        p = fit(rest, start) if rest else everything
        out.append(GroupResult(g, members[0].source_id if by == "source" else members[0].model, len(members),
                               rel_errors(members, p), rel_errors(members, everything), p,
                               [c.workload.model.moe_experts > 0 for c in members]))
    names = [g.label for g in out]
    for g in out:  # reduced-depth proxies share their model's name: say which is which
        if names.count(g.label) > 1:
            g.label += f" ({groups[g.group][0].arch[0]} layers)"
    return CVReport(by, sorted(out, key=lambda r: (-r.rows, r.label)), everything)


def _med_p90(xs: list[float]) -> str:
    a = [abs(x) for x in xs]
    return f"{100 * statistics.median(a):5.1f}% {100 * pct(a, 0.9):5.1f}%"


def format_cv(r: CVReport) -> str:
    lines = [f"Leave-one-{r.by}-out cross-validation: each group is predicted by a fit of "
             f"{', '.join(FITTED)} on the other groups only.",
             f"{'held-out group':<34} {'rows':>4}  {'held-out median p90':>20}  {'in-sample median p90':>21}  fit without it"]
    for g in r.groups:
        fitted = ", ".join(f"{n}={getattr(g.params, n):g}" for n in FITTED)
        lines.append(f"{g.label[:34]:<34} {g.rows:>4}  {_med_p90(g.held_out):>20}  {_med_p90(g.in_sample):>21}  {fitted}")
    for name, moe in (("overall", None), ("overall, dense rows", False), ("overall, MoE rows", True)):
        n = sum(m == moe or moe is None for g in r.groups for m in g.moe)
        if n and (moe is None or n < sum(g.rows for g in r.groups)):
            (hm, hp), (im, ip) = r.overall("held_out", moe), r.overall("in_sample", moe)
            lines.append(f"{name:<34} {n:>4}  {100 * hm:5.1f}% {100 * hp:5.1f}%   {100 * im:5.1f}% {100 * ip:5.1f}%")
    lines.append("(|relative error| of tokens/s per GPU; in-sample = one fit on every row: "
                 + ", ".join(f"{n}={getattr(r.all_rows, n):g}" for n in FITTED) + ")")
    return "\n".join(lines)


def shipped_is_fit(cases: list[Case]) -> bool:
    """True when cost.PARAMS equals the fit on `cases` (the shipped values are reproducible)."""
    fitted = fit(cases)
    return all(getattr(fitted, n) == getattr(PARAMS, n) for n in FITTED)
