"""Async checkpointing (same files as a synchronous save, staged before save() returns, one save
in flight) and failing writers (disk full) in both modes."""

import errno
import json

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

from scaletrain.config.schema import CheckpointConfig
from scaletrain.errors import CheckpointError
from scaletrain.train.checkpoint import MARKER, Checkpointer, verify_checkpoint

MODES = pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])


def _state(v: float):
    g = torch.Generator().manual_seed(int(v))
    return {"model": {"w": torch.randn(64, 64, generator=g), "b": torch.full((7,), v)},
            "optim": {"state.w.exp_avg": torch.randn(64, 64, generator=g)},
            "train": {"step": int(v), "loader": {"pos": int(v) * 2}, "rng": torch.get_rng_state()}}


def _load(path):
    target = _state(0.0)
    Checkpointer.load(path, target)
    return target


def _assert_same_state(a, b):
    for part in ("model", "optim"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["train"]["step"] == b["train"]["step"] and a["train"]["loader"] == b["train"]["loader"]
    assert torch.equal(a["train"]["rng"], b["train"]["rng"])


def test_async_save_writes_the_same_checkpoint_as_sync(tmp_path):
    state = _state(3.0)
    sync = Checkpointer(tmp_path / "sync", CheckpointConfig()).save(3, state, {"note": "x"})
    ck = Checkpointer(tmp_path / "async", CheckpointConfig(async_save=True))
    path = ck.save(3, state, {"note": "x"})
    assert ck.wait() == path == tmp_path / "async" / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in sync.iterdir()) == sorted(p.name for p in path.iterdir())
    a, b = verify_checkpoint(sync, checksums=True), verify_checkpoint(path, checksums=True)
    timing = {"time", "save_seconds", "files"}
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert a["files"].keys() == b["files"].keys()
    for name in a["files"]:
        # DCP's .metadata pickles a fresh save id (uuid) and the folder path on every save, so
        # even two synchronous saves differ there; every data file is byte-identical.
        if name != ".metadata":
            assert a["files"][name] == b["files"][name], name
    _assert_same_state(_load(sync), _load(path))
    _assert_same_state(_load(path), state)
    assert not list((tmp_path / "async" / "checkpoints").glob(".tmp-*"))


def test_async_save_stages_the_state_before_returning(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(async_save=True))
    state = _state(1.0)
    expected = {part: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in d.items()}
                for part, d in state.items()}
    ck.save(1, state, {})
    # Training goes on while the write runs: in-place updates and a new step number.
    state["model"]["w"].add_(1.0)
    state["optim"]["state.w.exp_avg"].zero_()
    state["train"]["step"] = 2
    _assert_same_state(_load(ck.wait()), expected)


def test_one_save_in_flight_and_retention(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=2, async_save=True))
    assert ck.wait() is None  # nothing pending
    for s in (1, 2, 3):
        ck.save(s, _state(float(s)), {})
        # save() waited for the previous save, so it is already committed
        assert [p for p, _ in ck.complete_steps()][-1:] == ([s - 1] if s > 1 else [])
    ck.wait()
    assert [s for s, _ in ck.complete_steps()] == [2, 3]
    _assert_same_state(_load(ck.latest()), _state(3.0))
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        ck.save(3, _state(9.0), {})


def _disk_full_after(monkeypatch, nbytes: int = 1000):
    """Make DCP's file writer put `nbytes` into the data file, then fail like a full disk."""

    def write_then_fail(transforms, stream, *args, **kwargs):
        stream.write(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_fs, "_write_item", write_then_fail)


@MODES
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, async_save):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=1, async_save=async_save))
    good = ck.save(1, _state(1.0), {})
    ck.wait()
    with monkeypatch.context() as m:
        _disk_full_after(m)
        with pytest.raises(CheckpointError) as info:
            ck.save(2, _state(2.0), {})
            ck.wait()  # async: the failure surfaces when the pending save is waited for
    msg = str(info.value)
    for part in ("saving checkpoint step 2 failed", ".tmp-step-00000002", "No space left on device",
                 f"previous checkpoint {good} is intact"):
        assert part in msg, (part, msg)
    root = tmp_path / "checkpoints"
    assert not (root / "step-00000002").exists()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-00000001"]
    assert ck.latest() == good  # retention (keep=1) did not run for the failed save
    verify_checkpoint(good, checksums=True)
    _assert_same_state(_load(good), _state(1.0))
    # Space freed: the same step saves normally.
    ck.save(2, _state(2.0), {})
    ck.wait()
    assert [s for s, _ in ck.complete_steps()] == [2]
    assert json.loads((root / "step-00000002" / MARKER).read_text())["step"] == 2


def test_async_failure_is_raised_by_the_next_save(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=0, async_save=True))
    ck.save(1, _state(1.0), {})
    ck.wait()  # before the writer is broken
    with monkeypatch.context() as m:
        _disk_full_after(m)
        ck.save(2, _state(2.0), {})  # staged; the write fails in the background
        with pytest.raises(CheckpointError, match="step 2 failed.*No space left on device"):
            ck.save(3, _state(3.0), {})
    assert ck.wait() is None  # the failed save is no longer pending
    assert [s for s, _ in ck.complete_steps()] == [1]
