"""The chaos script in its short form: a seeded sequence of faults (kills, hangs, NaNs,
damaged and half-written checkpoints) is injected into a 2-rank job, which must end with the
clean run's exact model and only consistent checkpoints. Its checkpoint damage is checked on
its own first (fast): a chaos run that damaged nothing would pass without proving anything."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env
from scaletrain.config.schema import CheckpointConfig
from scaletrain.errors import ScaletrainError
from scaletrain.train.checkpoint import Checkpointer, verify_checkpoint


def _chaos_module():
    spec = importlib.util.spec_from_file_location("chaos", ROOT / "scripts" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_damage_faults_damage_what_resume_checks(trained_run, tmp_path):
    """`corrupt` truncates the newest of two checkpoints so that its checksums fail and the older
    one still verifies, and refuses when there is only one; `partial` leaves a .tmp-step folder
    without COMPLETE, which resume never counts."""
    chaos = _chaos_module()
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    ckpts = run / "checkpoints"
    assert chaos._corrupt_newest(run)
    with pytest.raises(ScaletrainError):
        verify_checkpoint(ckpts / "step-00000040", checksums=True)
    verify_checkpoint(ckpts / "step-00000020", checksums=True)
    assert chaos._leave_partial(run, 41)
    assert (ckpts / ".tmp-step-00000041").is_dir() and not (ckpts / ".tmp-step-00000041" / "COMPLETE").exists()
    assert 41 not in [s for s, _ in Checkpointer(run, CheckpointConfig()).complete_steps()]
    shutil.rmtree(ckpts / "step-00000040")
    before = sorted(p.name for p in (ckpts / "step-00000020").iterdir())
    assert not chaos._corrupt_newest(run)  # one checkpoint left: never damage the only good one
    verify_checkpoint(ckpts / "step-00000020", checksums=True)
    assert sorted(p.name for p in (ckpts / "step-00000020").iterdir()) == before


@pytest.mark.slow  # a clean torchrun job, then one launch per fault (2 ranks each): ~43 CPU-seconds
def test_chaos_short(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos.py"), "--seed", "3", "--faults", "5",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                          timeout=900)
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "total 5/5" in last and "final model equals clean run: yes" in last
    assert "inconsistent checkpoints: 0" in last
