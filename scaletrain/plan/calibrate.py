"""Microbenchmarks of the present machine -> a hardware profile (JSON) the planner can use.

Measures, each for a fixed small time budget (the whole run takes well under a minute on a
CPU): matmul FLOP/s at the model's shapes (scaled down to fit), causal SDPA attention,
memory bandwidth (a large tensor copy), the host cost of one small op (the framework tax),
and, only when torch.distributed is initialised with more than one rank, all-reduce
bandwidth; on the CPU also `framework_baseline_bytes`, the peak RSS of a fresh process
that imported torch and the trainer and ran one tiny step, and the `cpu` block (the measured CPU
execution model, `cpu_execution_model`, used by cost.py for calibrated CPU profiles only).
The profile's fields are those of `hardware.Hardware`; `calibrated` marks it so
the cost model uses the measured attention rate as is.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scaletrain.config.schema import ModelConfig


def _clock():
    """Wall clock, except on a CPU-only single-threaded torch: there the process CPU time, which
    does not count the time the OS gave the core to other processes (shared machines)."""
    if not torch.cuda.is_available() and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def _bench(fn, budget_s: float = 0.4, min_iters: int = 3) -> float:
    """Best seconds per call of `fn` over about `budget_s` (one warm-up call first)."""
    fn()
    _sync()
    clock = _clock()
    best, spent, n = float("inf"), 0.0, 0
    while n < min_iters or spent < budget_s:
        t0 = clock()
        fn()
        _sync()
        dt = clock() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
        if n >= 200:
            break
    return best


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _memory_capacity(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def calibrate(model: ModelConfig | None = None, device: str | torch.device | None = None,
              dtype: torch.dtype | None = None, max_dim: int = 1024) -> dict:
    """Run the microbenchmarks and return the profile as a dict (units: FLOP/s, bytes/s, s)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    prec = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    d = min(model.dim if model else max_dim, max_dim)
    f = min(model.ffn_dim if model else 4 * max_dim, 4 * max_dim)
    tokens = 512 if dev.type == "cpu" else 8192
    shapes = [(tokens, d, d), (tokens, f, d), (tokens, d, f), (tokens, 256, 256)]
    rates = {}
    for m, n, k in shapes:
        a, b = torch.randn(m, k, device=dev, dtype=dtype), torch.randn(k, n, device=dev, dtype=dtype)
        rates[f"{m}x{n}x{k}"] = 2 * m * n * k / _bench(lambda: a @ b)
    half_dim = 100.0  # cost.Params.matmul_half_dim: the profile extrapolates to the asymptote
    big = max(shapes[:3], key=lambda sh: rates[f"{sh[0]}x{sh[1]}x{sh[2]}"])
    best = rates[f"{big[0]}x{big[1]}x{big[2]}"]
    x = min(big)
    peak = best * (x + half_dim) / x
    # Attention: causal SDPA fwd at [1, heads, s, head_dim]; FLOPs counted causal (as cost.py).
    heads = model.n_heads if model else 8
    hd = (model.dim // model.n_heads) if model else 64
    s = 512 if dev.type == "cpu" else 4096
    q = torch.randn(1, heads, s, hd, device=dev, dtype=dtype)
    t_attn = _bench(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    attn_flops = 2 * 2 * heads * hd * s * (s + 1) / 2
    # Memory bandwidth: copy of 64 MiB (read + write).
    n = 16 * 2**20
    src, dst = torch.empty(n, device=dev), torch.empty(n, device=dev)
    bw = 2 * 4 * n / _bench(lambda: dst.copy_(src))
    # Host overhead per op: a tiny add, launched many times.
    tiny = torch.ones(8, device=dev)

    def many_adds() -> None:
        for _ in range(200):
            tiny.add_(0.0)

    op_s = _bench(many_adds) / 200
    profile = {
        "name": f"calibrated:{dev.type}:{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or platform.machine()}",
        "peak_flops": {prec: peak, **({"bf16": peak} if prec == "fp32" else {})},
        "matmul_eff_max": 1.0,
        "attn_eff": min(1.0, attn_flops / t_attn / peak),
        "hbm_bytes": _memory_capacity(dev),
        "hbm_bw": bw,
        "host_overhead_s": op_s,
        "gpus_per_node": max(1, torch.cuda.device_count()) if dev.type == "cuda" else 1,
        "calibrated": True,
        "source": f"scaletrain plan calibrate, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "extra": {"matmul_flops_by_shape": rates, "attention_flops": attn_flops / t_attn},
    }
    if dev.type == "cpu":
        profile["framework_baseline_bytes"] = framework_baseline_bytes()
        profile["cpu"] = cpu_execution_model(model or ModelConfig(dim=d, n_layers=2, n_heads=heads,
                                                                  n_kv_heads=heads, ffn_dim=f, vocab_size=512))
    profile.update(_collectives(dev))
    return profile


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
                        budget_s: float = 0.5) -> dict:
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
        t0 = _bench(gemm_triple(8, n, k), budget_s=0.05)
        for m in token_counts:
            t = _bench(gemm_triple(m, n, k), budget_s=budget_s)
            gemm.append([m, n, k, 3 * 2 * m * n * k / max(t - t0, 1e-3 * t)])

    attention = []
    for seq in sorted({min(s, model.max_seq_len) for s in (128, 256, 512)}):
        b = max(1, 2048 // seq)

        def sdpa(bb: int, s: int):
            qkv = [torch.randn(bb, model.n_heads, s, hd, requires_grad=True) for _ in range(3)]
            return lambda: F.scaled_dot_product_attention(*qkv, is_causal=True).sum().backward()

        t0 = _bench(sdpa(1, 8), budget_s=0.05)
        t = _bench(sdpa(b, seq), budget_s=budget_s)
        flops = (1 + _ATTN_BWD_RATIO) * 2 * 2 * b * model.n_heads * hd * seq * (seq + 1) / 2
        attention.append([seq, flops / max(t - t0, 1e-3 * t)])

    seq = min(256, model.max_seq_len)
    t0 = _bench(_elementwise_chain(model, 8, 8), budget_s=0.05)
    elementwise = []
    for tokens in token_counts:
        t = _bench(_elementwise_chain(model, tokens, seq), budget_s=budget_s)
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
    op_s = _bench(step2, budget_s=budget_s) / (f2 + b2)
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

        return _bench(run, budget_s=budget_s), param_counts(model if n_layers == model.n_layers else
                                                            dataclasses.replace(model, n_layers=n_layers))["total"]

    t_big, p_big = opt_time(max(2, model.n_layers))
    t_one, p_one = opt_time(1)
    per_param = max(0.0, (t_big - t_one) / max(1, p_big - p_one))
    return {"gemm": gemm, "attention": attention, "elementwise": elementwise, "ops": ops, "op_s": op_s,
            "optimizer_fixed_s": max(0.0, t_one - per_param * p_one), "optimizer_s_per_param": per_param,
            "threads": torch.get_num_threads()}


# A fresh process that imports what the trainer imports and runs one tiny AdamW training step
# (so autograd, the optimizer and SDPA kernels are loaded): its peak RSS is the part of a CPU
# run's measured peak that no model tensor accounts for (interpreter, torch and its libraries).
_BASELINE_SNIPPET = """
import resource, sys
import torch
import torch.nn.functional as F
import scaletrain.train.trainer, scaletrain.data
try:
    import torch.utils.tensorboard
except Exception:
    pass
m = torch.nn.Linear(8, 8)
opt = torch.optim.AdamW(m.parameters())
q = torch.randn(1, 2, 16, 8)
loss = F.cross_entropy(m(torch.randn(4, 8)), torch.zeros(4, dtype=torch.long))
loss = loss + F.scaled_dot_product_attention(q, q, q, is_causal=True).sum()
loss.backward()
opt.step()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(rss if sys.platform == "darwin" else rss * 1024)
"""


def framework_baseline_bytes() -> int:
    """Peak RSS (bytes) of a fresh CPU process that imported torch and scaletrain's trainer and
    ran one tiny training step. `plan check` adds it to CPU memory predictions, because the
    trainer's CPU `mem_bytes` is the process peak RSS, not tensor bytes."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", _BASELINE_SNIPPET], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _collectives(dev: torch.device, iters: int = 10, warmup: int = 2) -> dict:
    """All-reduce bus bandwidth (bytes/s) when more than one rank is present; nothing otherwise.

    Every rank issues the same number of collectives (a fixed count, never a time budget: a
    rank that stopped early would leave the others waiting in a collective it never joins),
    times them with the wall clock (the process CPU clock does not count waiting on peers or
    gloo's worker threads), and the slowest rank's time is the measurement."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return {}
    n = 8 * 2**20
    buf = torch.ones(n, device=dev)
    ws = dist.get_world_size()
    for _ in range(warmup):
        dist.all_reduce(buf)
    _sync()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf)
    _sync()
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=dev)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    t = float(elapsed.item()) / iters
    bus = 2 * (ws - 1) / ws * 4 * n / t
    return {"intra_bw": bus, "inter_bw": bus, "intra_latency": 20e-6, "inter_latency": 20e-6}


def write_profile(profile: dict, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(profile, indent=1))
    tmp.replace(p)
