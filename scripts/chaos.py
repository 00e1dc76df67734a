"""Chaos test: train while injecting a seeded random sequence of faults, then prove nothing
was lost.

    python scripts/chaos.py --seed S --faults K [--ranks 2] [--steps 12] [--workdir DIR]

A clean reference job runs first. Then the same job (torchrun, gloo, FSDP over --ranks CPU
ranks, checkpoints every 2 steps, train.nan_policy = rollback, a hang watchdog) is launched
again and again with --resume auto while faults are injected, until it finishes:

  kill      a rank SIGKILLs itself inside a step              (SCALETRAIN_FAULT_KILL)
  hang      a rank sleeps inside a step; the watchdog dumps stacks and exits (SCALETRAIN_FAULT_SLEEP)
  nan       rank 0's gradients become NaN at a step; the trainer rolls back (SCALETRAIN_FAULT_NAN_STEPS)
  sigterm   a rank gets SIGTERM inside a step (SCALETRAIN_FAULT_SIGNAL): every rank finishes
            that step, it is saved, and the ranks exit 5 (preemption, no step lost)
  corrupt   between launches, a data file of the newest checkpoint is truncated
  partial   between launches, a half-written checkpoint folder (.tmp-step-*) is left behind,
            as a kill in the middle of a save leaves it
  writer    during a launch, a second `scaletrain train --resume auto` on the same run folder;
            it must be refused (exit 2, the run-folder lock) while the first goes on
  diskfull  for one launch, metrics.jsonl is a link to /dev/full (every write: ENOSPC); the
            launch must stop with exit 2 saying the disk is full; the file is put back after

Each kill/hang/sigterm ends a launch, and so does diskfull (at its first step); corrupt/partial
are applied before the next launch (a finished job is reopened by corrupting its newest
checkpoint); a nan or writer fault rides along in a launch. Faults are drawn until K have
actually fired: a kill/hang counts when its marker file exists, a nan when the trainer counted a
non-finite step, damage when a file was damaged, a sigterm when the ranks exited 5 with the
step's checkpoint committed, a writer when it was refused with exit 2, a diskfull when the
launch stopped with exit 2 and the disk-full message. All count as survived when the job then
finished. Exit 0 only when every injected fault was survived, the final model equals the clean
run bit for bit, and every committed checkpoint verifies (sizes and sha256). The last line
summarises faults injected and survived by kind.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("kill", "hang", "nan", "corrupt", "partial", "sigterm", "writer", "diskfull")


def _env(env_extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **env_extra)
    return env


def _train_args(run: Path, data_cache: Path, steps: int, dp_shard: int) -> list[str]:
    return ["-m", "scaletrain", "train", "--config", str(ROOT / "configs" / "cpu_debug.toml"), "--run-dir", str(run),
            "--data.cache_dir", str(data_cache), "--train.steps", str(steps), "--metrics.progress", "none",
            "--metrics.tensorboard", "false", "--metrics.plot", "false", "--data.seq_len", "64",
            "--data.batch_size", "2", "--parallel.dp_shard", str(dp_shard), "--checkpoint.interval", "2",
            "--checkpoint.keep", "0", "--train.nan_policy", "rollback", "--train.hang_timeout_s", "5",
            "--train.eval_interval", "0", "--resume", "auto"]


def _metric_lines(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() and not metrics.is_symlink() else 0


# The second writer: imports everything first (seconds), then waits until the job's rank 0 has
# taken the run-folder lock (RUN/.lock changes) and only then starts `train`, so it meets a
# held lock. Its model shape differs from the job's: were the lock ever free, it would stop
# with exit 2 ("different model shape") before writing anything, and not count as refused.
_SECOND_WRITER = """
import sys, time, pathlib
lock = pathlib.Path(sys.argv[1]) / ".lock"
before = lock.read_bytes() if lock.exists() else b""
import scaletrain.cli, scaletrain.train.trainer, scaletrain.plan.memcheck
while not lock.exists() or lock.read_bytes() == before:
    time.sleep(0.01)
scaletrain.cli.main(sys.argv[2:])
"""


def _job(run: Path, data_cache: Path, ranks: int, steps: int, env_extra: dict[str, str], timeout: float,
         second_writer: list | None = None):
    """One torchrun launch of the job. With `second_writer` (a list), a single-process `train` on
    the same folder runs alongside (see _SECOND_WRITER); its CompletedProcess is appended when it
    ran (it is stopped if the job ended before taking the lock)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           *_train_args(run, data_cache, steps, ranks)]
    second = None
    if second_writer is not None:
        args = [*_train_args(run, data_cache, steps, 1)[2:], "--model.dim", "128", "--model.ffn_dim", "256"]
        second = subprocess.Popen([sys.executable, "-c", _SECOND_WRITER, str(run), *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=_env({}), cwd=ROOT)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(env_extra),
                            cwd=ROOT)
    out, err = proc.communicate(timeout=timeout)
    if second is not None:
        try:
            second_out, second_err = second.communicate(timeout=20)
            second_writer.append(subprocess.CompletedProcess(second.args, second.returncode, second_out, second_err))
        except subprocess.TimeoutExpired:  # the job ended before it took the lock
            second.kill()
            second.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _newest_step(run: Path) -> int:
    from scaletrain.config.schema import CheckpointConfig
    from scaletrain.train.checkpoint import Checkpointer

    steps = Checkpointer(run, CheckpointConfig()).complete_steps()
    return steps[-1][0] if steps else 0


def _corrupt_newest(run: Path) -> bool:
    """Truncate the largest data file of the newest checkpoint (when there are two, so a good
    one remains to fall back to)."""
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    if len(ckpts) < 2:
        return False
    target = max((f for f in ckpts[-1].iterdir() if f.suffix == ".distcp"), key=lambda f: f.stat().st_size)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return True


def _leave_partial(run: Path, step: int) -> bool:
    """A checkpoint folder as a kill mid-save leaves it: files, no COMPLETE marker, tmp name."""
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    if not ckpts:
        return False
    tmp = run / "checkpoints" / f".tmp-step-{step:08d}"
    shutil.copytree(ckpts[-1], tmp, dirs_exist_ok=True)
    (tmp / "COMPLETE").unlink(missing_ok=True)
    return True


def run_chaos(seed: int, n_faults: int, ranks: int, steps: int, workdir: Path) -> int:
    import torch

    from scaletrain.export.runio import load_run_model
    from scaletrain.train.checkpoint import verify_checkpoint

    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    data_cache, clean, run = workdir / "data_cache", workdir / "clean", workdir / "chaos"
    for path in (clean, run):
        shutil.rmtree(path, ignore_errors=True)
    ref = _job(clean, data_cache, ranks, steps, {}, timeout=600)
    if ref.returncode != 0:
        print(ref.stderr[-3000:], file=sys.stderr)
        print("chaos: the clean reference run failed")
        return 1

    injected: collections.Counter = collections.Counter()
    survived: collections.Counter = collections.Counter()
    launches = 0
    while True:
        env: dict[str, str] = {}
        markers: list[tuple[str, Path | int]] = []  # (kind, marker file or sigterm step)
        start = _newest_step(run) if run.exists() else 0
        # Pick faults for this launch: between-launch damage first, nan faults that ride along,
        # and at most one kill/hang that ends the launch.
        while sum(injected.values()) + len(markers) < n_faults:
            kind = rng.choice(KINDS)
            if start >= steps:  # the job is complete: damage its newest checkpoint to reopen it
                kind = "corrupt"
            if kind in ("corrupt", "partial"):
                if run.exists() and (_corrupt_newest(run) if kind == "corrupt" else _leave_partial(run, start + 1)):
                    injected[kind] += 1
                    start = _newest_step(run)
                elif start >= steps:
                    break
                continue
            if kind == "nan":
                if start + 3 > steps or "SCALETRAIN_FAULT_NAN_STEPS" in env:
                    continue
                env["SCALETRAIN_FAULT_NAN_STEPS"] = str(rng.randint(start + 3, steps))  # after a checkpoint
                markers.append(("nan", Path()))
                continue
            if kind == "writer":
                if not run.exists() or any(k == "writer" for k, _ in markers):
                    continue
                markers.append(("writer", Path()))
                continue
            marker = workdir / f"fault-{launches}-{kind}"
            marker.unlink(missing_ok=True)
            rank, step = rng.randrange(ranks), rng.randint(start + 1, steps)
            if kind == "kill":
                env["SCALETRAIN_FAULT_KILL"] = f"{rank}:{step}:{marker}"
            elif kind == "hang":
                env["SCALETRAIN_FAULT_SLEEP"] = f"{rank}:{step}:60:{marker}"
            elif kind == "sigterm":
                env["SCALETRAIN_FAULT_SIGNAL"] = f"{rank}:{step}:TERM"
                marker = step  # the step the ranks must stop at, saved
            elif not run.exists() or not (run / "metrics.jsonl").is_file():  # diskfull: needs a metrics file
                continue
            markers.append((kind, marker))
            break
        launches += 1
        metrics = run / "metrics.jsonl"
        seen = _metric_lines(run)
        full = any(k == "diskfull" for k, _ in markers)
        if full:  # every write to metrics.jsonl fails with ENOSPC for this launch
            kept = metrics.read_bytes()
            metrics.unlink()
            metrics.symlink_to("/dev/full")
        writers: list | None = [] if any(k == "writer" for k, _ in markers) else None
        proc = _job(run, data_cache, ranks, steps, env, timeout=600, second_writer=writers)
        if full:
            metrics.unlink()
            metrics.write_bytes(kept)
            injected["diskfull"] += "metrics.jsonl failed: the disk is full" in proc.stderr
        for writer in writers or []:
            injected["writer"] += writer.returncode == 2 and "in use by another training run" in writer.stderr
        for kind, marker in markers:
            if kind in ("kill", "hang") and marker.exists():
                injected[kind] += 1
            if kind == "sigterm" and f"preempted at step {marker}, saved" in proc.stderr:
                # every rank exited 5 and the step they stopped at is committed: no step lost
                injected[kind] += proc.stderr.count("exitcode  : 5") == ranks and _newest_step(run) == marker
        if "SCALETRAIN_FAULT_NAN_STEPS" in env and metrics.exists():
            # The injected NaN was caught (and rolled back) when this launch's records count it.
            new = [json.loads(line) for line in metrics.read_text().splitlines()[seen:] if line.strip()]
            injected["nan"] += min(1, max((r.get("nonfinite_steps", 0) for r in new if r.get("kind") == "train"),
                                          default=0))
        if proc.returncode == 0 and sum(injected.values()) >= n_faults:
            break
        if launches > 3 * max(n_faults, 1) + 4:
            print("chaos: too many launches without finishing", file=sys.stderr)
            break

    finished = proc.returncode == 0
    if finished:
        survived.update(injected)
    a = load_run_model(clean)[0].state_dict()
    b = load_run_model(run)[0].state_dict() if finished else {}
    same = finished and all(torch.equal(a[k], b[k]) for k in a)
    bad_ckpts = []
    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        try:
            verify_checkpoint(ckpt, checksums=True)
        except Exception as e:  # noqa: BLE001 - report every inconsistent checkpoint
            bad_ckpts.append(f"{ckpt.name}: {e}")
    total_in, total_ok = sum(injected.values()), sum(survived.values())
    by_kind = ", ".join(f"{k} {survived[k]}/{injected[k]}" for k in KINDS if injected[k])
    ok = finished and same and total_ok == total_in and not bad_ckpts
    for line in bad_ckpts:
        print(f"checkpoint check: {line}")
    print(f"chaos seed {seed}: {launches} launches; faults survived/injected by kind: {by_kind or 'none'}; "
          f"total {total_ok}/{total_in}; final model equals clean run: {'yes' if same else 'NO'}; "
          f"inconsistent checkpoints: {len(bad_ckpts)}")
    return 0 if ok else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--faults", type=int, required=True, help="number of faults to inject")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--workdir", type=Path, default=Path("runs") / "chaos")
    args = p.parse_args()
    if args.faults < 0 or args.ranks < 1 or args.steps < 2:
        p.error("--faults must be >= 0, --ranks >= 1 and --steps >= 2")
    sys.exit(run_chaos(args.seed, args.faults, args.ranks, args.steps, args.workdir))


if __name__ == "__main__":
    main()
