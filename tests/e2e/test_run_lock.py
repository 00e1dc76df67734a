"""One writer per run folder: a second `train` on a folder that a running trainer holds is
refused with exit 2 naming the holder, before it writes anything; the first run is unaffected."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, cli_env, debug_train_args, main_exit
from scaletrain.train.checkpoint import verify_checkpoint
from scaletrain.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # two training processes on one folder: ~6 s on 2 cores

STEPS = 100
QUIET = ("--metrics.tensorboard", "false", "--metrics.plot", "false", "--train.eval_interval", "0",
         "--checkpoint.interval", "10")


def _wait_for_step(run, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    metrics, deadline = run / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(json.loads(x).get("step", 0) >= step
                                     for x in metrics.read_text().splitlines() if x.endswith("}")):
            return
        time.sleep(0.05)
    raise AssertionError(f"the first run did not reach step {step}: {proc.stderr.read()[-2000:]}")


def test_a_second_writer_is_refused_and_the_first_is_unaffected(tmp_path, data_cache, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "scaletrain", *debug_train_args(run, data_cache, STEPS, *QUIET)],
                             env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(run, 1, first)
        config = (run / "config.toml").read_bytes()
        for extra in (["--resume", "auto", "--optim.lr", "1e-4"], ["--overwrite", "--optim.lr", "1e-4"]):
            code, err = main_exit(capsys, *debug_train_args(run, data_cache, STEPS, *QUIET), *extra)
            assert code == 2, err
            assert f"pid {first.pid} on host {socket.gethostname()}" in err and "in use by another training run" in err
            assert (run / "config.toml").read_bytes() == config
        assert first.poll() is None, "the refused runs stopped the first one"
        first.wait(timeout=600)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, first.stderr.read()[-2000:]
    train, _ = read_metrics(run)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        verify_checkpoint(ckpt, checksums=True)
