"""A hostile checkpoint runs no code: a `.metadata` (or a stored non-tensor value) holding a
pickled payload, with COMPLETE's sizes and sha256 rewritten to match, is refused with exit 2
by every command that reads checkpoints, and the payload never runs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import debug_train_args, main_exit
from scaletrain.cli import run as cli_run
from scaletrain.config.schema import CheckpointConfig
from scaletrain.errors import CheckpointError
from scaletrain.fsutil import sha256_file
from scaletrain.train.checkpoint import MARKER, Checkpointer


class _Touch:
    """Unpickling this calls Path.touch(path): the stand-in for any code a payload could run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _reseal(ckpt: Path) -> None:
    """Rewrite COMPLETE's sizes and sha256 to match the (tampered) files, as an attacker would."""
    marker = json.loads((ckpt / MARKER).read_text())
    for name in marker["files"]:
        f = ckpt / name
        marker["files"][name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (ckpt / MARKER).write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    run = tmp_path_factory.mktemp("hostile") / "run"
    assert cli_run(debug_train_args(run, data_cache, 2, "--metrics.tensorboard", "false", "--metrics.plot", "false",
                                    "--train.eval_interval", "0")) == 0
    return run


def _hostile_copy(trained: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(run folder, its checkpoint, the file the payload would create)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = run / "checkpoints" / "step-00000002"
    pwned = tmp_path / "pwned"
    with open(ckpt / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own file, written by the training above
    metadata.storage_meta.modules = [_Touch(pwned)]  # loads fine with plain pickle, running the payload
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    _reseal(ckpt)
    return run, ckpt, pwned


def test_every_command_refuses_a_hostile_metadata(trained, tmp_path, data_cache, capsys):
    run, ckpt, pwned = _hostile_copy(trained, tmp_path)
    train = debug_train_args(run, data_cache, 4, "--metrics.tensorboard", "false", "--metrics.plot", "false")
    for args in (["generate", "--run", str(run), "--prompt", "a", "--max-new-tokens", "2"],
                 ["export", "--run", str(run), "--out", str(tmp_path / "hf")],
                 [*train, "--resume", "auto"],
                 [*train, "--resume", str(ckpt)]):
        code, err = main_exit(capsys, *args)
        assert not pwned.exists(), f"the payload ran on: scaletrain {args[0]}"
        assert code == 2, (args, err)
        assert ".metadata" in err and "pathlib" in err and "runs no code" in err, err
    assert not (tmp_path / "hf").exists()


def test_a_pickled_object_among_the_stored_values_is_refused(tmp_path):
    """DCP pickles non-tensor values into the data files and its default planner reads them with
    torch.load(weights_only=False); ours reads them with weights_only=True."""
    pwned = tmp_path / "pwned"
    state = {"model": {"w": torch.ones(2)}, "train": {"note": _Touch(pwned)}}
    path = Checkpointer(tmp_path, CheckpointConfig()).save(1, state, {})
    with pytest.raises(CheckpointError, match="runs no code"):
        Checkpointer.load(path, {"model": {"w": torch.zeros(2)}, "train": {"note": None}})
    assert not pwned.exists()
    # The plain DCP reader would have run it: the test's payload is real.
    dcp.load({"model": {"w": torch.zeros(2)}, "train": {"note": None}}, checkpoint_id=str(path))
    assert pwned.exists()
