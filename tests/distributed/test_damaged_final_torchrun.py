"""Under torchrun (2 gloo ranks, FSDP): a damaged final checkpoint is replaced by the resumed
run, warnings are printed once, and the run header and run_info.json name the world size, the
layout and the torchrun command. The single-process cases are in tests/e2e/test_damaged_final.py."""

from __future__ import annotations

import json

import pytest

from conftest import damaged_copies, debug_train_args, main_run, run_torchrun, train_losses, truncate_one_file
from scaletrain.train.checkpoint import verify_checkpoint

pytestmark = pytest.mark.slow  # two torchrun jobs: ~15 s on 2 cores

QUIET = ("--metrics.tensorboard", "false", "--metrics.plot", "false", "--train.eval_interval", "0",
         "--metrics.progress", "plain", "--metrics.log_interval", "1")


def test_damaged_final_checkpoint_is_replaced_under_torchrun(tmp_path, data_cache, capsys):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = debug_train_args(run, data_cache, 4, "--checkpoint.interval", "2", *QUIET)
    proc = run_torchrun(2, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world 2: dp_replicate 1 x dp_shard 2 x tp 1 x pp 1 x cp 1" in proc.stdout.splitlines()
    command = json.loads((run / "run_info.json").read_text())["command"]
    assert " -m torch.distributed.run --standalone --nproc-per-node 2 -m scaletrain train --config " in command
    final = ckpts / "step-00000004"
    truncate_one_file(final)
    before = train_losses(run)

    proc = run_torchrun(2, *args, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("skipping damaged checkpoint") == 1, proc.stderr  # rank 0 only
    assert f"resumed at step 2 from {ckpts / 'step-00000002'}" in proc.stdout
    verify_checkpoint(final, checksums=True)
    assert len(damaged_copies(run, 4)) == 1
    resumed = train_losses(run)[len(before):]
    assert [s for s, _ in resumed] == [3, 4]
    # fp32 gloo reductions in the same order on the same layout: the same losses exactly.
    assert resumed == before[2:]

    # The new step 4 is found by the next resume (here on one process): nothing is trained.
    code, out, err = main_run(capsys, *args, "--resume", "auto")
    assert code == 0, err
    assert f"resumed at step 4 from {final}" in out and "saved checkpoint" not in out
    assert train_losses(run) == before + resumed
