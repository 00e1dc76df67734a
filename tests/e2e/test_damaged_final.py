"""A damaged checkpoint is replaced when its step is saved again: the final one (issue 12's
sequence: train, truncate a file of the final checkpoint, `--resume auto` twice, export) and one
in the middle of a run. In-process through the CLI's `main`; the 2-rank case is in
tests/distributed/test_damaged_final_torchrun.py."""

from __future__ import annotations

import shutil

from conftest import damaged_copies, debug_train_args, main_run, train_losses, truncate_one_file
from scaletrain.train.checkpoint import verify_checkpoint
from scaletrain.train.rundir import latest_checkpoint

QUIET = ("--metrics.tensorboard", "false", "--metrics.plot", "false", "--train.eval_interval", "0",
         "--metrics.progress", "plain", "--metrics.log_interval", "1")


def test_damaged_final_checkpoint_is_replaced_and_used(tmp_path, data_cache, capsys):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = debug_train_args(run, data_cache, 8, "--checkpoint.interval", "4", *QUIET)
    code, out, err = main_run(capsys, *args)
    assert code == 0, err
    assert f"saved checkpoint step 4 to {ckpts / 'step-00000004'} in " in out
    assert f"saved checkpoint step 8 to {ckpts / 'step-00000008'} in " in out
    final = ckpts / "step-00000008"
    truncate_one_file(final)
    before = train_losses(run)

    code, out, err = main_run(capsys, *args, "--resume", "auto")
    assert code == 0, err
    # Warnings are one plain line each, without Python's warning machinery or source lines.
    skip = [x for x in err.splitlines() if "skipping damaged checkpoint" in x]
    assert skip and skip[0].startswith("warning: skipping damaged checkpoint") and "truncated" in skip[0]
    assert "UserWarning" not in err and "warnings.warn" not in err
    assert "moved damaged checkpoint" in err
    assert f"resumed at step 4 from {ckpts / 'step-00000004'}" in out
    assert f"saved checkpoint step 8 to {final} in " in out
    verify_checkpoint(final, checksums=True)  # a good step-8 checkpoint under its name ...
    assert len(damaged_copies(run, 8)) == 1  # ... and the damaged one kept aside
    resumed = train_losses(run)[len(before):]
    assert resumed == before[4:]  # steps 5-8 again, bit-identical

    # A second resume finds the new step 8: nothing is trained or saved again.
    code, out, err = main_run(capsys, *args, "--resume", "auto")
    assert code == 0, err
    assert "damaged" not in err
    assert f"resumed at step 8 from {final}" in out
    assert "saved checkpoint" not in out and "step 5/8" not in out
    assert train_losses(run) == before + resumed
    assert len(damaged_copies(run, 8)) == 1

    # generate and export use step 8, and export says so.
    assert latest_checkpoint(run) == final
    code, out, err = main_run(capsys, "export", "--run", str(run), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert f"exported step 8 ({final})" in out
    code, err = main_run(capsys, "export", "--run", str(run), "--out", str(tmp_path / "hf"))[::2]
    assert code == 2 and "--overwrite" in err and "overwrite=True" not in err


def test_damaged_checkpoint_mid_run_is_replaced_when_its_step_comes_again(tmp_path, data_cache, capsys):
    """The run stopped after its step-8 save, and that checkpoint is damaged: the resume starts
    at step 4 and the step-8 save moves the damaged folder aside and commits a good one."""
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = debug_train_args(run, data_cache, 12, "--checkpoint.interval", "4", "--checkpoint.keep", "0", *QUIET)
    code, out, err = main_run(capsys, *args)
    assert code == 0, err
    reference = train_losses(run)
    shutil.rmtree(ckpts / "step-00000012")
    truncate_one_file(ckpts / "step-00000008")

    code, out, err = main_run(capsys, *args, "--resume", "auto")
    assert code == 0, err
    assert f"resumed at step 4 from {ckpts / 'step-00000004'}" in out
    for step in (8, 12):
        verify_checkpoint(ckpts / f"step-{step:08d}", checksums=True)
    assert len(damaged_copies(run, 8)) == 1
    assert train_losses(run)[len(reference):] == reference[4:]
