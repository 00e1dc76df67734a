"""Hardware catalog for the planner: accelerators plus the cluster they sit in.

Each `Hardware` entry is one GPU model in its usual server: dense peak FLOP/s (reused from
train/peaks.py so MFU and plan agree), HBM capacity and bandwidth, and the per-GPU
bandwidth and latency of the intra-node fabric (NVLink/NVSwitch, Infinity Fabric, PCIe) and
the inter-node network (InfiniBand/RoCE, one NIC per GPU, "rail optimised").

Bandwidths are per GPU, per direction, in bytes/s, as the datasheet gives them (NVLink
"900 GB/s" is bidirectional, so 450e9 here). Latencies (alpha of the alpha-beta model) are
per message step in seconds: typical NCCL small-message figures (a few microseconds inside a
node, ~10 us across InfiniBand; NCCL tests / NVIDIA "NCCL performance" talks). Sources are
named next to every entry; docs/planner.md repeats them.

A calibrated profile (plan/calibrate.py) is a JSON file with the same fields; `get_hardware`
accepts a catalog name or a path to such a file. Topology fields can be overridden.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from scaletrain.errors import ConfigError
from scaletrain.train.peaks import PEAKS

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    """One accelerator in its node. Units: FLOP/s, bytes, bytes/s, seconds."""

    name: str
    peak_flops: dict[str, float]  # dense peak per precision ("bf16", "fp8", "fp32", ...)
    hbm_bytes: float  # device memory capacity
    hbm_bw: float  # device memory bandwidth
    gpus_per_node: int
    intra_bw: float  # per GPU per direction inside a node
    intra_latency: float
    inter_bw: float  # per GPU per direction between nodes
    inter_latency: float
    host_overhead_s: float = 6e-6  # CPU time to launch one kernel/op (eager PyTorch + driver)
    attn_eff: float | None = None  # achieved flash-attention fraction of peak (fwd and bwd)
    matmul_eff_max: float | None = None  # calibrated profiles: measured best matmul efficiency
    calibrated: bool = False  # measured by plan/calibrate.py (rates used as measured)
    source: str = ""
    extra: dict = field(default_factory=dict)
    # Calibrated CPU profiles only: rates measured at the model's shapes (calibrate.cpu_execution_model).
    # plan/cost.py uses them instead of the GPU-shaped terms iff `calibrated` and non-empty.
    cpu: dict = field(default_factory=dict)


def _peaks(key: str) -> dict[str, float]:
    for e in PEAKS:
        if e.key == key:
            return dict(e.flops)
    raise KeyError(key)  # pragma: no cover - catalog bug


CATALOG: dict[str, Hardware] = {}


def register(hw: Hardware) -> None:
    """Add (or replace) a catalog entry."""
    CATALOG[hw.name] = hw


# NVIDIA A100 datasheet: 40GB HBM2 1,555 GB/s; 80GB HBM2e 2,039 GB/s (SXM4). NVLink 3
# 600 GB/s bidirectional per GPU (DGX A100, NVSwitch). DGX A100: 8x ConnectX-6 HDR 200 Gb/s
# (one per GPU) = 25 GB/s per direction.
register(Hardware("a100_40gb", _peaks("a100"), 40 * GB, 1555 * GB, 8, 300 * GB, 5e-6, 25 * GB, 10e-6,
                  attn_eff=0.55, source="NVIDIA A100 datasheet; DGX A100 user guide (8x HDR 200 Gb/s)"))
register(Hardware("a100_80gb", _peaks("a100"), 80 * GB, 2039 * GB, 8, 300 * GB, 5e-6, 25 * GB, 10e-6,
                  attn_eff=0.55, source="NVIDIA A100 datasheet; DGX A100 user guide (8x HDR 200 Gb/s)"))
# H100 SXM5: 80 GB HBM3 3.35 TB/s; NVLink 4 900 GB/s bidirectional; DGX H100: 8x ConnectX-7
# NDR 400 Gb/s = 50 GB/s per GPU per direction (H100 datasheet, DGX H100 user guide).
register(Hardware("h100_sxm", _peaks("h100_sxm"), 80 * GB, 3350 * GB, 8, 450 * GB, 4e-6, 50 * GB, 10e-6,
                  attn_eff=0.35, source="NVIDIA H100 datasheet (SXM5); DGX H100 user guide (8x NDR 400 Gb/s)"))
# H100 PCIe: 80 GB HBM2e 2.0 TB/s; no NVSwitch (NVLink bridges pair GPUs only), so the node
# fabric is PCIe Gen5 x16: 128 GB/s bidirectional = 64 GB/s per direction.
register(Hardware("h100_pcie", _peaks("h100_pcie"), 80 * GB, 2000 * GB, 8, 64 * GB, 8e-6, 50 * GB, 12e-6,
                  attn_eff=0.35, source="NVIDIA H100 datasheet (PCIe); PCIe Gen5 x16"))
# H200 SXM: 141 GB HBM3e 4.8 TB/s; NVLink 900 GB/s; HGX H200 with 400 Gb/s NICs.
register(Hardware("h200", _peaks("h200_sxm"), 141 * GB, 4800 * GB, 8, 450 * GB, 4e-6, 50 * GB, 10e-6,
                  attn_eff=0.35, source="NVIDIA H200 datasheet (SXM)"))
# B200 (HGX/DGX B200): 1,440 GB HBM3e and 64 TB/s per 8 GPUs = 180 GB, 8 TB/s each; NVLink 5
# 1.8 TB/s bidirectional; DGX B200: 8x ConnectX-7 400 Gb/s.
register(Hardware("b200", _peaks("b200"), 180 * GB, 8000 * GB, 8, 900 * GB, 4e-6, 50 * GB, 10e-6,
                  attn_eff=0.35, source="NVIDIA HGX/DGX B200 specifications"))
# MI300X: 192 GB HBM3 5.3 TB/s; 7 Infinity Fabric links x 64 GB/s per direction to the 7
# peers (448 GB/s aggregate); a ring uses 1 link per direction, but RCCL runs 7 rings in
# parallel, so the aggregate is the right per-GPU figure. 400 Gb/s NIC per GPU.
register(Hardware("mi300x", _peaks("mi300x"), 192 * GB, 5300 * GB, 8, 448 * GB, 8e-6, 50 * GB, 12e-6,
                  attn_eff=0.35, source="AMD Instinct MI300X datasheet / platform brief"))
# L40S: 48 GB GDDR6 864 GB/s, no NVLink: PCIe Gen4 x16 64 GB/s bidirectional; 200 Gb/s NIC.
register(Hardware("l40s", _peaks("l40s"), 48 * GB, 864 * GB, 8, 32 * GB, 8e-6, 25 * GB, 12e-6,
                  attn_eff=0.5, source="NVIDIA L40S datasheet; PCIe Gen4 x16"))
# Meta Grand Teton H100 (torchtitan benchmarks): 96 GB HBM2e, 500 W cap, 400 Gb/s RDMA per GPU.
# Same SXM5 die and peaks as h100_sxm; HBM2e bandwidth taken as the H100 NVL-class 3.35 TB/s
# (not published for this part). The lower power cap is not modelled (it lowers clocks).
register(Hardware("h100_hbm2e_500w", _peaks("h100_sxm"), 96 * GB, 3350 * GB, 8, 450 * GB, 4e-6, 50 * GB, 10e-6,
                  attn_eff=0.35, source="torchtitan benchmarks/llama3_h100_202412_torchtitan.md (hardware description)"))
# V100 SXM2 32 GB (DGX-2): fp16 tensor 125 TF, 900 GB/s HBM2, NVSwitch 300 GB/s bidirectional,
# 8x100 Gb/s IB per 16 GPUs. Not in train/peaks.py (no MFU there), kept for old published rows.
register(Hardware("v100_32gb", {"fp16": 125e12, "bf16": 0.0, "fp32": 15.7e12}, 32 * GB, 900 * GB, 16,
                  150 * GB, 5e-6, 6.25 * GB, 10e-6, attn_eff=0.3, source="NVIDIA V100 datasheet; DGX-2 user guide"))


def hardware_names() -> list[str]:
    return list(CATALOG)


def load_profile(path: str | Path) -> Hardware:
    """A Hardware from a calibrated JSON profile (see calibrate.py); errors name the file."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read hardware profile {p}: {e}.") from None
    names = {f.name for f in dataclasses.fields(Hardware)}
    missing = sorted({"name", "peak_flops", "hbm_bytes", "hbm_bw"} - set(raw))
    if missing:
        raise ConfigError(f"hardware profile {p} lacks fields {missing}; regenerate it with `scaletrain plan calibrate`.")
    defaults = dict(gpus_per_node=1, intra_bw=raw["hbm_bw"], intra_latency=5e-6, inter_bw=12.5 * GB, inter_latency=20e-6)
    values = {**defaults, **{k: v for k, v in raw.items() if k in names}}
    return Hardware(**values)


def get_hardware(name_or_path: str, **topology: float | int | None) -> Hardware:
    """Catalog entry `name_or_path` or a JSON profile path, with topology overrides applied
    (gpus_per_node, intra_bw, intra_latency, inter_bw, inter_latency; None = keep)."""
    if name_or_path in CATALOG:
        hw = CATALOG[name_or_path]
    elif name_or_path.endswith(".json") or Path(name_or_path).is_file():
        hw = load_profile(name_or_path)
    else:
        import difflib

        close = difflib.get_close_matches(name_or_path, hardware_names(), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown GPU '{name_or_path}'.{hint} Known: {', '.join(hardware_names())}, "
                          "or a profile JSON from `scaletrain plan calibrate`.")
    changes = {k: v for k, v in topology.items() if v is not None}
    if "gpus_per_node" in changes and int(changes["gpus_per_node"]) < 1:
        raise ConfigError(f"--gpus-per-node must be >= 1, got {changes['gpus_per_node']}.")
    for k in ("intra_bw", "inter_bw"):
        if k in changes and changes[k] <= 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be > 0 (bytes/s), got {changes[k]}.")
    return dataclasses.replace(hw, **changes) if changes else hw
