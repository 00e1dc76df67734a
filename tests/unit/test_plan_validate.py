"""`plan validate` against the published development set shipped as package data
(scaletrain/plan/data/): row parsing, skip reasons, Stack switches, and the CLI."""

import csv
import json

import pytest

from conftest import main_exit
from scaletrain.plan.validate import case_for_row, dev_set_path, predict, read_rows, stack_for, summary, validate_file


@pytest.fixture(scope="module")
def rows():
    return read_rows()


def test_the_development_set_ships_with_the_package(rows):
    path = dev_set_path()
    assert path.is_file() and path.with_suffix(".md").is_file()
    assert "scaletrain" in path.parts and len(rows) >= 280 and "row_id" in rows[0]


def test_moe_rows_are_priced_as_moe_and_mla_rows_with_latent_attention(rows):
    moe = [r for r in rows if r["arch_type"] == "moe"]
    assert moe
    for r in moe:
        assert case_for_row(r).workload.model.moe_experts == int(r["moe_experts"])
    dense = next(r for r in rows if r["arch_type"] == "dense" and not isinstance(case_for_row(r), str))
    mla = case_for_row(dict(dense, attention="mla")).workload.model
    assert (mla.attention, mla.n_kv_heads, mla.qk_norm) == ("mla", mla.n_heads, False)


def test_rows_in_a_precision_without_rates_are_skipped_not_priced_at_another(rows):
    """An NVFP4 (or MXFP4, INT8) row must not be priced at the bf16 or fp8 rate: it is skipped
    and the reason names the precision."""
    llama = next(r for r in rows if r["model"] == "LLAMA3_8B" and r["gpu_type"] == "GB300")
    assert not isinstance(case_for_row(llama), str)
    for text in ("NVFP4", "MXFP4 (32-element blocks)", "int8"):
        reason = case_for_row(dict(llama, precision=text))
        assert isinstance(reason, str) and text in reason and "not in the cost model" in reason
    assert case_for_row(dict(llama, gpu_type="L40S (48GB)")).hw.name == "l40s"


def test_every_skip_names_its_reason_and_priced_rows_cover_today_s_gpus(rows):
    results = validate_file()
    assert all(r.skipped or r.rel_error is not None for r in results)
    gpus = {case_for_row(r).hw.name for r in rows if not isinstance(case_for_row(r), str)}
    assert {"gb200_nvl72", "gb300_nvl72", "b200", "h100_sxm", "a100_80gb"} <= gpus
    s = summary(results)
    assert s["predicted"] >= 250 and s["skipped"] <= 37
    dense = summary([r for r in results if not r.moe])
    assert dense["predicted"] >= 180 and dense["median_abs_rel_error"] < 0.07 and dense["p90_abs_rel_error"] < 0.2
    moe = summary([r for r in results if r.moe])
    assert moe["predicted"] >= 60 and moe["median_abs_rel_error"] < 0.2


def test_recompute_text_maps_to_the_ac_policy(rows):
    """torchtitan's op-level SAC rows get the cost model's "op" policy, selective (attention)
    rows "selective", full recompute "full"."""
    seen = {}
    for row in rows:
        c = case_for_row(row)
        if not isinstance(c, str):
            seen.setdefault((row.get("act_recompute") or "none").lower(), set()).add(c.layout.ac)
    assert seen["selective op"] == {"op"} and seen["selective (op, config default)"] == {"op"}
    assert all(v == {"full"} for k, v in seen.items() if k.startswith("full"))
    assert all(v == {"selective"} for k, v in seen.items() if k.startswith("selective") and " op" not in k
               and "(op" not in k)


@pytest.mark.parametrize("text, switches", [
    ({"framework": "NeMo (NeMo Launcher, Megatron-Core)"},
     dict(fused=True, tp_overlap=True, fused_attention=True, fsdp=False, cp_comm="ring")),
    ({"framework": "torchtitan (FSDP2/DTensor)", "optimizations": "FSDP + torch.compile + Float8"},
     dict(fused=True, fused_attention=False, fsdp=True, cp_comm="allgather_overlap")),
    ({"framework": "llm-foundry / Composer (PyTorch FSDP1)", "optimizations": "FSDP FULL_SHARD, MP mode PURE"},
     dict(fused=False, fsdp=True, grad_reduce_fp32=False)),
    ({"framework": "llm-foundry", "optimizations": "FSDP SHARD_GRAD_OP, MP mode DEFAULT"},
     dict(reshard_after_forward=False, grad_reduce_fp32=True)),
])
def test_stack_switches_come_from_the_software_a_row_names(text, switches):
    stack = stack_for({"optimizations": "", "framework": "", "precision": "", **text})
    for name, value in switches.items():
        assert getattr(stack, name) == value, name


def test_validate_cli_uses_the_shipped_set_and_writes_json(tmp_path, capsys, rows):
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
    text = capsys.readouterr().out
    assert "median |rel error|" in text and "skipped" in text
    assert run(["plan", "validate"]) == 0  # no path: the shipped development set
    assert "rows 287" in capsys.readouterr().out


def test_validate_cv_cli(capsys, tmp_path, rows):
    small = tmp_path / "two_sources.csv"
    keep = [r for r in rows if r["source_id"] in ("torchtitan_perf_md_2024", "torchtitan_bench_2412")]
    with small.open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(keep)
    from scaletrain.cli import run

    assert run(["plan", "validate", "--published", str(small), "--cv", "source"]) == 0
    out = capsys.readouterr().out
    assert "Leave-one-source-out" in out and "torchtitan_perf_md_2024" in out and "overall" in out


def test_missing_file_exits_2_with_one_line(capsys, tmp_path):
    code, err = main_exit(capsys, "plan", "validate", "--published", str(tmp_path / "nope.csv"))
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_family_head_widths_for_models_without_a_flavor(rows):
    """Qwen3-235B-A22B (hidden 4096, 64 heads of 128) and gpt-oss-20b (hidden 2880, 64 heads of
    64) have no registered flavor: their head width comes from the family, not hidden / heads."""
    qwen = next(r for r in rows if r["model"].startswith("Qwen3_30B"))
    big = dict(qwen, model="Qwen3 235B-A22B", layers="94", hidden="4096", heads="64", kv_heads="4", ffn_hidden="12288",
               moe_ffn_hidden="1536")
    m = case_for_row(big).workload.model
    assert (m.head_dim, m.qk_norm, m.dim, m.n_heads) == (128, True, 4096, 64)
    oss = next(r for r in rows if r["model"] == "GPT OSS 120B")
    small = dict(oss, model="GPT-OSS 20B", layers="24", moe_experts="32", num_gpus="8", ep="8")
    m = case_for_row(small).workload.model
    assert (m.head_dim, m.qk_norm, m.n_layers) == (64, False, 24)
    llama = next(r for r in rows if r["model"] == "LLAMA3_8B")
    assert case_for_row(dict(llama, model="LLAMA3 8B variant", layers="33")).workload.model.head_dim == 0  # dim / heads


def test_damaged_or_unusual_rows_are_skipped_with_a_reason_never_crash(rows):
    """Held-out CSVs come from other hands: numbers that are missing, zero, negative, NaN,
    infinite or text, and layouts no run could have (pp deeper than the layers, CP not dividing
    the sequence) give a skip reason or a prediction, never an exception."""
    import random

    rng = random.Random(0)
    keys = ["num_gpus", "tp", "pp", "cp", "vp", "ep", "micro_batch", "global_batch", "seq_len", "layers", "hidden",
            "heads", "kv_heads", "ffn_hidden", "vocab", "moe_experts", "moe_topk", "moe_dense_layers",
            "tokens_per_s_per_gpu", "step_time_s", "precision", "gpu_type", "arch_type"]
    values = ["", "0", "-1", "nan", "inf", "n/a", "1.5", "3", "999999", "1", "2 (x)"]
    for _ in range(300):
        row = dict(rng.choice(rows), **{rng.choice(keys): rng.choice(values) for _ in range(rng.randint(1, 3))})
        case = case_for_row(row)
        if isinstance(case, str):
            assert case
        else:
            r = predict(case)
            assert r.predicted_tokens_per_s_per_gpu > 0 and r.rel_error is not None
    llama = next(r for r in rows if r["model"] == "LLAMA3_8B")
    assert "8 pipeline stages for 4 layers" in case_for_row(dict(llama, layers="4", pp="8", tp="1"))
    assert "CP 8 does not divide" in case_for_row(dict(llama, cp="8", seq_len="8188", tp="1"))


def test_a_csv_without_the_required_columns_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "rows.csv"
    path.write_text("row_id,model\n1,x\n")
    code, err = main_exit(capsys, "plan", "validate", "--published", str(path))
    assert code == 2 and "source_id, gpu_type" in err and len(err.strip().splitlines()) == 1
    binary = tmp_path / "table.xlsx"
    binary.write_bytes(b"PK\x03\x04\xd0\xcf\x11\xe0" * 64)
    code, err = main_exit(capsys, "plan", "validate", "--published", str(binary))
    assert code == 2 and "not a UTF-8 CSV" in err and len(err.strip().splitlines()) == 1
    code, err = main_exit(capsys, "plan", "validate", "--published", str(tmp_path))
    assert code == 2 and "it is a folder" in err


def test_a_row_naming_cuda_graphs_exposes_no_host_launch_time(rows):
    """Megatron-Bridge's newer MoE presets capture the router and the dispatcher's preprocessing
    in CUDA graphs; a row that says so is priced without the MoE layer's host time."""
    import dataclasses

    from scaletrain.plan.cost import PARAMS

    qwen = next(r for r in rows if r["model"].startswith("Qwen3_30B") and r["gpu_type"] == "GB200")
    plain, graphs = case_for_row(qwen), case_for_row(dict(qwen, optimizations="CUDA graphs (moe_router, moe_preprocess)"))
    assert graphs.stack.cuda_graphs and not plain.stack.cuda_graphs
    no_host = predict(plain, dataclasses.replace(PARAMS, moe_host_scale=0.0)).predicted_tokens_per_s_per_gpu
    assert predict(graphs).predicted_tokens_per_s_per_gpu == pytest.approx(no_host)
    assert no_host > 1.2 * predict(plain).predicted_tokens_per_s_per_gpu


def test_a_csv_saved_with_a_byte_order_mark_reads_like_any_other(tmp_path):
    src = dev_set_path().read_text(encoding="utf-8")
    path = tmp_path / "bom.csv"
    path.write_text("\ufeff" + src, encoding="utf-8")
    assert [r["row_id"] for r in read_rows(path)] == [r["row_id"] for r in read_rows()]


def test_fp8_recipes_named_by_the_precision_text(rows):
    """Block-scaled (DeepSeek-style, Megatron subchannel) and row-wise fp8 are their own recipes
    with their own cast bytes; the 25.09 rows' footnote text ("block-scaled ... per footnote") is
    not a recipe name and stays per-tensor."""
    h100 = next(r for r in rows if r["model"] == "LLAMA3_8B" and r["gpu_type"] == "H100")
    for text, recipe in (("FP8-SS", "blockwise"), ("fp8 blockwise (1x128)", "blockwise"), ("FP8 rowwise", "rowwise"),
                         ("FP8-CS", "tensorwise"), ("FP8-MX", "mxfp8")):
        case = case_for_row(dict(h100, precision=text))
        assert isinstance(case, str) if recipe == "mxfp8" else case.workload.fp8_recipe == recipe
    footnote = next(r for r in rows if "per footnote" in r["precision"])
    assert case_for_row(footnote).workload.fp8_recipe == "tensorwise"


def test_ffn_kind_and_tied_embeddings_follow_the_model_family(rows):
    """A gated FFN has three matrices, a GELU/ReLU one two: pricing a Qwen or Mistral row with two
    would miss a third of its FFN. Families decide; an unknown model is gated unless its FFN is
    exactly 4 x hidden."""
    llama = next(r for r in rows if r["model"] == "LLAMA3_8B")
    base = dict(llama, layers="33")  # no registered flavor has this shape

    def kind(model, ffn):
        m = case_for_row(dict(base, model=model, ffn_hidden=str(ffn))).workload.model
        return m.ffn, m.tie_embeddings

    assert kind("Qwen2.5 72B", 29568) == ("swiglu", False)
    assert kind("Mistral-7B", 14336) == ("swiglu", False)
    assert kind("Gemma 7B", 24576) == ("swiglu", True)
    assert kind("Falcon 40B", 16384) == ("squared_relu", False)
    assert kind("Nemotron-4 15B", 16384) == ("squared_relu", False)
    assert kind("Llama-3.1-Nemotron 70B", 14336) == ("swiglu", False)
    assert kind("FooLM 7B", 11008) == ("swiglu", False)
    assert kind("FooLM 7B", 16384) == ("squared_relu", False)
    assert kind("MPT-7b", 16384) == ("squared_relu", True)


def test_activation_checkpointing_text_in_its_common_spellings(rows):
    llama = next(r for r in rows if r["model"] == "LLAMA3_8B")
    for text, ac in (("full", "full"), ("Full (uniform, 1 layer)", "full"), ("block", "full"), ("yes", "full"),
                     ("selective", "selective"), ("selective (op, config default)", "op"), ("partial", "selective"),
                     ("none", "none"), ("no", "none"), ("", "none"), ("off", "none")):
        assert case_for_row(dict(llama, act_recompute=text)).layout.ac == ac, text


def test_stack_switches_from_the_common_spellings_of_what_a_row_names(rows):
    llama = next(r for r in rows if r["model"] == "LLAMA3_8B")
    plain = dict(llama, framework="PyTorch", optimizations="")
    for text in ("Async-TP", "async_tp", "AsyncTP", "--tp-comm-overlap"):
        assert stack_for(dict(plain, optimizations=text)).tp_overlap, text
    for text in ("DeepSpeed ZeRO-3", "ZeRO stage 3", "HSDP", "FSDP2"):
        assert stack_for(dict(plain, optimizations=text)).fsdp, text
    for text in ("DeepSpeed ZeRO-1", "DDP"):
        assert not stack_for(dict(plain, optimizations=text)).fsdp, text


def test_the_global_batch_comes_from_its_tokens_when_only_they_are_given(rows):
    llama = next(r for r in rows if r["model"] == "LLAMA3_8B")
    case = case_for_row(llama)
    tokens = str(case.workload.global_batch * case.workload.seq_len)
    assert case_for_row(dict(llama, global_batch="", global_batch_tokens=tokens)).workload == case.workload


def test_the_measured_throughput_from_a_total_or_a_step_time(rows):
    from scaletrain.plan.validate import measured_tokens

    llama = next(r for r in rows if r["model"] == "LLAMA3_8B")
    per_gpu, gpus = float(llama["tokens_per_s_per_gpu"]), int(llama["num_gpus"])
    assert measured_tokens(dict(llama, tokens_per_s_per_gpu="", tokens_per_s_total=str(per_gpu * gpus))) == pytest.approx(per_gpu)
    step = int(llama["global_batch"]) * int(llama["seq_len"]) / (per_gpu * gpus)
    only_step = dict(llama, tokens_per_s_per_gpu="", tokens_per_s_total="", step_time_s=str(step))
    assert measured_tokens(only_step) == pytest.approx(per_gpu)
