"""The chaos script in its short form: a seeded sequence of faults (kills, hangs, NaNs,
damaged and half-written checkpoints) is injected into a 2-rank job, which must end with the
clean run's exact model and only consistent checkpoints."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, cli_env


@pytest.mark.slow  # a clean torchrun job, then one launch per fault (2 ranks each): ~43 CPU-seconds
def test_chaos_short(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos.py"), "--seed", "3", "--faults", "5",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                          timeout=900)
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "total 5/5" in last and "final model equals clean run: yes" in last
    assert "inconsistent checkpoints: 0" in last
