"""DCP checkpointer: atomic commit, marker, retention, damage detection, resume lookup."""

import warnings

import pytest
import torch

from scaletrain.config.schema import CheckpointConfig
from scaletrain.errors import CheckpointError
from scaletrain.train.checkpoint import MARKER, Checkpointer, verify_checkpoint
from scaletrain.train.rundir import resolve_resume


def _state(v: float):
    return {"model": {"w": torch.full((4, 4), v)}, "train": {"step": int(v), "loader": {"pos": int(v) * 2}}}


def test_save_load_round_trip(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=0))
    path = ck.save(3, _state(3.0), {"note": "x"})
    assert path.name == "step-00000003" and (path / MARKER).is_file()
    target = _state(0.0)
    meta = Checkpointer.load(path, target)
    assert torch.equal(target["model"]["w"], torch.full((4, 4), 3.0))
    assert target["train"] == {"step": 3, "loader": {"pos": 6}} and meta["note"] == "x"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_retention_keeps_newest(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=2))
    for s in (1, 2, 3):
        ck.save(s, _state(float(s)), {})
    assert [s for s, _ in ck.complete_steps()] == [2, 3]


def test_incomplete_and_truncated_are_skipped(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=0))
    ck.save(1, _state(1.0), {})
    good = ck.save(2, _state(2.0), {})
    # A save killed before its commit leaves only a .tmp folder: never picked.
    (tmp_path / "checkpoints" / ".tmp-step-00000003").mkdir()
    assert ck.latest() == good
    # Truncate a data file of the newest: it is skipped with a warning naming it.
    data = next(f for f in good.iterdir() if f.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:10])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ck.latest().name == "step-00000001"
    assert any(data.name in str(w.message) for w in caught)
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(good)


def test_corruption_detected_by_checksum(tmp_path):
    good = Checkpointer(tmp_path, CheckpointConfig()).save(1, _state(1.0), {})
    data = next(f for f in good.iterdir() if f.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    verify_checkpoint(good)  # sizes still match
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(good, checksums=True)


def test_never_overwrites_existing_step(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig())
    ck.save(1, _state(1.0), {})
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        ck.save(1, _state(5.0), {})
    target = _state(0.0)
    Checkpointer.load(ck.latest(), target)
    assert target["model"]["w"][0, 0] == 1.0


def test_resolve_resume_rules(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume(run, "never", False) is None  # new folder
    Checkpointer(run, CheckpointConfig()).save(4, _state(4.0), {})
    with pytest.raises(CheckpointError, match="--resume auto"):
        resolve_resume(run, "never", False)
    assert resolve_resume(run, "auto", False).name == "step-00000004"
    assert resolve_resume(run, "never", True) is None  # --overwrite permits a fresh start
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        resolve_resume(run, str(tmp_path / "nope"), False)
