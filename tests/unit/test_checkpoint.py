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


def test_bit_flipped_newest_is_skipped_on_resume(tmp_path):
    """checkpoint.verify = "checksum" (default): a same-size corruption of the newest checkpoint
    is caught by resume, which warns naming the file and falls back to the previous one; the
    fast "size" mode does not read the data and would take it."""
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=0))
    first = ck.save(1, _state(1.0), {})
    newest = ck.save(2, _state(2.0), {})
    data = next(f for f in newest.iterdir() if f.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=f"{data.name} fails its sha256"):
        assert resolve_resume(tmp_path, "auto", False, CheckpointConfig()) == first
    assert resolve_resume(tmp_path, "auto", False, CheckpointConfig(verify="size")) == newest


def test_damaged_checkpoint_is_moved_aside_when_its_step_is_saved_again(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=0))
    ck.save(1, _state(1.0), {})
    bad = ck.save(2, _state(2.0), {})
    data = next(f for f in bad.iterdir() if f.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:10])  # truncated
    with pytest.warns(UserWarning, match="truncated"):
        assert ck.latest().name == "step-00000001"
    with pytest.warns(UserWarning, match="moved damaged checkpoint"):
        again = ck.save(2, _state(2.5), {})
    verify_checkpoint(again, checksums=True)
    assert any(p.name.startswith("damaged-step-00000002") for p in tmp_path.joinpath("checkpoints").iterdir())
