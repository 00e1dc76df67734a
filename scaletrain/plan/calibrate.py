"""Microbenchmarks of the present machine -> a hardware profile (JSON) the planner can use.

Measures, each for a fixed small time budget or call count: matmul FLOP/s at the model's
shapes (scaled down to fit), causal SDPA attention, memory bandwidth (a large tensor copy),
the host cost of one small op (the framework tax), and, only when torch.distributed is
initialised with more than one rank, all-reduce bandwidth; on the CPU also
`framework_baseline_bytes`, the peak RSS of a fresh process that imported torch and the
trainer and ran one tiny step, and the `cpu` block (the measured CPU execution model,
calibrate_cpu.py: rates at the model's shapes and the real block and head timed per AC
mode, compiled too with `compile`; used by cost.py for calibrated CPU profiles only). A CPU
calibration takes ~30 s for `debug`, ~1-3 min for `cpu_demo`, more with `compile` the first
time (10-20 s of compilation per shape).
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
from scaletrain.plan.calibrate_cpu import cpu_execution_model
from scaletrain.plan.timing import best_time, sync


def _memory_capacity(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def calibrate(model: ModelConfig | None = None, device: str | torch.device | None = None,
              dtype: torch.dtype | None = None, max_dim: int = 1024, compile: bool = False) -> dict:
    """Run the microbenchmarks and return the profile as a dict (units: FLOP/s, bytes/s, s).
    `compile` (CPU): also time the compiled block and loss (about 10-20 s of compilation per
    measured shape), so compiled runs are predicted from a measurement too."""
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
        rates[f"{m}x{n}x{k}"] = 2 * m * n * k / best_time(lambda: a @ b)
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
    t_attn = best_time(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    attn_flops = 2 * 2 * heads * hd * s * (s + 1) / 2
    # Memory bandwidth: copy of 64 MiB (read + write).
    n = 16 * 2**20
    src, dst = torch.empty(n, device=dev), torch.empty(n, device=dev)
    bw = 2 * 4 * n / best_time(lambda: dst.copy_(src))
    # Host overhead per op: a tiny add, launched many times.
    tiny = torch.ones(8, device=dev)

    def many_adds() -> None:
        for _ in range(200):
            tiny.add_(0.0)

    op_s = best_time(many_adds) / 200
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
                                                                  n_kv_heads=heads, ffn_dim=f, vocab_size=512),
                                             compile=compile)
    profile.update(_collectives(dev))
    return profile


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
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf)
    sync()
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
