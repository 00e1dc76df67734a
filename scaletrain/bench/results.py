"""Benchmark results: one JSON object per line, appended, plus the printed report.

Every row carries what docs/benchmarks.md must state for a result: date (UTC), device name,
torch / CUDA versions, git revision, and the exact command line.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

GiB = 2**30


def environment() -> dict[str, Any]:
    """Identity of the machine and software a result was measured with."""
    from scaletrain.train.runinfo import git_info

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device_name": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "git": git_info(), "cpu_threads": torch.get_num_threads(),
            "command": "scaletrain " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            if Path(sys.argv[0]).name in ("scaletrain", "__main__.py") else " ".join(map(shlex.quote, sys.argv))}


def append_result(path: str | Path, row: dict[str, Any]) -> Path:
    """Append `row` as one JSON line to `path` (created with its folder when missing); the line
    is written with one write call and fsynced, so a crash never leaves half a row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, default=str, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a results file (blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_report(r: dict[str, Any]) -> str:
    """The human-readable report of one bench result."""
    c = r["config"]
    lines = [
        f"bench {c['model']} ({c['params'] / 1e6:,.1f}M params) | {c['layout']} x{c['world_size']} | "
        f"batch {c['batch_size']} x seq {c['seq_len']} (x{c['grad_accum']} accum) | {c['precision']}"
        f"{' ' + c['fp8_recipe'] if c.get('fp8_recipe') else ''} | compile {c['compile_mode'] or 'off'} | "
        f"ac {c['ac']} | ffn {c['ffn']}{' 2:4' if c['activation_sparsity'] == '2:4' else ''}",
        f"device {r.get('device_name', r['device'])} | torch {r.get('torch')} | {r.get('date_utc', '')}",
        f"warm-up {r['warmup_steps']} steps ({r['warmup_s']:.1f} s, build {r['build_s']:.1f} s); "
        f"measured {r['steps']} steps in {r['window_s']:.2f} s{'  [smoke: not a result]' if r['smoke'] else ''}",
        f"  tokens/s     {r['tokens_per_s']:,.0f}  ({r['tokens_per_step']:,} tokens/step)",
        f"  TFLOP/s      {r['tflops']:,.4g}  ({r['flops_per_token'] / 1e9:.4g} GFLOP/token, torchtitan convention)",
        f"  MFU          {_pct(r['mfu'])}"
        + (f"  (peak {r['peak_flops'] / 1e12:,.0f} TFLOP/s per device)" if r["peak_flops"] else "  (device peak unknown)"),
        f"  step time    mean {r['mean_s'] * 1e3:.1f} ms, median {r['median_s'] * 1e3:.1f} ms, "
        f"min {r['min_s'] * 1e3:.1f}, max {r['max_s'] * 1e3:.1f}, cv {100 * r['cv']:.1f}%",
        f"  peak memory  {r['peak_allocated_bytes'] / GiB:.2f} GiB allocated, "
        f"{r['peak_reserved_bytes'] / GiB:.2f} GiB reserved" + (" (CPU: process peak RSS)" if r["device"] == "cpu" else ""),
    ]
    if r["phases_s"]:
        total = sum(r["phases_s"].values())
        lines.append("  step breakdown (" + ("GPU timeline" if r["device"] == "cuda" else "host wall") + ", ms/step):")
        for phase, s in r["phases_s"].items():
            lines.append(f"    {phase:<32s}{s * 1e3:9.2f}  {100 * s / total:5.1f}%")
    t = r.get("framework_tax") or {}
    if t:
        if t.get("gpu_busy_s") is not None:
            lines.append(f"  framework tax: GPU idle {t['gpu_idle_s'] * 1e3:.2f} ms/step ({_pct(t['gpu_idle_fraction'])} of "
                         f"{t['wall_s'] * 1e3:.2f} ms), launch calls {t['launch_s'] * 1e3:.2f} ms/step, "
                         f"{t['kernels_per_step']:.0f} kernels/step, {t['ops_per_step']:.0f} aten ops/step")
        else:
            lines.append(f"  framework tax: {t['ops_per_step']:.0f} aten ops/step, {t['wall_s'] * 1e3:.2f} ms/step "
                         "(no GPU timeline on the CPU)")
    return "\n".join(lines)
