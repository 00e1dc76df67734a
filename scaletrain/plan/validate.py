"""Check the cost model against published training measurements.

`validate_file(path)` predicts tokens/s per GPU (and peak memory where a row has it) for
every row of a CSV in the format of published_training_perf_dev.csv whose model is dense
with a known architecture and whose layout is complete, using ONE global parameter set
(cost.PARAMS). Software differences enter only through `Stack` switches read from the
row's own description: fused kernels (torch.compile, Megatron/NeMo Transformer Engine) and
TP communication overlap (AsyncTP, --tp-comm-overlap, NeMo recipes).
"""

from __future__ import annotations

import re

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from scaletrain.config.schema import ModelConfig
from scaletrain.errors import ConfigError
from scaletrain.plan.cost import Layout, Stack, Workload, estimate
from scaletrain.plan.hardware import GiB, get_hardware


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


def _f(row: dict, key: str) -> float | None:
    v = (row.get(key) or "").strip()
    try:
        return float(v)
    except ValueError:
        return None


def _i(row: dict, key: str, default: int | None = None) -> int | None:
    v = _f(row, key)
    return int(v) if v is not None else default


def gpu_for(gpu_type: str) -> str | None:
    """Catalog name of a published `gpu_type` description, or None."""
    g = gpu_type.lower()
    if "v100" in g:
        return "v100_32gb"
    if "a100" in g:
        return "a100_40gb" if "40gb" in g else "a100_80gb"
    if "h100" in g:
        return "h100_hbm2e_500w" if "hbm2e" in g else "h100_sxm"
    if "h200" in g:
        return "h200"
    if "b200" in g and "gb200" not in g:
        return "b200"
    return None


def model_for(row: dict) -> ModelConfig | None:
    """ModelConfig of a row: Llama rows (kv_heads set) use SwiGLU; GPT/MPT rows a 2-matrix
    GELU FFN (same FLOPs and activation count as squared ReLU), 4*hidden when not given."""
    layers, hidden, heads = _i(row, "layers"), _i(row, "hidden"), _i(row, "heads")
    vocab = _i(row, "vocab")
    if not (layers and hidden and heads and vocab):
        return None
    kv = _i(row, "kv_heads", heads)
    ffn = _i(row, "ffn_hidden", 4 * hidden)
    llama = "llama" in row["model"].lower()
    mpt = "mpt" in row["model"].lower()
    return ModelConfig(flavor=row["model"], dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                       ffn_dim=ffn, vocab_size=vocab, max_seq_len=_i(row, "seq_len", 2048),
                       ffn="swiglu" if llama else "squared_relu", tie_embeddings=mpt)


def predict_row(row: dict) -> RowResult:
    """Predict one published row; `skipped` says why when it cannot."""
    r = RowResult(row["row_id"], row["source_id"], row["model"])
    gpus, seq = _i(row, "num_gpus"), _i(row, "seq_len")
    gb = _i(row, "global_batch")
    measured = _f(row, "tokens_per_s_per_gpu")
    step = _f(row, "step_time_s")
    if measured is None and step and gpus and seq and gb:
        measured = gb * seq / step / gpus  # derived from the printed step time
    r.measured_tokens_per_s_per_gpu = measured
    r.measured_peak_mem_gib = _f(row, "peak_mem_gib")
    model = model_for(row)
    hw_name = gpu_for(row["gpu_type"])
    tp, pp = _i(row, "tp"), _i(row, "pp")
    mb = _i(row, "micro_batch")
    if row.get("arch_type", "dense") != "dense" or model is None:
        r.skipped = "architecture not known (layers/hidden/heads/vocab missing) or not dense"
    elif hw_name is None:
        r.skipped = f"GPU '{row['gpu_type']}' not in the catalog"
    elif not (gpus and seq and gb and tp and pp and mb):
        r.skipped = "layout incomplete (GPU count, TP, PP, micro-batch or global batch missing)"
    elif measured is None:
        r.skipped = "no measured tokens/s per GPU or step time"
    if r.skipped:
        return r
    cp = _i(row, "cp", 1) or 1
    vp = _i(row, "vp", 1) or 1
    if gpus % (tp * pp * cp):
        r.skipped = "SOURCE-INCONSISTENT: TP*PP*CP does not divide the GPU count"
        return r
    dp = gpus // (tp * pp * cp)
    text = (row.get("optimizations", "") + " " + row.get("framework", "")).lower()
    fsdp = row["source_id"].startswith(("torchtitan", "llm_foundry")) or (_i(row, "fsdp", 0) or 0) > 1
    schedule = "interleaved_1f1b" if (vp > 1 or "interleave" in text) else "1f1b"
    if schedule == "interleaved_1f1b" and vp == 1:
        vp = 2  # torchtitan's interleaved 1F1B default: 2 stages per rank
    ac_raw = (row.get("act_recompute") or "none").lower()
    ac = "full" if ac_raw.startswith("full") else "selective" if ac_raw.startswith("selective") else "none"
    if ac == "selective" and re.search(r"\bop\b", ac_raw):
        ac = "op"  # torchtitan's op-level SAC: saves matmul outputs except every second mm (cost.py "op")
    prec_raw = row.get("precision", "").lower()
    precision = "fp8" if ("fp8" in prec_raw or "float8" in prec_raw) else "fp16" if hw_name == "v100_32gb" else "bf16"
    megatron = any(k in text for k in ("megatron", "nemo"))
    stack = Stack(fused="compile" in text or megatron,
                  tp_overlap=any(k in text for k in ("asynctp", "async tp", "tp-comm-overlap")) or "nemo" in text,
                  reshard_after_forward=False if "shard_grad_op" in text else None, fsdp=fsdp)
    layout = Layout(dp_replicate=1 if fsdp else dp, dp_shard=dp if fsdp else 1, tp=tp, pp=pp, cp=cp,
                    pp_schedule=schedule, virtual_stages=vp if schedule == "interleaved_1f1b" else 1,
                    micro_batch=mb, ac=ac)
    w = Workload(model, seq, gb, precision)
    est = estimate(w, layout, get_hardware(hw_name), stack)
    r.layout = layout.short()
    r.predicted_tokens_per_s_per_gpu = est.tokens_per_s_per_gpu
    r.rel_error = (est.tokens_per_s_per_gpu - measured) / measured
    r.predicted_peak_mem_gib = est.memory.total / GiB
    if r.measured_peak_mem_gib:
        r.mem_rel_error = (r.predicted_peak_mem_gib - r.measured_peak_mem_gib) / r.measured_peak_mem_gib
    return r


def validate_file(path: str | Path) -> list[RowResult]:
    """Predict every row of the published CSV at `path`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"published data file {p} does not exist.")
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "row_id" not in rows[0]:
        raise ConfigError(f"{p} is not a published-performance CSV (needs a row_id column).")
    return [predict_row(r) for r in rows]


def _pct(x: list[float], q: float) -> float:
    s = sorted(x)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summary(results: list[RowResult]) -> dict[str, float | int]:
    """Median / p90 absolute relative error of tokens/s per GPU (and of peak memory)."""
    errs = [abs(r.rel_error) for r in results if r.rel_error is not None]
    mem = [abs(r.mem_rel_error) for r in results if r.mem_rel_error is not None]
    out: dict[str, float | int] = {"rows": len(results), "predicted": len(errs),
                                   "skipped": len(results) - len(errs)}
    if errs:
        out |= {"median_abs_rel_error": statistics.median(errs), "p90_abs_rel_error": _pct(errs, 0.9),
                "within_25pct": sum(e <= 0.25 for e in errs) / len(errs)}
    if mem:
        out |= {"mem_rows": len(mem), "mem_median_abs_rel_error": statistics.median(mem)}
    return out


def format_results(results: list[RowResult]) -> str:
    lines = [f"{'row':>5} {'source':<28} {'model':<22} {'layout':<44} {'pred':>9} {'meas':>9} {'err':>7} {'mem p/m GiB':>13}"]
    for r in results:
        if r.skipped:
            continue
        mem = f"{r.predicted_peak_mem_gib:.1f}/{r.measured_peak_mem_gib:.1f}" if r.measured_peak_mem_gib else ""
        lines.append(f"{r.row_id:>5} {r.source_id[:28]:<28} {r.model[:22]:<22} {r.layout[:44]:<44} "
                     f"{r.predicted_tokens_per_s_per_gpu:9.0f} {r.measured_tokens_per_s_per_gpu:9.0f} "
                     f"{100 * r.rel_error:+6.1f}% {mem:>13}")
    s = summary(results)
    lines.append(f"rows {s['rows']}: predicted {s['predicted']}, skipped {s['skipped']}")
    if "median_abs_rel_error" in s:
        lines.append(f"tokens/s per GPU: median |rel error| {100 * s['median_abs_rel_error']:.1f}%, "
                     f"p90 {100 * s['p90_abs_rel_error']:.1f}%, within 25%: {100 * s['within_25pct']:.0f}% of rows")
    if "mem_rows" in s:
        lines.append(f"peak memory ({s['mem_rows']} rows): median |rel error| {100 * s['mem_median_abs_rel_error']:.1f}%")
    return "\n".join(lines)


def write_json(results: list[RowResult], path: str | Path) -> None:
    """One JSON object per row (a JSON list)."""
    Path(path).write_text(json.dumps([r.__dict__ for r in results], indent=1))
