"""Hardware catalog for the planner: accelerators plus the cluster they sit in.

Each `Hardware` entry is one GPU model in its usual server: dense peak FLOP/s per precision
(read from train/peaks.py, the one table of device peaks, so MFU and plan agree), HBM capacity
and bandwidth, the per-GPU bandwidth and latency of the NVLink domain (NVLink/NVSwitch,
Infinity Fabric, PCIe: 8 GPUs in an HGX/DGX node, 72 in a GB200/GB300 NVL72 rack) and of the
network between domains (InfiniBand/RoCE, one NIC per GPU, "rail optimised"), the measured
best achievable matmul fraction of peak (MAMF) and the attention kernels' fraction of peak.

Bandwidths are per GPU, per direction, in bytes/s ("900 GB/s NVLink" is bidirectional, so
450e9 here). Latencies (alpha of the alpha-beta model) are per message step in seconds.
Every figure of a catalog entry has its source in `Hardware.sources` (field name -> document);
tests check that none is missing. docs/planner.md repeats the table.

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

# Figures every catalog entry must cite (tests/unit/test_plan_hardware.py).
CITED = ("peak_flops", "hbm_bytes", "hbm_bw", "intra_bw", "inter_bw", "latency", "mamf", "attn_eff", "fp8_recipes")


@dataclass(frozen=True)
class Hardware:
    """One accelerator in its NVLink domain. Units: FLOP/s, bytes, bytes/s, seconds."""

    name: str
    peak_flops: dict[str, float]  # dense peak per precision ("bf16", "fp8", "fp32", ...)
    hbm_bytes: float  # device memory capacity
    hbm_bw: float  # device memory bandwidth
    gpus_per_node: int  # GPUs in one NVLink domain (8 for HGX/DGX, 72 for an NVL72 rack)
    intra_bw: float  # per GPU per direction inside the NVLink domain
    intra_latency: float
    inter_bw: float  # per GPU per direction between domains (one NIC per GPU)
    inter_latency: float
    host_overhead_s: float = 6e-6  # CPU time to launch one kernel/op (eager PyTorch + driver)
    attn_eff: float | None = None  # flash-attention-2 class kernel (PyTorch SDPA): fraction of peak
    attn_eff_fused: float | None = None  # cuDNN / FlashAttention-3/4 class kernel (Transformer Engine)
    matmul_eff_max: float | None = None  # calibrated profiles: measured best matmul efficiency (overrides mamf)
    mamf: dict[str, float] = field(default_factory=dict)  # measured max achievable matmul fraction of peak
    fp8_recipes: tuple[str, ...] = ()  # fp8 scalings the tensor cores run natively ("mxfp8": Blackwell)
    calibrated: bool = False  # measured by plan/calibrate.py (rates used as measured)
    device_key: str = ""  # the train/peaks.py entry of this device (plan check matches runs by it)
    source: str = ""  # one-line summary (calibrated profiles: how it was measured)
    sources: dict[str, str] = field(default_factory=dict)  # figure (CITED) -> document it comes from
    extra: dict = field(default_factory=dict)
    # Calibrated CPU profiles only: rates measured at the model's shapes (calibrate.cpu_execution_model).
    # plan/cost.py uses them instead of the GPU-shaped terms iff `calibrated` and non-empty.
    cpu: dict = field(default_factory=dict)


def _peaks(key: str) -> tuple[dict[str, float], str]:
    for e in PEAKS:
        if e.key == key:
            return dict(e.flops), e.source
    raise KeyError(key)  # pragma: no cover - catalog bug


CATALOG: dict[str, Hardware] = {}


def register(hw: Hardware) -> None:
    """Add (or replace) a catalog entry."""
    CATALOG[hw.name] = hw


# ---- sources shared by several entries ----
MAMF = ("Maximum Achievable Matmul FLOPS table (bf16 and fp8 torch.matmul/_scaled_mm, best shape), "
        "S. Bekman, ml-engineering compute/accelerator/README.md @744d01e (2026-08-22)")
NCCL_LAT = ("assumed per-step latency, between NCCL's own LL128 and Simple per-hop figures "
            "(NCCL src/graph/tuning.cc hwLat: NVLink 2.5-5.7 us, network 2.5-6.6 us + 8.4 us base)")
FA2_H100 = ("FlashAttention-3 paper (Shah et al. 2024): 'FlashAttention-2 achieves only 35% utilization on H100'")
FA3_H100 = ("FlashAttention-3 paper (Shah et al. 2024): up to 740 TFLOP/s = 75% of H100 bf16 peak "
            "(cuDNN's fused attention is of the same class)")
FA2_A100 = "FlashAttention-2 paper (Dao 2023): 50-73% of A100 peak; 0.55 taken for fwd+bwd"
FA4_B200 = ("FlashAttention-4 paper (Zadouri, Dao et al. 2026): up to 1613 TFLOP/s = 71% of B200 bf16 peak, "
            "1.3x cuDNN 9.13; the flash-attention-2 class (PyTorch SDPA) taken as the cuDNN figure, 71/1.3 = 55%")
HOPPER_FP8 = ("sm90 fp8 tensor cores (H100 whitepaper): per-tensor and per-row/block scales applied in the "
              "GEMM epilogue or by CUTLASS/DeepGEMM promotion; no MX block-scaled MMA")
BLACKWELL_FP8 = ("sm100 block-scaled MMA (NVIDIA Blackwell architecture technical brief: MXFP8 at the FP8 "
                 "rate); per-tensor/row/block scales as on Hopper")


def _entry(name: str, peaks_key: str, hbm_gb: float, hbm_tbs: float, per_domain: int, intra_gbs: float,
           inter_gbs: float, *, mamf: dict[str, float], attn: float, attn_fused: float, fp8: tuple[str, ...],
           sources: dict[str, str], intra_lat: float = 4e-6, inter_lat: float = 10e-6) -> Hardware:
    """A catalog entry; `sources` names the document of each figure (peak_flops, latency, mamf and
    the attention figures default to the shared sources above)."""
    peaks, peak_source = _peaks(peaks_key)
    cited = {"peak_flops": f"train/peaks.py '{peaks_key}': {peak_source}", "latency": NCCL_LAT, "mamf": MAMF,
             **sources}
    return Hardware(name, peaks, hbm_gb * GB, hbm_tbs * 1000 * GB, per_domain, intra_gbs * GB, intra_lat,
                    inter_gbs * GB, inter_lat, attn_eff=attn, attn_eff_fused=attn_fused, mamf=mamf,
                    fp8_recipes=fp8, device_key=peaks_key, source=cited["hbm_bytes"], sources=cited)


A100 = "NVIDIA A100 datasheet (https://www.nvidia.com/en-us/data-center/a100/)"
DGX_A100 = "NVIDIA DGX A100 user guide: NVSwitch, 600 GB/s NVLink3 bidirectional; 8x ConnectX-6 HDR 200 Gb/s"
for _name, _gb, _tbs in (("a100_40gb", 40, 1.555), ("a100_80gb", 80, 2.039)):
    register(_entry(_name, "a100", _gb, _tbs, 8, 300, 25, mamf={"bf16": 0.869}, attn=0.55, attn_fused=0.55, fp8=(),
                    sources={"hbm_bytes": A100, "hbm_bw": A100, "intra_bw": DGX_A100, "inter_bw": DGX_A100,
                             "attn_eff": FA2_A100, "fp8_recipes": "Ampere has no fp8 tensor cores (A100 datasheet)"},
                    intra_lat=5e-6))

H100 = "NVIDIA H100 datasheet (https://www.nvidia.com/en-us/data-center/h100/)"
DGX_H100 = "NVIDIA DGX H100 user guide: NVLink4 900 GB/s bidirectional; 8x ConnectX-7 NDR 400 Gb/s"
_hopper = dict(mamf={"bf16": 0.803, "fp8": 0.709}, attn=0.35, attn_fused=0.75, fp8=("tensorwise", "rowwise", "blockwise"))
_hopper_src = {"attn_eff": f"{FA2_H100}; fused: {FA3_H100}", "fp8_recipes": HOPPER_FP8}
register(_entry("h100_sxm", "h100_sxm", 80, 3.35, 8, 450, 50, **_hopper,
                sources={"hbm_bytes": H100, "hbm_bw": H100, "intra_bw": DGX_H100, "inter_bw": DGX_H100, **_hopper_src}))
# H100 PCIe: no NVSwitch (NVLink bridges pair GPUs only), so the node fabric is PCIe Gen5 x16.
register(_entry("h100_pcie", "h100_pcie", 80, 2.0, 8, 64, 50, **_hopper,
                sources={"hbm_bytes": H100, "hbm_bw": H100, "intra_bw": "PCIe Gen5 x16: 128 GB/s bidirectional",
                         "inter_bw": "one 400 Gb/s NIC per GPU (assumed, as DGX H100)", **_hopper_src},
                intra_lat=8e-6, inter_lat=12e-6))
H200 = "NVIDIA H200 datasheet (https://www.nvidia.com/en-us/data-center/h200/): 141 GB HBM3e, 4.8 TB/s"
register(_entry("h200", "h200_sxm", 141, 4.8, 8, 450, 50, **{**_hopper, "mamf": {"bf16": 0.803, "fp8": 0.734}},
                sources={"hbm_bytes": H200, "hbm_bw": H200, "intra_bw": f"{H200}; NVLink 900 GB/s bidirectional",
                         "inter_bw": "HGX H200 with 400 Gb/s ConnectX-7 per GPU", **_hopper_src}))
# Meta Grand Teton H100 (torchtitan benchmarks): 96 GB HBM2e at 2.4 TB/s, 500 W power limit, 400 Gb/s
# RDMA per GPU. The benchmark's footnote puts its peak "between SXM and NVL": the midpoint of the two
# peaks-table entries is taken (an assumption the footnote allows, not a measurement).
TT = ("torchtitan benchmarks/llama3_h100_202412_torchtitan.md: '96GB HBM2e with 2.4 TB/sec', '400 Gb/s per "
      "GPU', 500 W limit, 'peak TFLOPs between SXM and NVL'")
_tt = _entry("h100_hbm2e_500w", "h100_sxm", 96, 2.4, 8, 450, 50, **_hopper,
             sources={"hbm_bytes": TT, "hbm_bw": TT, "intra_bw": DGX_H100, "inter_bw": TT, **_hopper_src})
_nvl, _ = _peaks("h100_nvl")
register(dataclasses.replace(_tt, peak_flops={k: (v + _nvl[k]) / 2 for k, v in _tt.peak_flops.items()},
                             sources={**_tt.sources, "peak_flops": f"{TT}: midpoint of train/peaks.py 'h100_sxm' "
                                                                   "and 'h100_nvl'"}))

HGX = ("NVIDIA HGX platform specifications (https://www.nvidia.com/en-us/data-center/hgx/), per GPU = 1/8 of "
       "the board: B200 180 GB, NVLink5 1.8 TB/s bidirectional, 0.8 TB/s networking (400 Gb/s per GPU); "
       "B300 288 GB, 1.6 TB/s networking (800 Gb/s per GPU)")
DGX_B = "NVIDIA DGX B200 / DGX B300 datasheets: 8 TB/s HBM3e per GPU"
_blackwell = dict(attn=0.55, attn_fused=0.71, fp8=("tensorwise", "rowwise", "blockwise", "mxfp8"))
_bw_src = {"attn_eff": FA4_B200, "fp8_recipes": BLACKWELL_FP8}
register(_entry("b200", "b200", 180, 8.0, 8, 900, 50, mamf={"bf16": 0.776, "fp8": 0.763}, **_blackwell,
                sources={"hbm_bytes": HGX, "hbm_bw": DGX_B, "intra_bw": HGX, "inter_bw": HGX, **_bw_src}))
register(_entry("b300", "b300", 288, 8.0, 8, 900, 100, mamf={"bf16": 0.786, "fp8": 0.745}, **_blackwell,
                sources={"hbm_bytes": HGX, "hbm_bw": DGX_B, "intra_bw": HGX, "inter_bw": HGX, **_bw_src}))
# GB200 / GB300 NVL72: 72 GPUs in one NVLink domain (NVLink5 switch trays, 1.8 TB/s bidirectional per
# GPU); between racks one NIC per GPU (GB200: ConnectX-7 400 Gb/s, GB300: ConnectX-8 800 Gb/s).
GB200 = ("NVIDIA GB200 NVL72 specifications (https://www.nvidia.com/en-us/data-center/gb200-nvl72/): per GPU "
         "186 GB HBM3e, 8 TB/s, NVLink5 1.8 TB/s bidirectional, 72-GPU NVLink domain")
GB300 = ("NVIDIA GB300 NVL72 specifications (https://www.nvidia.com/en-us/data-center/gb300-nvl72/): per GPU "
         "288 GB HBM3e, 8 TB/s, NVLink5 1.8 TB/s bidirectional, 72-GPU NVLink domain, ConnectX-8 800 Gb/s")
register(_entry("gb200_nvl72", "gb200", 186, 8.0, 72, 900, 50, mamf={"bf16": 0.729, "fp8": 0.723}, **_blackwell,
                sources={"hbm_bytes": GB200, "hbm_bw": GB200, "intra_bw": GB200,
                         "inter_bw": "GB200 NVL72 compute tray: ConnectX-7 400 Gb/s per GPU", **_bw_src}))
register(_entry("gb300_nvl72", "gb300", 288, 8.0, 72, 900, 100,
                mamf={"bf16": 0.729, "fp8": 0.723}, **_blackwell,
                sources={"hbm_bytes": GB300, "hbm_bw": GB300, "intra_bw": GB300, "inter_bw": GB300,
                         **_bw_src, "mamf": f"not measured; the GB200 figures of the {MAMF} (same die, same clocks "
                                            "for bf16/fp8 per the GB300 NVL72 specifications)"}))

MI300X = "AMD Instinct MI300X datasheet (https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html)"
# 7 Infinity Fabric links x 64 GB/s per direction to the 7 peers; RCCL runs 7 rings in parallel,
# so the aggregate is the per-GPU figure.
register(_entry("mi300x", "mi300x", 192, 5.3, 8, 448, 50, mamf={"bf16": 0.514}, attn=0.35, attn_fused=0.35,
                fp8=("tensorwise", "rowwise"),
                sources={"hbm_bytes": MI300X, "hbm_bw": MI300X, "intra_bw": f"{MI300X}: 7 x 64 GB/s Infinity Fabric",
                         "inter_bw": "one 400 Gb/s NIC per GPU (assumed)",
                         "attn_eff": "assumed equal to the H100 flash-attention-2 figure (no published MI300X kernel "
                                     "efficiency used here)",
                         "fp8_recipes": "CDNA3 fp8 (MI300X datasheet: 2,614.9 TFLOPS dense fp8)"},
                intra_lat=8e-6, inter_lat=12e-6))
L40S = "NVIDIA L40S datasheet (https://www.nvidia.com/en-us/data-center/l40s/): 48 GB GDDR6, 864 GB/s"
register(_entry("l40s", "l40s", 48, 0.864, 8, 32, 25, mamf={}, attn=0.5, attn_fused=0.5, fp8=("tensorwise", "rowwise"),
                sources={"hbm_bytes": L40S, "hbm_bw": L40S, "intra_bw": "PCIe Gen4 x16: 64 GB/s bidirectional",
                         "inter_bw": "one 200 Gb/s NIC per GPU (assumed)",
                         "mamf": f"not measured in the {MAMF}: Params.mamf_default is used",
                         "attn_eff": "assumed (Ada flash-attention-2; no published figure used)",
                         "fp8_recipes": "Ada fp8 tensor cores (L40S datasheet: 733 TFLOPS dense fp8)"},
                intra_lat=8e-6, inter_lat=12e-6))
# V100 SXM2 32 GB (DGX-2): fp16 tensor 125 TF, not in train/peaks.py (no MFU there), kept for old rows.
V100 = "NVIDIA V100 datasheet: 125 TFLOPS fp16 tensor, 15.7 TFLOPS fp32, 32 GB HBM2 at 900 GB/s"
register(Hardware("v100_32gb", {"fp16": 125e12, "bf16": 0.0, "fp32": 15.7e12}, 32 * GB, 900 * GB, 16,
                  150 * GB, 5e-6, 6.25 * GB, 10e-6, attn_eff=0.3, attn_eff_fused=0.3, source=V100,
                  sources={"peak_flops": V100, "hbm_bytes": V100, "hbm_bw": V100,
                           "intra_bw": "NVIDIA DGX-2 user guide: NVSwitch, 300 GB/s bidirectional per GPU",
                           "inter_bw": "NVIDIA DGX-2 user guide: 8x 100 Gb/s InfiniBand per 16 GPUs",
                           "latency": NCCL_LAT, "mamf": f"not measured in the {MAMF}: Params.mamf_default is used",
                           "attn_eff": "assumed (no flash attention on Volta: memory-bound attention)",
                           "fp8_recipes": "Volta has no fp8 tensor cores"}))


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
    if isinstance(values.get("fp8_recipes"), list):
        values["fp8_recipes"] = tuple(values["fp8_recipes"])
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
