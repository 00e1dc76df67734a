"""The one entry point: `scaletrain train | plan | bench | generate | export | import | data | launch | btx`.

User mistakes (ScaletrainError) print one message on stderr without a traceback and exit 2;
anything else is a crash with a traceback and exit 1.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from scaletrain.errors import (EXIT_INTERRUPTED, EXIT_NUMERICS, EXIT_USER_ERROR, LayoutError, NumericsError,
                               ScaletrainError, Stopped)
from scaletrain.fsutil import STORAGE_ERRNOS, storage_error
from scaletrain.ranks import Ranks, env_ranks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaletrain", description="Plan, train and measure decoder-only LMs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a TOML preset plus --section.key overrides",
                       epilog="Any other --section.key VALUE overrides the config, e.g. --train.steps 50.")
    t.add_argument("--config", help="TOML preset (configs/*.toml); defaults when omitted")
    t.add_argument("--run-dir", help="run folder (default runs/<config name>)")
    t.add_argument("--resume", default="never",
                   help="'never' (default: the run folder must be new), 'auto' (newest complete checkpoint "
                        "of the run folder, or a fresh start), or a checkpoint folder")
    t.add_argument("--overwrite", action="store_true", help="discard an existing run folder's contents")
    t.add_argument("--force", action="store_true",
                   help="run even when the planner predicts the layout does not fit in memory")

    g = sub.add_parser("generate", help="sample text from a run's newest checkpoint")
    g.add_argument("--run", required=True, help="run folder")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint", help="checkpoint folder (default: the run's newest complete one)")

    e = sub.add_parser("export", help="write a run's newest checkpoint as a Hugging Face model folder")
    e.add_argument("--run", required=True, help="run folder")
    e.add_argument("--to", choices=["hf"], default="hf")
    e.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    e.add_argument("--checkpoint", help="checkpoint folder (default: the run's newest complete one)")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")

    i = sub.add_parser("import", help="turn a Hugging Face Llama, Qwen3 or Qwen3-MoE folder into a scaletrain run folder")
    i.add_argument("--from", dest="src_format", choices=["hf"], default="hf")
    i.add_argument("--src", required=True, help="HF model folder (config.json + *.safetensors)")
    i.add_argument("--run-dir", required=True, help="new run folder to create")
    i.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled pytorch_model.bin weights when there are no safetensors "
                        "(read with torch.load(weights_only=True)); refused by default")

    from scaletrain.launch import add_launch_parser

    add_launch_parser(sub)
    d = sub.add_parser("data", help="data preparation")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dp = dsub.add_parser("prepare", help="build tokenizer and token shards for a config (cached)")
    dp.add_argument("--config", help="TOML preset")

    from scaletrain.plan.cli import add_plan_parser

    add_plan_parser(sub)
    from scaletrain.bench.cli import add_bench_parser

    add_bench_parser(sub)
    from scaletrain.recipes.cli import add_btx_parser

    add_btx_parser(sub)
    return p


def _cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from scaletrain.plan.memcheck import preflight
    from scaletrain.train.rundir import train_config
    from scaletrain.train.trainer import Trainer

    rank0 = env_ranks().rank == 0
    run_dir = Path(args.run_dir or Path("runs") / (Path(args.config).stem if args.config else "default"))
    cfg, notes = train_config(args.config, overrides, run_dir, args.resume, args.overwrite)
    if rank0 and notes:
        print("\n".join(notes), flush=True)
    summary = Trainer(cfg, run_dir, memory_check=preflight(force=args.force), resume=args.resume,
                      overwrite=args.overwrite).fit()
    if rank0:
        if "initial_val_loss" in summary:
            print(f"val_loss: {summary['initial_val_loss']:.4f} at step 0 -> "
                  f"{summary['final_val_loss']:.4f} at step {summary['final_step']}")
        else:
            print(f"val_loss: {summary['final_val_loss']:.4f} at step {summary['final_step']}")
        if "sample" in summary:
            print("sample:\n" + summary["sample"])
        print(_memory_line(summary, run_dir))
        print(f"run folder: {run_dir}")
    return 0


def _memory_line(summary: dict, run_dir: Path) -> str:
    """The closing memory line (rank 0's measurement). On CUDA both numbers are tensor bytes
    (the allocator's peak vs the planner's), so they are compared; on CPU the measurement is
    the whole process's peak RSS, which says nothing about the tensor prediction, so the two
    are not set side by side as if they were."""
    gib = 2**30
    measured, predicted = summary["measured_peak_bytes"] / gib, summary["predicted_peak_bytes"] / gib
    if summary.get("device") == "cuda":
        return f"peak tensor memory (rank 0): measured {measured:.2f} GiB, planner predicted {predicted:.2f} GiB"
    return (f"peak process RSS (rank 0): {measured:.2f} GiB, the whole process, not comparable with the planner's "
            f"{predicted:.2f} GiB of tensors (tensors vs tensors: scaletrain plan check --run {run_dir} --measure-tensors)")


def _cmd_generate(args: argparse.Namespace) -> int:
    from scaletrain.export.runio import load_run_model
    from scaletrain.model.generate import generate

    model, tokenizer, _ = load_run_model(args.run, args.checkpoint)
    ids = generate(model, tokenizer.encode(args.prompt), args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, seed=args.seed, eos_id=tokenizer.eos_id)
    print(args.prompt + tokenizer.decode(ids))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from scaletrain.export.runio import export_run

    out, ckpt, step = export_run(args.run, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"exported step {step} ({ckpt}) as a Hugging Face model to {out}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from scaletrain.export.runio import import_run

    ckpt = import_run(args.src, args.run_dir, allow_pickle=args.allow_pickle)
    print(f"imported {args.src} into {ckpt}")
    return 0


def _cmd_data(args: argparse.Namespace, overrides: list[str]) -> int:
    from scaletrain.config import load_config
    from scaletrain.data import prepare_data

    cfg = load_config(args.config, overrides)
    data = prepare_data(cfg.data, cfg.tokenizer, note=lambda msg: print(f"data: {msg}", flush=True))
    for d in data.domains:
        print(f"{f'domain {d.name}: ' if d.name else ''}shards in {d.shard_dir}: {d.manifest['total_tokens']:,} tokens "
              f"({d.stats['tokens_train']:,} train / {d.stats['tokens_val']:,} val; {d.stats.get('documents_train', 0):,} / "
              f"{d.stats.get('documents_val', 0):,} documents)")
    print(f"tokenizer vocab {data.tokenizer.vocab_size}" + (
        f"; {data.stats['tokens_train'] + data.stats['tokens_val']:,} tokens in {len(data.domains)} domains"
        if data.domains[0].name else ""))
    return 0


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` for the CLI: each warning as one line on stderr, like the errors
    (`warning: ...`; a library's warning names the library), without the source line. Under
    torchrun only rank 0 prints them: the ranks see the same run and would repeat each other."""
    if env_ranks().rank != 0:
        return
    parts = Path(filename).parts
    lib = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p in ("site-packages", "dist-packages")), None)
    if lib is None and "scaletrain" not in parts:
        lib = Path(filename).stem  # the standard library or a script
    origin = "" if lib in (None, "scaletrain") else f" ({lib}, {category.__name__})"
    print(f"warning{origin}: {message}", file=file or sys.stderr, flush=True)


def run(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the command; returns the exit code (raises on crashes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _warning_line
    from scaletrain.config.load import split_overrides

    argv, overrides = split_overrides(argv)  # --section.key VALUE: taken out first, so VALUE is no sub-command
    args, rest = _parser().parse_known_args(argv)
    takes_overrides = args.command in ("train", "data", "launch", "bench", "btx")
    if (rest or overrides) and not takes_overrides:
        _parser().error(f"unrecognized arguments: {' '.join(rest + overrides)}")
    if args.command == "launch":
        from scaletrain.launch import run_launch

        return run_launch(args, rest, overrides)
    rest = overrides + rest  # an unknown option: load_config names it and the override syntax
    if args.command == "train":
        return _cmd_train(args, rest)
    if args.command == "data":
        return _cmd_data(args, rest)
    if args.command == "bench":
        from scaletrain.bench.cli import run_bench_cmd

        return run_bench_cmd(args, rest)
    if args.command == "btx":
        from scaletrain.recipes.cli import run_btx_cmd

        return run_btx_cmd(args, rest)
    if args.command == "plan":
        from scaletrain.plan.cli import run_plan

        return run_plan(args)
    return {"generate": _cmd_generate, "export": _cmd_export, "import": _cmd_import}[args.command](args)


def _report_user_error(e: ScaletrainError) -> None:
    """Print a user error once per job, not once per rank, yet never hide a rank's own error.

    Every rank exits 2; who prints depends on whether the other ranks surely met the same error.
    Before any process group exists the ranks have run the same code on the same arguments, so
    ranks on one node (same files, same hardware) fail alike: only each node's first rank
    prints, and a LayoutError (a function of the config and the world size alone) only rank 0.
    After that, errors can be one rank's own (its checkpoint shard, its device): each prints,
    prefixed with its rank."""
    import torch.distributed as dist

    try:
        ranks = env_ranks()
    except ScaletrainError:  # the error being reported may be this very one: print it as rank 0
        ranks = Ranks()
    if ranks.rank != 0:
        before_group = not (dist.is_available() and dist.is_initialized())
        if before_group and (isinstance(e, LayoutError) or ranks.local_rank != 0):
            return
    print(f"{'' if ranks.rank == 0 else f'[rank {ranks.rank}] '}error: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except NumericsError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_NUMERICS
    except (ScaletrainError, OSError) as e:
        if isinstance(e, OSError):  # a full disk, a quota, no permission, a read-only file system
            if e.errno not in STORAGE_ERRNOS:
                raise
            e = storage_error(e, f"accessing {e.filename or 'a file'}")
        _report_user_error(e)
        code = EXIT_USER_ERROR
    except Stopped as e:  # a signal during training: the checkpoint is saved (train/preempt.py)
        if env_ranks().rank == 0:
            print(e, file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:
        from scaletrain.parallel.dims import shutdown_distributed

        shutdown_distributed()
    sys.exit(code)


if __name__ == "__main__":
    main()
