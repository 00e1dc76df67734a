"""What a resume uses: changed optimizer settings take effect (and are said), and checkpoints
written before the train state moved into the marker still resume exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from conftest import debug_train_args, main_exit
from scaletrain.cli import run as cli_run
from scaletrain.config.load import read_toml
from scaletrain.fsutil import sha256_file
from scaletrain.train.checkpoint import MARKER
from scaletrain.train.metrics import read_metrics

QUIET = ("--metrics.tensorboard", "false", "--metrics.plot", "false", "--train.eval_interval", "0")


def _train(run, data_cache, steps, *extra):
    assert cli_run(debug_train_args(run, data_cache, steps, *QUIET, *extra)) == 0


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, data_cache):
    """A run of 4 planned steps stopped after step 2 (its checkpoint), and the uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    full, half = root / "full", root / "half"
    _train(full, data_cache, 4, "--checkpoint.interval", "2")
    _train(half, data_cache, 4, "--checkpoint.interval", "2")
    shutil.rmtree(half / "checkpoints" / "step-00000004")
    lines = (half / "metrics.jsonl").read_text().splitlines()
    (half / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= 2))
    return full, half


def _losses(run):
    return [r["loss"] for r in read_metrics(run)[0]]


def test_changed_optimizer_settings_are_applied_and_reported(two_steps, tmp_path, data_cache, capsys):
    full, half = two_steps
    same, changed = tmp_path / "same", tmp_path / "changed"
    shutil.copytree(half, same)
    shutil.copytree(half, changed)
    code, _ = main_exit(capsys, *debug_train_args(same, data_cache, 4, *QUIET), "--resume", "auto")
    assert code == 0 and _losses(same) == _losses(full)  # the control: an unchanged resume is exact
    code, err = main_exit(capsys, *debug_train_args(changed, data_cache, 4, *QUIET), "--resume", "auto",
                          "--optim.weight_decay", "0.0", "--optim.beta2", "0.99")
    assert code == 0, err
    assert "optim.weight_decay 0.1 -> 0.0" in err and "optim.beta2 0.95 -> 0.99" in err, err
    assert "optim.beta1" not in err and "optim.eps" not in err
    got, ref = _losses(changed), _losses(same)
    assert got[:3] == ref[:3] and got[3] != ref[3]  # step 3's update is the first with the new values
    optim = read_toml(changed / "config.toml")["optim"]
    assert optim["weight_decay"] == 0.0 and optim["beta2"] == 0.99


def test_a_checkpoint_in_the_previous_format_resumes_exactly(two_steps, tmp_path, data_cache, capsys):
    """Before this format the step, schedule, loader position and skipped batches were DCP values
    (pickled ints, dicts and a JSON string) rather than JSON in the marker."""
    full, half = two_steps
    run = tmp_path / "old"
    shutil.copytree(half, run)
    ckpt = run / "checkpoints" / "step-00000002"
    marker = json.loads((ckpt / MARKER).read_text())
    train = marker.pop("train_state")
    sd = _load_state_dict_from_keys(checkpoint_id=str(ckpt))  # our own file: the plain reader is fine
    sd["train"].update(step=train["step"], schedule=train["schedule"], loader=train["loader"],
                       skip_positions=json.dumps(train["skip_positions"]))
    shutil.rmtree(ckpt)
    dcp.save(sd, checkpoint_id=str(ckpt))
    marker["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in ckpt.iterdir()}
    (ckpt / MARKER).write_text(json.dumps(marker))

    code, err = main_exit(capsys, *debug_train_args(run, data_cache, 4, *QUIET), "--resume", "auto")
    assert code == 0, err
    assert _losses(run) == _losses(full)
