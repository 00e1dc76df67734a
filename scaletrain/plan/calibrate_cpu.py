"""The measured CPU execution model of `plan calibrate` (the profile's `cpu` block).

Every number is a timing on this machine at the calibrated model's own shapes; plan/cost.py
uses the block only for calibrated CPU profiles (see the comment below and docs/planner.md,
"CPU execution model").
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from scaletrain.config.schema import ModelConfig
from scaletrain.plan.timing import best_time, median_time, timer


# ---------------------------------------------------------------------------------------------
# CPU execution model. One CPU core runs every op in sequence: there is no launch queue that
# hides the host, and GEMM / elementwise / attention rates depend on the operand shapes and
# on which cache they fit in. So for a CPU the profile stores rates MEASURED at the model's own
# shapes (plan/cost.py uses them only when the profile is a calibrated CPU one):
#   gemm:        [m, n, k, FLOP/s] per linear of the model (qkv, wo, w1/w3, w2, head) at two
#                token counts; the time is forward + both backward GEMMs (X W^T, dY W, dY^T X),
#                the rate counts 3 * 2mnk, minus the same three calls on 8-token operands (their
#                dispatch cost, which `op_s` below accounts for)
#   attention:   [seq, FLOP/s] causal SDPA forward + backward at the model's heads/head_dim,
#                FLOPs counted as (1 + cost.Params.attn_bwd_ratio) x the causal forward
#   elementwise: [bytes, bytes/s] one layer's non-GEMM, non-attention ops (both RMSNorms,
#                RoPE on q and k, the GQA repeat, the attention-output transpose copy, SiLU*mul,
#                the two residual adds) forward + backward, expressed in the cost model's own
#                unit: bytes = elementwise_passes_eager * activation_bytes_per_layer
#   ops:         aten ops per layer (forward, backward) and outside the layers (embedding,
#                final norm, head, loss), counted with a dispatch mode on the real model
#   op_s:        seconds per op of the real model's forward+loss+backward at 8 tokens (no
#                compute left: Python modules, autograd and dispatch)
#   optimizer:   grad-norm clip + foreach AdamW step, fixed seconds + seconds per parameter
#   blocks:      {"none" | "full" | "selective" [| "compiled"]: [[tokens, seq, s], ...]} the
#                real transformer block (one layer of the model, wrapped by parallel/ac.py as the
#                trainer wraps it; "compiled" = block.compile(), AC none, only with `plan
#                calibrate --compile`) forward + backward, the median of 7 calls after 2 (the
#                calls interleaved over all cases, each right after an untimed call of the
#                same case: warm caches, as in a run), at seq 128/256/512 (<= max_seq_len) x
#                1024/4096 tokens. It includes the block's dispatch, so cost.py adds no op term
#                for a measured block; cost.py prices a run from a least-squares fit of
#                c + a T + b T s through the points (cpu_measured.py).
#   head:        [[tokens, s], ...] final RMSNorm + output linear + the trainer's cross-entropy
#                forward + backward (compiled loss too with --compile: "head_compiled"), and
#                head_ops, its aten op count (the op term outside the layers excludes them).
#                Compiled cases run after every eager one and on the wall clock (_clock_for).
#   The block and head timings replace the composed GEMM + attention + elementwise + op terms
#   for runs without TP/CP; the composed terms stay for TP/CP, whose local shapes are not measured.
# ---------------------------------------------------------------------------------------------

_PASSES_EAGER = 8.0  # cost.Params.elementwise_passes_eager (not imported: cost imports hardware)
_ATTN_BWD_RATIO = 2.5  # cost.Params.attn_bwd_ratio


def _elementwise_chain(model: ModelConfig, tokens: int, seq: int):
    """A closure running one layer's elementwise ops fwd+bwd on `tokens` tokens, and its
    tensors (so the caller keeps them alive)."""
    from scaletrain.model.transformer import apply_rope, rope_cos_sin

    b = max(1, tokens // seq)
    hd = model.dim // model.n_heads
    n_rep = model.n_heads // model.n_kv_heads
    x = torch.randn(b, seq, model.dim, requires_grad=True)
    w1 = torch.ones(model.dim, requires_grad=True)
    w2 = torch.ones(model.dim, requires_grad=True)
    q = torch.randn(b, model.n_heads, seq, hd, requires_grad=True)
    k = torch.randn(b, model.n_kv_heads, seq, hd, requires_grad=True)
    v = torch.randn(b, model.n_kv_heads, seq, hd, requires_grad=True)
    o = torch.randn(b, model.n_heads, seq, hd, requires_grad=True)
    a = torch.randn(b, seq, model.ffn_dim, requires_grad=True)
    g = torch.randn(b, seq, model.ffn_dim, requires_grad=True)
    cos, sin = rope_cos_sin(hd, seq, model.rope_theta)
    eps = model.norm_eps

    def run() -> None:
        n1 = F.rms_norm(x, (model.dim,), w1, eps)
        qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kk, vv = (kr.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)) if n_rep > 1 else (kr, v)
        att = o.transpose(1, 2).reshape(b, seq, -1)
        h = x + att
        n2 = F.rms_norm(h, (model.dim,), w2, eps)
        act = F.silu(a) * g if model.ffn == "swiglu" else F.relu(a).square()
        out = h + n2  # second residual (n2 stands in for the FFN output it feeds)
        outs = [out, n1, qr, kk, vv, act]
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
        for t in (x, w1, w2, q, k, v, o, a, g):
            t.grad = None

    return run


def _count_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.n += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.n


def cpu_execution_model(model: ModelConfig, token_counts: tuple[int, ...] = (1024, 4096),
                        budget_s: float = 0.5, compile: bool = False) -> dict:
    """Measure the CPU execution model of `model` (see the block comment above). Seconds,
    FLOP/s, bytes/s; every number is a timing on this machine, none is fitted to a run."""
    import dataclasses

    from scaletrain.model.flops import activation_bytes_per_layer, param_counts
    from scaletrain.model.transformer import build_model

    hd = model.dim // model.n_heads
    q_dim, kv_dim = model.n_heads * hd, model.n_kv_heads * hd
    linears = {(q_dim + 2 * kv_dim, model.dim), (model.dim, q_dim), (model.ffn_dim, model.dim),
               (model.dim, model.ffn_dim), (model.vocab_size, model.dim)}

    def gemm_triple(m: int, n: int, k: int):
        x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        return lambda: (x @ w.t(), dy @ w, dy.t() @ x)

    gemm = []
    for n, k in sorted(linears):
        t0 = best_time(gemm_triple(8, n, k), budget_s=0.05)
        for m in token_counts:
            t = best_time(gemm_triple(m, n, k), budget_s=budget_s)
            gemm.append([m, n, k, 3 * 2 * m * n * k / max(t - t0, 1e-3 * t)])

    attention = []
    for seq in sorted({min(s, model.max_seq_len) for s in (128, 256, 512)}):
        b = max(1, 2048 // seq)

        def sdpa(bb: int, s: int):
            qkv = [torch.randn(bb, model.n_heads, s, hd, requires_grad=True) for _ in range(3)]
            return lambda: F.scaled_dot_product_attention(*qkv, is_causal=True).sum().backward()

        t0 = best_time(sdpa(1, 8), budget_s=0.05)
        t = best_time(sdpa(b, seq), budget_s=budget_s)
        flops = (1 + _ATTN_BWD_RATIO) * 2 * 2 * b * model.n_heads * hd * seq * (seq + 1) / 2
        attention.append([seq, flops / max(t - t0, 1e-3 * t)])

    seq = min(256, model.max_seq_len)
    t0 = best_time(_elementwise_chain(model, 8, 8), budget_s=0.05)
    elementwise = []
    for tokens in token_counts:
        t = best_time(_elementwise_chain(model, tokens, seq), budget_s=budget_s)
        nbytes = _PASSES_EAGER * activation_bytes_per_layer(model, max(1, tokens // seq), seq, 4, "none")
        elementwise.append([nbytes, nbytes / max(t - t0, 1e-3 * t)])

    # Op counts and per-op seconds of the real model code (forward + loss, backward) at 8 tokens
    # and with 8-wide heads, a 16-wide FFN and a 64-token vocabulary: the same ops in the same
    # order, with no arithmetic left to time (Python modules, autograd, dispatch, allocation).
    tiny = dataclasses.replace(model, dim=8 * model.n_heads, ffn_dim=16, vocab_size=64)

    def fwd_bwd(n_layers: int):
        m = build_model(dataclasses.replace(tiny, n_layers=n_layers))
        tok = torch.randint(0, tiny.vocab_size, (1, 8))

        def fwd():
            return F.cross_entropy(m(tok).float().flatten(0, 1), tok.flatten())

        def step():
            fwd().backward()
            for p in m.parameters():
                p.grad = None

        loss = fwd()
        n_fwd = _count_ops(fwd)
        loss = fwd()
        n_bwd = _count_ops(loss.backward)
        return m, step, n_fwd, n_bwd

    _, _, f1, b1 = fwd_bwd(1)
    m2, step2, f2, b2 = fwd_bwd(2)
    op_s = best_time(step2, budget_s=budget_s) / (f2 + b2)
    ops = {"fwd_per_layer": f2 - f1, "bwd_per_layer": b2 - b1,
           "fixed": (f1 - (f2 - f1)) + (b1 - (b2 - b1))}

    # Optimizer: grad clip (foreach norm + scale) + foreach AdamW, as train/optim + train/reduce.
    def opt_time(n_layers: int) -> tuple[float, int]:
        m = build_model(dataclasses.replace(model, n_layers=n_layers))
        params = [p for p in m.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)

        def run():
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, foreach=True)
            torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm, foreach=True)
            opt.step()

        return best_time(run, budget_s=budget_s), param_counts(model if n_layers == model.n_layers else
                                                            dataclasses.replace(model, n_layers=n_layers))["total"]

    t_big, p_big = opt_time(max(2, model.n_layers))
    t_one, p_one = opt_time(1)
    per_param = max(0.0, (t_big - t_one) / max(1, p_big - p_one))
    return {"gemm": gemm, "attention": attention, "elementwise": elementwise, "ops": ops, "op_s": op_s,
            "optimizer_fixed_s": max(0.0, t_one - per_param * p_one), "optimizer_s_per_param": per_param,
            "threads": torch.get_num_threads(),
            **_measured_blocks(model, token_counts, compile)}


def _measured_blocks(model: ModelConfig, token_counts: tuple[int, ...], compile: bool) -> dict:
    """{"blocks", "head", "head_ops"[, "head_compiled"]}: eager cases first, compiled ones last."""
    out = {"blocks": block_timings(model, token_counts), **head_timings(model, token_counts)}
    if compile:
        out["blocks"].update(block_timings(model, token_counts, variants=("compiled",)))
        out.update(head_timings(model, token_counts, compiled=True))
    return out


def _block_points(model: ModelConfig, token_counts: tuple[int, ...]) -> list[tuple[int, int]]:
    """(batch, seq) pairs measured: seq 128/256/512 capped at max_seq_len, ~token_counts tokens."""
    seqs = sorted({min(s, model.max_seq_len) for s in (128, 256, 512)})
    return [(max(1, tokens // seq), seq) for seq in seqs for tokens in token_counts]


EAGER_BLOCKS = ("none", "full", "selective")


def _clock_for(compiled: bool):
    """The process CPU clock (timer()) for eager code; the wall clock once compiled code runs:
    inductor's helper threads are charged to the process CPU clock (measured on the debug
    block: 18.3 ms CPU time for an eager call interleaved with compiled ones, 13.0 ms wall)."""
    return time.perf_counter if compiled else timer()


def block_timings(model: ModelConfig, token_counts: tuple[int, ...] = (1024, 4096),
                  variants: tuple[str, ...] = EAGER_BLOCKS, rounds: int = 7, slow_s: float = 2.0) -> dict:
    """Seconds of one real transformer block forward + backward per variant (AC mode "none",
    "full", "selective", or "compiled": block.compile-d, AC none) at `_block_points`: the
    median of `rounds` timed calls after 2 warm-up calls, interleaved round-robin over all
    cases so that a slow spell of a shared machine touches every case alike; each timed call
    follows an untimed call of the same case, so its data is in cache as in a training run
    that repeats one step (a small model's whole step fits in the L3 cache: timed right after
    other cases, the debug block read 14-18 ms against 12-14 ms inside a training run).
    Points above the first token count are skipped when the first takes more than `slow_s` (a
    model too big to time quickly). Time compiled variants in a call of their own, after the
    eager ones."""
    from scaletrain.model.transformer import build_model, rope_cos_sin
    from scaletrain.parallel.ac import apply_ac

    one = dataclasses.replace(model, n_layers=1)
    hd = model.dim // model.n_heads

    def case(variant: str, b: int, seq: int):
        cos, sin = rope_cos_sin(hd, seq, model.rope_theta)
        x = torch.randn(b, seq, model.dim, requires_grad=True)
        dy = torch.randn(b, seq, model.dim)
        block = apply_ac(build_model(one), variant if variant in ("full", "selective") else "none").layers["0"]
        if variant == "compiled":  # a static graph per shape, as a run compiles its one shape
            block = torch.compile(block, dynamic=False)

        def step() -> None:
            block(x, cos, sin).backward(dy)
            x.grad = None
            for p in block.parameters():
                p.grad = None

        return step

    points = _block_points(model, token_counts)
    first = case("none", *points[0])  # also the size probe: reused below, not built twice
    if median_time(first, reps=1, warmup=1) > slow_s:
        points = [(b, s) for b, s in points if b * s <= token_counts[0]]
    cases = [(v, b, s, first if (v, (b, s)) == ("none", points[0]) else case(v, b, s))
             for v in variants for b, s in points]
    times: dict[tuple, list[float]] = {}
    for v, b, s, step in cases:  # compile + allocator warm-up
        step()
        step()
    now = _clock_for("compiled" in variants)
    for _ in range(rounds):
        for v, b, s, step in cases:
            step()  # untimed: the caches hold this case's data, as in a run that repeats its step
            t0 = now()
            step()
            times.setdefault((v, b, s), []).append(now() - t0)
    out: dict[str, list] = {v: [] for v in variants}
    for (v, b, s), ts in times.items():
        out[v].append([b * s, s, statistics.median(ts)])
    return out


def head_timings(model: ModelConfig, token_counts: tuple[int, ...] = (1024, 4096), compiled: bool = False,
                 reps: int = 5) -> dict:
    """Seconds of the final norm + output linear + the trainer's loss forward + backward per
    token count: {"head": [[tokens, s], ...], "head_ops": its aten op count}, or with
    `compiled` the loss compiled as train.compile compiles it: {"head_compiled": [...]}."""
    from scaletrain.model.transformer import build_model
    from scaletrain.model.loss import cross_entropy_loss

    m = build_model(dataclasses.replace(model, n_layers=1))
    norm, output = m.norm, m.output
    key = "head_compiled" if compiled else "head"
    loss_fn = torch.compile(cross_entropy_loss, dynamic=False) if compiled else cross_entropy_loss
    out: dict = {key: []}
    for tokens in token_counts:
        h = torch.randn(1, tokens, model.dim, requires_grad=True)
        tgt = torch.randint(0, model.vocab_size, (1, tokens))

        def step(h=h, tgt=tgt) -> None:
            loss_fn(output(norm(h)), tgt).backward()
            h.grad = None
            for p in (*norm.parameters(), *output.parameters()):
                p.grad = None

        out[key].append([tokens, median_time(step, reps, now=_clock_for(compiled))])
    if compiled:
        return out
    h = torch.randn(1, 8, model.dim, requires_grad=True)
    tgt = torch.randint(0, model.vocab_size, (1, 8))
    out["head_ops"] = _count_ops(lambda: cross_entropy_loss(output(norm(h)), tgt).backward())
    return out
