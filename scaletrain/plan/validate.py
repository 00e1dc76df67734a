"""Check the cost model against published training measurements.

`read_cases(path)` turns every row of a CSV in the format of published_training_perf_dev.csv
(a copy ships in scaletrain/plan/data/) into a `Case` -- the workload, layout, hardware and
software `Stack` the row describes -- or a skip with its reason (an unknown architecture, GPU
or layout). Dense and MoE rows, with grouped-query or multi-head latent attention, are
priced. `predict(case, params)` prices a case with ONE global parameter
set; `validate_file` does both with the fitted default (cost.PARAMS). Software differences
enter only through `Stack` switches read from the row's own description of its software
(docs/planner.md lists every switch and the words that set it); nothing is keyed on a source.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from scaletrain.config.schema import ModelConfig, head_dim_of
from scaletrain.errors import ConfigError
from scaletrain.plan.cost import PARAMS, Layout, Params, Stack, Workload, estimate
from scaletrain.plan.cost_moe import check_ep
from scaletrain.plan.hardware import GiB, Hardware, get_hardware

DEV_SET = "published_training_perf_dev.csv"


def dev_set_path() -> Path:
    """The development set shipped as package data (scaletrain/plan/data/)."""
    return Path(str(resources.files("scaletrain.plan").joinpath("data", DEV_SET)))


@dataclass(frozen=True)
class Case:
    """One priceable published row: what ran, on what, and what it measured."""

    row_id: str
    source_id: str
    model: str
    workload: Workload
    layout: Layout
    hw: Hardware
    stack: Stack
    measured_tokens_per_s_per_gpu: float
    measured_peak_mem_gib: float | None = None
    arch: tuple = ()  # (layers, dim, heads, kv heads, ffn, vocab, experts, top-k, expert ffn[, "mla"]): one model whatever the row calls it


@dataclass
class RowResult:
    row_id: str
    source_id: str
    model: str
    predicted_tokens_per_s_per_gpu: float | None = None
    measured_tokens_per_s_per_gpu: float | None = None
    rel_error: float | None = None
    predicted_peak_mem_gib: float | None = None
    measured_peak_mem_gib: float | None = None
    mem_rel_error: float | None = None
    layout: str = ""
    skipped: str | None = None
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds per step by cause
    moe: bool = False  # a mixture-of-experts model (summaries report dense and MoE rows apart)


def _f(row: dict, key: str) -> float | None:
    """The row's number in column `key`, or None when it is missing, not a number, not finite or
    negative (no column of a published run is negative)."""
    v = (row.get(key) or "").strip()
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) and x >= 0 else None


def _i(row: dict, key: str, default: int | None = None) -> int | None:
    v = _f(row, key)
    return int(v) if v is not None else default


def gpu_for(gpu_type: str) -> str | None:
    """Catalog name of a published `gpu_type` description, or None."""
    g = gpu_type.lower()
    for needle, name in (("gb300", "gb300_nvl72"), ("gb200", "gb200_nvl72"), ("b300", "b300"), ("b200", "b200"),
                         ("h200", "h200"), ("v100", "v100_32gb"), ("mi300x", "mi300x"), ("l40s", "l40s")):
        if needle in g:
            return name
    if "a100" in g:
        return "a100_40gb" if "40gb" in g else "a100_80gb"
    if "h100" in g:
        return "h100_hbm2e_500w" if "hbm2e" in g else "h100_pcie" if "pcie" in g else "h100_sxm"
    return None


def model_for(row: dict) -> ModelConfig | None:
    """ModelConfig of a row: a gated FFN (SwiGLU/GeGLU: three matrices) for MoE rows and the
    gated families (GATED_FAMILIES), a 2-matrix FFN (GELU, ReLU or squared ReLU: same FLOPs and
    activation count) for the non-gated ones (PLAIN_FAMILIES); a model of neither family is
    gated unless its FFN is exactly 4 x hidden (the width every non-gated family uses; gated
    models shrink it to ~8/3 x or widen it, as Gemma's 8 x). 4*hidden when not given. MoE rows add
    their experts (moe_experts, moe_topk, moe_ffn_hidden, moe_shared_experts, moe_dense_layers).
    The CSV has no head width: where a registered flavor has the row's shape (the models the
    rows name, cited in model/flavors.py) its head_dim and q/k norms are taken, else
    hidden / heads (what every dense row's model has). A row whose `attention` is `mla` gets
    multi-head latent attention with DeepSeek-V3's widths (ModelConfig's mla_* defaults: the CSV
    has no MLA width columns; a DeepSeek-V2-Lite-style model without query compression would
    need mla_q_lora_rank = 0) and one kv head per query head (MLA shares none)."""
    layers, hidden, heads = _i(row, "layers"), _i(row, "hidden"), _i(row, "heads")
    vocab = _i(row, "vocab")
    if not (layers and hidden and heads and vocab):
        return None
    mla = (row.get("attention") or "gqa").lower() == "mla"
    kv = heads if mla else _i(row, "kv_heads", heads)
    ffn = _i(row, "ffn_hidden", 4 * hidden)
    moe = row.get("arch_type", "dense") == "moe"
    name = re.sub(r"[\s_-]+", "", row["model"].lower())
    plain = any(f in name for f in PLAIN_FAMILIES) and not any(f in name for f in GATED_FAMILIES)
    gated = moe or any(f in name for f in GATED_FAMILIES) or (not plain and ffn != 4 * hidden)
    tied = any(f in name for f in TIED_FAMILIES)
    experts = dict(moe_experts=_i(row, "moe_experts", 0), moe_top_k=_i(row, "moe_topk", 0),
                   moe_ffn_dim=_i(row, "moe_ffn_hidden", 0), moe_shared_experts=_i(row, "moe_shared_experts", 0),
                   moe_dense_layers=_i(row, "moe_dense_layers", 0)) if moe else {}
    cfg = ModelConfig(flavor=row["model"], dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                      ffn_dim=ffn, vocab_size=vocab, max_seq_len=_i(row, "seq_len", 2048),
                      ffn="swiglu" if gated else "squared_relu", tie_embeddings=tied,
                      attention="mla" if mla else "gqa", **experts)
    if mla:  # DeepSeek-V3's widths (ModelConfig's defaults); never a registered flavor
        return cfg
    known = flavor_like(cfg)
    if known:
        return dataclasses.replace(cfg, head_dim=known.head_dim, qk_norm=known.qk_norm)
    for family, (head_dim, qk_norm) in FAMILY_HEADS.items():
        if family in name:
            return dataclasses.replace(cfg, head_dim=head_dim, qk_norm=qk_norm)
    return cfg


# FFN kind by model family (names matched with spaces, '_' and '-' removed): gated FFNs
# (SwiGLU / GeGLU, three matrices) in Llama, Mistral/Mixtral, Qwen, DeepSeek, Gemma, Phi-3/4,
# InternLM, OLMo, Baichuan, Granite, GLM, Kimi, DBRX, Arctic; two matrices in GPT-2/3/NeoX/J,
# MPT, BLOOM, OPT, Falcon, StarCoder, Pythia and Nemotron-4 (squared ReLU). Tied input and
# output embeddings: MPT, Gemma.
GATED_FAMILIES = ("llama", "mistral", "mixtral", "qwen", "deepseek", "gemma", "phi3", "phi4", "internlm",
                  "olmo", "baichuan", "granite", "glm", "kimi", "dbrx", "arctic")
PLAIN_FAMILIES = ("gpt", "mpt", "bloom", "opt", "falcon", "starcoder", "pythia", "nemotron")
TIED_FAMILIES = ("mpt", "gemma")


# Model families whose attention heads are not hidden / heads wide, for the rows of family
# members no registered flavor has (the CSV has no head-width column): every Qwen3 model has
# 128-wide heads with q/k RMSNorms (Qwen3 config.json: head_dim 128, e.g. Qwen3-235B-A22B with
# hidden 4096 and 64 heads), every GPT-OSS model 64-wide heads (gpt-oss-20b / -120b config.json:
# head_dim 64 with hidden 2880). Matched on the model name with spaces, '_' and '-' removed.
FAMILY_HEADS: dict[str, tuple[int, bool]] = {"qwen3": (128, True), "gptoss": (64, False)}


SHAPE = ("n_layers", "dim", "n_heads", "n_kv_heads", "vocab_size", "moe_experts", "moe_top_k", "moe_ffn_dim")


def flavor_like(cfg: ModelConfig) -> ModelConfig | None:
    """The registered flavor with `cfg`'s shape (SHAPE fields), or None."""
    from scaletrain.config.flavors import FLAVORS, model_config_for

    for name in FLAVORS:
        f = model_config_for(name)
        if all(getattr(f, k) == getattr(cfg, k) for k in SHAPE):
            return f
    return None


def precision_for(row: dict, hw_name: str) -> tuple[str, str]:
    """(precision, fp8 recipe) from the row's precision text. fp8 recipes: "tensorwise" (current
    per-tensor scaling: torchao Float8, Megatron-Bridge FP8-CS), "delayed" (Transformer Engine's
    amax-history scaling, its default before 2025: NeMo 24.x, llm-foundry), "mxfp8" (32-element
    block scales, Blackwell), "blockwise" (1x128 / 128x128 block scales: DeepSeek-V3's recipe,
    Megatron's "FP8-SS" subchannel scaling; torchao's "rowwise" is per-row)."""
    text = row.get("precision", "").lower()
    if "mxfp8" in text or "fp8-mx" in text:
        return "fp8", "mxfp8"
    if re.search(r"blockwise|block-wise|subchannel|sub-channel|fp8-ss|fp8-blk|fp8-ds|deepseek", text):
        return "fp8", "blockwise"
    if "rowwise" in text or "row-wise" in text:
        return "fp8", "rowwise"
    if "fp8" in text or "float8" in text:
        te = any(k in (row.get("framework", "") + " " + text).lower() for k in ("nemo", "transformerengine"))
        current = "-cs" in text or "per-tensor" in text or "megatron-bridge" in row.get("framework", "").lower()
        return "fp8", "delayed" if te and not current else "tensorwise"
    return ("fp16" if hw_name == "v100_32gb" else "bf16"), "tensorwise"


# Precisions the cost model has no rates or cast terms for: a row in one of them is skipped with
# its reason rather than priced at another precision's rate (4-bit GEMMs run at 2-3x the fp8 peak
# on Blackwell, with their own block-scale and Hadamard-transform passes).
UNPRICED_PRECISIONS = ("nvfp4", "mxfp4", "fp4", "fp6", "int8", "int4")


def unpriced_precision(row: dict) -> str | None:
    """The skip reason of a row whose precision the cost model does not price, or None."""
    text = row.get("precision", "").lower()
    for name in UNPRICED_PRECISIONS:
        if name in text:
            return (f"precision {row['precision']!r} is not in the cost model (it prices bf16/fp16/fp32 "
                    "and fp8 tensorwise, rowwise, blockwise, mxfp8)")
    return None


def stack_for(row: dict) -> Stack:
    """The software switches a row names (docs/planner.md "Stack switches")."""
    text = " ".join(row.get(k, "") for k in ("optimizations", "framework", "precision")).lower()
    megatron = any(k in text for k in ("megatron", "nemo"))  # Megatron-Core with Transformer Engine
    # sharded weights: FSDP/HSDP, torchtitan, llm-foundry, DeepSpeed ZeRO stage 3 (ZeRO-1/2 shard only the
    # optimizer state / gradients: DDP-like communication)
    zero3 = re.search(r"zero[\s_-]*(stage[\s_-]*)?3", text) is not None
    fsdp = (any(k in text for k in ("fsdp", "hsdp", "torchtitan", "llm-foundry")) or zero3) and "megatron" not in text \
        or (_i(row, "fsdp", 0) or 0) > 1
    return Stack(fused="compile" in text or megatron,
                 tp_overlap=bool(re.search(r"async[\s_-]*tp|tp[\s_-]*comm[\s_-]*overlap", text)) or "nemo" in text,
                 reshard_after_forward=False if "shard_grad_op" in text else None, fsdp=fsdp,
                 fused_attention=megatron, grad_reduce_fp32="mp mode pure" not in text, moe_folding=megatron,
                 cuda_graphs=bool(re.search(r"cuda[ _-]?graph|cudagraph|reduce-overhead", text)),
                 cp_comm="ring" if megatron else "allgather_overlap" if "torchtitan" in text else "allgather")


def global_batch(row: dict) -> int | None:
    """Sequences per optimizer step: the `global_batch` column, else `global_batch_tokens` /
    `seq_len` when that divides exactly."""
    gb = _i(row, "global_batch")
    tokens, seq = _i(row, "global_batch_tokens"), _i(row, "seq_len")
    if not gb and tokens and seq and tokens % seq == 0:
        gb = tokens // seq
    return gb


def measured_tokens(row: dict) -> float | None:
    gpus, seq, gb = _i(row, "num_gpus"), _i(row, "seq_len"), global_batch(row)
    measured = _f(row, "tokens_per_s_per_gpu")
    step = _f(row, "step_time_s")
    total = _f(row, "tokens_per_s_total")
    if not measured and total and gpus:
        measured = total / gpus  # the whole job's throughput, per GPU
    if not measured and step and gpus and seq and gb:
        measured = gb * seq / step / gpus  # derived from the printed step time
    return measured or None  # a throughput of 0 is no measurement


def architecture_inconsistent(m: ModelConfig) -> str | None:
    """Why the row's architecture cannot be a model (None when it can): widths that are zero, kv
    heads that do not divide the heads, more experts per token than experts."""
    if min(m.n_kv_heads, m.ffn_dim, head_dim_of(m)) <= 0 or m.n_heads % m.n_kv_heads:
        return f"hidden {m.dim}, {m.n_heads} heads, {m.n_kv_heads} kv heads, FFN width {m.ffn_dim}"
    if m.moe_experts and not (0 < m.moe_top_k <= m.moe_experts and m.moe_dense_layers < m.n_layers):
        return f"top-{m.moe_top_k} of {m.moe_experts} experts, {m.moe_dense_layers} of {m.n_layers} layers dense"
    return None


def case_for_row(row: dict) -> Case | str:
    """The row as a Case, or the reason it cannot be priced."""
    if row.get("arch_type", "dense") not in ("dense", "moe"):
        return f"architecture type {row['arch_type']!r} is not in the cost model"
    model = model_for(row)
    if model is None:
        return "architecture not given (layers, hidden, heads or vocab missing)"
    if why := architecture_inconsistent(model):
        return f"architecture inconsistent: {why}"
    if row.get("arch_type") == "moe" and not (model.moe_experts and model.moe_top_k):
        return "MoE architecture not given (moe_experts or moe_topk missing)"
    hw_name = gpu_for(row["gpu_type"])
    if hw_name is None:
        return f"GPU '{row['gpu_type']}' not in the catalog"
    if reason := unpriced_precision(row):
        return reason
    gpus, seq, gb = _i(row, "num_gpus"), _i(row, "seq_len"), global_batch(row)
    tp, pp, mb = _i(row, "tp"), _i(row, "pp"), _i(row, "micro_batch")
    cp, vp = _i(row, "cp", 1) or 1, _i(row, "vp", 1) or 1
    text = (row.get("optimizations", "") + " " + row.get("framework", "")).lower()
    if mb is None and pp and pp > 1 and "torchtitan" in text and _i(row, "local_batch"):
        # torchtitan at the benchmark commit splits the local batch into pp micro-batches
        # (torchtitan/parallelisms/pipelining_utils.py: n_microbatches defaults to the pp degree)
        mb = _i(row, "local_batch") // pp
    if not (gpus and seq and gb and tp and pp and mb):
        return "layout incomplete (GPU count, TP, PP, micro-batch or global batch missing)"
    measured = measured_tokens(row)
    if measured is None:
        return "no measured tokens/s per GPU or step time"
    if gpus % (tp * pp * cp):
        return "source inconsistent: TP*PP*CP does not divide the GPU count"
    if seq % cp:
        return f"source inconsistent: CP {cp} does not divide the {seq}-token sequence"
    if pp * (vp if vp > 1 else 1) > model.n_layers:
        return f"source inconsistent: {pp * vp} pipeline stages for {model.n_layers} layers"
    hw = get_hardware(hw_name)
    precision, recipe = precision_for(row, hw_name)
    if precision == "fp8" and not (hw.fp8_recipes and (recipe == "delayed" or recipe in hw.fp8_recipes)):
        return f"{recipe} fp8 does not run on {hw_name}"
    dp = gpus // (tp * pp * cp)
    stack = stack_for(row)
    schedule = "interleaved_1f1b" if (vp > 1 or "interleave" in text) else "1f1b"
    if schedule == "interleaved_1f1b" and vp == 1:
        vp = 2  # torchtitan's interleaved 1F1B default: 2 stages per rank
    ac_raw = (row.get("act_recompute") or "none").lower()
    # "full", Megatron's "uniform"/"block" methods, a bare yes -> full; "selective"/"partial"/SAC -> selective
    if re.search(r"selective|partial|\bsac\b", ac_raw):
        ac = "selective"
    elif re.search(r"full|uniform|block|\byes\b|\btrue\b|enabled|\bon\b", ac_raw):
        ac = "full"
    else:
        ac = "none"
    if ac == "selective" and re.search(r"\bop\b", ac_raw):
        ac = "op"  # torchtitan's op-level SAC: saves matmul outputs except every second mm (cost.py "op")
    layout = Layout(dp_replicate=1 if stack.fsdp else dp, dp_shard=dp if stack.fsdp else 1, tp=tp, pp=pp, cp=cp,
                    pp_schedule=schedule, virtual_stages=vp if schedule == "interleaved_1f1b" else 1,
                    micro_batch=mb, ac=ac, ep=_i(row, "ep", 1) or 1)
    why = check_ep(model, layout, stack)
    if why:
        return f"source inconsistent: {why}"
    arch = (model.n_layers, model.dim, model.n_heads, model.n_kv_heads, model.ffn_dim, model.vocab_size,
            model.moe_experts, model.moe_top_k, model.moe_ffn_dim) + (("mla",) if model.attention == "mla" else ())
    return Case(row["row_id"], row["source_id"], row["model"], Workload(model, seq, gb, precision, recipe), layout,
                hw, stack, measured, _f(row, "peak_mem_gib"), arch)


def predict(case: Case, p: Params = PARAMS) -> RowResult:
    """Price one case with parameter set `p`."""
    est = estimate(case.workload, case.layout, case.hw, case.stack, p)
    r = RowResult(case.row_id, case.source_id, case.model, est.tokens_per_s_per_gpu,
                  case.measured_tokens_per_s_per_gpu, layout=case.layout.short(), moe=case.workload.model.moe_experts > 0)
    r.rel_error = (est.tokens_per_s_per_gpu - case.measured_tokens_per_s_per_gpu) / case.measured_tokens_per_s_per_gpu
    r.predicted_peak_mem_gib = est.memory.total / GiB
    r.measured_peak_mem_gib = case.measured_peak_mem_gib
    if case.measured_peak_mem_gib:
        r.mem_rel_error = (r.predicted_peak_mem_gib - case.measured_peak_mem_gib) / case.measured_peak_mem_gib
    t = est.time
    r.breakdown = {"compute": t.compute, "bubble": t.bubble, "overhead": t.overhead, "optimizer": t.optimizer,
                   **{f"{k} comm": v for k, v in t.exposed.items()}}
    return r


def read_rows(path: str | Path | None = None) -> list[dict]:
    """Rows of a published-performance CSV (default: the shipped development set)."""
    p = Path(path) if path else dev_set_path()
    if not p.is_file():
        raise ConfigError(f"published data file {p} does not exist" + (" (it is a folder)." if p.is_dir() else "."))
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte-order mark is not part of row_id
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{p} is not a UTF-8 CSV file ({e.__class__.__name__}: {e}); export the table as CSV "
                          "(UTF-8) with the development set's columns.") from None
    if not rows or "row_id" not in rows[0]:
        raise ConfigError(f"{p} is not a published-performance CSV (needs a row_id column).")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise ConfigError(f"{p} lacks the column(s) {', '.join(missing)}; a published-performance CSV has the "
                          f"columns of the shipped development set ({dev_set_path().name}).")
    return rows


# Columns every published-performance CSV must have (the others may be absent: a row then lacks
# that figure and is priced without it or skipped with the reason).
REQUIRED_COLUMNS = ("row_id", "source_id", "model", "gpu_type")


def read_cases(path: str | Path | None = None) -> tuple[list[Case], list[RowResult]]:
    """(priceable cases, skipped rows with their reason) of a published CSV."""
    cases, skipped = [], []
    for row in read_rows(path):
        c = case_for_row(row)
        if isinstance(c, Case):
            cases.append(c)
        else:
            skipped.append(RowResult(row["row_id"], row["source_id"], row["model"],
                                     measured_tokens_per_s_per_gpu=measured_tokens(row), skipped=c,
                                     moe=row.get("arch_type") == "moe"))
    return cases, skipped


def validate_file(path: str | Path | None = None, p: Params = PARAMS) -> list[RowResult]:
    """Predict every row of the published CSV at `path` (default: the shipped development set)."""
    cases, skipped = read_cases(path)
    by_id = {r.row_id: r for r in [predict(c, p) for c in cases] + skipped}
    return [by_id[row["row_id"]] for row in read_rows(path)]


def pct(x: list[float], q: float) -> float:
    """The q-quantile of x (nearest rank)."""
    s = sorted(x)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summary(results: list[RowResult]) -> dict[str, float | int]:
    """Median / p90 absolute relative error of tokens/s per GPU (and of peak memory)."""
    errs = [abs(r.rel_error) for r in results if r.rel_error is not None]
    mem = [abs(r.mem_rel_error) for r in results if r.mem_rel_error is not None]
    out: dict[str, float | int] = {"rows": len(results), "predicted": len(errs),
                                   "skipped": len(results) - len(errs)}
    if errs:
        out |= {"median_abs_rel_error": statistics.median(errs), "p90_abs_rel_error": pct(errs, 0.9),
                "within_25pct": sum(e <= 0.25 for e in errs) / len(errs)}
    if mem:
        out |= {"mem_rows": len(mem), "mem_median_abs_rel_error": statistics.median(mem)}
    return out


def format_results(results: list[RowResult]) -> str:
    lines = [f"{'row':>5} {'source':<28} {'model':<22} {'layout':<44} {'predicted':>9} {'measured':>9} "
             f"{'error':>7} {'memory GiB pred/meas':>20}"]
    for r in results:
        if r.skipped:
            continue
        mem = f"{r.predicted_peak_mem_gib:.1f}/{r.measured_peak_mem_gib:.1f}" if r.measured_peak_mem_gib else ""
        lines.append(f"{r.row_id:>5} {r.source_id[:28]:<28} {r.model[:22]:<22} {r.layout[:44]:<44} "
                     f"{r.predicted_tokens_per_s_per_gpu:9.0f} {r.measured_tokens_per_s_per_gpu:9.0f} "
                     f"{100 * r.rel_error:+6.1f}% {mem:>20}")
    s = summary(results)
    lines.append("(tokens/s per GPU; error = (predicted - measured) / measured)")
    reasons: dict[str, int] = {}
    for r in results:
        if r.skipped:
            reasons[r.skipped] = reasons.get(r.skipped, 0) + 1
    lines.append(f"rows {s['rows']}: predicted {s['predicted']}, skipped {s['skipped']}")
    lines += [f"  skipped {n:>3}: {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    for kind, rows in (("all", results), ("dense", [r for r in results if not r.moe]),
                       ("MoE", [r for r in results if r.moe])):
        k = summary(rows)
        if "median_abs_rel_error" in k and (kind == "all" or k["predicted"] < s["predicted"]):
            lines.append(f"tokens/s per GPU, {kind} rows ({k['predicted']}): median |rel error| "
                         f"{100 * k['median_abs_rel_error']:.1f}%, p90 {100 * k['p90_abs_rel_error']:.1f}%, "
                         f"within 25%: {100 * k['within_25pct']:.0f}% of rows")
    if "mem_rows" in s:
        lines.append(f"peak memory ({s['mem_rows']} rows): median |rel error| {100 * s['mem_median_abs_rel_error']:.1f}%")
    return "\n".join(lines)


def write_json(results: list[RowResult], path: str | Path) -> None:
    """One JSON object per row (a JSON list)."""
    Path(path).write_text(json.dumps([r.__dict__ for r in results], indent=1))
