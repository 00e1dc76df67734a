"""Shared test helpers: one data cache per test session, the CLI run in a fresh process
(`run_cli`, `run_torchrun`) or in this one (`run_main`, `main_exit`, `main_run`), and gloo
process groups that run many cases per launch (`spawn_cases`).

What a test costs: a fresh `python -m scaletrain` spends ~3 s of 2 CPU cores importing torch
and scaletrain before it does anything, a torchrun launch that per rank plus the launcher.
So error paths and single-process runs call the CLI in this process, each sub-command keeps
at most one fresh-process check (tests/e2e/test_cli_process.py: the real interpreter's exit
code, no traceback), and distributed cases share one process group per world size.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = ROOT / "configs" / "cpu_debug.toml"


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """Shards and tokenizers are cached here once for the whole session."""
    return tmp_path_factory.mktemp("data_cache")


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    for var in LAUNCHER_VARS:
        env.pop(var, None)
    return env


def run_cli(*args: str, check: bool = True, timeout: float = 600, env: dict[str, str] | None = None,
            **popen) -> subprocess.CompletedProcess:
    """Run `python -m scaletrain ARGS` (with `env` added to cli_env()) and return the completed
    process (text output)."""
    proc = subprocess.run([sys.executable, "-m", "scaletrain", *args], capture_output=True, text=True,
                          env={**cli_env(), **(env or {})}, timeout=timeout, cwd=popen.pop("cwd", ROOT), **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"scaletrain {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def run_main(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`scaletrain ARGS` run in this process through the CLI's own `main`, as `run_cli` runs it
    in a fresh one (same return value, exit codes and one-line errors) without the ~3 s start-up:
    for error paths, single-process runs and fixtures that need a run folder. sys.argv /
    sys.orig_argv read as `python -m scaletrain ARGS` (the run info records that command),
    launcher variables are hidden and `env` (e.g. SCALETRAIN_FAULT_*) is set for the call only;
    stdout and stderr are captured (no capsys needed)."""
    from scaletrain.cli import main

    env = env or {}
    saved_env = {var: os.environ.pop(var, None) for var in (*LAUNCHER_VARS, *env)}
    os.environ.update(env)
    saved_argv = sys.argv, sys.orig_argv
    sys.argv, sys.orig_argv = ["scaletrain", *args], [sys.executable, "-m", "scaletrain", *args]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
            main(list(args))
    finally:
        for var, value in saved_env.items():
            os.environ.pop(var, None)
            if value is not None:
                os.environ[var] = value
        sys.argv, sys.orig_argv = saved_argv
    proc = subprocess.CompletedProcess(["scaletrain", *args], e.value.code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"scaletrain {' '.join(args)} exited {proc.returncode} (in-process)\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def main_run(capsys, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `scaletrain ARGS` run in this process through the CLI's
    own `main` (error printing and exit codes as in a fresh process, without its ~3 s start-up)."""
    from scaletrain.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def main_exit(capsys, *args: str) -> tuple[int, str]:
    """Exit code and stderr of `main_run` (for error paths)."""
    code, _, err = main_run(capsys, *args)
    return code, err


def debug_train_args(run_dir: Path, data_cache: Path, steps: int = 30, *extra: str) -> list[str]:
    """CLI args training the debug preset quickly and quietly (no TB / plot unless asked)."""
    return ["train", "--config", str(DEBUG_CONFIG), "--run-dir", str(run_dir),
            "--data.cache_dir", str(data_cache), "--train.steps", str(steps),
            "--metrics.progress", "none", *extra]


TRAINED_STEPS = 40


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_cache) -> tuple[Path, subprocess.CompletedProcess]:
    """One debug run trained through a fresh `python -m scaletrain train` (40 steps, validation
    and checkpoints at 20 and 40, a sample, TensorBoard and the loss plot) and its process, for
    every test that only reads a run folder (generate, export, errors about an existing run).
    Those tests must leave it as it is; tests/e2e/test_train_cli.py checks what it holds."""
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = run_cli(*debug_train_args(run, data_cache, TRAINED_STEPS, "--train.eval_interval", "20",
                                     "--checkpoint.interval", "20", "--train.sample_tokens", "20",
                                     "--train.sample_prompt", "def "))
    return run, proc


def run_torchrun(nproc: int, *args: str, timeout: float = 600, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m scaletrain ARGS` with gloo on the CPU (one
    thread per rank, `env` added); returns the completed process without checking it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "scaletrain", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**cli_env(), "OMP_NUM_THREADS": "1", **(env or {})},
                          cwd=ROOT, timeout=timeout)


def free_port() -> int:
    """A TCP port nobody listens on now (for a process group's rendezvous store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    """A spawned rank with torchrun's environment (one CPU thread, as run_torchrun gives it)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    fn(rank, world, *args)
    if dist.is_initialized():
        dist.destroy_process_group()


def spawn_ranks(world: int, fn: Callable, *args, timeout: float = 600) -> None:
    """Run `fn(rank, world, *args)` in `world` fresh processes that see torchrun's environment
    (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...): `scaletrain.cli.run` or a Trainer inside them
    forms a gloo group over the `world` ranks and keeps it for the process's life, so several
    runs share one start-up. `fn` must be a module-level function (it is pickled). Raises when
    a rank fails (the others are stopped) or after `timeout` seconds (all are killed)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_rank_main, args=(world, free_port(), fn, args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                proc.kill()
                proc.join()
            raise TimeoutError(f"{world} spawned ranks did not finish within {timeout:.0f} s")


def _cases_main(rank: int, world: int, fn: Callable, cases: list[str], out: str, args: tuple) -> None:
    for name in cases:
        try:
            fn(name, rank, world, *args)
        except BaseException:
            Path(out, f"{name}.rank{rank}.error").write_text(traceback.format_exc())
            raise
        Path(out, f"{name}.rank{rank}.ok").touch()


def spawn_cases(world: int, cases: list[str], fn: Callable, out: Path, *args, timeout: float = 600) -> dict[str, str]:
    """Run `fn(case, rank, world, *args)` for every case in turn on ONE group of `world` spawned
    ranks (see spawn_ranks): one process start-up for all cases instead of one torchrun launch
    each. Returns {case: error} for the cases that failed: a failing case stops its group, and
    the cases after it run in a new one, so each case passes or fails on its own. `out` (a
    folder) keeps the per-rank markers and tracebacks."""
    out.mkdir(parents=True, exist_ok=True)
    errors: dict[str, str] = {}
    todo = list(cases)
    while todo:
        try:
            spawn_ranks(world, _cases_main, fn, todo, str(out), args, timeout=timeout)
            break
        except Exception as e:  # noqa: BLE001 - attributed to the first case not done on every rank
            failed = next((c for c in todo if not all((out / f"{c}.rank{r}.ok").exists() for r in range(world))), None)
            if failed is None:  # every case was done: the group failed on its way out
                raise
            tracebacks = [p.read_text() for p in sorted(out.glob(f"{failed}.rank*.error"))]
            errors[failed] = "\n".join(tracebacks) or f"{type(e).__name__}: {e}"
            todo = todo[todo.index(failed) + 1:]
    return errors


def truncate_one_file(ckpt: Path) -> None:
    """Cut a data file of checkpoint folder `ckpt` to 10 bytes (a disk that lost its end)."""
    data = next(p for p in sorted(ckpt.iterdir()) if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:10])


def train_losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training line of RUN/metrics.jsonl in file order, repeats included."""
    lines = (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip())
    return [(r["step"], r["loss"]) for r in lines if r.get("kind") == "train"]


def damaged_copies(run: Path, step: int) -> list[str]:
    """Folders a damaged checkpoint of `step` was moved aside to."""
    return [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(f"damaged-step-{step:08d}")]


UNIT_TESTS = ROOT / "tests" / "unit"
MOVE = ("tests/unit runs in one process: call the CLI in-process (run_main / main_exit) or move this test to "
        "tests/e2e (a fresh process) or tests/distributed (several ranks)")


def _starts_scaletrain(args) -> bool:
    """Whether a command line runs scaletrain's CLI (`python -m scaletrain`, the script) or torchrun."""
    cmd = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
    if cmd and Path(cmd[0]).name in ("torchrun", "scaletrain"):
        return True
    return dict(zip(cmd[1:], cmd[2:])).get("-m") in ("scaletrain", "torch.distributed.run")


class _UnitPopen(subprocess.Popen):
    def __new__(cls, args, *rest, **kwargs):  # refused before a Popen object exists
        if _starts_scaletrain(args):
            raise AssertionError(f"{MOVE}: {args}")
        return super().__new__(cls)


def _no_spawn(*args, **kwargs):
    raise AssertionError(f"{MOVE}: torch.multiprocessing spawn")


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(request, monkeypatch):
    """In tests/unit, starting a scaletrain or torchrun process, or spawning ranks, fails the
    test with where it belongs. Other programs a unit starts (git, the launcher's stand-in
    workers, calibrate's baseline probe) are allowed."""
    if UNIT_TESTS not in Path(str(request.node.fspath)).resolve().parents:
        return
    import torch.multiprocessing as mp

    monkeypatch.setattr(subprocess, "Popen", _UnitPopen)
    monkeypatch.setattr(mp, "spawn", _no_spawn)
    monkeypatch.setattr(mp, "start_processes", _no_spawn)


GPU_TESTS = ROOT / "tests" / "gpu"


def pytest_collection_modifyitems(config, items):
    """tests/gpu need a CUDA device. Where there is none (CI, the CPU machine) they are skipped
    with that reason; with SCALETRAIN_REQUIRE_GPU=1 (set on the GPU machine) a missing device
    fails them instead, so a GPU run can never pass by skipping."""
    import torch

    if torch.cuda.is_available() or os.environ.get("SCALETRAIN_REQUIRE_GPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `SCALETRAIN_REQUIRE_GPU=1 pytest -m gpu tests/gpu` on the H100)")
    for item in items:
        if GPU_TESTS in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
