"""Resuming an existing run folder: without --config the run's own config.toml is used, with
--section.key overrides on top; with --config the differences from config.toml are listed. The
output a user reads during a run (header, data preparation, memory line) is checked here too."""

from __future__ import annotations

import json

from conftest import debug_train_args, main_run
from scaletrain.train.rundir import load_run_config

QUIET = ("--metrics.tensorboard", "false", "--metrics.plot", "false", "--train.eval_interval", "0",
         "--metrics.progress", "plain", "--checkpoint.interval", "2", "--data.seq_len", "64")


def test_resume_uses_the_runs_config_and_lists_changes(tmp_path, data_cache, capsys):
    run = tmp_path / "run"
    code, out, err = main_run(capsys, *debug_train_args(run, tmp_path / "cache", 4, *QUIET))
    assert code == 0, err
    lines = out.splitlines()
    # The header names the world size and layout; the cold data cache reports its build.
    assert any(x.startswith("world 1: dp_replicate 1 x dp_shard 1 x tp 1 x pp 1 x cp 1") for x in lines), out
    assert any(x.startswith("data: tokenizing") for x in lines), out
    assert any(x.startswith("data: ready in") for x in lines), out
    # On CPU the measured peak is the process RSS: it is not set against the tensor prediction.
    mem = [x for x in lines if "RSS" in x]
    assert len(mem) == 1 and "not comparable" in mem[0] and "measured" not in mem[0], mem
    info = json.loads((run / "run_info.json").read_text())
    assert info["layout"] == {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "pp": 1, "cp": 1, "ep": 1}

    # No --config: the run's config.toml (seq_len 64, its cache) plus the override.
    code, out, err = main_run(capsys, "train", "--run-dir", str(run), "--resume", "auto", "--train.steps", "6")
    assert code == 0, err
    assert f"using {run / 'config.toml'}" in out
    assert "  train.steps: 4 -> 6" in out.splitlines()
    assert "resumed at step 4" in out and "data: tokenizing" not in out  # the run's own data cache
    cfg = load_run_config(run)
    assert (cfg.train.steps, cfg.data.seq_len) == (6, 64)

    # A change that cannot resume is still refused clearly, and nothing is changed.
    code, out, err = main_run(capsys, "train", "--run-dir", str(run), "--resume", "auto",
                              "--model.dim", "128", "--model.ffn_dim", "256")
    assert code == 2 and "different model shape" in err, err
    assert load_run_config(run).model.dim != 128

    # --config on an existing run: each difference from its config.toml is listed.
    code, out, err = main_run(capsys, *debug_train_args(run, tmp_path / "cache", 8, *QUIET), "--resume", "auto")
    assert code == 0, err
    changed = [x for x in out.splitlines() if " -> " in x and x.startswith("  ")]
    assert changed == ["  train.steps: 6 -> 8"], out
    assert "resumed at step 6" in out


def test_unknown_cli_key_suggests_the_flag(tmp_path, capsys):
    code, out, err = main_run(capsys, "train", "--run-dir", str(tmp_path / "r"), "--train.stepz", "3")
    assert code == 2 and "Did you mean '--train.steps'?" in err, err
    assert not (tmp_path / "r").exists()


def test_warnings_are_one_line_on_rank_0(capsys, monkeypatch):
    """The CLI's warning format: scaletrain's own as `warning: ...`, a library's naming it; no
    source line; nothing from the other ranks of a torchrun job."""
    from scaletrain.cli import _warning_line

    _warning_line(UserWarning("checkpoint skipped"), UserWarning, "/src/scaletrain/train/rundir.py", 48)
    _warning_line(FutureWarning("old API"), FutureWarning, "/v/lib/python3.11/site-packages/torch/x.py", 7)
    monkeypatch.setenv("RANK", "1")
    _warning_line(UserWarning("again"), UserWarning, "/src/scaletrain/train/rundir.py", 48)
    assert capsys.readouterr().err.splitlines() == ["warning: checkpoint skipped",
                                                    "warning (torch, FutureWarning): old API"]
