"""Context parallelism (CP): split every sequence over `cp` ranks; attention all-gathers K/V.

Why our own: PyTorch's experimental `context_parallel` has no CPU sharding rule for SDPA, so
scaletrain carries a small CP attention built on autograd-aware functional collectives
(`torch.distributed._functional_collectives`); it runs unchanged on gloo and NCCL.

Layout (load-balanced causal). A sequence of S tokens is cut into 2*cp equal chunks of
c = S / (2*cp) tokens; rank r holds chunks r and 2*cp-1-r, in that order. Under a causal mask
an early chunk is cheap and a late one expensive, so pairing them gives every rank the same
attention work: chunk g attends to (g+1)*c keys, and r + 1 + (2*cp - r) = 2*cp + 1 chunk-rows
per rank. Everything per-token (embedding, norms, FFN, loss) runs on the local S/cp tokens with
no communication; the trainer feeds each rank `shard_sequence(tokens)` and
`shard_sequence(targets)`. Every rank holds the same number of tokens, so the global mean loss
is the average over cp ranks of the local means: averaging gradients over the cp ranks (as
FSDP does over a dp_shard x cp mesh) gives exactly the single-device gradient.

Attention. Each rank computes q, k, v for its S/cp tokens (RoPE at their true positions: see
`apply_cp`), all-gathers K and V over the cp group (one collective carrying both, on the
n_kv_heads un-repeated heads), puts the keys in natural order and, for each of its two query
chunks g, runs SDPA against keys [0, (g+1)*c) with a lower-right causal bias. That is exactly
the mask pos_q >= pos_k of full causal attention, so the result equals single-device
attention up to fp32 reduction order. In backward the all-gather becomes a reduce-scatter
(sum): every rank's contribution to dL/dK, dL/dV flows back to the rank that owns those tokens.

Cost per rank and per layer, with b = batch, S = full sequence, h_kv = kv heads,
hd = head dim and e = bytes per element:
- all-gather K and V: receives 2 * b * h_kv * hd * S * (cp-1)/cp * e bytes in forward and
  reduce-scatters the same volume of gradients in backward: O(S) per rank, not O(S / cp).
- gathered K/V held for backward: 2 * b * h_kv * hd * S * e bytes (plus the n_rep-fold
  repeat for grouped-query attention), O(S) per rank; every other activation is O(S / cp).
- attention FLOPs: 4 * b * n_heads * hd * c^2 * (2*cp + 1) forward (balanced over ranks),
  against 4 * b * n_heads * hd * S^2 / 2 for the full causal sequence on one device.
On CUDA the lower-right causal bias dispatches to the flash / memory-efficient kernels
without materialising a mask; on CPU SDPA materialises a [c, (g+1)*c] boolean mask.
The all-gather is not overlapped with compute (a ring of send/recv would be); at the
sequence lengths where that matters, the planner should charge its full time.

Limitations: the layout is static for one `seq_len` (every forward must carry exactly
seq_len / cp local tokens; anything else raises LayoutError), so generation and evaluation at
another length do not work on a CP-applied model: generate with an un-applied copy.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention.bias import causal_lower_right

from scaletrain.errors import LayoutError


def cp_positions(seq_len: int, cp: int, cp_rank: int) -> torch.LongTensor:
    """Token positions (int64 [seq_len / cp], increasing) held by `cp_rank`: chunks r and 2cp-1-r.

    Raises LayoutError when seq_len is not a multiple of 2 * cp (parallel/layout.py's rule).
    """
    from scaletrain.parallel.dims import ParallelDims
    from scaletrain.parallel.layout import check_layout

    if not 0 <= cp_rank < cp:
        raise LayoutError(f"context parallel rank {cp_rank} is outside [0, parallel.cp={cp})")
    check_layout(ParallelDims(1, 1, 1, 1, cp), None, None, seq_len, 1)
    c = seq_len // (2 * cp)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c)
    second = torch.arange((2 * cp - 1 - cp_rank) * c, (2 * cp - cp_rank) * c)
    return torch.cat((first, second))


def shard_sequence(x: torch.Tensor, cp: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """`cp_rank`'s part of a full-sequence tensor (tokens, targets: [batch, seq]) along `dim`."""
    if cp == 1:
        return x
    positions = cp_positions(x.shape[dim], cp, cp_rank).to(x.device)
    return x.index_select(dim, positions)


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[cp, *x.shape]: x from every rank of `group`, stacked in rank order (autograd-aware).

    Backward is a reduce-scatter (sum) of the incoming gradient, which gloo supports.
    """
    from torch.distributed import _functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    out = gather(x.unsqueeze(0).contiguous(), 0, group)  # [cp, ...]
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group, cp: int, cp_rank: int,
                 local_seq: int, n_rep: int = 1) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence of the cp `group`.

    q, k, v: [batch, heads, local_seq, head_dim], this rank's tokens in the `cp_positions`
    layout (k/v already repeated n_rep times per kv head, HF repeat_kv order) -> out, same
    shape as q. Collective: every rank of `group` must call it in the same order.
    """
    bsz, n_heads, seq, head_dim = q.shape
    if seq != local_seq:
        raise LayoutError(
            f"context parallelism was applied for {local_seq} local tokens (data.seq_len / parallel.cp) "
            f"but got {seq}; a CP model only runs on sequences of exactly data.seq_len tokens "
            "(generate or evaluate at other lengths with a model without apply_cp)"
        )
    c = seq // 2
    # Gather only the distinct kv heads: n_rep times less traffic than the repeated ones.
    # Slicing is exact: every copy of a kv head is equal, and repeat_interleave's backward
    # sums the copies' gradients, all of which arrive through the first copy.
    kv = torch.stack((k[:, ::n_rep], v[:, ::n_rep]))  # [2, b, kv_heads, seq, hd]
    kv = _all_gather_seq(kv, group)  # [cp, 2, b, kv_heads, seq, hd]
    n_kv = kv.shape[3]
    kv = kv.view(cp, 2, bsz, n_kv, 2, c, head_dim).permute(1, 2, 3, 0, 4, 5, 6)  # [2, b, kvh, cp, 2, c, hd]
    kv = kv.reshape(2, bsz, n_kv, 2 * cp, c, head_dim)  # chunk slot 2*rank + j
    # Natural order: global chunk g < cp sits in rank g's first slot, g >= cp in rank 2cp-1-g's second.
    # Rank r needs keys only up to the end of its late chunk 2cp-1-r.
    n_chunks = 2 * cp - cp_rank
    order = [2 * g if g < cp else 2 * (2 * cp - 1 - g) + 1 for g in range(n_chunks)]
    kv = kv.index_select(3, torch.tensor(order, device=kv.device))  # [2, b, kvh, n_chunks, c, hd]
    kv = kv.reshape(2, bsz, n_kv, n_chunks * c, head_dim)  # keys at positions [0, n_chunks * c)
    if n_rep > 1:
        kv = kv.repeat_interleave(n_rep, dim=2)  # [2, b, heads, n_chunks * c, hd]
    keys, values = kv[0], kv[1]
    outs = []
    for j, g in enumerate((cp_rank, 2 * cp - 1 - cp_rank)):
        q_chunk = q[:, :, j * c:(j + 1) * c]  # [b, heads, c, hd] at positions [g*c, (g+1)*c)
        n_keys = (g + 1) * c
        # Lower-right causal over [c, (g+1)c]: query i (position g*c + i) sees keys <= g*c + i.
        mask = None if g == 0 else causal_lower_right(c, n_keys)
        outs.append(F.scaled_dot_product_attention(q_chunk, keys[:, :, :n_keys], values[:, :, :n_keys],
                                                   attn_mask=mask, is_causal=g == 0))
    return torch.cat(outs, dim=2)  # [b, heads, seq, hd]


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, seq_len: int) -> nn.Module:
    """Make `model` run one cp rank's share of `seq_len`-token sequences, in place.

    Swaps every Attention's `attention_fn` for `cp_attention` over `cp_mesh`'s group and
    replaces the model's RoPE tables `rope_cos` / `rope_sin` with the rows at this rank's
    positions, so the unchanged Attention's `cos[:local_seq]` holds the true angles. The tables
    are non-persistent buffers: checkpoints are unaffected and load under any cp degree. Works
    on a materialised or a meta model: `init_buffers` is wrapped to re-select the rows after it
    refills the full tables. Finds Attention modules through activation-checkpoint wrappers.
    """
    from scaletrain.model.transformer import Attention, rope_cos_sin

    if cp_mesh.ndim != 1:
        raise LayoutError(f"apply_cp needs a 1-D cp mesh, got {cp_mesh.ndim}-D {cp_mesh.mesh_dim_names}")
    cp, cp_rank = cp_mesh.size(), cp_mesh.get_local_rank()
    positions = cp_positions(seq_len, cp, cp_rank)
    cfg = model.cfg
    if seq_len > cfg.max_seq_len:
        raise LayoutError(f"data.seq_len={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    if cp == 1:
        return model
    local_seq = seq_len // cp
    group = cp_mesh.get_group()
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    if not attentions:
        raise LayoutError("apply_cp found no Attention module in the model")
    for attn in attentions:
        attn.attention_fn = partial(cp_attention, group=group, cp=cp, cp_rank=cp_rank,
                                    local_seq=local_seq, n_rep=attn.n_rep)

    def select_rope_rows() -> None:
        device = model.rope_cos.device
        cos, sin = rope_cos_sin(model.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device)
        index = positions.to(device)
        model.rope_cos = cos.index_select(0, index)  # [local_seq, head_dim], still non-persistent
        model.rope_sin = sin.index_select(0, index)

    init_buffers = model.init_buffers

    @torch.no_grad()
    def init_buffers_cp() -> None:
        # init_buffers copies full [max_seq_len, hd] tables into the buffers: give it room.
        device = model.rope_cos.device
        model.rope_cos = torch.empty(cfg.max_seq_len, model.head_dim, device=device)
        model.rope_sin = torch.empty(cfg.max_seq_len, model.head_dim, device=device)
        init_buffers()
        select_rope_rows()

    with torch.no_grad():
        select_rope_rows()
    model.init_buffers = init_buffers_cp
    return model
