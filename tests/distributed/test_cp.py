"""Context parallelism on 2 and 4 gloo CPU ranks against single-process references.

Every case runs in ONE group of 4 spawned ranks (conftest.spawn_cases): the cp=4 attention
over all of them, the cp=2 cases over two pairs of ranks (ranks 0-1 and 2-3, each pair its own
cp group computing the same thing; ranks 0 and 1 report). Each rank writes its results to a
folder and the tests compare them in the parent; a failing case fails its own test with that
rank's traceback.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import spawn_cases
from scaletrain.errors import LayoutError
from scaletrain.model import build_model
from scaletrain.config.flavors import model_config_for
from scaletrain.parallel.cp import cp_attention, cp_positions, shard_sequence

# fp32 throughout: CP changes only the order of the softmax/matmul reductions (keys split
# into chunks, gradients summed over ranks), so results agree to a few fp32 ulps of O(1) values.
ATTN_ATOL = 1e-5
MODEL_RTOL = 1e-5


def _pair_mesh():
    """A (pair, cp) mesh of the 4 ranks: this rank's "cp" sub-mesh is a cp=2 group."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("pair", "cp"))


def _run_case(name: str, rank: int, world: int, out: str) -> None:
    """One case on this spawned rank (the 4-rank group is formed by the first case)."""
    if not dist.is_initialized():  # a short timeout turns a hang into an error
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    if name == "attention_cp4":
        result = _attention(dist.group.WORLD, world, rank, seq=8 * 4)
    else:
        cp_mesh = _pair_mesh()["cp"]
        result = _attention(cp_mesh.get_group(), 2, cp_mesh.get_local_rank(), seq=8 * 2) if name == "attention_cp2" \
            else _model_cp(cp_mesh)
    if name == "attention_cp4" or rank < 2:
        torch.save(result, Path(out) / f"{name}.rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("cp")
    return out, spawn_cases(4, ["attention_cp4", "attention_cp2", "model_cp2"], _run_case, out, str(out))


def _results(results, name: str, world: int) -> list[dict]:
    out, errors = results
    assert name not in errors, f"{name} failed:\n{errors.get(name, '')[-4000:]}"
    return [torch.load(out / f"{name}.rank{r}.pt", weights_only=True) for r in range(world)]


# ---------------------------------------------------------------- attention kernel alone

B, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 8
N_REP = HEADS // KV_HEADS


def _attention_inputs(seq: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, HEADS, seq, HEAD_DIM, generator=g)
    k = torch.randn(B, KV_HEADS, seq, HEAD_DIM, generator=g)
    v = torch.randn(B, KV_HEADS, seq, HEAD_DIM, generator=g)
    grad_out = torch.randn(B, HEADS, seq, HEAD_DIM, generator=g)
    return q, k, v, grad_out


def _attention(group, cp: int, cp_rank: int, seq: int) -> dict:
    q, k, v, grad_out = (shard_sequence(t, cp, cp_rank, dim=2) for t in _attention_inputs(seq))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = cp_attention(q, k.repeat_interleave(N_REP, dim=1), v.repeat_interleave(N_REP, dim=1),
                       group=group, cp=cp, cp_rank=cp_rank, local_seq=seq // cp, n_rep=N_REP)
    (out * grad_out).sum().backward()
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _unshard(parts: list[torch.Tensor], seq: int, dim: int) -> torch.Tensor:
    """Inverse of shard_sequence: place each rank's slice back at its positions."""
    world = len(parts)
    shape = list(parts[0].shape)
    shape[dim] = seq
    full = parts[0].new_zeros(shape)
    for rank, part in enumerate(parts):
        full.index_copy_(dim, cp_positions(seq, world, rank), part)
    return full


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_attention_matches_full_causal_sdpa(results, cp):
    seq = 8 * cp  # chunks of 4 tokens
    results = _results(results, f"attention_cp{cp}", cp)

    q, k, v, grad_out = _attention_inputs(seq)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(N_REP, dim=1), v.repeat_interleave(N_REP, dim=1),
                                         is_causal=True)
    (ref * grad_out).sum().backward()
    expected = {"out": ref.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for name, want in expected.items():
        got = _unshard([r[name] for r in results], seq, dim=2)
        err = (got - want).abs().max().item()
        print(f"cp={cp} {name}: max abs error {err:.2e}")
        torch.testing.assert_close(got, want, atol=ATTN_ATOL, rtol=0, msg=lambda m: f"cp={cp} {name}: {m}")


# ---------------------------------------------------------------- whole debug model

SEQ, BATCH = 64, 2


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    vocab = model_config_for("debug").vocab_size
    tokens = torch.randint(vocab, (BATCH, SEQ), generator=g)
    targets = torch.randint(vocab, (BATCH, SEQ), generator=g)
    return tokens, targets


def _model_cp(mesh) -> dict:
    from scaletrain.model.transformer import Transformer
    from scaletrain.parallel.ac import apply_ac
    from scaletrain.parallel.cp import apply_cp
    from scaletrain.parallel.init import materialize

    world, rank, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
    # The trainer's order: build on meta, wrap (AC, then CP), materialise and initialise. The
    # same seed as build_model(seed=0) must give the same weights and the CP RoPE rows.
    with torch.device("meta"):
        model = Transformer(model_config_for("debug"))
    apply_ac(model, "full")  # CP must find Attention modules inside checkpoint wrappers
    apply_cp(model, mesh, SEQ)
    materialize([model], "cpu", seed=0)

    tokens, targets = (shard_sequence(t, world, rank) for t in _tokens())
    logits = model(tokens)  # [b, seq / cp, vocab]
    # Each rank's share of the global mean: its token sum over all tokens; summed over ranks.
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / (BATCH * SEQ)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
        grads[name.replace("_checkpoint_wrapped_module.", "")] = p.grad
    total = loss.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return {"logits": logits.detach(), "loss": total, "grads": grads, "rope_rows": model.rope_cos.shape[0]}


def test_debug_model_with_cp2_matches_single_process(results):
    world = 2
    results = _results(results, "model_cp2", world)

    model = build_model(model_config_for("debug"), seed=0)
    tokens, targets = _tokens()
    logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()

    assert all(r["rope_rows"] == SEQ // world for r in results)
    got_logits = _unshard([r["logits"] for r in results], SEQ, dim=1)
    print(f"logits max abs error {(got_logits - logits).abs().max().item():.2e}")
    torch.testing.assert_close(got_logits, logits.detach(), rtol=MODEL_RTOL, atol=1e-6)
    for r in results:
        print(f"loss {r['loss'].item():.8f} vs {loss.item():.8f}")
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=MODEL_RTOL, atol=0)
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    for r in results:
        assert r["grads"].keys() == ref_grads.keys()
        for name, want in ref_grads.items():
            got = r["grads"][name]
            rel = ((got - want).norm() / want.norm()).item()
            print(f"{name}: relative error {rel:.2e}")
            # Relative in norm per tensor: single elements near zero carry no information.
            assert rel <= MODEL_RTOL, f"{name}: gradient relative error {rel:.2e} > {MODEL_RTOL}"


# ---------------------------------------------------------------- pure layout checks

def test_cp_positions_layout():
    assert cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert cp_positions(16, 4, 1).tolist() == [2, 3, 12, 13]
    assert cp_positions(16, 1, 0).tolist() == list(range(16))
    for cp in (1, 2, 4, 8):
        all_pos = torch.cat([cp_positions(64, cp, r) for r in range(cp)])
        assert sorted(all_pos.tolist()) == list(range(64))  # a partition of the sequence
        assert all(cp_positions(64, cp, r).dtype == torch.int64 for r in range(cp))


def test_shard_sequence_takes_the_positions():
    x = torch.arange(2 * 16).view(2, 16)
    assert shard_sequence(x, 2, 1).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26, 27]]
    assert shard_sequence(x, 1, 0) is x
    y = torch.randn(2, 3, 16, 4)
    assert torch.equal(shard_sequence(y, 4, 3, dim=2), y[:, :, [6, 7, 8, 9]])
    assert torch.equal(_unshard([shard_sequence(y, 4, r, dim=2) for r in range(4)], 16, dim=2), y)


def test_bad_seq_len_is_a_layout_error():
    with pytest.raises(LayoutError) as info:
        cp_positions(100, 4, 0)
    msg = str(info.value)
    assert "data.seq_len = 100" in msg and "parallel.cp" in msg and "use data.seq_len 96" in msg
    with pytest.raises(LayoutError, match="use data.seq_len 8"):
        shard_sequence(torch.zeros(1, 6), 4, 0)  # shorter than 2 * cp: suggests the smallest valid
    with pytest.raises(LayoutError):
        cp_positions(16, 2, 2)


def test_cp_attention_rejects_another_sequence_length():
    q = torch.zeros(1, 2, 6, 4)
    with pytest.raises(LayoutError, match="exactly data.seq_len"):
        cp_attention(q, q, q, group=None, cp=2, cp_rank=0, local_seq=8)
