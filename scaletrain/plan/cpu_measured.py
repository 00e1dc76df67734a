"""Measured block and head times of a calibrated CPU profile, priced at a run's shapes.

`plan calibrate` on a CPU times the model's real transformer block (forward + backward, per
activation-checkpointing mode, optionally compiled) at a few (tokens T, sequence length s)
points and the final norm + head + loss at a few token counts (plan/calibrate_cpu.py). A
step then costs layers x block(T, s) + head(T) per micro-batch; nothing here is fitted to a
training run.

Each series is priced by a least-squares fit through its measured points of

    block(T, s) = c + a T + b T s        head(T) = c + a T

(c: the fixed dispatch of the block's ops, a: per-token work of GEMMs and elementwise ops,
b: causal attention, whose work per token grows with the context), with non-negative
coefficients and relative residuals, so a point measured during a slow spell of a shared
machine is averaged with the others instead of being reproduced. Seconds throughout.
"""

from __future__ import annotations

import functools
import itertools

import torch


def _fit(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Non-negative least squares of sum(((X w - y) / y)^2), by trying every active set (at most
    three columns); returns w."""
    n = len(rows[0])
    x = torch.tensor(rows, dtype=torch.float64) / torch.tensor(ys, dtype=torch.float64)[:, None]
    y = torch.ones(len(ys), dtype=torch.float64)
    best, best_err = [0.0] * n, float("inf")
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            sub = x[:, list(cols)]
            w = torch.linalg.lstsq(sub, y[:, None], driver="gelsd").solution[:, 0]
            if (w < 0).any():
                continue
            err = float(((sub @ w - y) ** 2).sum())
            if err < best_err - 1e-15:
                full = [0.0] * n
                for c, v in zip(cols, w.tolist()):
                    full[c] = v
                best, best_err = full, err
    return best


@functools.lru_cache(maxsize=64)
def _block_law(points: tuple[tuple[float, ...], ...]) -> tuple[float, ...]:
    """(c, a, b) of one measured series, fitted once (the search prices thousands of layouts)."""
    return tuple(_fit([[1.0, t, t * s] for t, s, _ in points], [sec for _, _, sec in points]))


@functools.lru_cache(maxsize=64)
def _head_law(points: tuple[tuple[float, ...], ...]) -> tuple[float, ...]:
    return tuple(_fit([[1.0, t] for t, _ in points], [sec for _, sec in points]))


def block_seconds(points: list, tokens: float, seq: float) -> float:
    """Forward + backward seconds of one block on `tokens` tokens of sequence length `seq`,
    from measured [tokens, seq, seconds] points."""
    c, a, b = _block_law(tuple(tuple(p) for p in points))
    return c + a * tokens + b * tokens * seq


def head_seconds(points: list, tokens: float) -> float:
    """Final norm + head + loss forward + backward seconds on `tokens` tokens."""
    c, a = _head_law(tuple(tuple(p) for p in points))
    return c + a * tokens


def measured_block_key(cpu: dict | None, ac: str, fused: bool, tp: int, cp: int) -> str | None:
    """Which measured block series prices this layout, or None for the composed terms: the
    block was measured unsharded (TP and CP change its local shapes and add collectives), in
    eager mode per AC mode, and compiled without AC only."""
    blocks = (cpu or {}).get("blocks") or {}
    if tp > 1 or cp > 1:
        return None
    key = ("compiled" if ac == "none" else None) if fused else ac
    return key if key and blocks.get(key) else None
