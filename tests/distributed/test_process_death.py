"""A rank of a 4-rank FSDP run is SIGKILLed mid-step; torchrun (--max-restarts 1) restarts the
job, which resumes from the newest complete checkpoint, and the final parameters are
bit-identical to an uninterrupted run (CPU, fp32, same layout: gloo reductions are
deterministic)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, cli_env, debug_train_args
from scaletrain.export.runio import load_run_model
from scaletrain.train.metrics import read_metrics

ARGS = ("--checkpoint.interval", "3", "--metrics.tensorboard", "false", "--metrics.plot", "false",
        "--data.seq_len", "64", "--data.batch_size", "2", "--parallel.dp_shard", "4", "--resume", "auto")


def _job(run, data_cache, env_extra):
    env = cli_env()
    # torchrun restarts share the rendezvous TCP store with the workers by default and a restarted
    # gloo group can read the previous round's addresses (pytorch/pytorch#135712): opt out.
    env.update(OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "--max-restarts", "1", "-m", "scaletrain", *debug_train_args(run, data_cache, 8, *ARGS)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow  # three torchrun starts of 4 ranks (clean, killed, restarted): ~65 CPU-seconds
def test_sigkill_one_rank_restart_resume_bit_identical(tmp_path, data_cache):
    clean = _job(tmp_path / "clean", data_cache, {})
    assert clean.returncode == 0, clean.stderr[-3000:]
    marker = tmp_path / "killed"
    run = tmp_path / "killed_run"
    proc = _job(run, data_cache, {"SCALETRAIN_FAULT_KILL": f"2:5:{marker}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()  # the fault really happened ...
    assert "SIGKILL" in proc.stderr or "Signals.SIGKILL" in proc.stderr or "-9" in proc.stderr  # ... and was seen
    a = load_run_model(tmp_path / "clean")[0].state_dict()
    b = load_run_model(run)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ([r["loss"] for r in read_metrics(run / "metrics.jsonl")[0]]
            == [r["loss"] for r in read_metrics(tmp_path / "clean" / "metrics.jsonl")[0]])
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())
