"""Shared fixtures: one data cache per test session, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = ROOT / "configs" / "cpu_debug.toml"


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """Shards and tokenizers are cached here once for the whole session."""
    return tmp_path_factory.mktemp("data_cache")


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_cli(*args: str, check: bool = True, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    """Run `python -m scaletrain ARGS` and return the completed process (text output)."""
    proc = subprocess.run([sys.executable, "-m", "scaletrain", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout, cwd=popen.pop("cwd", ROOT), **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"scaletrain {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def main_exit(capsys, *args: str) -> tuple[int, str]:
    """Exit code and stderr of `scaletrain ARGS` run in this process through the CLI's own
    `main` (error printing and exit codes as in a fresh process, without its ~3 s start-up)."""
    from scaletrain.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capsys.readouterr().err


def main_run(capsys, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `scaletrain ARGS` run in this process through `main`
    (like `main_exit`, for commands whose normal output is checked too)."""
    from scaletrain.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def debug_train_args(run_dir: Path, data_cache: Path, steps: int = 30, *extra: str) -> list[str]:
    """CLI args training the debug preset quickly and quietly (no TB / plot unless asked)."""
    return ["train", "--config", str(DEBUG_CONFIG), "--run-dir", str(run_dir),
            "--data.cache_dir", str(data_cache), "--train.steps", str(steps),
            "--metrics.progress", "none", *extra]


def run_torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m scaletrain ARGS` with gloo on the CPU (one
    thread per rank); returns the completed process without checking it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "scaletrain", *args]
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


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
