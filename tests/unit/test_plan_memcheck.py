"""Pre-launch memory check (plan/memcheck.py)."""

import os

import pytest
import torch

from scaletrain.config.load import load_config
from scaletrain.errors import ConfigError
from scaletrain.plan.hardware import GiB, Hardware
from scaletrain.plan.memcheck import check_fits, device_capacity, estimate_for_config

CPU = torch.device("cpu")


def test_small_config_fits_on_cpu():
    est = check_fits(load_config(None), 1, CPU)
    assert est.fits and 0 < est.predicted_bytes < est.capacity_bytes
    assert set(est.breakdown) == {"weights", "grads", "optimizer", "activations", "buffers", "fragmentation"}
    assert est.predicted_bytes == pytest.approx(sum(est.breakdown.values()))


def test_debug_model_state_bytes_per_param_in_fp32():
    """fp32 weights 4 B + AdamW moments 8 B per parameter always; the 4 B of gradients only
    where they are alive at the peak moment: not at the start of backward of a one-micro-batch
    step (the debug model's peak), all of them with gradient accumulation."""
    cfg = load_config(None)
    from scaletrain.model.flops import param_counts

    p = param_counts(cfg.model)["total"]
    b = estimate_for_config(cfg, 1, CPU).breakdown
    assert b["weights"] + b["optimizer"] == pytest.approx(12 * p) and b["grads"] == 0
    b = estimate_for_config(load_config(None, {"train.grad_accum": "2"}), 1, CPU).breakdown
    assert b["weights"] + b["grads"] + b["optimizer"] == pytest.approx(16 * p)


def test_oversized_run_raises_with_breakdown_capacity_and_fix(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cfg = load_config(None, {"model.flavor": "llama3_70b", "data.seq_len": "8192", "data.batch_size": "4"})
    with pytest.raises(ConfigError) as e:
        check_fits(cfg, 1, CPU)
    msg = str(e.value)
    assert "predicted peak" in msg and "capacity" in msg and "GiB" in msg and "optimizer" in msg
    assert "dp_shard" in msg and "pass --force to run anyway" in msg.lower()


def test_activation_heavy_run_suggests_checkpointing():
    cfg = load_config(None, {"model.flavor": "llama3_8b", "data.seq_len": "8192", "data.batch_size": "64"})
    est = estimate_for_config(cfg, 1, CPU)
    assert est.breakdown["activations"] > est.breakdown["optimizer"]
    if not est.fits:
        with pytest.raises(ConfigError, match='ac = "full"'):
            check_fits(cfg, 1, CPU)
    full = estimate_for_config(load_config(None, {"model.flavor": "llama3_8b", "data.seq_len": "8192",
                                                  "data.batch_size": "64", "parallel.ac": "full"}), 1, CPU)
    assert full.breakdown["activations"] < est.breakdown["activations"]


def test_cpu_capacity_is_ram_split_over_local_ranks(monkeypatch):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert device_capacity(CPU, 4) == pytest.approx(ram / 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert device_capacity(CPU, 4) == pytest.approx(ram / 2)
    assert device_capacity(CPU, 1) > 0.1 * GiB


def test_sharding_over_ranks_lowers_the_estimate():
    cfg = load_config(None, {"model.flavor": "llama3_8b", "data.seq_len": "1024", "data.batch_size": "1"})
    one = estimate_for_config(cfg, 1, CPU).breakdown["optimizer"]
    eight = estimate_for_config(cfg, 8, CPU).breakdown["optimizer"]
    assert eight == pytest.approx(one / 8)


def test_memcheck_uses_the_runs_own_stack():
    """The pre-flight check predicts what `plan check` predicts for the same run: scaletrain's
    TP keeps replicated logits (whole 12 T V loss buffers per rank, not /tp) and train.compile
    compiles the loss (2 B T V instead of 12 T V)."""
    from scaletrain.plan.cost import Stack, estimate_memory
    from scaletrain.plan.memcheck import run_stack, workload_for_config

    cfg = load_config(None, {"parallel.tp": "2", "parallel.dp_shard": "1"})
    assert run_stack(cfg) == Stack(fused=False, compiled_loss=False, loss_parallel=False)
    w, layout = workload_for_config(cfg, 2, "cpu")
    hw = Hardware("cpu", {}, 1e12, 1.0, 1, 1.0, 0.0, 1.0, 0.0)
    own = estimate_memory(w, layout, hw, run_stack(cfg)).total
    vocab_parallel = estimate_memory(w, layout, hw, Stack(loss_parallel=True)).total
    assert estimate_for_config(cfg, 2, CPU).predicted_bytes == pytest.approx(own)
    assert own > vocab_parallel  # the replicated loss is larger than the vocabulary-parallel one
    compiled = load_config(None, {"train.compile": "true"})
    assert run_stack(compiled).compiled_loss and run_stack(compiled).fused
