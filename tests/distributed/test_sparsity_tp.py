"""The 2:4-sparse Squared-ReLU FFN under tensor parallelism (parallel/tp.py `sparse_ffn_tp`) on
2 gloo CPU ranks, against the same model on one process (the "reference" backend: the dense
emulation of the 2:4 kernels, the CPU path).

Ranks are started with torch.multiprocessing.spawn and meet through a FileStore in tmp_path;
each writes its results to tmp_path and the test compares them in the parent.

Tolerance: fp32, relative 1e-5 on the loss and 1e-5 absolute on gradients (O(1e-2..1) values).
TP splits the hidden units H over the ranks (192 / 2 = 96, a multiple of 4, so every 2:4 group
stays whole on one rank and the masks are the single-device masks) and sums the two halves of
the w2 product in a reduce-scatter, so only the order of fp32 sums changes; a missing reduction
or a wrong mask shows up at the 1e-2 level.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from scaletrain.model import build_model
from scaletrain.config.flavors import model_config_for

LOSS_RTOL = 1e-5
GRAD_ATOL = 1e-5
SEQ, BATCH = 16, 2


def _cfg():
    return model_config_for("debug", ffn="squared_relu", activation_sparsity="2:4")


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, _cfg().vocab_size, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    inputs, targets = _tokens()
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach()
             for name, p in model.named_parameters()}
    return loss.detach(), grads


def _tp_worker(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from scaletrain.model.transformer import Transformer
    from scaletrain.parallel.init import materialize
    from scaletrain.parallel.tp import apply_tp, sparse_ffn_tp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    with torch.device("meta"):
        model = Transformer(_cfg())
    apply_tp(model, mesh)
    materialize([model], "cpu", seed=0)
    assert all(block.feed_forward.sparse_ffn is sparse_ffn_tp for block in model.layers.values())
    loss, grads = _loss_and_grads(model)
    torch.save({"loss": loss, "grads": grads}, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_2to4_ffn_under_tp_matches_single_device(tmp_path):
    world = 2
    mp.spawn(_tp_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    ref_loss, ref_grads = _loss_and_grads(build_model(_cfg(), seed=0))
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], ref_loss, rtol=LOSS_RTOL, atol=0)
        assert set(got["grads"]) == set(ref_grads)
        for name, ref in ref_grads.items():
            torch.testing.assert_close(got["grads"][name], ref, rtol=0, atol=GRAD_ATOL, msg=name)
