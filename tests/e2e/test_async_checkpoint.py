"""Training with checkpoint.async_save = true writes the same checkpoints as synchronous saves
(every one committed, final weights equal) and resumes from them exactly."""

from __future__ import annotations

import torch

from conftest import debug_train_args, run_main
from scaletrain.export.runio import load_run_model
from scaletrain.train.metrics import read_metrics

ARGS = ("--checkpoint.interval", "3", "--checkpoint.keep", "0", "--metrics.tensorboard", "false",
        "--metrics.plot", "false", "--data.seq_len", "64")


def test_async_equals_sync_and_resumes(tmp_path, data_cache):
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    run_main(*debug_train_args(sync, data_cache, 9, *ARGS))
    run_main(*debug_train_args(asyn, data_cache, 9, *ARGS, "--checkpoint.async_save", "true"))
    names = sorted(p.name for p in (asyn / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (sync / "checkpoints").iterdir()) == [
        "step-00000003", "step-00000006", "step-00000009"]
    a, b = load_run_model(sync)[0].state_dict(), load_run_model(asyn)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Resume the async run from its step-6 checkpoint: steps 7-9 repeat exactly.
    import shutil

    shutil.rmtree(asyn / "checkpoints" / "step-00000009")
    before = {r["step"]: r["loss"] for r in read_metrics(asyn / "metrics.jsonl")[0]}
    run_main(*debug_train_args(asyn, data_cache, 9, *ARGS, "--checkpoint.async_save", "true", "--resume", "auto"))
    after = {r["step"]: r["loss"] for r in read_metrics(asyn / "metrics.jsonl")[0]}
    assert [after[s] for s in (7, 8, 9)] == [before[s] for s in (7, 8, 9)]
