"""A user error under a launcher: every worker exits 2 before any work and rank 0 alone prints
the message, which names a valid layout for the world size. Plain torchrun then exits 1 (the
workers' codes appear only in its ChildFailedError report); `scaletrain launch local` exits 2
with nothing but the message on stderr. The numerical layout checks are in test_layouts.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, cli_env, debug_train_args, run_torchrun

pytestmark = pytest.mark.slow  # torchrun and launch local jobs: ~10 s on 2 cores


def test_layout_error_under_torchrun_and_the_wrapper(tmp_path, data_cache):
    args = debug_train_args(tmp_path / "r", data_cache, 2, "--parallel.tp", "3")
    plain = run_torchrun(2, *args)
    assert plain.returncode == 1  # torchrun's own code for any failed worker (docs/scaling.md)
    assert "exitcode: 2" in plain.stderr  # both workers exited 2, as its report says
    assert plain.stderr.count("does not divide the world size 2") == 1, plain.stderr  # rank 0 only
    assert "[rank 1]" not in plain.stderr and "--parallel.tp 2" in plain.stderr
    assert "/scaletrain/" not in plain.stderr  # no traceback of ours, only torchrun's report

    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    wrapped = subprocess.run([sys.executable, "-m", "scaletrain", "launch", "local", "--nproc-per-node", "2", *args],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert wrapped.returncode == 2, wrapped.stderr
    lines = wrapped.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--parallel.tp 2" in lines[0], wrapped.stderr
    assert not (tmp_path / "r").exists()
