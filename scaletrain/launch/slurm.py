"""`scaletrain launch slurm`: check a job's layout now, then write (and optionally submit) a
Slurm batch script that survives preemption and time limits (docs/scaling.md, "Slurm").

On each node, srun starts one `scaletrain launch local` (torchrun's agent, exiting with the
workers' own codes) with the c10d rendezvous on the first node's IP address:

    srun --ntasks-per-node=1 python3 -m scaletrain launch local --nnodes N --nproc-per-node P \\
         --rdzv-endpoint $HEAD_IP:PORT --rdzv-id $SLURM_JOB_ID --max-restarts K \\
         train --config CFG --run-dir DIR --resume auto --train.hang_timeout_s S [overrides]

Preemption: `#SBATCH --signal=B:USR1@<lead>` sends SIGUSR1 to the batch shell <lead> seconds
before the time limit; its trap passes the signal to srun, srun to every node's launcher, the
launcher to the workers, which finish the step, save and exit 5; the script then runs
`scontrol requeue` and the next start continues with `--resume auto`. Codes that would repeat
(2, 3) are neither restarted nor requeued; the script exits with the first failing node's code,
so Slurm's job state shows scaletrain's own code. Logs go to DIR/slurm/ in append mode, so a
requeued job's earlier attempts stay in the same files.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scaletrain.errors import ConfigError, ScaletrainError

SUBMIT_BACKOFF_S = (10.0, 30.0)  # waits between sbatch attempts (a busy slurmctld answers later)


def add_slurm_parser(lsub) -> None:
    s = lsub.add_parser("slurm", help="Slurm batch script: `launch local` per node under srun, preemption-safe")
    s.add_argument("--config", required=True, help="TOML preset the job trains")
    s.add_argument("--run-dir", required=True, help="run folder on a file system every node sees (logs go to RUN/slurm/)")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes per node (default: --gpus-per-node, else the config's degrees / --nodes)")
    s.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs to request per node (default: one per process); 0 = a CPU job with gloo, no GPUs")
    s.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per node for its processes (default: one per process for CPU jobs, the "
                        "partition's default for GPU jobs); OMP_NUM_THREADS = this / processes per node")
    s.add_argument("--partition", default=None)
    s.add_argument("--account", default=None)
    s.add_argument("--time", default=None,
                   help="wall-clock limit (Slurm syntax, e.g. 1-00:00:00); default: the partition's own default limit")
    s.add_argument("--signal-lead-s", type=int, default=300,
                   help="seconds before the time limit at which SIGUSR1 asks the workers to save and requeue")
    s.add_argument("--job-name", default="scaletrain")
    s.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    s.add_argument("--max-restarts", type=int, default=3,
                   help="worker restarts after a crash or hang within one allocation (never after exit 2 or 3)")
    s.add_argument("--hang-timeout-s", type=float, default=1800.0,
                   help="train.hang_timeout_s for the job when the config leaves the watchdog off (0 = leave it off)")
    s.add_argument("--nccl-socket-ifname", default=None,
                   help="NCCL_SOCKET_IFNAME (and GLOO_SOCKET_IFNAME), e.g. ib0 or ^docker,lo")
    s.add_argument("--debug", action="store_true",
                   help="NCCL_DEBUG=INFO, TORCH_DISTRIBUTED_DEBUG=DETAIL, TORCH_NCCL_DUMP_ON_TIMEOUT=1")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="export KEY=VALUE on every node (repeatable), e.g. --env NCCL_IB_HCA=mlx5")
    s.add_argument("--venv", default=None, help="virtual environment to activate on each node")
    s.add_argument("--out", default=None, help="write the script here (default: print it)")
    s.add_argument("--submit", action="store_true", help="submit with sbatch (needs --out)")
    s.add_argument("--submit-attempts", type=int, default=3, help="sbatch attempts before giving up")


def job_shape(args: argparse.Namespace, overrides: list[str]) -> tuple[int, int]:
    """(processes per node, GPUs per node) after checking the config's layout against them.

    Processes per node: --nproc-per-node, else --gpus-per-node, else the config's degrees /
    --nodes when they fix the world size (dp_shard != -1). Raises ConfigError/LayoutError now, not
    after the queue wait."""
    from scaletrain.config import load_config
    from scaletrain.parallel.layout import check_layout, resolve_dims

    if args.nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {args.nodes}.")
    cfg = load_config(args.config, overrides)
    par = cfg.parallel
    nproc = args.nproc_per_node or args.gpus_per_node or None
    if nproc is None and par.dp_shard != -1:
        world = par.dp_replicate * par.dp_shard * par.tp * par.pp * par.cp
        if world % args.nodes:
            raise ConfigError(f"the config's layout has {world} processes, which {args.nodes} nodes cannot share "
                              f"evenly; choose --nodes dividing {world} or change the parallel degrees.")
        nproc = world // args.nodes
    if nproc is None:
        raise ConfigError(f"how many processes per node? {args.config} leaves parallel.dp_shard = -1 (the rest of "
                          "the world), so pass --gpus-per-node G (one process per GPU) or --nproc-per-node P "
                          "(with --gpus-per-node 0 for a CPU job), or fix the degrees (--parallel.dp_shard N).")
    if nproc < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {nproc}.")
    gpus = nproc if args.gpus_per_node is None else args.gpus_per_node
    if gpus not in (0, nproc):
        raise ConfigError(f"--gpus-per-node {gpus} with {nproc} processes per node: scaletrain runs one process "
                          "per GPU; pass the same number (or 0 for a CPU job).")
    dims = resolve_dims(par, args.nodes * nproc, cfg.model, cfg.data.seq_len, cfg.data.batch_size)
    check_layout(dims, par, cfg.model, cfg.data.seq_len, cfg.data.batch_size, cfg.train.precision)
    if gpus and dims.tp > gpus:
        raise ConfigError(f"parallel.tp = {dims.tp} spans more than one node ({gpus} GPUs each); tensor "
                          "parallelism needs NVLink-class bandwidth: keep tp <= --gpus-per-node.")
    if not overrides_set(overrides, "train.hang_timeout_s") and cfg.train.hang_timeout_s <= 0 < args.hang_timeout_s:
        overrides.extend(["--train.hang_timeout_s", f"{args.hang_timeout_s:g}"])
    return nproc, gpus


def overrides_set(overrides: list[str], key: str) -> bool:
    return any(o == f"--{key}" or o.startswith(f"--{key}=") for o in overrides)


def _environment(args: argparse.Namespace, nproc: int) -> list[str]:
    """`export` lines of the script (documented in docs/scaling.md, "Slurm options")."""
    env = [
        f"export OMP_NUM_THREADS=$(( ${{SLURM_CPUS_PER_TASK:-{nproc}}} / {nproc} ))",
        '[ "$OMP_NUM_THREADS" -ge 1 ] || export OMP_NUM_THREADS=1',
        "export PYTHONFAULTHANDLER=1  # a crashing or hung worker prints every thread's Python stack",
        "# Restarted workers must not reuse the previous round's rendezvous keys (pytorch#135712).",
        "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
    ]
    if args.nccl_socket_ifname:
        iface = shlex.quote(args.nccl_socket_ifname)
        env.append(f"export NCCL_SOCKET_IFNAME={iface} GLOO_SOCKET_IFNAME={iface}")
    if args.debug:
        env.append("export NCCL_DEBUG=INFO TORCH_DISTRIBUTED_DEBUG=DETAIL TORCH_NCCL_DUMP_ON_TIMEOUT=1")
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env {item!r} is not KEY=VALUE; e.g. --env NCCL_IB_HCA=mlx5")
        env.append(f"export {key}={shlex.quote(value)}")
    return env


def slurm_script(args: argparse.Namespace, overrides: list[str], nproc: int, gpus: int) -> str:
    """The sbatch script text (module docstring); `overrides` already hold the watchdog's."""
    run_dir = Path(args.run_dir).resolve()
    logs = run_dir / "slurm"
    cpus = args.cpus_per_task or (None if gpus else nproc)
    header = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1"]
    header += [f"--gpus-per-node={gpus}", "--exclusive"] if gpus else []
    header += [f"--cpus-per-task={cpus}"] if cpus else []
    header += [f"--time={args.time}"] if args.time else []
    header += [f"--partition={args.partition}"] if args.partition else []
    header += [f"--account={args.account}"] if args.account else []
    header += [f"--signal=B:USR1@{args.signal_lead_s}", "--requeue", "--open-mode=append",
               f"--output={logs}/%x-%j.out", f"--error={logs}/%x-%j.err"]
    q = shlex.quote
    worker = ["python3", "-m", "scaletrain", "launch", "local", "--nnodes", str(args.nodes),
              "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d"]
    train = ["train", "--config", str(Path(args.config).resolve()), "--run-dir", str(run_dir), "--resume", "auto",
             *overrides]
    srun_cpus = ' --cpus-per-task="$SLURM_CPUS_PER_TASK"' if cpus else ""  # srun no longer inherits it (22.05+)
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {h}" for h in header),
        "",
        "# Generated by `scaletrain launch slurm` (docs/scaling.md): one `scaletrain launch local` per node,",
        "# SIGUSR1/SIGTERM -> workers save and exit 5 -> requeue -> --resume auto; exit code = the workers'.",
        "set -uo pipefail  # no -e: srun's status is examined below",
        *([f"source {q(str(Path(args.venv).resolve()))}/bin/activate"] if args.venv else []),
        f"EXITS={q(str(logs))}/exit-$SLURM_JOB_ID  # each node's launcher writes '<time_ns> <code>' here",
        'rm -rf "$EXITS" && mkdir -p "$EXITS"',
        'echo "[scaletrain] job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST at $(date)"',
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "# The rendezvous host by address: node names need not resolve on the other nodes.",
        'HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD" hostname --ip-address | awk \'{print $1}\')',
        *_environment(args, nproc),
        "",
        f"srun --ntasks-per-node=1{srun_cpus} --kill-on-bad-exit=0 --wait=120 \\",
        f"  {' '.join(worker)} --rdzv-endpoint \"$HEAD_IP:{args.port}\" --rdzv-id \"$SLURM_JOB_ID\" \\",
        f"  --max-restarts {args.max_restarts} --exit-code-dir \"$EXITS\" \\",
        f"  {' '.join(q(a) for a in train)} &",
        "SRUN=$! SIGNALLED= TRAPPED=",
        "forward() {  # Slurm's warning signal: every node's workers finish the step, save and exit 5",
        '  SIGNALLED=$1 TRAPPED=1',
        '  echo "[scaletrain] SIG$1 at $(date): workers save a checkpoint and stop"',
        '  kill -s "$1" "$SRUN" 2>/dev/null  # srun passes it to every node\'s launcher, which passes it on',
        "}",
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        "while :; do  # a trapped signal interrupts wait (status > 128); wait again for srun itself",
        '  wait "$SRUN"; rc=$?',
        '  [ "$rc" -gt 128 ] && [ -n "$TRAPPED" ] || break',
        "  TRAPPED=",
        "done",
        "# srun reports the highest code of all nodes; the job's code is the first failing node's.",
        "first=$(cat \"$EXITS\"/* 2>/dev/null | sort -n | awk '$2 != 0 {print $2; exit}')",
        'rc=${first:-$rc}',
        'if [ "$rc" = 5 ] || { [ -n "$SIGNALLED" ] && [ "$rc" != 0 ] && [ "$rc" != 2 ] && [ "$rc" != 3 ]; }; then',
        '  if scontrol requeue "$SLURM_JOB_ID"; then',
        '    echo "[scaletrain] exit $rc${SIGNALLED:+ after SIG$SIGNALLED}: requeued; the next start resumes (--resume auto)"',
        "    exit 0",
        "  fi",
        '  echo "[scaletrain] scontrol requeue failed: submit this script again to continue (--resume auto)" >&2',
        "fi",
        'echo "[scaletrain] exit $rc at $(date)"',
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def _submit(script: Path, attempts: int) -> int:
    """sbatch `script`, retrying a failure (a busy or restarting controller) up to `attempts`
    times; prints sbatch's answer. ScaletrainError after the last failure."""
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch is not on PATH: run this on a Slurm login node, or submit the script by hand.")
    for attempt in range(1, attempts + 1):
        proc = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
        if proc.returncode == 0:
            print(proc.stdout.strip())
            return 0
        error = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        print(f"sbatch failed (attempt {attempt} of {attempts}): {error}", file=sys.stderr)
        if attempt < attempts:
            time.sleep(SUBMIT_BACKOFF_S[min(attempt, len(SUBMIT_BACKOFF_S)) - 1])
    raise ScaletrainError(f"sbatch refused {script} {attempts} times (last: {error}); fix what it says "
                          f"(partition, account, time limit) and run `sbatch {script}`, or rerun this command.")


def run_slurm(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.submit and not args.out:
        raise ConfigError("--submit needs --out FILE (the script sbatch submits).")
    if args.signal_lead_s < 0 or args.submit_attempts < 1:
        raise ConfigError("--signal-lead-s must be >= 0 and --submit-attempts >= 1.")
    if not Path(args.config).is_file():
        raise ConfigError(f"config file {args.config} does not exist; pass a preset such as configs/anchor_1b.toml.")
    overrides = list(overrides)
    nproc, gpus = job_shape(args, overrides)
    script = slurm_script(args, overrides, nproc, gpus)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and out.read_text() != script:
        raise ConfigError(f"{out} already exists with another script; choose another --out or remove it.")
    logs = Path(args.run_dir).resolve() / "slurm"
    try:  # Slurm opens --output/--error before the script runs and does not create their folder
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the job's log folder {logs} ({e.strerror}); choose a --run-dir "
                          "on a file system you can write and every node sees.") from None
    if out is None:
        print(script, end="")
        return 0
    if not out.exists():
        out.write_text(script)
        print(f"wrote {out}")
    return _submit(out, args.submit_attempts) if args.submit else 0
