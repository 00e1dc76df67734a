"""The run-folder lock: held by one process, refused to others with the holder's pid and host,
dropped by the kernel when the holder dies."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket

import pytest

from scaletrain.errors import CheckpointError
from scaletrain.train.lock import LOCK_FILE, RunLock
from scaletrain.train.rundir import clear_run_dir, resolve_resume


def _hold(run_dir, ready) -> None:
    RunLock(run_dir).acquire()
    ready.set()
    signal.pause()


def test_held_lock_is_refused_and_freed_when_the_holder_dies(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path / "run", ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(CheckpointError, match=f"pid {holder.pid} on host {socket.gethostname()}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    RunLock(tmp_path / "run").acquire().release()  # the kernel dropped the dead holder's lock


def test_a_folder_holding_only_the_lock_is_new_and_overwrite_keeps_the_lock(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run).acquire(new=True)
    assert resolve_resume(run, "never", False) is None
    (run / "config.toml").write_text("x")
    clear_run_dir(run)
    assert [p.name for p in run.iterdir()] == [LOCK_FILE]
    lock.release()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(CheckpointError, match="written by another run while this one was starting"):
        RunLock(run).acquire(new=True)
