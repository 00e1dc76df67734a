"""`scaletrain bench ffn`: the Squared-ReLU FFN in isolation, dense vs 2:4 activation sparsity.

Times y = W2 · relu(W1 x)^2 (the model's dense FeedForward) against the 2:4 sparse FFN of
model/sparsity.py, forward alone and forward + backward, on random inputs of one shape. The
default shape is the anchor model's (anchor_1b: 8 sequences of 2048 tokens, dim 2048, FFN
hidden 8192) in bf16 on CUDA. 2:4 kernels cost the same whatever the values, so random inputs
time them fairly, but random pre-activations are only ~50% positive: the mask drops far more
than on a trained model, so this benchmark says nothing about accuracy.

On CUDA every iteration is timed with CUDA events after warm-up; on CPU (a testable smoke
run, fp32 by default) the 2:4 FFN is the dense "reference" emulation, so its times measure no
sparse hardware at all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scaletrain.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ANCHOR_SHAPE = {"tokens": 8 * 2048, "dim": 2048, "hidden": 8192}  # anchor_1b, one micro-batch
CPU_SHAPE = {"tokens": 512, "dim": 256, "hidden": 1024}  # default on CPU: seconds, not hours
MIN_ITERS = 20
KERNELS = ("auto", "cusparselt", "cutlass")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `scaletrain bench ffn`."""
    shape = ", ".join(f"{k} {v}" for k, v in ANCHOR_SHAPE.items())
    parser.add_argument("--tokens", type=int, help=f"rows of x = batch * seq (default: anchor shape, {shape}, "
                                                   f"on CUDA; {CPU_SHAPE} on CPU)")
    parser.add_argument("--dim", type=int, help="model dim D")
    parser.add_argument("--hidden", type=int, help="FFN hidden dim H (multiple of 4; of 64 on CUDA)")
    parser.add_argument("--iters", type=int, default=50,
                        help=f"timed iterations per case, >= {MIN_ITERS} (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations first (default 10)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--kernel", choices=KERNELS, default="auto",
                        help="2:4 GEMM library on CUDA (auto: cuSPARSELt when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this JSON file")


def dense_squared_relu_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The model's dense FeedForward: w2(relu(w1 x)^2)."""
    return F.linear(F.relu(F.linear(x, w1)).square(), w2)


def _time_ms(fn: Callable[[], Any], iters: int, warmup: int, cuda: bool) -> list[float]:
    """Wall time of each of `iters` calls of fn (after `warmup` calls), in milliseconds."""
    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return times
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()  # one sync at the end: no host stall between timed iterations
    return [start.elapsed_time(end) for start, end in events]


def run_ffn_bench(tokens: int, dim: int, hidden: int, iters: int = 50, warmup: int = 10, dtype: str = "bf16",
                  device: str = "cuda", kernel: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Time the dense and the 2:4 FFN, forward and forward + backward, at one shape.

    Returns a dict: the shape and settings, `ms` {case: {"median", "mean"}} per case
    dense_fwd, sparse_fwd, dense_fwd_bwd, sparse_fwd_bwd (milliseconds per call), `speedup`
    {"fwd", "fwd_bwd"} = dense median / 2:4 median, `dense_equiv_tflops` per case (FFN FLOPs of
    the dense computation, 4*T*D*H forward and 12*T*D*H forward + backward, per second / 1e12),
    `activation_density` (fraction of relu(W1 x)^2 > 0 on this random input) and
    `sparse_hardware` (False on CPU). Raises ConfigError for unusable arguments.
    """
    from torch.sparse import SparseSemiStructuredTensor

    from scaletrain.model.sparsity import check_cuda_backend, semi_structured_kernel, sparse_squared_relu_ffn

    _check_args(tokens, dim, hidden, iters, warmup, dtype, device, kernel)
    cuda = device == "cuda"
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (std * torch.randn(*shape, generator=gen)).to(device=device, dtype=dt).requires_grad_()

    x = randn(tokens, dim, std=1.0)
    w1, w2 = randn(hidden, dim, std=dim ** -0.5), randn(dim, hidden, std=hidden ** -0.5)
    dy = torch.randn(tokens, dim, generator=gen).to(device=device, dtype=dt)
    if cuda:
        check_cuda_backend(x, w1, w2)
    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    if cuda and kernel != "auto":
        SparseSemiStructuredTensor._FORCE_CUTLASS = kernel == "cutlass"
    try:
        if cuda and kernel == "cusparselt" and semi_structured_kernel() != "cusparselt":
            raise ConfigError("--kernel cusparselt: this PyTorch build has no cuSPARSELt; use --kernel cutlass")
        ms: dict[str, list[float]] = {}
        for name, ffn in (("dense", dense_squared_relu_ffn), ("sparse", sparse_squared_relu_ffn)):
            def fwd(ffn=ffn) -> None:
                with torch.no_grad():
                    ffn(x, w1, w2)

            def fwd_bwd(ffn=ffn) -> None:
                torch.autograd.grad(ffn(x, w1, w2), (x, w1, w2), dy)

            ms[f"{name}_fwd"] = _time_ms(fwd, iters, warmup, cuda)
            ms[f"{name}_fwd_bwd"] = _time_ms(fwd_bwd, iters, warmup, cuda)
        used_kernel = semi_structured_kernel() if cuda else None
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = forced
    with torch.no_grad():
        density = (F.relu(x @ w1.t()) > 0).float().mean().item()
    stats = {k: {"median": statistics.median(v), "mean": statistics.fmean(v)} for k, v in ms.items()}
    flops = {"fwd": 4 * tokens * dim * hidden, "fwd_bwd": 12 * tokens * dim * hidden}
    return {
        "benchmark": "ffn", "device": torch.cuda.get_device_name(x.device) if cuda else "cpu", "dtype": dtype,
        "tokens": tokens, "dim": dim, "hidden": hidden, "iters": iters, "warmup": warmup,
        "backend": "cuda" if cuda else "reference", "kernel": used_kernel, "sparse_hardware": cuda,
        "ms": stats,
        "speedup": {m: stats[f"dense_{m}"]["median"] / stats[f"sparse_{m}"]["median"] for m in flops},
        "dense_equiv_tflops": {k: flops[k.split("_", 1)[1]] / (v["median"] * 1e-3) / 1e12 for k, v in stats.items()},
        "activation_density": density,
    }


def _check_args(tokens: int, dim: int, hidden: int, iters: int, warmup: int, dtype: str, device: str,
                kernel: str) -> None:
    for name, value in (("tokens", tokens), ("dim", dim), ("hidden", hidden)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
    if hidden % 4:
        raise ConfigError(f"--hidden must be a multiple of 4 (2:4 groups), got {hidden}")
    if iters < MIN_ITERS:
        raise ConfigError(f"--iters must be >= {MIN_ITERS} for a stable median, got {iters}")
    if warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {warmup}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if kernel not in KERNELS:
        raise ConfigError(f"--kernel must be one of {list(KERNELS)}, got {kernel!r}")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible; use --device cpu (dense emulation only)")


def format_table(r: dict[str, Any]) -> str:
    """The human-readable table of one result of :func:`run_ffn_bench`."""
    where = f"{r['device']}, 2:4 kernel {r['kernel']}" if r["sparse_hardware"] else "cpu"
    lines = [f"FFN dense vs 2:4: tokens {r['tokens']}, dim {r['dim']}, hidden {r['hidden']}, {r['dtype']} on {where}; "
             f"{r['iters']} timed iterations after {r['warmup']} warm-up",
             f"{'':18}{'dense ms median/mean':>24}{'2:4 ms median/mean':>24}{'speedup':>10}"]
    for mode, label in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
        d, s = r["ms"][f"dense_{mode}"], r["ms"][f"sparse_{mode}"]
        lines.append(f"{label:18}{d['median']:>13.3f} / {d['mean']:<8.3f}{s['median']:>13.3f} / {s['mean']:<8.3f}"
                     f"{r['speedup'][mode]:>9.2f}x")
    lines.append(f"speedup = dense median / 2:4 median; relu(W1 x)^2 is {100 * r['activation_density']:.0f}% "
                 "nonzero on this random input (a trained Squared-ReLU FFN is far sparser)")
    if not r["sparse_hardware"]:
        lines.append("NOTE: CPU run: the 2:4 FFN is the dense 'reference' emulation (mask + dense matmuls). "
                     "No sparse hardware is used; these times say nothing about GPU speedups.")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run `scaletrain bench ffn` with parsed `args`, print the table, write --json; exit code."""
    from scaletrain.bench.results import environment
    from scaletrain.parallel.dims import resolve_precision

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = ANCHOR_SHAPE if device == "cuda" else CPU_SHAPE
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    dtype = resolve_precision(args.dtype or "auto", device)
    result = {**environment(), **run_ffn_bench(**shape, iters=args.iters, warmup=args.warmup, dtype=dtype,
                                                 device=device, kernel=args.kernel, seed=args.seed)}
    print(format_table(result), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"result written to {path}")
    return 0
