"""Under torchrun an impossible layout fails on every rank before any work: each worker prints
the message and exits 2 (the numerical layout checks are in test_layouts.py)."""

from __future__ import annotations

from conftest import debug_train_args, run_torchrun


def test_impossible_layout_is_a_clear_error(tmp_path, data_cache):
    proc = run_torchrun(2, *debug_train_args(tmp_path / "r", data_cache, 2, "--parallel.dp_shard", "4"))
    assert proc.returncode != 0
    assert "parallel degrees multiply to 4" in proc.stderr and "world size is 2" in proc.stderr
    assert "exitcode: 2" in proc.stderr  # each worker exits 2 with the message, no traceback of ours
    assert "/scaletrain/" not in proc.stderr  # torchrun's own ChildFailedError report names no frame of ours
    assert not (tmp_path / "r").exists()
