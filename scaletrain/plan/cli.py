"""`scaletrain plan [search|calibrate|validate|check] ...`: argparse wiring only.

Bad input raises ConfigError, which the main CLI prints and turns into exit code 2.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from scaletrain.errors import ConfigError
from scaletrain.ranks import env_ranks

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


SEARCH_DEFAULTS = {"gpu": "h100_sxm", "seq_len": "8192", "global_batch_tokens": "4M"}


def _search_options(p: argparse.ArgumentParser) -> None:
    """The layout search's options (on `plan` itself and on `plan search`)."""
    p.add_argument("--model", help="flavor name or a config TOML (its [model]); required")
    p.add_argument("--gpus", help="GPU count (required unless --sweep-gpus)")
    p.add_argument("--gpu", help=f"catalog entry or a calibrated profile JSON (default {SEARCH_DEFAULTS['gpu']})")
    p.add_argument("--seq-len", help=f"tokens per sequence (default {SEARCH_DEFAULTS['seq_len']})")
    p.add_argument("--global-batch-tokens",
                   help=f"tokens per optimizer step, e.g. 16M (default {SEARCH_DEFAULTS['global_batch_tokens']})")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp8", "fp16", "fp32"])
    p.add_argument("--fp8-recipe", default="tensorwise", choices=["tensorwise", "rowwise"],
                   help="with --precision fp8: the scaling the trainer uses (train.fp8_recipe)")
    p.add_argument("--compile", action="store_true", help="assume torch.compile (train.compile: fused kernels)")
    p.add_argument("--expert-imbalance", type=float, default=1.0,
                   help="MoE: tokens of the busiest expert-parallel rank / the mean (default 1.0 = balanced; a "
                        "run's metrics.jsonl reports expert_imbalance, an upper bound of it)")
    p.add_argument("--top", type=int, default=5, help="layouts shown")
    p.add_argument("--write-config", help="write the winner as a scaletrain config TOML (e.g. runs/best.toml)")
    p.add_argument("--sweep-gpus", help="GPU counts, e.g. 8,16,...,16384: best layout per size + plot")
    p.add_argument("--plot", default="plan_sweep.png", help="PNG written by --sweep-gpus")
    p.add_argument("--gpus-per-node", type=int, help="override the catalog topology: GPUs per NVLink domain")
    p.add_argument("--intra-bw", type=float, help="NVLink-domain GB/s per GPU per direction")
    p.add_argument("--inter-bw", type=float, help="network GB/s per GPU per direction")
    p.add_argument("--intra-latency-us", type=float)
    p.add_argument("--inter-latency-us", type=float)


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """`plan` with its sub-commands; `plan --model ...` without one is `plan search`."""
    p = subparsers.add_parser("plan", help="predict memory and step time of every parallel layout and rank them",
                              description="Rank parallel layouts (`search`, the default when no sub-command is "
                                          "given), calibrate this machine, validate the cost model against "
                                          "published measurements, or check a finished run against the prediction. "
                                          "`scaletrain plan ACTION --help` lists each one's options.")
    _search_options(p)
    p.set_defaults(action="search")
    actions = p.add_subparsers(dest="action", metavar="[ACTION]")
    _search_options(actions.add_parser("search", help="rank the layouts of a model on a GPU count (default)",
                                       description="Rank every legal parallel layout of a model on a GPU count."))
    c = actions.add_parser("calibrate", help="measure this machine into a hardware profile JSON",
                           description="Microbenchmarks of this machine -> a profile for --gpu PROFILE.json.")
    c.add_argument("--model", help="flavor or config TOML whose shapes are measured (default: generic shapes)")
    c.add_argument("--compile", action="store_true",
                   help="CPU: also time the compiled block and loss at each shape (10-20 s of compilation each)")
    c.add_argument("--out", default="profile.json", help="profile JSON to write")
    v = actions.add_parser("validate", help="compare the cost model with published measurements",
                           description="Predict tokens/s per GPU (and memory) of published training runs.")
    v.add_argument("--published", help="CSV of published measurements (default: the development set shipped "
                                       "with scaletrain, scaletrain/plan/data/)")
    v.add_argument("--cv", choices=["source", "model"],
                   help="leave-one-group-out cross-validation: refit the global parameters without each source "
                        "(publication) or model and predict it")
    v.add_argument("--json", help="write the per-row results as JSON")
    k = actions.add_parser("check", help="a finished run's measured step time and memory vs the prediction",
                           description="Measured vs predicted step time and memory of a `scaletrain train` run.")
    k.add_argument("--run", "--run-dir", dest="run",
                   help="a run folder written by `scaletrain train` (under torchrun write --run-dir: torchrun "
                        "takes --run for its own --run-path)")
    k.add_argument("--profile", help="calibrated profile JSON or catalog entry (default: the run's GPU)")
    k.add_argument("--json", help="write the result as JSON")
    k.add_argument("--measure-tensors", action="store_true",
                   help="re-run the run's config for a few steps here and measure the peak live tensor bytes per "
                        "rank (the CPU analogue of CUDA max_memory_allocated; multi-rank runs: launch under "
                        "torchrun --nproc-per-node N)")
    k.add_argument("--measure-steps", type=int, default=2, help="--measure-tensors: steps measured")
    k.add_argument("--measure-warmup", type=int, default=1,
                   help="--measure-tensors: steps run first, not measured (optimizer state, compile)")
    return p


def _model(spec: str):
    from scaletrain.config.flavors import FLAVORS, model_config_for

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
    if not args.expert_imbalance >= 1.0:
        raise ConfigError(f"--expert-imbalance is max / mean tokens per expert-parallel rank, so >= 1; got "
                          f"{args.expert_imbalance}.")
    return Workload(model, seq, tokens // seq, args.precision, args.fp8_recipe, args.expert_imbalance)


def run_plan(args: argparse.Namespace) -> int:
    action = {"calibrate": _calibrate, "validate": _validate, "check": _check}.get(args.action)
    return action(args) if action else _search(args)


def _search(args: argparse.Namespace) -> int:
    from scaletrain.plan import report
    from scaletrain.plan.memcheck import scaletrain_stack
    from scaletrain.plan.search import search

    if not args.model or not (args.gpus or args.sweep_gpus):
        raise ConfigError("plan search needs --model (a flavor or config TOML) and --gpus (or --sweep-gpus), "
                          "e.g. `scaletrain plan --model llama3_8b --gpus 8`.")
    defaults = [f"--{k.replace('_', '-')} {v}" for k, v in SEARCH_DEFAULTS.items() if getattr(args, k) is None]
    for k, v in SEARCH_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}.")
    model = _model(args.model)
    if args.write_config and model.attention != "gqa":  # refused before the search, which is long for such models
        raise ConfigError(f"--write-config writes a config for `scaletrain train`, which does not build "
                          f"model.attention = '{model.attention}' (priced by the planner only); drop --write-config.")
    hw = _hardware(args)
    w = _workload(args, model)
    stack = scaletrain_stack(args.compile, w.precision, w.fp8_recipe)
    used = f" (defaults used: {', '.join(defaults)})" if defaults else ""
    if args.sweep_gpus:
        points = []
        for g in parse_sweep(args.sweep_gpus):
            try:
                best = search(w, g, hw, stack, top=1).ranked
            except ConfigError:
                best = []
            points.append(report.SweepPoint(g, best[0] if best else None))
        print(f"{model.flavor} on {hw.name}, {w.seq_len}-token sequences, {w.global_batch * w.seq_len:,} tokens per "
              f"step, {w.precision}{used}")
        print(report.format_sweep(points))
        report.plot_sweep(points, args.plot, f"{model.flavor} on {hw.name}: {w.global_batch * w.seq_len:,} tokens "
                                             f"per step of {w.seq_len}-token sequences, {w.precision}")
        print(f"plot: {args.plot}")
        return 0
    gpus = parse_count(args.gpus, "--gpus")
    result = search(w, gpus, hw, stack, top=max(args.top, 5))
    print(f"{model.flavor} on {gpus} x {hw.name} ({hw.gpus_per_node} GPUs per NVLink domain), {w.seq_len}-token "
          f"sequences, {w.global_batch:,} sequences = {w.global_batch * w.seq_len:,} tokens per step, "
          f"{w.precision}{used}")
    print(report.format_result(result, hw, args.top))
    if args.write_config:
        if not result.ranked:
            raise ConfigError("no layout fits, so there is no config to write; add GPUs or shrink the batch.")
        report.write_winner(model, w, result.ranked[0], args.write_config, hw, gpus, args.compile)
        print(f"wrote {args.write_config} (layout #1; train it on {gpus} ranks)")
    return 0


def _calibrate(args) -> int:
    from scaletrain.plan.calibrate import calibrate, write_profile

    model = _model(args.model) if args.model else None
    ranks = env_ranks()
    if ranks.world_size > 1:  # under torchrun: also measure all-reduce bandwidth
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(ranks.local_rank)
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
    from scaletrain.plan.validate import format_results, read_cases, validate_file, write_json

    results = validate_file(args.published)
    print(format_results(results))
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    if args.cv:
        from scaletrain.plan.fit import cross_validate, format_cv

        print(format_cv(cross_validate(read_cases(args.published)[0], args.cv)))
    return 0


def _check(args) -> int:
    import json

    from scaletrain.plan.check import check_run, format_check

    if not args.run:
        raise ConfigError("plan check needs --run DIR (a run folder written by `scaletrain train`).")
    result = check_run(args.run, args.profile, measure_tensors=args.measure_tensors,
                       measure_steps=args.measure_steps, measure_warmup=args.measure_warmup)
    if env_ranks().rank != 0:  # under torchrun rank 0 prints every rank's numbers
        return 0
    print(format_check(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_dict(), indent=1))
        print(f"wrote {args.json}")
    return 0
