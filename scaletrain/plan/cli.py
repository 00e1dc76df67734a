"""`scaletrain plan [search|calibrate|validate|check] ...`: argparse wiring only.

Bad input raises ConfigError, which the main CLI prints and turns into exit code 2.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from scaletrain.errors import ConfigError

_SUFFIX = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_count(text: str, what: str) -> int:
    """'16M' -> 16 * 2**20 (binary suffixes k, M, G, T), '4096' -> 4096."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)\s*", str(text))
    if not m:
        raise ConfigError(f"{what} must be a number with an optional k/M/G suffix (e.g. 16M), got {text!r}.")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if value < 1 or value != int(value):
        raise ConfigError(f"{what} must be a positive whole number, got {text!r}.")
    return int(value)


def parse_sweep(text: str) -> list[int]:
    """'8,16,...,1024' -> doubling from the value before '...' to the one after."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    out: list[int] = []
    for i, t in enumerate(items):
        if t == "...":
            if not out or i + 1 >= len(items):
                raise ConfigError("--sweep-gpus: '...' needs a value on each side, e.g. 8,16,...,1024.")
            stop = parse_count(items[i + 1], "--sweep-gpus")
            step = out[-1] // out[-2] if len(out) >= 2 and out[-1] % out[-2] == 0 else 2
            while out[-1] * step < stop:
                out.append(out[-1] * step)
        else:
            out.append(parse_count(t, "--sweep-gpus"))
    return sorted(set(out))


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="predict memory and step time of every parallel layout and rank them",
                              description="Rank parallel layouts (default), calibrate this machine, validate "
                                          "the cost model against published measurements, or check a finished "
                                          "run's measured step time and memory against the prediction.")
    p.add_argument("action", nargs="?", default="search", choices=["search", "calibrate", "validate", "check"])
    p.add_argument("--model", default="llama3_8b", help="flavor name or a config TOML (its [model])")
    p.add_argument("--gpus", default="8", help="GPU count")
    p.add_argument("--gpu", default="h100_sxm", help="catalog entry or a calibrated profile JSON")
    p.add_argument("--seq-len", default="8192", help="tokens per sequence")
    p.add_argument("--global-batch-tokens", default="4M", help="tokens per optimizer step (e.g. 16M)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp8", "fp16", "fp32"])
    p.add_argument("--compile", action="store_true",
                   help="search: assume torch.compile (fused elementwise kernels); calibrate (CPU): also time the "
                        "compiled block and loss at each measured shape (10-20 s of compilation each)")
    p.add_argument("--async-tp", action="store_true", help="assume TP communication overlapped with GEMMs")
    p.add_argument("--top", type=int, default=5, help="layouts shown")
    p.add_argument("--write-config", help="write the winner as a scaletrain config TOML")
    p.add_argument("--sweep-gpus", help="GPU counts, e.g. 8,16,...,16384: best layout per size + plot")
    p.add_argument("--plot", default="plan_sweep.png", help="PNG written by --sweep-gpus")
    p.add_argument("--gpus-per-node", type=int, help="override the catalog topology")
    p.add_argument("--intra-bw", type=float, help="intra-node GB/s per GPU per direction")
    p.add_argument("--inter-bw", type=float, help="inter-node GB/s per GPU per direction")
    p.add_argument("--intra-latency-us", type=float)
    p.add_argument("--inter-latency-us", type=float)
    p.add_argument("--out", default="profile.json", help="calibrate: profile JSON to write")
    p.add_argument("--published", help="validate: CSV of published measurements")
    p.add_argument("--json", help="validate / check: write the results as JSON")
    p.add_argument("--run", "--run-dir", dest="run",
                   help="check: a run folder written by `scaletrain train` (under torchrun write --run-dir: "
                        "torchrun takes --run for its own --run-path)")
    p.add_argument("--profile", help="check: calibrated profile JSON or catalog entry (default: the run's GPU)")
    p.add_argument("--measure-tensors", action="store_true",
                   help="check: re-run the run's config for a few steps here and measure the peak live tensor "
                        "bytes per rank (the CPU analogue of CUDA max_memory_allocated; multi-rank runs: launch "
                        "under torchrun --nproc-per-node N)")
    p.add_argument("--measure-steps", type=int, default=2, help="check --measure-tensors: steps measured")
    p.add_argument("--measure-warmup", type=int, default=1,
                   help="check --measure-tensors: steps run first, not measured (optimizer state, compile)")
    return p


def _model(spec: str):
    from scaletrain.model.flavors import FLAVORS, model_config_for

    if spec in FLAVORS:
        return model_config_for(spec)
    if spec.endswith(".toml") or Path(spec).is_file():
        from scaletrain.config.load import load_config

        return load_config(spec).model
    return model_config_for(spec)  # raises ConfigError with a suggestion


def _hardware(args):
    from scaletrain.plan.hardware import GB, get_hardware

    us = lambda v: None if v is None else v * 1e-6  # noqa: E731
    gbs = lambda v: None if v is None else v * GB  # noqa: E731
    return get_hardware(args.gpu, gpus_per_node=args.gpus_per_node, intra_bw=gbs(args.intra_bw),
                        inter_bw=gbs(args.inter_bw), intra_latency=us(args.intra_latency_us),
                        inter_latency=us(args.inter_latency_us))


def _workload(args, model):
    from scaletrain.plan.cost import Workload

    seq = parse_count(args.seq_len, "--seq-len")
    tokens = parse_count(args.global_batch_tokens, "--global-batch-tokens")
    if tokens % seq:
        raise ConfigError(f"--global-batch-tokens {tokens} is not a multiple of --seq-len {seq}.")
    return Workload(model, seq, tokens // seq, args.precision)


def run_plan(args: argparse.Namespace) -> int:
    if args.action == "calibrate":
        return _calibrate(args)
    if args.action == "validate":
        return _validate(args)
    if args.action == "check":
        return _check(args)
    from scaletrain.plan import report
    from scaletrain.plan.cost import Stack
    from scaletrain.plan.search import search

    model = _model(args.model)
    hw = _hardware(args)
    w = _workload(args, model)
    stack = Stack(fused=args.compile, tp_overlap=args.async_tp)
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}.")
    if args.sweep_gpus:
        points = []
        for g in parse_sweep(args.sweep_gpus):
            try:
                best = search(w, g, hw, stack, top=1).ranked
            except ConfigError:
                best = []
            points.append(report.SweepPoint(g, best[0] if best else None))
        print(f"{model.flavor} on {hw.name}, seq {w.seq_len}, {w.global_batch * w.seq_len:,} tokens/step")
        print(report.format_sweep(points))
        report.plot_sweep(points, args.plot, f"{model.flavor} on {hw.name}")
        print(f"plot: {args.plot}")
        return 0
    gpus = parse_count(args.gpus, "--gpus")
    result = search(w, gpus, hw, stack, top=max(args.top, 5))
    print(f"{model.flavor} on {gpus} x {hw.name} ({hw.gpus_per_node}/node), seq {w.seq_len}, "
          f"{w.global_batch} sequences = {w.global_batch * w.seq_len:,} tokens/step, {w.precision}")
    print(report.format_result(result, hw, args.top))
    if args.write_config:
        if not result.ranked:
            raise ConfigError("no layout fits, so there is no config to write; add GPUs or shrink the batch.")
        report.write_winner(model, w, result.ranked[0], args.write_config,
                            "fp32" if w.precision == "fp32" else "bf16")
        print(f"wrote {args.write_config}")
    return 0


def _calibrate(args) -> int:
    from scaletrain.plan.calibrate import calibrate, write_profile

    import os

    model = _model(args.model) if args.model else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: also measure all-reduce bandwidth
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            prof = calibrate(model, compile=args.compile)
        finally:
            rank = dist.get_rank()
            dist.destroy_process_group()
        if rank != 0:
            return 0
    else:
        prof = calibrate(model, compile=args.compile)
    write_profile(prof, args.out)
    print(f"{prof['name']}: matmul peak {prof['peak_flops']} FLOP/s, attention eff {prof['attn_eff']:.2f}, "
          f"memory bw {prof['hbm_bw'] / 1e9:.1f} GB/s, op overhead {prof['host_overhead_s'] * 1e6:.1f} us")
    print(f"wrote {args.out}; use it with --gpu {args.out}")
    return 0


def _validate(args) -> int:
    from scaletrain.plan.validate import format_results, validate_file, write_json

    if not args.published:
        raise ConfigError("plan validate needs --published FILE (a published-performance CSV).")
    results = validate_file(args.published)
    print(format_results(results))
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 0


def _check(args) -> int:
    import json

    from scaletrain.plan.check import check_run, format_check

    if not args.run:
        raise ConfigError("plan check needs --run DIR (a run folder written by `scaletrain train`).")
    import os

    result = check_run(args.run, args.profile, measure_tensors=args.measure_tensors,
                       measure_steps=args.measure_steps, measure_warmup=args.measure_warmup)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 prints every rank's numbers
        return 0
    print(format_check(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_dict(), indent=1))
        print(f"wrote {args.json}")
    return 0
