"""An MoE model (`moe_debug`, dropless, fp32) under the data-parallel layouts reproduces one
device: FSDP (dp_shard=2, auxiliary loss) and DDP-style replication (dp_replicate=2, expert
bias) on 2 gloo ranks, both trained in ONE process group (one spawn), against single-process
runs of the same global batch of 8 sequences; gradient accumulation (4 x 2) matches too.

Tolerance: relative 1e-5 on losses, grad norms and the expert metrics, 2e-5 absolute on the
final parameters and expert biases (the argument of tests/distributed/test_layouts.py). Routing
is per token and the auxiliary loss is a mean over sequences, so splitting the batch changes
only the order of fp32 reductions; the expert counts are integers summed exactly, so the
bias updates agree exactly unless a near-tie flips a routing decision (none does here).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import DEBUG_CONFIG
from scaletrain.export.runio import load_run_model
from scaletrain.train.metrics import read_metrics

STEPS, GLOBAL_BATCH = 10, 8
BALANCE = {"aux_loss": ("--model.moe_balance", "aux_loss"),
           "bias": ("--model.moe_balance", "bias", "--model.moe_bias_rate", "0.01")}
# name -> (balancing, per-rank batch, extra overrides); each runs on 2 ranks with batch 4 each.
LAYOUTS = {"fsdp": ("aux_loss", ("--parallel.dp_shard", "2")),
           "ddp": ("bias", ("--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"))}
KEYS = ("loss", "grad_norm", "aux_loss", "expert_imbalance", "dropped_frac")


def _train(run: Path, data_cache: str, batch: int, *extra: str) -> None:
    from scaletrain.config import load_config
    from scaletrain.train.trainer import Trainer

    cfg = load_config(DEBUG_CONFIG, ["--model.flavor", "moe_debug", "--train.steps", str(STEPS),
                                     "--data.cache_dir", data_cache, "--data.seq_len", "64",
                                     "--data.batch_size", str(batch), "--metrics.progress", "none",
                                     "--metrics.tensorboard", "false", "--metrics.plot", "false",
                                     "--train.eval_interval", "0", "--checkpoint.interval", "0", *extra])
    Trainer(cfg, run).fit()


def _worker(rank: int, world: int, port: int, root: str, data_cache: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for name, (balance, layout) in LAYOUTS.items():  # one process group for every layout
        _train(Path(root) / name, data_cache, GLOBAL_BATCH // world, *BALANCE[balance], *layout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("moe_layouts")
    for balance, extra in BALANCE.items():
        _train(root / f"ref_{balance}", str(data_cache), GLOBAL_BATCH, *extra)
    _train(root / "accum", str(data_cache), GLOBAL_BATCH // 2, *BALANCE["aux_loss"], "--train.grad_accum", "2")
    mp.spawn(_worker, args=(2, _free_port(), str(root), str(data_cache)), nprocs=2, join=True)
    return root


@pytest.mark.slow  # about 32 s on 2 cores: 3 single-process runs and one 2-rank spawn with both layouts
@pytest.mark.parametrize("name,balance", [("fsdp", "aux_loss"), ("ddp", "bias"), ("accum", "aux_loss")])
def test_moe_layout_matches_single_device(runs, name, balance):
    ref, got = read_metrics(runs / f"ref_{balance}")[0], read_metrics(runs / name)[0]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in KEYS:
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-5, abs=1e-12), key
    ref_state, got_state = load_run_model(runs / f"ref_{balance}")[0].state_dict(), load_run_model(runs / name)[0].state_dict()
    assert ref_state.keys() == got_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(got_state[key], value, rtol=0, atol=2e-5, msg=f"{name}: {key}")
    if balance == "bias":
        assert ref_state["layers.1.feed_forward.router.expert_bias"].abs().sum() > 0  # the bias did move
