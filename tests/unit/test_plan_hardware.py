"""The planner's hardware catalog (plan/hardware.py): every entry loads, every figure cites its
source, units are sane, and the device peaks are the trainer's (one table, train/peaks.py)."""

import dataclasses

import pytest

from scaletrain.plan.hardware import CATALOG, CITED, GB, get_hardware, load_profile
from scaletrain.train.peaks import PEAKS, match_device

NEW_DEVICES = ("h100_sxm", "h100_pcie", "h200", "b200", "b300", "gb200_nvl72", "gb300_nvl72", "mi300x")


@pytest.mark.parametrize("name", list(CATALOG))
def test_every_figure_has_a_source(name):
    hw = get_hardware(name)
    missing = [k for k in CITED if not hw.sources.get(k, "").strip()]
    assert not missing, f"{name}: figures without a source: {missing}"
    assert hw.source


@pytest.mark.parametrize("name", list(CATALOG))
def test_units_are_sane(name):
    hw = CATALOG[name]
    assert hw.peak_flops.get("bf16", 0) > 1e14 or hw.peak_flops.get("fp16", 0) > 1e14
    assert 10 * GB < hw.hbm_bytes < 300 * GB and 0.5e12 < hw.hbm_bw < 10e12
    assert hw.inter_bw <= hw.intra_bw and 0 < hw.intra_latency <= hw.inter_latency < 1e-4
    assert 0 < hw.attn_eff < 1 and 0 < hw.attn_eff_fused < 1
    assert all(0.4 < v <= 1 for v in hw.mamf.values())
    if hw.fp8_recipes:
        assert hw.peak_flops["fp8"] == pytest.approx(2 * hw.peak_flops["bf16"], rel=0.02)
    assert "mxfp8" not in hw.fp8_recipes or name.startswith(("b", "gb"))  # block-scaled MMA: Blackwell


def test_todays_devices_are_in_the_catalog():
    assert set(NEW_DEVICES) <= set(CATALOG)
    for rack in ("gb200_nvl72", "gb300_nvl72"):
        assert CATALOG[rack].gpus_per_node == 72  # one NVLink domain of 72 GPUs
    assert CATALOG["gb300_nvl72"].hbm_bytes > CATALOG["gb200_nvl72"].hbm_bytes
    assert "mxfp8" in CATALOG["b200"].fp8_recipes and "mxfp8" not in CATALOG["h100_sxm"].fp8_recipes


def test_peaks_come_from_the_trainers_table():
    by_key = {e.key: e for e in PEAKS}
    for hw in CATALOG.values():
        if hw.device_key and hw.name != "h100_hbm2e_500w":  # that one is a documented midpoint
            assert hw.peak_flops == by_key[hw.device_key].flops, hw.name
    for device_name, entry in (("NVIDIA GB200", "gb200_nvl72"), ("NVIDIA GB300", "gb300_nvl72"),
                               ("NVIDIA B300 SXM6 AC", "b300"), ("NVIDIA H100 80GB HBM3", "h100_sxm")):
        assert match_device(device_name).key == CATALOG[entry].device_key


def test_profile_round_trip(tmp_path):
    import json

    hw = CATALOG["b200"]
    path = tmp_path / "b200.json"
    path.write_text(json.dumps(dataclasses.asdict(hw)))
    assert load_profile(path) == hw
