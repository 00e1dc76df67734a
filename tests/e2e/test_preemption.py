"""SIGTERM/SIGUSR1 (preemption, time limits) and Ctrl-C: the step in flight finishes, a checkpoint
of it is committed, rank 0 says how to resume, the process exits 5 (130 for Ctrl-C), and
`--resume auto` continues the exact loss sequence of an uninterrupted run (CPU, fp32)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, cli_env, debug_train_args, main_exit, run_torchrun
from scaletrain.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED
from scaletrain.train.checkpoint import Checkpointer, verify_checkpoint
from scaletrain.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # signals to training processes and torchrun workers: ~23 s on 2 cores

STEPS = 8
QUIET = ("--metrics.tensorboard", "false", "--metrics.plot", "false", "--train.eval_interval", "4",
         "--checkpoint.interval", "0")


def _args(run, data_cache, *extra):
    return [*debug_train_args(run, data_cache, STEPS, *QUIET), *extra]


def _losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run)[0]]


def _steps(run):
    return [p.name for p in sorted((run / "checkpoints").glob("step-*"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    from scaletrain.cli import run as cli_run

    run = tmp_path_factory.mktemp("preempt") / "ref"
    assert cli_run(_args(run, data_cache)) == 0
    return _losses(run)


@pytest.mark.parametrize("name,code,verb", [("TERM", EXIT_PREEMPTED, "preempted"), ("USR1", EXIT_PREEMPTED, "preempted"),
                                            ("INT", EXIT_INTERRUPTED, "interrupted")])
def test_signal_saves_the_step_and_resume_is_exact(reference, tmp_path, data_cache, capsys, monkeypatch, name, code,
                                                   verb):
    run = tmp_path / "run"
    monkeypatch.setenv("SCALETRAIN_FAULT_SIGNAL", f"0:3:{name}")  # rank 0 signals itself inside step 3
    got, err = main_exit(capsys, *_args(run, data_cache))
    assert got == code, err
    folder = run / "checkpoints" / "step-00000003"
    assert f"{verb} at step 3, saved {folder}; resume with: " in err and "--resume auto" in err, err
    assert _steps(run) == ["step-00000003"] and [s for s, _ in _losses(run)] == [1, 2, 3]
    verify_checkpoint(folder, checksums=True)
    monkeypatch.delenv("SCALETRAIN_FAULT_SIGNAL")
    got, err = main_exit(capsys, *_args(run, data_cache), "--resume", "auto")
    assert got == 0, err
    assert _losses(run) == reference  # exact float equality: no step lost or repeated


def test_a_second_signal_does_not_abort_the_save(tmp_path, data_cache, capsys, monkeypatch):
    commit = Checkpointer._commit

    def commit_interrupted(self, *args):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the checkpoint is being committed
        os.kill(os.getpid(), signal.SIGTERM)
        return commit(self, *args)

    monkeypatch.setattr(Checkpointer, "_commit", commit_interrupted)
    monkeypatch.setenv("SCALETRAIN_FAULT_SIGNAL", "0:2:TERM")
    run = tmp_path / "run"
    got, err = main_exit(capsys, *_args(run, data_cache))
    assert got == EXIT_PREEMPTED and "preempted at step 2" in err, err
    verify_checkpoint(run / "checkpoints" / "step-00000002", checksums=True)


def test_a_signal_during_setup_stops_at_once_without_a_checkpoint(tmp_path, data_cache, capsys, monkeypatch):
    import scaletrain.data

    prepare = scaletrain.data.prepare_data

    def prepare_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(scaletrain.data, "prepare_data", prepare_then_signal)
    run = tmp_path / "run"
    got, err = main_exit(capsys, *_args(run, data_cache))
    assert got == EXIT_PREEMPTED and "before training started" in err and "Traceback" not in err, err
    assert not run.exists()


def test_sigterm_from_outside_then_resume_is_exact(reference, tmp_path, data_cache):
    """A real SIGTERM from another process at a moment the trainer does not choose."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "scaletrain", *_args(run, data_cache)], env=cli_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(json.loads(x).get("step", 0) >= 2 for x in metrics.read_text().splitlines()
                                     if x.endswith("}")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == EXIT_PREEMPTED, err
    stopped = _losses(run)[-1][0]
    assert f"preempted at step {stopped}, saved " in err and "Traceback" not in err
    assert _steps(run) == [f"step-{stopped:08d}"] and stopped < STEPS
    proc = subprocess.run([sys.executable, "-m", "scaletrain", *_args(run, data_cache), "--resume", "auto"],
                          env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _losses(run) == reference


@pytest.mark.slow
def test_sigterm_to_one_torchrun_worker_stops_both_at_one_step(tmp_path, data_cache):
    run = tmp_path / "run"
    args = [*debug_train_args(run, data_cache, STEPS, *QUIET), "--parallel.dp_shard", "2"]
    env_fault = {"SCALETRAIN_FAULT_SIGNAL": "1:3:TERM"}  # rank 1 only
    os.environ.update(env_fault)
    try:
        proc = run_torchrun(2, *args)
    finally:
        os.environ.pop("SCALETRAIN_FAULT_SIGNAL")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and out.count("exitcode  : 5") + out.count("exitcode: 5") >= 1, out[-3000:]
    assert out.count("preempted at step 3, saved ") == 1, out[-3000:]  # rank 0 says it, once
    assert _steps(run) == ["step-00000003"] and [s for s, _ in _losses(run)] == [1, 2, 3]
    verify_checkpoint(run / "checkpoints" / "step-00000003", checksums=True)
    proc = run_torchrun(2, *args, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s for s, _ in _losses(run)] == list(range(1, STEPS + 1))


def test_a_damaged_preemption_checkpoint_is_set_aside_on_resume(reference, tmp_path, data_cache, capsys, monkeypatch):
    """A preemption checkpoint falls between interval steps, so the resumed run never saves its
    step again: a damaged one is moved aside when the resume skips it."""
    run = tmp_path / "run"
    monkeypatch.setenv("SCALETRAIN_FAULT_SIGNAL", "0:3:TERM")
    assert main_exit(capsys, *_args(run, data_cache, "--checkpoint.interval", "2"))[0] == EXIT_PREEMPTED
    monkeypatch.delenv("SCALETRAIN_FAULT_SIGNAL")
    data = run / "checkpoints" / "step-00000003" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])
    code, err = main_exit(capsys, *_args(run, data_cache, "--checkpoint.interval", "2"), "--resume", "auto")
    assert code == 0, err
    assert _steps(run) == ["step-00000006", "step-00000008"]  # checkpoint.keep = 2
    assert [p.name.startswith("damaged-step-00000003-") for p in (run / "checkpoints").iterdir()].count(True) == 1
    for ckpt in (run / "checkpoints").glob("step-*"):
        verify_checkpoint(ckpt, checksums=True)
    assert _losses(run) == reference
