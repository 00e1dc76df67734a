"""Expert parallelism and MoE under model parallelism, in-process: which layouts are refused
before any process group starts (and what the message offers instead), the sequence-wise aux
loss of a sequence split over context-parallel ranks, and the all-to-all byte counts. The
layouts themselves run in tests/distributed/test_moe_layouts.py."""

from __future__ import annotations

import pytest
import torch

from conftest import main_exit
from scaletrain.config import load_config
from scaletrain.config.schema import ParallelConfig
from scaletrain.errors import ConfigError, LayoutError
from scaletrain.model import model_config_for
from scaletrain.model.flops import moe_dispatch_bytes
from scaletrain.model.moe import sequence_aux_loss
from scaletrain.parallel.layout import resolve_dims
from scaletrain.parallel.layout import check_layout


def _check(world: int, model: str = "moe_debug", seq_len: int = 64, batch: int = 8, **degrees) -> None:
    parallel = ParallelConfig(**degrees)
    model_cfg = model_config_for(model, qk_norm=True)
    check_layout(resolve_dims(parallel, world), parallel, model_cfg, seq_len, batch)


@pytest.mark.parametrize("world,degrees,needles", [
    (2, dict(dp_shard=2, ep=2), ["this model is dense", "--parallel.ep 1"]),
    (4, dict(dp_shard=4, ep=3), ["parallel.ep = 3 does not divide model.moe_experts = 8", "--parallel.ep in {1, 2, 4}"]),
    (4, dict(dp_shard=2, tp=2, ep=4), ["does not divide parallel.dp_shard x parallel.cp = 2 x 1 = 2",
                                       "--parallel.ep in {1, 2}", "parallel.dp_shard to a multiple of 4"]),
    (4, dict(dp_shard=1, cp=2, pp=2, ep=4), ["parallel.dp_shard x parallel.cp = 1 x 2 = 2", "--parallel.ep in {1, 2}"]),
], ids=["dense", "experts", "dp_shard", "cp"])
def test_impossible_ep_is_refused_naming_valid_degrees(world, degrees, needles):
    with pytest.raises(LayoutError) as info:
        _check(world, "debug" if "dense" in needles[0] else "moe_debug", **degrees)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize("world,degrees", [
    (2, dict(dp_shard=1, tp=2)), (2, dict(dp_shard=1, pp=2)), (2, dict(dp_shard=1, cp=2)),
    (2, dict(dp_shard=1, cp=2, ep=2)), (8, dict(dp_shard=2, cp=2, tp=2, ep=4)), (4, dict(dp_replicate=2, dp_shard=2, ep=2)),
])
def test_moe_and_qk_norm_compose_with_model_parallel_layouts(world, degrees):
    _check(world, **degrees)  # no error: MoE under tp / pp / cp, and ep from dp_shard x cp
    if degrees.get("ep", 1) == 1:
        _check(world, "debug", **degrees)  # the q/k norms (qk_norm = true) have a tensor-parallel plan


def test_cli_refuses_impossible_ep_in_one_line(capsys, tmp_path):
    code, err = main_exit(capsys, "train", "--model.flavor", "moe_debug", "--parallel.ep", "3",
                          "--run-dir", str(tmp_path / "run"))
    assert code == 2 and "parallel.ep = 3 does not divide model.moe_experts = 8" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_ep_degree_must_be_positive():
    with pytest.raises(ConfigError, match="parallel.ep must be >= 1"):
        load_config(None, ["--parallel.ep", "0"])


def test_aux_loss_of_a_sequence_split_over_cp_ranks_averages_to_the_whole():
    """Each part computes E * sum_e f_e P_e with the WHOLE sequence's routed fractions f (its
    counts summed over the parts) and its own tokens' mean probabilities P; averaging over the
    parts, as averaging gradients over the cp ranks does, gives the whole sequence's loss (and
    gradient). Without the summed counts it does not."""
    torch.manual_seed(0)
    e, k = 6, 2
    logits = torch.randn(3, 8, e, requires_grad=True)  # [B, S, E]
    probs = logits.softmax(-1)
    ids = torch.topk(probs, k, -1).indices
    whole = sequence_aux_loss(probs, ids, e)
    chunks = [slice(0, 2), slice(6, 8)], [slice(2, 4), slice(4, 6)]  # cp = 2, rank r: chunks r, 3 - r
    parts = [(torch.cat([probs[:, c] for c in cs], 1), torch.cat([ids[:, c] for c in cs], 1)) for cs in chunks]

    def counts(i):  # [B, E] slots per expert of part i
        return torch.zeros(3, e).scatter_add_(1, parts[i][1].reshape(3, -1), torch.ones(3, 4 * k))

    total = counts(0) + counts(1)
    split = [sequence_aux_loss(p, i, e, sum_counts=lambda c: total) for p, i in parts]
    torch.testing.assert_close((split[0] + split[1]) / 2, whole)
    g_whole, = torch.autograd.grad(whole, logits, retain_graph=True)
    g_split, = torch.autograd.grad((split[0] + split[1]) / 2, logits)
    torch.testing.assert_close(g_split, g_whole)
    local_only = sum(sequence_aux_loss(p, i, e) for p, i in parts) / 2
    assert abs(local_only.item() - whole.item()) > 1e-3


def test_all_to_all_bytes_per_layer_and_micro_batch():
    """qwen3_30b_a3b (dim 2048, top-8 of 128 experts), 2 x 4096 tokens, bf16, ep = 8: 7/8 of the
    65,536 token slots leave the rank, 4 KiB each, in each of the four all-to-alls."""
    cfg = model_config_for("qwen3_30b_a3b")
    b = moe_dispatch_bytes(cfg, batch=2, seq_len=4096, ep=8, dtype_bytes=2)
    assert b["dispatch"] == b["combine"] == b["combine_grad"] == b["dispatch_grad"] == 65536 * 7 // 8 * 4096
    assert b["counts"] == 128 * 8 * 7 // 8
    assert set(moe_dispatch_bytes(cfg, 2, 4096, ep=1).values()) == {0}


def test_run_header_shows_ep_apart_from_the_world_factors():
    from scaletrain.bench.runner import layout_name
    from scaletrain.parallel.dims import ParallelDims
    from scaletrain.train.runinfo import run_info_header

    dims = ParallelDims(dp_replicate=1, dp_shard=4, tp=1, pp=1, cp=1, ep=2)
    header = run_info_header({"world_size": 4, "layout": {k: getattr(dims, k) for k in
                                                          ("dp_replicate", "dp_shard", "tp", "pp", "cp", "ep")}})
    assert "world 4: dp_replicate 1 x dp_shard 4 x tp 1 x pp 1 x cp 1, experts over ep 2" in header.splitlines()
    assert layout_name(dims) == "dp_shard=4 ep=2"
