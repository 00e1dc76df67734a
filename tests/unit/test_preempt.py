"""Stop signals: immediate during setup, recorded once training runs, the previous handlers
restored; the resume command keeps the user's arguments, with --resume auto and no --overwrite."""

from __future__ import annotations

import os
import signal

import pytest

from scaletrain.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, Stopped
from scaletrain.train.preempt import StopSignals, resume_command


def test_resume_command_continues_the_run():
    base = ["python", "-m", "scaletrain", "train", "--config", "a b.toml", "--run-dir", "runs/x"]
    assert resume_command(base) == "python -m scaletrain train --config 'a b.toml' --run-dir runs/x --resume auto"
    for extra in (["--resume", "never"], ["--resume=runs/x/checkpoints/step-00000004"], ["--overwrite"],
                  ["--resume", "auto", "--overwrite"]):
        assert resume_command([*base, *extra]) == resume_command(base)


def test_signals_stop_setup_at_once_and_are_recorded_in_training():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = StopSignals()
    try:
        with pytest.raises(Stopped, match="SIGTERM before training started") as info:
            os.kill(os.getpid(), signal.SIGTERM)
        assert info.value.exit_code == EXIT_PREEMPTED
        stop = StopSignals()
        stop.defer()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert stop.requested and stop.stopped(3, "RUN/checkpoints/step-00000003").exit_code == EXIT_INTERRUPTED
        assert "interrupted at step 3, saved RUN/checkpoints/step-00000003; resume with: " in str(
            stop.stopped(3, "RUN/checkpoints/step-00000003"))
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
