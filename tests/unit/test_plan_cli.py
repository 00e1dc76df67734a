"""`python -m scaletrain plan ...` end to end in subprocesses (CLI contract: exit codes, files)."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scaletrain.config.load import load_config

ROOT = Path(__file__).resolve().parents[2]
DEV_CSV = Path("/work/shared/data/published_training_perf_dev.csv")


def _plan(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "scaletrain", "plan", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=120)


def test_plan_prints_ranked_table_and_writes_a_loadable_config(tmp_path):
    out = tmp_path / "best.toml"
    r = _plan("--model", "llama3_8b", "--gpus", "64", "--gpu", "h100_sxm", "--seq-len", "4096",
              "--global-batch-tokens", "2M", "--write-config", str(out))
    assert r.returncode == 0, r.stderr
    assert "tok/s/GPU" in r.stdout and "Winner:" in r.stdout and "memory/GPU GiB" in r.stdout
    assert "time/step" in r.stdout and "slower" in r.stdout
    cfg = load_config(out)
    p = cfg.parallel
    assert p.dp_replicate * p.dp_shard * p.tp * p.pp * p.cp == 64
    assert cfg.data.seq_len == 4096 and cfg.model.flavor == "llama3_8b" and cfg.model.dim == 4096
    dp = p.dp_replicate * p.dp_shard
    assert cfg.data.batch_size * cfg.train.grad_accum * dp * 4096 == 2 * 2**20


def test_bad_input_exits_2_with_a_clear_message():
    r = _plan("--gpu", "h100_sxn")
    assert r.returncode == 2 and "unknown GPU 'h100_sxn'" in r.stderr and "h100_sxm" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--global-batch-tokens", "lots"], "--global-batch-tokens"),
    (["--model", "llama3_8c"], "llama3_8b"),
    (["--seq-len", "1000", "--global-batch-tokens", "4k"], "not a multiple of --seq-len"),
    (["--sweep-gpus", "8,...", "--model", "debug"], "needs a value on each side"),
    (["validate"], "--published"),
])
def test_bad_input_raises_config_error_in_process(args, needle):
    from scaletrain.cli import run
    from scaletrain.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(needle)):
        run(["plan", *args])


def test_sweep_writes_png(tmp_path):
    png = tmp_path / "sweep.png"
    r = _plan("--model", "anchor_1b", "--seq-len", "2048", "--global-batch-tokens", "1M",
              "--sweep-gpus", "8,16,...,64", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(f"{g:>6}" in r.stdout for g in (8, 16, 32, 64))


def test_calibrate_then_plan_with_the_profile(tmp_path, capsys):
    prof = tmp_path / "cpu.json"
    r = _plan("calibrate", "--model", "debug", "--out", str(prof))
    assert r.returncode == 0, r.stderr
    data = json.loads(prof.read_text())
    assert data["calibrated"] and data["hbm_bw"] > 0 and data["peak_flops"]["fp32"] > 0
    # the measured real block per AC mode at seq 128 / 256 (debug: max_seq_len 256) x 1024 / 4096
    # tokens, and the head + loss; compiled ones only with --compile
    cpu = data["cpu"]
    assert set(cpu["blocks"]) == {"none", "full", "selective"} and "head_compiled" not in cpu
    for points in cpu["blocks"].values():
        assert sorted((t, s) for t, s, _ in points) == [(1024, 128), (1024, 256), (4096, 128), (4096, 256)]
        assert all(sec > 0 for _, _, sec in points)
    assert [t for t, _ in cpu["head"]] == [1024, 4096]
    assert 0 < cpu["head_ops"] <= cpu["ops"]["fixed"]  # the ops outside the layers include the head
    from scaletrain.cli import run

    assert run(["plan", "--model", "debug", "--gpus", "1", "--gpu", str(prof), "--seq-len", "256",
                "--global-batch-tokens", "4k", "--precision", "fp32"]) == 0
    assert "Winner:" in capsys.readouterr().out


def test_validate_writes_per_row_json(tmp_path, capsys):
    if not DEV_CSV.is_file():
        pytest.skip(f"published data set {DEV_CSV} not present on this machine")
    rows = list(csv.DictReader(DEV_CSV.open()))
    keep = [r for r in rows if r["source_id"] in ("dgxc_benchmarking", "megatron_lm_readme_2022_mfu")][:8]
    small = tmp_path / "small.csv"
    with small.open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(keep)
    out = tmp_path / "v.json"
    from scaletrain.cli import run

    assert run(["plan", "validate", "--published", str(small), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res) == len(keep)
    for obj in res:
        assert {"row_id", "predicted_tokens_per_s_per_gpu", "measured_tokens_per_s_per_gpu", "rel_error", "skipped"} <= set(obj)
    assert any(o["skipped"] for o in res) and any(o["rel_error"] is not None for o in res)
    assert "median |rel error|" in capsys.readouterr().out


def test_validate_maps_recompute_text_to_the_ac_policy():
    """torchtitan's op-level SAC rows get the cost model's "op" policy, Megatron's selective
    (attention core) rows the "selective" one, full recompute "full"."""
    if not DEV_CSV.is_file():
        pytest.skip(f"published data set {DEV_CSV} not present on this machine")
    from scaletrain.plan.validate import predict_row

    rows = list(csv.DictReader(DEV_CSV.open()))
    seen = {}
    for row in rows:
        r = predict_row(row)
        if r.layout:
            seen.setdefault((row.get("act_recompute") or "none").lower(), set()).add(r.layout.split("ac=")[-1])
    assert seen["selective op"] == {"op"} and seen["selective (op, config default)"] == {"op"}
    assert all(v == {"full"} for k, v in seen.items() if k.startswith("full"))
    assert all(v == {"selective"} for k, v in seen.items() if k.startswith("selective") and " op" not in k
               and "(op" not in k)
