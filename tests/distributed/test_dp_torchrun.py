"""torchrun with 2 gloo ranks: data parallel (FSDP2 and HSDP-as-replicate) reproduces the
single-process run with the same global batch; impossible layouts fail before any work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, cli_env, debug_train_args, run_cli
from scaletrain.train.metrics import read_metrics

STEPS = 8
QUIET = ("--metrics.tensorboard", "false", "--metrics.plot", "false", "--checkpoint.save_final", "false")


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "scaletrain", *args]
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("layout", [("--parallel.dp_shard", "-1"), ("--parallel.dp_replicate", "2", "--parallel.dp_shard", "1")],
                         ids=["fsdp2", "replicate2"])
def test_data_parallel_matches_single_process(tmp_path, data_cache, layout):
    ref = tmp_path / "ref"
    run_cli(*debug_train_args(ref, data_cache, STEPS, "--data.batch_size", "8", *QUIET))
    dp = tmp_path / "dp"
    proc = _torchrun(2, *debug_train_args(dp, data_cache, STEPS, "--data.batch_size", "4", *QUIET, *layout))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_loss = [r["loss"] for r in read_metrics(ref / "metrics.jsonl")[0]]
    dp_loss = [r["loss"] for r in read_metrics(dp / "metrics.jsonl")[0]]
    assert len(dp_loss) == STEPS
    # Same samples per step (rank r takes slice r of each global batch); only the order of the
    # fp32 reductions differs (two half-batch means averaged, gradients reduce-scattered), so
    # the losses agree to float32 rounding amplified over a few Adam steps.
    assert dp_loss == pytest.approx(ref_loss, rel=1e-5)


def test_impossible_layout_is_a_clear_error(tmp_path, data_cache):
    proc = _torchrun(2, *debug_train_args(tmp_path / "r", data_cache, 2, "--parallel.dp_shard", "4"))
    assert proc.returncode != 0
    assert "parallel degrees multiply to 4" in proc.stderr and "world size is 2" in proc.stderr
    assert "exitcode: 2" in proc.stderr  # each worker exits 2 with the message, no traceback of ours
    assert "/scaletrain/" not in proc.stderr  # torchrun's own ChildFailedError report names no frame of ours
    assert not (tmp_path / "r").exists()
