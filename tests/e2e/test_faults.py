"""Non-finite numerics policies and the hang watchdog, with faults injected through the
SCALETRAIN_FAULT_* environment variables (scaletrain/train/faults.py). Single-process runs call
the CLI in this process (conftest.run_main; runs whose losses are compared bit for bit share its
thread count), the abort without a checkpoint in a fresh one (exit code 3 from the real
interpreter); the 2-rank cases run under torchrun."""

from __future__ import annotations

import json
import math

import pytest

from conftest import debug_train_args, run_cli, run_main, run_torchrun
from scaletrain.config.schema import CheckpointConfig
from scaletrain.train.checkpoint import Checkpointer
from scaletrain.train.metrics import read_metrics

STEPS = 10
ARGS = ("--checkpoint.interval", "4", "--metrics.tensorboard", "false", "--metrics.plot", "false",
        "--data.seq_len", "64")


def _train(run, data_cache, policy, nan_steps="6", steps=STEPS, *extra, env=None):
    args = debug_train_args(run, data_cache, steps, *ARGS, "--train.nan_policy", policy, *extra)
    return run_main(*args, check=False, env={"SCALETRAIN_FAULT_NAN_STEPS": nan_steps, **(env or {})})


def _losses(run):
    return [(r["step"], r["loss"], r["nonfinite_steps"]) for r in read_metrics(run / "metrics.jsonl")[0]]


def test_skip_drops_the_update_and_counts_it(tmp_path, data_cache):
    clean = _train(tmp_path / "clean", data_cache, "skip", nan_steps="")
    assert clean.returncode == 0, clean.stderr
    proc = _train(tmp_path / "skip", data_cache, "skip")
    assert proc.returncode == 0, proc.stderr
    got, ref = _losses(tmp_path / "skip"), _losses(tmp_path / "clean")
    assert [s for s, _, _ in got] == list(range(1, STEPS + 1))
    # The losses up to the faulty step are the clean run's (the loss is computed before the update).
    assert [loss for _, loss, _ in got[:6]] == [loss for _, loss, _ in ref[:6]]
    assert got[7][1] != ref[7][1]  # step 6's update was dropped, so later steps differ
    assert [n for _, _, n in got] == [0] * 5 + [1] * 5
    assert all(math.isfinite(loss) for _, loss, _ in got)


def test_abort_reports_and_keeps_the_last_good_state(tmp_path, data_cache):
    run = tmp_path / "abort"
    proc = _train(run, data_cache, "abort")
    assert proc.returncode == 3, proc.stderr
    for part in ("non-finite gradient norm at step 6", "sample ids [", "first non-finite tensor on this rank: ",
                 "train.nan_policy = 'abort'", f"The last good state (after step 5) is in {run}/checkpoints/step-00000005"):
        assert part in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpts = Checkpointer(run, CheckpointConfig()).complete_steps()
    assert [s for s, _ in ckpts] == [4, 5]
    # Step 6's bad update was never applied: resuming the saved state continues the clean run exactly.
    assert _train(tmp_path / "clean", data_cache, "abort", "").returncode == 0
    proc = _train(run, data_cache, "abort", "", STEPS, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert _losses(run) == _losses(tmp_path / "clean")


def test_rollback_retries_a_transient_fault_exactly(tmp_path, data_cache):
    """A one-off NaN at step 6: reload the step-4 checkpoint and redo steps 5-6 with the same
    batches, so the run ends exactly like a clean one."""
    run = tmp_path / "rollback"
    proc = _train(run, data_cache, "rollback")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10]  # step 5 redone from step 4
    clean = _train(tmp_path / "clean", data_cache, "rollback", nan_steps="")
    assert clean.returncode == 0
    assert [loss for _, loss, _ in _losses(run)] == [loss for _, loss, _ in _losses(tmp_path / "clean")]


def test_rollback_skips_a_batch_that_fails_twice(tmp_path, data_cache):
    """Bad data: a sample that always produces NaN gradients. The first failure is retried,
    the second skips the batch, and training continues past it."""
    probe = _train(tmp_path / "probe", data_cache, "abort")  # learn the sample ids of step 6
    bad = probe.stderr.split("sample ids [")[1].split(",")[0]
    run = tmp_path / "bad"
    proc = _train(run, data_cache, "rollback", "", env={"SCALETRAIN_FAULT_NAN_SAMPLES": bad})
    assert proc.returncode == 0, proc.stderr
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in train if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 5, 5, 6, 7, 8, 9, 10]  # two rollbacks to step 4, then past it
    assert all(math.isfinite(r["loss"]) for r in train if r["kind"] == "train")
    assert _losses(run)[5][2] == 2  # two non-finite steps counted


def test_rollback_without_checkpoint_aborts(tmp_path, data_cache):
    proc = run_cli(*debug_train_args(tmp_path / "r", data_cache, 4, "--train.nan_policy", "rollback"),
                   check=False, timeout=300, env={"SCALETRAIN_FAULT_NAN_STEPS": "2"})
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "no checkpoint yet" in proc.stderr


def test_nan_on_one_rank_is_skipped_by_every_rank(tmp_path, data_cache):
    """The NaN is injected into rank 0's gradient shard only; the global norm carries it to
    rank 1, so both ranks skip the same step and the job finishes."""
    proc = run_torchrun(2, *debug_train_args(tmp_path / "dp", data_cache, 5, *ARGS, "--parallel.dp_shard", "2",
                                             "--train.nan_policy", "skip", "--data.batch_size", "4"),
                        env={"SCALETRAIN_FAULT_NAN_STEPS": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [n for _, _, n in _losses(tmp_path / "dp")] == [0, 0, 1, 1, 1]


@pytest.mark.slow  # waits for the hang watchdog: ~10 s on 2 cores
def test_watchdog_dumps_stacks_and_exits(tmp_path, data_cache):
    run = tmp_path / "hang"
    proc = run_torchrun(2, *debug_train_args(run, data_cache, 6, *ARGS, "--parallel.dp_shard", "2",
                                             "--train.hang_timeout_s", "4", "--data.batch_size", "4"),
                        timeout=120, env={"SCALETRAIN_FAULT_SLEEP": "1:3:120"})
    assert proc.returncode != 0
    assert "watchdog: no progress for" in proc.stderr and "in step 3" in proc.stderr
    assert "most recent call first" in proc.stderr  # a Python stack dump
    assert "exitcode: 4" in proc.stderr
    dumps = list(run.glob("hang-rank*.txt"))
    assert dumps and "last phase / collective entered" in dumps[0].read_text()
