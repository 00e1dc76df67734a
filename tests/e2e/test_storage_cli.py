"""`scaletrain train` on a full, limited or refusing disk: exit 2 with a message that fits the
cause, no traceback, the committed checkpoints intact; a torn metrics line is repaired on
resume."""

from __future__ import annotations

import errno
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, debug_train_args, main_exit, run_main
from scaletrain.cli import run as cli_run
from scaletrain.train.checkpoint import verify_checkpoint
from scaletrain.train.metrics import read_metrics

QUIET = ("--metrics.tensorboard", "false", "--metrics.plot", "false", "--train.eval_interval", "0")


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, data_cache):
    run = tmp_path_factory.mktemp("storage") / "run"
    assert cli_run(debug_train_args(run, data_cache, 2, *QUIET)) == 0
    return run


def _resume(capsys, run, data_cache, *extra):
    return main_exit(capsys, *debug_train_args(run, data_cache, 4, *QUIET, *extra), "--resume", "auto")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_metrics_on_a_full_disk_exits_2_and_keeps_the_checkpoints(two_steps, tmp_path, data_cache, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to("/dev/full")  # the kernel answers every write with ENOSPC
    code, err = _resume(capsys, run, data_cache)
    assert code == 2, err
    assert "metrics.jsonl failed: the disk is full" in err and "Traceback" not in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    verify_checkpoint(run / "checkpoints" / "step-00000002", checksums=True)


def test_a_torn_metrics_line_is_repaired_on_resume(two_steps, tmp_path, data_cache, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "kind": "train", "lo')  # what a full disk left mid-line
    code, err = _resume(capsys, run, data_cache)
    assert code == 0, err
    assert "removed a torn last line" in err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert [r["step"] for r in read_metrics(run)[0]] == [1, 2, 3, 4]


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission denied"),
                                        (errno.EROFS, "read-only")])
def test_run_folder_write_errors_at_startup_exit_2(tmp_path, data_cache, capsys, monkeypatch, code, words):
    import scaletrain.train.trainer as trainer

    def refused(cfg, path):
        raise OSError(code, "refused", str(path))

    monkeypatch.setattr(trainer, "write_config", refused)
    got, err = main_exit(capsys, *debug_train_args(tmp_path / "run", data_cache, 2, *QUIET))
    assert got == 2 and words in err and "config.toml" in err and "Traceback" not in err, err


def test_checkpoints_folder_that_cannot_take_checkpoints_is_refused_before_training(two_steps, tmp_path, data_cache,
                                                                                    capsys):
    run = tmp_path / "run"
    shutil.copytree(two_steps, run, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "checkpoints").write_text("not a folder")
    metrics = (run / "metrics.jsonl").read_bytes()
    code, err = main_exit(capsys, *debug_train_args(run, data_cache, 4, *QUIET), "--resume", "auto")
    assert code == 2 and "checkpoints is a file, not a folder" in err, err
    assert (run / "metrics.jsonl").read_bytes() == metrics  # no step was trained


def _limit_file_size(nbytes: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return preexec


def test_a_checkpoint_over_the_file_size_limit_exits_2(tmp_path, data_cache):
    """A real kernel refusal in the middle of DCP's write: RLIMIT_FSIZE below a checkpoint's
    data file (about 2.4 MB here); config, tokenizer and metrics stay below it."""
    run = tmp_path / "run"
    args = debug_train_args(run, data_cache, 2, *QUIET)
    run_main("data", "prepare", "--config", args[2], "--data.cache_dir", str(data_cache))
    proc = subprocess.run([sys.executable, "-m", "scaletrain", *args], env=cli_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, preexec_fn=_limit_file_size(2**20))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "saving checkpoint step 2 failed" in proc.stderr and "file-size limit" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list((run / "checkpoints").iterdir()) == []  # the failed .tmp folder was removed
