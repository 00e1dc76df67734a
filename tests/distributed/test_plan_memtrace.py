"""`plan check --measure-tensors` under torchrun: every gloo rank measures its own peak live
tensor bytes and rank 0 prints all of them next to the planner's per-rank prediction."""

from __future__ import annotations

import json

import pytest

from conftest import DEBUG_CONFIG, run_torchrun
from scaletrain.config.flavors import model_config_for
from scaletrain.model.flops import param_counts

pytestmark = pytest.mark.slow  # a 2-rank FSDP run measured: ~11 s on 2 cores

PROFILE = {"name": "synthetic-cpu", "peak_flops": {"fp32": 5e10, "bf16": 5e10}, "matmul_eff_max": 1.0,
           "attn_eff": 0.2, "hbm_bytes": 8e9, "hbm_bw": 1e10, "host_overhead_s": 5e-6, "gpus_per_node": 2,
           "calibrated": True, "framework_baseline_bytes": 0.3 * 2**30}


def test_fsdp_ranks_measure_their_own_peak(tmp_path, data_cache):
    run = tmp_path / "run"
    proc = run_torchrun(2, "train", "--config", str(DEBUG_CONFIG), "--run-dir", str(run), "--train.steps", "3",
                        "--data.cache_dir", str(data_cache), "--metrics.progress", "none", "--parallel.dp_shard", "2",
                        "--train.eval_interval", "0", "--checkpoint.save_final", "false",
                        "--metrics.tensorboard", "false", "--metrics.plot", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = tmp_path / "cpu.json"
    profile.write_text(json.dumps(PROFILE))
    out = tmp_path / "check.json"
    proc = run_torchrun(2, "plan", "check", "--run-dir", str(run), "--profile", str(profile), "--measure-tensors",
                        "--measure-steps", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("peak live tensors r") == 2 and "r1" in proc.stdout  # rank 0 prints both ranks
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and [r["rank"] for r in res["tensor_ranks"]] == [0, 1]
    m = model_config_for("debug")
    p = param_counts(m)["total"]
    for r in res["tensor_ranks"]:
        # each rank holds half of the fp32 weights and of the Adam moments (FSDP shards) + the RoPE tables
        assert r["state_bytes"]["params"] == 4 * p // 2 + 2 * m.max_seq_len * (m.dim // m.n_heads) * 4
        assert 8 * p // 2 < r["state_bytes"]["optimizer"] < 8 * p // 2 + 1024
        assert r["at_peak"]["comm"] > 0  # the all-gathered root unit (embedding, norm, head)
        assert abs(res["predicted_tensor_bytes"] - r["peak_bytes"]) / r["peak_bytes"] < 0.15
