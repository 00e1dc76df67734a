"""`scaletrain bench` end to end on the CPU: a smoke benchmark of the debug preset, its result
row and JSON, and the errors (exit 2, nothing appended, nothing overwritten). The CLI runs in
this process (conftest.run_main), one error case in a fresh one."""

from __future__ import annotations

import json

from conftest import DEBUG_CONFIG, run_cli, run_main


def _bench(tmp_path, data_cache, *extra, check=True, fresh=False):
    return (run_cli if fresh else run_main)("bench", "--config", str(DEBUG_CONFIG), "--data.cache_dir", str(data_cache),
                   "--run-dir", str(tmp_path / "scratch"), "--results", str(tmp_path / "results.jsonl"),
                   *extra, check=check)


def test_bench_smoke_reports_and_appends(tmp_path, data_cache):
    out = tmp_path / "r.json"
    proc = _bench(tmp_path, data_cache, "--smoke", "--warmup", "2", "--steps", "4", "--phase-steps", "2",
                  "--profile-steps", "2", "--json", str(out))
    for needle in ("tokens/s", "TFLOP/s", "MFU", "step breakdown", "forward", "optimizer", "framework tax",
                   "aten ops/step", "[smoke: not a result]"):
        assert needle in proc.stdout, needle
    result = json.loads(out.read_text())
    assert result["steps"] == 4 and result["warmup_steps"] == 2 and result["smoke"] is True
    assert result["tokens_per_step"] == 8 * 128 and result["tokens_per_s"] > 0
    assert result["tokens_per_s"] == result["tokens_per_step"] * 4 / result["window_s"]
    assert set(result["phases_s"]) >= {"data", "forward", "backward", "grad norm + clip", "optimizer"}
    assert result["framework_tax"]["ops_per_step"] > 100 and result["framework_tax"]["gpu_busy_s"] is None
    assert result["command"].startswith("scaletrain bench") and result["git"]["revision"]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["tokens_per_s"] == result["tokens_per_s"]
    # A second run overwrites its own scratch folder and appends a second row.
    _bench(tmp_path, data_cache, "--smoke", "--warmup", "1", "--steps", "1", "--phase-steps", "0")
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2


def test_bench_bad_input_exits_2_and_writes_nothing(tmp_path, data_cache):
    proc = _bench(tmp_path, data_cache, "--steps", "5", check=False, fresh=True)
    assert proc.returncode == 2 and "--steps must be >= 20" in proc.stderr and "--smoke" in proc.stderr
    proc = _bench(tmp_path, data_cache, "--smoke", "--steps", "2", "--model.dimm", "8", check=False)
    assert proc.returncode == 2 and "model.dim" in proc.stderr
    # A folder that holds something else (a training run) is never used as scratch space.
    keep = tmp_path / "scratch" / "checkpoints" / "step-00000010"
    keep.mkdir(parents=True)
    proc = _bench(tmp_path, data_cache, "--smoke", "--steps", "2", check=False)
    assert proc.returncode == 2 and "not written by `scaletrain bench`" in proc.stderr and keep.is_dir()
    assert not (tmp_path / "results.jsonl").exists()


def test_bench_peer_without_torchtitan_is_a_clear_error(tmp_path, data_cache):
    import importlib.util

    if importlib.util.find_spec("torchtitan") is not None:
        import pytest

        pytest.skip("torchtitan is installed here; the missing-peer error cannot be shown")
    proc = _bench(tmp_path, data_cache, "--smoke", "--steps", "2", "--peer", "torchtitan", check=False)
    assert proc.returncode == 2 and "torchtitan 0.2.2" in proc.stderr
    assert not (tmp_path / "scratch").exists() and not (tmp_path / "results.jsonl").exists()
