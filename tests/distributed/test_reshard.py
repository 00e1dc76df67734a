"""A checkpoint saved under one layout resumes under others and training continues with the
same losses: saved at dp_shard=4 (4 ranks), resumed at dp_shard=2 x tp=2, at dp_shard=2 x
pp=2, and on a single process. The global batch (8 sequences) and the loader position are the
same in every layout, so the continued losses agree to fp32 reduction order (rel 1e-5, see
test_layouts.py)."""

from __future__ import annotations

import shutil

import pytest

from conftest import debug_train_args, run_cli, run_torchrun
from scaletrain.train.metrics import read_metrics

STEPS = 6
COMMON = ("--metrics.tensorboard", "false", "--metrics.plot", "false", "--train.eval_interval", "0",
          "--checkpoint.interval", "3", "--checkpoint.keep", "3", "--data.seq_len", "64")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data_cache):
    run = tmp_path_factory.mktemp("reshard") / "fsdp4"
    proc = run_torchrun(4, *debug_train_args(run, data_cache, STEPS, "--data.batch_size", "2", *COMMON,
                                             "--parallel.dp_shard", "4"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def _resume_copy(saved, dest):
    """The saved run as it was after step 3: newer checkpoints and all metrics removed."""
    shutil.copytree(saved, dest)
    shutil.rmtree(dest / "checkpoints" / "step-00000006")
    (dest / "metrics.jsonl").unlink()
    return dest


@pytest.mark.parametrize("name,ranks,batch,layout", [
    ("fsdp2_tp2", 4, 4, ("--parallel.dp_shard", "2", "--parallel.tp", "2")),
    ("fsdp2_pp2", 4, 4, ("--parallel.dp_shard", "2", "--parallel.pp", "2")),
    ("single", 1, 8, ()),
])
def test_resume_under_another_layout(name, ranks, batch, layout, saved, tmp_path, data_cache):
    run = _resume_copy(saved, tmp_path / name)
    args = debug_train_args(run, data_cache, STEPS, "--data.batch_size", str(batch), *COMMON, *layout,
                            "--resume", "auto")
    if ranks == 1:
        proc = run_cli(*args)
    else:
        proc = run_torchrun(ranks, *args)
        assert proc.returncode == 0, proc.stderr[-4000:]
    expected = [r["loss"] for r in read_metrics(saved / "metrics.jsonl")[0] if r["step"] > 3]
    got = read_metrics(run / "metrics.jsonl")[0]
    assert [r["step"] for r in got] == [4, 5, 6]
    assert [r["loss"] for r in got] == pytest.approx(expected, rel=1e-5)


def test_validation_loss_is_layout_independent(saved, tmp_path, data_cache):
    """The final validation loss of the dp=4 run equals the single-process one at the same
    weights: every layout evaluates the same sequences (global batches, split by dp rank)."""
    run = _resume_copy(saved, tmp_path / "eval")
    run_cli(*debug_train_args(run, data_cache, STEPS, "--data.batch_size", "8", *COMMON, "--resume", "auto"))
    evals = read_metrics(run / "metrics.jsonl")[1]
    ref = [e for e in read_metrics(saved / "metrics.jsonl")[1] if e["step"] == STEPS]
    assert evals[-1]["step"] == STEPS and len(ref) == 1
    assert evals[-1]["val_loss"] == pytest.approx(ref[0]["val_loss"], rel=1e-5)
