"""Peak table lookups: every supported device string, unknown devices and the CPU."""

import pytest
import torch

from scaletrain.train.peaks import PEAKS, PRECISIONS, device_peak_flops, lookup_peak

# (torch.cuda.get_device_name() string, precision, dense FLOP/s from the datasheet)
CASES = [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),
    ("NVIDIA H100 80GB HBM3", "fp8", 1978.9e12),
    ("NVIDIA H100 80GB HBM3", "fp32", 66.9e12),
    ("NVIDIA H100 80GB HBM3", "tf32", 494.7e12),
    ("NVIDIA H100 PCIe", "bf16", 756.5e12),
    ("NVIDIA H100 PCIe", "fp8", 1513e12),
    ("NVIDIA H100 NVL", "bf16", 835.5e12),
    ("NVIDIA H200", "bf16", 989.4e12),
    ("NVIDIA H200", "fp8", 1978.9e12),
    ("NVIDIA H200 NVL", "bf16", 835.5e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-SXM4-40GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "fp16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156e12),
    ("NVIDIA A100-SXM4-40GB", "fp32", 19.5e12),
    ("NVIDIA B200", "bf16", 2250e12),
    ("NVIDIA B200", "fp8", 4500e12),
    ("NVIDIA B300 SXM6 AC", "bf16", 2250e12),
    ("NVIDIA GB200", "bf16", 2500e12),
    ("NVIDIA GB200", "fp8", 5000e12),
    ("NVIDIA GB300", "fp8", 5000e12),
    ("NVIDIA L40S", "bf16", 362.05e12),
    ("AMD Instinct MI300X", "bf16", 1307.4e12),
    ("AMD Instinct MI300X", "fp8", 2614.9e12),
]


@pytest.mark.parametrize("name,precision,expected", CASES)
def test_lookup_known_devices(name, precision, expected):
    assert lookup_peak(name, precision) == expected


def test_lookup_is_case_and_space_insensitive():
    assert lookup_peak("  nvidia h100 80gb hbm3 ", "bf16") == 989.4e12


@pytest.mark.parametrize("name", [
    "NVIDIA GeForce RTX 4090", "NVIDIA L40", "NVIDIA GB100", "AMD Instinct MI300A",
    "NVIDIA A100X", "NVIDIA H100", "cpu", "",
])
def test_unknown_device_gives_none(name):
    assert lookup_peak(name, "bf16") is None


def test_unsupported_precision_on_known_device_is_none():
    assert lookup_peak("NVIDIA A100-SXM4-80GB", "fp8") is None  # A100 has no FP8 tensor cores


def test_bad_precision_raises():
    with pytest.raises(ValueError, match="precision"):
        lookup_peak("NVIDIA H100 80GB HBM3", "auto")


def test_cpu_device_gives_none():
    assert device_peak_flops(torch.device("cpu"), "bf16") is None
    assert device_peak_flops("cpu", "fp32") is None


def test_table_is_consistent():
    for entry in PEAKS:
        assert entry.source, entry.key
        assert set(entry.flops) <= set(PRECISIONS), entry.key
        # bf16 and fp16 share the tensor-core rate; fp8 doubles it; tf32 halves it. 2 %
        # slack: the L40S datasheet prints BF16 362.05 but FP8 733 and TF32 183 (rounded).
        assert entry.flops["bf16"] == entry.flops["fp16"], entry.key
        if "fp8" in entry.flops:
            assert entry.flops["fp8"] == pytest.approx(2 * entry.flops["bf16"], rel=2e-2)
        assert entry.flops["tf32"] == pytest.approx(entry.flops["bf16"] / 2, rel=2e-2)
        assert entry.flops["fp32"] < entry.flops["tf32"]
