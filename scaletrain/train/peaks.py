"""Peak dense tensor throughput per device, the denominator of MFU.

Every number is a vendor datasheet peak in FLOP/s for *dense* math (no 2:4 structured
sparsity: datasheets that print "X | Y" or "Y*" with sparsity are halved here). "fp32"
means plain IEEE fp32 on the vector/CUDA cores (no TF32); "tf32" means TF32 tensor cores.
A precision a device does not run on tensor cores (FP8 on A100) has no entry.

Lookups never guess: an unknown device, an unknown variant of a known family (L40 without
the S, MI300A) or the CPU gives None, and metrics report MFU as "n/a" (docs/architecture.md,
rule 4). Add a device by appending a `PeakEntry` to `PEAKS` with its source document.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

PRECISIONS = ("bf16", "fp16", "fp8", "tf32", "fp32")


@dataclass(frozen=True)
class PeakEntry:
    """One device model: a regex over the lower-cased `torch.cuda.get_device_name()` and its
    dense peaks in FLOP/s per precision."""

    key: str
    pattern: str
    flops: dict[str, float]
    source: str


# Ordered: the first entry whose pattern matches wins, so variants (NVL, PCIe) come before
# the plain family name they also contain.
PEAKS: tuple[PeakEntry, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet (2023), H100 NVL column, per GPU: FP32 60 TF,
    # TF32 835 TF, BF16/FP16 1,671 TF, FP8 3,341 TF (all tensor numbers with sparsity).
    PeakEntry(
        "h100_nvl",
        r"\bh100\b.*\bnvl\b",
        {"bf16": 835.5e12, "fp16": 835.5e12, "fp8": 1670.5e12, "tf32": 417.5e12, "fp32": 60e12},
        "NVIDIA H100 Tensor Core GPU datasheet, H100 NVL (per GPU)",
    ),
    # NVIDIA H100 Tensor Core GPU Architecture whitepaper (v1.0x), table "H100 PCIe":
    # FP32 51.2 TF, TF32 378 TF, BF16/FP16 756.5 TF, FP8 1,513 TF (dense).
    PeakEntry(
        "h100_pcie",
        r"\bh100\b.*\bpcie\b",
        {"bf16": 756.5e12, "fp16": 756.5e12, "fp8": 1513e12, "tf32": 378e12, "fp32": 51.2e12},
        "NVIDIA H100 Tensor Core GPU Architecture whitepaper, H100 PCIe",
    ),
    # NVIDIA H100 Tensor Core GPU Architecture whitepaper, table "H100 SXM5": FP32 66.9 TF,
    # TF32 494.7 TF, BF16/FP16 989.4 TF, FP8 1,978.9 TF (dense). The SXM part reports itself
    # as "NVIDIA H100 80GB HBM3" (the PCIe/NVL parts have HBM2e/HBM3 but say PCIe/NVL).
    PeakEntry(
        "h100_sxm",
        r"\bh100\b.*\bhbm3\b|\bh100\b.*\bsxm",
        {"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12, "tf32": 494.7e12, "fp32": 66.9e12},
        "NVIDIA H100 Tensor Core GPU Architecture whitepaper, H100 SXM5",
    ),
    # NVIDIA H200 Tensor Core GPU datasheet (2024), H200 NVL column: FP32 60 TF, TF32 835 TF,
    # BF16/FP16 1,671 TF, FP8 3,341 TF (tensor numbers with sparsity) -- same as H100 NVL.
    PeakEntry(
        "h200_nvl",
        r"\bh200\b.*\bnvl\b",
        {"bf16": 835.5e12, "fp16": 835.5e12, "fp8": 1670.5e12, "tf32": 417.5e12, "fp32": 60e12},
        "NVIDIA H200 Tensor Core GPU datasheet, H200 NVL",
    ),
    # NVIDIA H200 Tensor Core GPU datasheet (2024), H200 SXM column: FP32 67 TF, TF32 989 TF,
    # BF16/FP16 1,979 TF, FP8 3,958 TF (with sparsity): the H100 SXM compute die with more
    # HBM, so the whitepaper's exact H100 SXM5 values apply.
    PeakEntry(
        "h200_sxm",
        r"\bh200\b",
        {"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12, "tf32": 494.7e12, "fp32": 66.9e12},
        "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM",
    ),
    # NVIDIA A100 Tensor Core GPU datasheet (2021): FP32 19.5 TF, TF32 156 TF, BF16/FP16
    # 312 TF (dense; 2x with sparsity). Identical for the 40GB/80GB, SXM4/PCIe parts. No FP8.
    PeakEntry(
        "a100",
        r"\ba100\b",
        {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
        "NVIDIA A100 Tensor Core GPU datasheet",
    ),
    # NVIDIA HGX B200 platform specifications (8 GPUs): FP32 600 TF, TF32 18 PF, BF16/FP16
    # 36 PF, FP8 72 PF (tensor numbers with sparsity); per GPU and dense that is FP32 75 TF,
    # TF32 1.125 PF, BF16 2.25 PF, FP8 4.5 PF. (GB200 runs at higher power: its own entry.)
    PeakEntry(
        "b200",
        r"(?<![a-z])b200\b",
        {"bf16": 2250e12, "fp16": 2250e12, "fp8": 4500e12, "tf32": 1125e12, "fp32": 75e12},
        "NVIDIA HGX B200 specifications (per GPU = 1/8 of the 8-GPU board)",
    ),
    # NVIDIA HGX platform specifications (HGX B300, 8 GPUs): FP32 600 TF, TF32 18 PF, BF16/FP16
    # 36 PF, FP8 72 PF (tensor numbers with sparsity) -- per GPU and dense the B200 figures.
    PeakEntry(
        "b300",
        r"(?<![a-z])b300\b",
        {"bf16": 2250e12, "fp16": 2250e12, "fp8": 4500e12, "tf32": 1125e12, "fp32": 75e12},
        "NVIDIA HGX B300 specifications (per GPU = 1/8 of the 8-GPU board)",
    ),
    # NVIDIA GB200 NVL72 specifications, per Blackwell GPU: FP32 80 TF, TF32 2.5 PF, BF16/FP16 5 PF,
    # FP8 10 PF (tensor numbers with sparsity): dense TF32 1.25 PF, BF16 2.5 PF, FP8 5 PF (the GB200
    # runs its B200 dies at 1,200 W, above the HGX B200's 1,000 W).
    PeakEntry(
        "gb200",
        r"\bgb200\b",
        {"bf16": 2500e12, "fp16": 2500e12, "fp8": 5000e12, "tf32": 1250e12, "fp32": 80e12},
        "NVIDIA GB200 NVL72 specifications (per GPU)",
    ),
    # NVIDIA GB300 NVL72 specifications: 360 PF dense FP8 and 180 PF dense BF16 per 72 GPUs = FP8 5 PF,
    # BF16 2.5 PF per GPU (Blackwell Ultra raises FP4 only); FP32 80 TF, TF32 1.25 PF as GB200.
    PeakEntry(
        "gb300",
        r"\bgb300\b",
        {"bf16": 2500e12, "fp16": 2500e12, "fp8": 5000e12, "tf32": 1250e12, "fp32": 80e12},
        "NVIDIA GB300 NVL72 specifications (per GPU = 1/72 of the rack)",
    ),
    # NVIDIA L40S GPU datasheet: FP32 91.6 TF, TF32 183 | 366 TF, BF16/FP16 362.05 | 733 TF,
    # FP8 733 | 1,466 TF (dense | sparse).
    PeakEntry(
        "l40s",
        r"\bl40s\b",
        {"bf16": 362.05e12, "fp16": 362.05e12, "fp8": 733e12, "tf32": 183e12, "fp32": 91.6e12},
        "NVIDIA L40S GPU datasheet",
    ),
    # AMD Instinct MI300X accelerator datasheet: FP32 vector 163.4 TF, TF32 653.7 TF,
    # BF16/FP16 1,307.4 TF, FP8 2,614.9 TF (dense; 2x with sparsity).
    PeakEntry(
        "mi300x",
        r"\bmi300x\b",
        {"bf16": 1307.4e12, "fp16": 1307.4e12, "fp8": 2614.9e12, "tf32": 653.7e12, "fp32": 163.4e12},
        "AMD Instinct MI300X accelerator datasheet",
    ),
)


def match_device(device_name: str) -> PeakEntry | None:
    """The table entry for a `torch.cuda.get_device_name()` string, or None when no entry
    matches (matching is case-insensitive; the first matching entry of `PEAKS` wins)."""
    name = device_name.strip().lower()
    for entry in PEAKS:
        if re.search(entry.pattern, name):
            return entry
    return None


def lookup_peak(device_name: str, precision: str) -> float | None:
    """Dense peak tensor throughput of one device in FLOP/s, or None when the device is not
    in the table or does not run `precision` natively.

    `precision` is one of PRECISIONS; anything else is a programming error (ValueError),
    since the trainer resolves "auto" before asking.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    entry = match_device(device_name)
    if entry is None:
        return None
    return entry.flops.get(precision)


def device_peak_flops(device: torch.device | str, precision: str) -> float | None:
    """Dense peak FLOP/s of the accelerator behind `device` (one device, not the cluster).

    CPU (and any non-CUDA device) gives None: CPU peaks depend on clocks, cores and ISA and
    are not in the table. ROCm GPUs report as device type "cuda" and are looked up by name.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return lookup_peak(torch.cuda.get_device_name(device), precision)
