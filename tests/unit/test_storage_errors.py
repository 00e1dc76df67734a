"""Full disks and refused writes: metrics lines are never torn by our writing, a torn last line
is repaired, and every storage failure becomes a StorageError/CheckpointError worded after its
cause (disk full vs permission vs read-only; a vanished folder or a failed peer is not blamed on
the disk). /dev/full gives a real ENOSPC from the kernel."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from scaletrain.config.schema import CheckpointConfig, MetricsConfig
from scaletrain.errors import CheckpointError, StorageError
from scaletrain.fsutil import storage_error
from scaletrain.train import metrics as metrics_lib
from scaletrain.train.checkpoint import Checkpointer
from scaletrain.train.metrics import MetricsWriter, read_metrics

needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")


def _cfg(tb: bool = False) -> MetricsConfig:
    return MetricsConfig(tensorboard=tb, plot=False, progress="none")


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "quota"),
                                        (errno.EACCES, "permission denied"), (errno.EROFS, "read-only"),
                                        (errno.EFBIG, "file-size limit")])
def test_storage_errors_name_their_cause(code, words):
    msg = str(storage_error(OSError(code, os.strerror(code), "/r/x"), "writing /r/x", then="resume"))
    assert msg.startswith("writing /r/x failed: ") and words in msg and errno.errorcode[code] in msg
    assert ("disk is full" in msg) == (code == errno.ENOSPC)


@needs_dev_full
def test_metrics_on_a_full_disk_is_a_storage_error(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC from the kernel
    w = MetricsWriter(tmp_path, _cfg(), rank=0)
    with pytest.raises(StorageError, match=r"metrics.jsonl failed: the disk is full .*ENOSPC.*--resume auto"):
        w.log_step({"step": 1, "loss": 1.0})
    w.close()


def test_a_short_write_leaves_no_torn_line(tmp_path, monkeypatch):
    with MetricsWriter(tmp_path, _cfg(), rank=0) as w:
        w.log_step({"step": 1, "loss": 1.0})
        before = (tmp_path / "metrics.jsonl").read_bytes()
        real_write = os.write

        def half_then_full(fd, data):
            if len(data) > 1:
                return real_write(fd, data[: len(data) // 2])  # the disk fills mid-line
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(metrics_lib.os, "write", half_then_full)
        with pytest.raises(StorageError, match="disk is full"):
            w.log_step({"step": 2, "loss": 0.5})
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_a_torn_last_line_is_repaired_on_reopen(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kind": "train", "loss": 2.0}\n{"step": 2, "kind": "tr')
    with MetricsWriter(tmp_path, _cfg(), rank=0) as w:
        w.log_step({"step": 2, "loss": 1.5})
    assert "removed a torn last line (23 bytes)" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(path)[0]] == [1, 2]
    assert all(json.loads(line) for line in path.read_text().splitlines())
    # A complete record missing only its newline is kept.
    path.write_text('{"step": 1, "kind": "train", "loss": 2.0}')
    MetricsWriter(tmp_path, _cfg(), rank=0).close()
    assert path.read_text() == '{"step": 1, "kind": "train", "loss": 2.0}\n'


def test_tensorboard_write_errors_are_storage_errors(tmp_path, monkeypatch):
    w = MetricsWriter(tmp_path, _cfg(tb=True), rank=0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(w._tb, "add_scalar", full)
    with pytest.raises(StorageError, match=r"TensorBoard .*the disk is full"):
        w.log_step({"step": 1, "loss": 1.0})
    monkeypatch.undo()
    w.close()


def _state(v: float):
    return {"model": {"w": torch.full((8, 8), v)}}


@pytest.mark.parametrize("exc,words,not_words", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full", "another"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only", "disk is full"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/r/checkpoints/.tmp-step-00000002/__0_0.distcp"),
     "another process removed", "disk"),
    (RuntimeError("[gloo] Connection closed by peer [10.0.0.2]:4321"), "another rank", "disk"),
])
def test_a_failed_save_names_its_cause(tmp_path, monkeypatch, exc, words, not_words):
    ck = Checkpointer(tmp_path, CheckpointConfig())
    ck.save(1, _state(1.0), {})

    def failing_save(*args, **kwargs):
        raise exc

    monkeypatch.setattr(dcp, "save", failing_save)
    with pytest.raises(CheckpointError) as info:
        ck.save(2, _state(2.0), {})
    msg = str(info.value)
    assert words in msg and not_words not in msg.lower(), msg
    assert "step-00000001 is intact" in msg and "--resume auto" in msg


def test_checkpoints_folder_is_checked_before_training(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, CheckpointConfig())
    ck.check_writable()  # creates checkpoints/ and writes a probe file
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == []
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if "w" in mode and "checkpoints" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(StorageError, match=r"checkpoints.*failed.*read-only"):
        ck.check_writable()
