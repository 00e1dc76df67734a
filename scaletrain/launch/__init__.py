"""`scaletrain launch local | slurm`: start a job so that its exit code means what scaletrain's
do (errors.py: 2 user error, 3 numerics, 4 hang, 5 preempted after saving, 130 Ctrl-C).

- `local` (local.py): torchrun's agent on this node, exiting with the first failing worker's
  code, restarting only failures worth a retry, forwarding SIGTERM/SIGUSR1/SIGINT.
- `slurm` (slurm.py): a batch script running `local` on every node under srun, with the
  preemption flow (signal -> save -> exit 5 -> requeue -> --resume auto) and logs in the run folder.

Imports of torch happen inside `run_launch`, so `scaletrain --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from scaletrain.errors import ConfigError

COMMANDS = ("train", "bench", "generate", "export", "import", "data", "plan")  # what a worker may run


def add_launch_parser(sub) -> None:
    p = sub.add_parser("launch", help="start a job on this node's processes or on Slurm, keeping scaletrain's exit codes")
    lsub = p.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    loc = lsub.add_parser(
        "local", help="torchrun's agent: N workers of a scaletrain COMMAND, exit code of the first failing one",
        description="Run `scaletrain COMMAND ...` as N workers of a torchrun-style job (same rendezvous and "
                    "environment as torchrun). Exits with the first failing worker's code (2 user error, 3 "
                    "numerics, 4 hang, 5 preempted, 130 Ctrl-C); forwards SIGTERM/SIGUSR1/SIGINT to the "
                    "workers; restarts crashes and hangs only (--max-restarts).")
    loc.add_argument("--nproc-per-node", type=int, required=True, help="workers on this node")
    loc.add_argument("--nnodes", type=int, default=1, help="nodes of the job (one `launch local` per node)")
    loc.add_argument("--rdzv-backend", default="c10d")
    loc.add_argument("--rdzv-endpoint", default="",
                     help="HOST:PORT of the rendezvous (multi-node); default: a free port on this node")
    loc.add_argument("--rdzv-id", default="", help="job id shared by every node's launcher")
    loc.add_argument("--max-restarts", type=int, default=0,
                     help="restarts after a crash (1), hang (4) or a worker killed by a signal; never after 2, 3, 5, 130")
    loc.add_argument("--exit-code-dir", default=None,
                     help="also write this launcher's exit code to DIR/<host>-<pid> (the Slurm script reads them)")
    loc.add_argument("worker_command", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                     help="a scaletrain command and its arguments, e.g. train --config configs/cpu_debug.toml")
    from scaletrain.launch.slurm import add_slurm_parser

    add_slurm_parser(lsub)


def _run_local(args: argparse.Namespace, overrides: list[str]) -> int:
    if not args.worker_command or args.worker_command[0] not in COMMANDS:
        raise ConfigError(f"launch local needs a scaletrain command after its options, one of {', '.join(COMMANDS)}; "
                          "e.g. scaletrain launch local --nproc-per-node 2 train --config configs/cpu_debug.toml")
    if args.nproc_per_node < 1 or args.nnodes < 1 or args.max_restarts < 0:
        raise ConfigError(f"--nproc-per-node ({args.nproc_per_node}) and --nnodes ({args.nnodes}) must be >= 1 "
                          f"and --max-restarts ({args.max_restarts}) >= 0.")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise ConfigError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the first node) and --rdzv-id.")
    from scaletrain.launch.local import LocalLaunch, run_workers

    launch = LocalLaunch(args.nproc_per_node, args.nnodes, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id,
                         args.max_restarts)
    python = os.environ.get("PYTHON_EXEC", sys.executable)  # torchrun's variable for the workers' interpreter
    code = run_workers(launch, [python, "-u", "-m", "scaletrain", *args.worker_command, *overrides])
    if args.exit_code_dir:
        record = Path(args.exit_code_dir) / f"{socket.gethostname()}-{os.getpid()}"
        record.write_text(f"{time.time_ns()} {code}\n")  # "when what": the script takes the earliest failure
    return code


def run_launch(args: argparse.Namespace, unknown: list[str], overrides: list[str]) -> int:
    """`scaletrain launch`: `overrides` are the command line's `--section.key VALUE` pairs (the
    worker command's, for local), `unknown` any other option argparse did not know."""
    if args.launcher == "local":
        if unknown:
            raise ConfigError(f"unknown launch local option(s) before the command: {' '.join(unknown)}")
        return _run_local(args, overrides)
    from scaletrain.launch.slurm import run_slurm

    return run_slurm(args, overrides + unknown)
