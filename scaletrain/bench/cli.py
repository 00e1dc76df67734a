"""`scaletrain bench` and `scaletrain bench ffn`: the benchmark command line.

  scaletrain bench --config configs/anchor_1b.toml [--warmup 10 --steps 30] [--peer torchtitan]
                   [--profile-steps 5] [--results FILE] [--section.key VALUE ...]
  scaletrain bench ffn [--tokens N --dim D --hidden H ...]     (FFN in isolation: dense vs 2:4)
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

from scaletrain.errors import ConfigError
from scaletrain.ranks import env_ranks

DEFAULT_RESULTS = "runs/bench/results.jsonl"


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench", help="steady-state tokens/s, TFLOP/s, MFU, memory and step breakdown of a config "
                      "(`scaletrain bench ffn -h`: the FFN alone, dense vs 2:4 sparse)",
        epilog="Any other --section.key VALUE overrides the config, e.g. --train.compile false.")
    b.add_argument("--config", help="TOML preset (e.g. configs/anchor_1b.toml)")
    b.add_argument("--warmup", type=int, default=10, help="steps run first and not measured (default 10)")
    b.add_argument("--steps", type=int, default=30, help="measured steps, >= 20 (default 30)")
    b.add_argument("--phase-steps", type=int, default=5,
                   help="extra steps timed phase by phase after the window (default 5; 0 = skip)")
    b.add_argument("--profile-steps", type=int, default=0,
                   help="extra steps under torch.profiler to measure the framework tax (GPU idle, launches)")
    b.add_argument("--peer", choices=["torchtitan"], help="also run torchtitan 0.2.2 on the identical job")
    b.add_argument("--results", default=DEFAULT_RESULTS, help=f"results file, one JSON line appended per run "
                                                                f"(default {DEFAULT_RESULTS})")
    b.add_argument("--no-results", action="store_true", help="do not append to the results file")
    b.add_argument("--json", help="also write this result as a JSON file")
    b.add_argument("--run-dir", help="scratch run folder (default runs/bench/<config name>; overwritten)")
    b.add_argument("--smoke", action="store_true",
                   help="allow fewer than 20 measured steps (a quick check; the row is marked smoke)")
    from scaletrain.bench import ffn

    f = b.add_subparsers(dest="bench_command", metavar="ffn").add_parser(
        "ffn", help="the Squared-ReLU FFN alone: dense vs 2:4 activation sparsity",
        description="Squared-ReLU FFN forward/backward in isolation: dense vs 2:4 activation sparsity.")
    ffn.add_arguments(f)


def _free_device() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_bench_cmd(args: argparse.Namespace, overrides: list[str]) -> int:
    from scaletrain.bench.results import append_result, environment, format_report
    from scaletrain.bench.runner import BenchOptions, run_bench
    from scaletrain.config import load_config

    if args.bench_command == "ffn":
        from scaletrain.bench import ffn

        if overrides:
            raise ConfigError(f"bench ffn takes no config overrides, got {' '.join(overrides)}; "
                              "see scaletrain bench ffn -h.")
        return ffn.main(args)
    for name in ("phase_steps", "profile_steps"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}.")
    cfg = load_config(args.config, overrides)
    ranks = env_ranks()
    world, rank = ranks.world_size, ranks.rank
    if args.peer:
        from scaletrain.bench.peer import check_peer

        check_peer(cfg, world)  # before anything runs: a missing peer is known in a second
    stem = Path(args.config).stem if args.config else "default"
    run_dir = Path(args.run_dir or Path("runs") / "bench" / stem)
    opts = BenchOptions(warmup=args.warmup, steps=args.steps, phase_steps=args.phase_steps,
                        profile_steps=args.profile_steps, smoke=args.smoke)
    result = {**environment(), **run_bench(cfg, opts, run_dir)}
    if rank == 0:
        print(format_report(result), flush=True)
    if args.peer and rank == 0:
        from scaletrain.bench.peer import run_peer
        from scaletrain.data import prepare_data

        _free_device()
        data = prepare_data(cfg.data, cfg.tokenizer)
        peer = run_peer(cfg, data, run_dir / "peer_torchtitan", args.warmup, args.steps)
        ratio = result["tokens_per_s"] / peer["tokens_per_s"]
        mem_ratio = result["peak_reserved_bytes"] / peer["peak_reserved_bytes"]
        result["peer"] = {"name": "torchtitan", **{k: v for k, v in peer.items() if k != "windows"},
                          "ratio_tokens_per_s": ratio, "ratio_peak_reserved": mem_ratio}
        print(f"peer torchtitan {peer['version']}: {peer['tokens_per_s']:,.0f} tokens/s, {peer['tflops']:,.1f} TFLOP/s, "
              f"MFU {100 * peer['mfu']:.1f}%, peak reserved {peer['peak_reserved_bytes'] / 2**30:.2f} GiB "
              f"(steady steps {peer['steps']})")
        print(f"scaletrain / torchtitan: {ratio:.3f}x tokens/s, {mem_ratio:.3f}x peak reserved memory")
    if rank == 0:
        if not args.no_results:
            path = append_result(args.results, result)
            print(f"result appended to {path}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return 0
