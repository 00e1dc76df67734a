"""The planner prices multi-head latent attention (DeepSeek-V3-style rows of a published CSV, and
`plan search` of an MLA model) and refuses to write a trainer config for it."""

import csv
import math

import pytest

from conftest import main_exit
from scaletrain.model.flops import param_counts
from scaletrain.plan.cost import Layout, Stack, Workload, attention_gemms, estimate
from scaletrain.plan.cost_moe import layer_split
from scaletrain.plan.hardware import get_hardware
from scaletrain.plan.validate import Case, predict, read_cases, validate_file
from test_flops_mla import DSV3, TINY

# DeepSeek-V3 as the Megatron-Bridge performance summary describes it (architecture columns as in
# the development set; no MLA width columns: the planner takes DeepSeek-V3's defaults).
DSV3_ROW = dict(source_id="synthetic", framework="Megatron-Bridge (NeMo, Megatron-Core)", model="DeepSeek-V3",
                arch_type="moe", attention="mla", layers="61", hidden="7168", heads="128", kv_heads="",
                ffn_hidden="18432", vocab="129280", moe_experts="256", moe_topk="8", moe_ffn_hidden="2048",
                moe_shared_experts="1", moe_dense_layers="3", seq_len="4096", micro_batch="1", cp="1",
                fsdp="0", act_recompute="", optimizations="")
# Megatron-Bridge layouts of DeepSeek-V3 (its performance summary: 1024 H100 TP 2 PP 8 VP 4 EP 64,
# GBS 8192; 256 GB200 PP 4 VP 4 EP 64, GBS 2048); the measured column only has to be present.
LAYOUTS = [dict(row_id="1", gpu_type="H100 SXM5 80GB", num_gpus="1024", tp="2", pp="8", vp="4", ep="64",
                global_batch="8192", precision="FP8-CS", tokens_per_s_per_gpu="1000"),
           dict(row_id="2", gpu_type="GB200 NVL72", num_gpus="256", tp="1", pp="4", vp="4", ep="64",
                global_batch="2048", precision="BF16", tokens_per_s_per_gpu="1000")]


def _write_csv(path, rows):
    with path.open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return path


def test_deepseek_v3_rows_are_priced_time_and_memory(tmp_path):
    path = _write_csv(tmp_path / "dsv3.csv", [DSV3_ROW | lay for lay in LAYOUTS])
    cases, skipped = read_cases(path)
    assert not skipped and len(cases) == 2 and all(isinstance(c, Case) for c in cases)
    for c in cases:
        m = c.workload.model
        assert (m.attention, m.n_kv_heads, m.mla_q_lora_rank, m.mla_kv_lora_rank) == ("mla", 128, 1536, 512)
        assert param_counts(m)["total"] == param_counts(DSV3)["total"]
        r = predict(c)
        assert math.isfinite(r.predicted_tokens_per_s_per_gpu) and r.predicted_tokens_per_s_per_gpu > 0
        assert math.isfinite(r.predicted_peak_mem_gib) and r.predicted_peak_mem_gib > 0
        assert r.moe and r.breakdown["compute"] > 0
    assert [r.skipped for r in validate_file(path)] == [None, None]


def test_tensor_parallel_splits_the_per_head_gemms_and_replicates_the_down_projections():
    T = 4096.0
    one, two = attention_gemms(DSV3, T, 1), attention_gemms(DSV3, T, 2)
    assert [g[0] for g in one] == ["wq_a", "wq_b", "wkv_a", "wkv_b", "wo"]
    for (name, *a), (_, *b) in zip(one, two):
        assert 2 * math.prod(b) == pytest.approx(math.prod(a)), name  # half the FLOPs on each of 2 ranks
        if name in ("wq_b", "wkv_b", "wo"):  # the heads split; the tokens do not
            assert b[0] == T
        else:  # wq_a, wkv_a: whole weights on the rank's half of the sequence (Megatron-Core, SP)
            assert (b[0], b[1:]) == (T / 2, a[1:])
    split = layer_split(param_counts(DSV3), False, DSV3)
    assert split.replicated == 7168 * 1536 + 7168 * 576  # wq_a + wkv_a are not split by tp


@pytest.mark.parametrize("layout", [
    Layout(1, 8, 1, 1, 1, micro_batch=1, ac="none"),
    Layout(1, 4, 2, 1, 1, micro_batch=1, ac="selective"),
    Layout(1, 2, 2, 1, 2, micro_batch=1, ac="full"),
    Layout(1, 4, 1, 2, 1, micro_batch=2, ac="op"),
])
def test_mla_estimates_are_finite_under_every_parallelism(layout):
    e = estimate(Workload(TINY, 256, 32, "fp8"), layout, get_hardware("h100_sxm"), Stack())
    assert math.isfinite(e.tokens_per_s_per_gpu) and e.tokens_per_s_per_gpu > 0
    assert math.isfinite(e.memory.total) and e.memory.activations > 0


def test_plan_search_prices_an_mla_model_and_write_config_refuses_it(tmp_path, capsys):
    model = tmp_path / "mla.toml"
    model.write_text('[model]\nattention = "mla"\nn_kv_heads = 4\nmla_q_lora_rank = 32\nmla_kv_lora_rank = 16\n'
                     'mla_qk_nope_dim = 16\nmla_qk_rope_dim = 8\nmla_v_dim = 16\n')
    args = ["plan", "search", "--model", str(model), "--gpus", "4", "--gpu", "h100_sxm", "--seq-len", "256",
            "--global-batch-tokens", "8k"]
    from scaletrain.cli import run

    assert run(args) == 0
    assert "tokens/s" in capsys.readouterr().out
    out = tmp_path / "best.toml"
    code, err = main_exit(capsys, *args, "--write-config", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--write-config" in err and "'mla'" in err and not out.exists()
