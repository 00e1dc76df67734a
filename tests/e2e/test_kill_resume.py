"""A run SIGKILLed at a random step and resumed with --resume auto reproduces the loss sequence
of an uninterrupted run bit for bit (CPU, fp32, deterministic algorithms)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, cli_env, debug_train_args, run_cli
from scaletrain.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # a SIGKILLed training process and its resume: ~11 s on 2 cores

STEPS = 30


def _final_weights(run):
    from scaletrain.export.runio import load_run_model

    model, _, _ = load_run_model(run)
    return model.state_dict()


def _kill_at(run, data_cache, kill_step: int) -> None:
    args = debug_train_args(run, data_cache, STEPS, "--checkpoint.interval", "4", "--checkpoint.keep", "2",
                            "--metrics.tensorboard", "false", "--metrics.plot", "false")
    proc = subprocess.Popen([sys.executable, "-m", "scaletrain", *args], env=cli_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file():
                lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
                if any(r.get("step", 0) >= kill_step for r in lines):
                    break
            time.sleep(0.01)
        assert proc.poll() is None, f"run ended before step {kill_step}: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_and_resume_is_bit_identical(tmp_path, data_cache):
    quiet = ("--checkpoint.interval", "4", "--checkpoint.keep", "2",
             "--metrics.tensorboard", "false", "--metrics.plot", "false")
    ref = tmp_path / "ref"
    run_cli(*debug_train_args(ref, data_cache, STEPS, *quiet))
    ref_train, ref_eval = read_metrics(ref / "metrics.jsonl")

    kill_step = random.Random(1234).randint(6, STEPS - 4)
    run = tmp_path / "killed"
    _kill_at(run, data_cache, kill_step)
    killed_train, _ = read_metrics(run / "metrics.jsonl")
    assert killed_train[-1]["step"] < STEPS
    run_cli(*debug_train_args(run, data_cache, STEPS, *quiet), "--resume", "auto")
    got_train, got_eval = read_metrics(run / "metrics.jsonl")

    assert [r["step"] for r in got_train] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got_train] == [r["loss"] for r in ref_train]  # exact float equality
    assert [e["val_loss"] for e in got_eval][-1] == [e["val_loss"] for e in ref_eval][-1]
    a, b = _final_weights(ref), _final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
