"""`scaletrain btx`: the argument parser and the command (wired into scaletrain/cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from scaletrain.errors import ConfigError
from scaletrain.ranks import env_ranks
from scaletrain.recipes.btx import CONFIG_FILE, STAGES, STATE_FILE, run_btx


def add_btx_parser(sub) -> None:
    b = sub.add_parser("btx", help="Branch-Train-MiX: a seed, one branch per data domain, mixed into an MoE (docs/btx.md)",
                       epilog="Any other --section.key VALUE overrides the config, e.g. --btx.branch_steps 50.")
    b.add_argument("--config", help="TOML with [[data.domains]] and [btx] (e.g. configs/cpu_btx.toml); default: "
                                    f"RUN_DIR/{CONFIG_FILE}, saved by the first invocation")
    b.add_argument("--run-dir", required=True, help="recipe folder: DIR/seed, DIR/branches/<domain>, ...")
    b.add_argument("--stage", choices=STAGES, help="run only this stage (default: every stage in order)")
    b.add_argument("--branch", metavar="DOMAIN", help="with --stage branch: only this domain's branch")
    b.add_argument("--seed", metavar="RUN", help="branch from this run folder's newest checkpoint (or this "
                                                 "checkpoint folder) instead of training DIR/seed")
    b.add_argument("--force", action="store_true",
                   help="run stages even when the planner predicts they do not fit in memory")


def run_btx_cmd(args: argparse.Namespace, overrides: list[str]) -> int:
    from scaletrain.config import load_config

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
