"""`scaletrain btx`: the argument parser and the command (wired into scaletrain/cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from scaletrain.errors import ConfigError
from scaletrain.ranks import env_ranks
from scaletrain.recipes.btx import CONFIG_FILE, STAGES, STATE_FILE, run_btx


def add_btx_parser(sub) -> None:
    b = sub.add_parser("btx", help="Branch-Train-MiX: a seed, one branch per data domain, mixed into an MoE, "
                                   "finetuned, against compute-matched baselines (docs/btx.md)",
                       epilog="Any other --section.key VALUE overrides the config, e.g. --btx.branch_steps 50.")
    b.add_argument("--config", help="TOML with [[data.domains]] and [btx] (e.g. configs/cpu_btx.toml); default: "
                                    f"RUN_DIR/{CONFIG_FILE}, saved by the first invocation")
    b.add_argument("--run-dir", help="recipe folder: DIR/seed, DIR/branches/<domain>, DIR/mix, ... (required unless "
                                     "--plan)")
    b.add_argument("--stage", choices=STAGES, help="run only this stage (default: every stage in order)")
    b.add_argument("--branch", metavar="DOMAIN", help="with --stage branch: only this domain's branch")
    b.add_argument("--seed", metavar="RUN", help="branch from this run folder's newest checkpoint (or this "
                                                 "checkpoint folder) instead of training DIR/seed")
    b.add_argument("--force", action="store_true",
                   help="run stages even when the planner predicts they do not fit in memory")
    p = b.add_argument_group("pricing (--plan: predict each stage's time on GPUs, train nothing)")
    p.add_argument("--plan", action="store_true", help="price every stage with the planner's layout search")
    p.add_argument("--gpus", help="GPUs of the whole recipe; the branches split them evenly")
    p.add_argument("--gpu", default="h100_sxm", help="catalog entry or calibrated profile JSON (default h100_sxm)")
    p.add_argument("--global-batch-tokens", help="tokens per optimizer step of every stage, e.g. 1M (default: "
                                                 "data.batch_size x seq_len x grad_accum x --gpus)")


def run_btx_cmd(args: argparse.Namespace, overrides: list[str]) -> int:
    from scaletrain.config import load_config

    if args.plan:
        return _plan(args, overrides)
    if not args.run_dir:
        raise ConfigError("btx needs --run-dir (the recipe folder), or --plan to price the stages only.")
    out = Path(args.run_dir)
    config = args.config or (out / CONFIG_FILE if (out / CONFIG_FILE).is_file() else None)
    if config is None:
        raise ConfigError(f"btx needs --config (a TOML with [[data.domains]] and [btx], e.g. configs/cpu_btx.toml): "
                          f"{out} holds no {CONFIG_FILE} of an earlier invocation.")
    run_btx(load_config(config, overrides), out, stage=args.stage, branch=args.branch, seed=args.seed,
            force=args.force)
    if env_ranks().rank == 0:
        print(f"btx: accounting in {out / STATE_FILE}")
    return 0


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    from scaletrain.config import load_config
    from scaletrain.plan.cli import parse_count
    from scaletrain.plan.hardware import get_hardware
    from scaletrain.recipes.btx import check_recipe_config
    from scaletrain.recipes.btx_plan import format_plan, price_btx

    if not args.config or not args.gpus:
        raise ConfigError("btx --plan needs --config (the recipe, e.g. configs/btx_gpu.toml) and --gpus N.")
    cfg = load_config(args.config, overrides)
    check_recipe_config(cfg, Path(args.run_dir) if args.run_dir else None)
    gpus = parse_count(args.gpus, "--gpus")
    tokens = parse_count(args.global_batch_tokens, "--global-batch-tokens") if args.global_batch_tokens else None
    hw = get_hardware(args.gpu)
    rows = price_btx(cfg, gpus, hw, tokens)
    print(format_plan(cfg, rows, gpus, hw.name, tokens or cfg.data.batch_size * cfg.data.seq_len
                      * cfg.train.grad_accum * gpus))
    return 0
