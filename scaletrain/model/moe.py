"""Mixture-of-experts feed-forward layer: plain single-device PyTorch (docs/moe.md).

One MoE layer, for the T = batch * seq tokens of a micro-batch:

    x [T, dim] --Router (fp32)--> expert ids [T, k], weights [T, k], probabilities [T, E]
      --permute: argsort of the expert ids--> tokens grouped by expert [N, dim], counts [E]
      --GroupedExperts(x_grouped, counts)--> [N, dim]        (the expert-parallel boundary)
      --combine: inverse permutation, weighted sum over k--> [T, dim]  (+ shared experts)

N = T * k (dropless), or fewer when a capacity factor drops token slots. No Python loop runs
over tokens; the CPU reference path loops over experts. Parameter names (a contract with
parallel/, export/ and recipes/btx.py): `router.gate.weight` [E, dim], the persistent buffer
`router.expert_bias` [E], `experts.w1` / `experts.w3` [E, f, dim], `experts.w2` [E, dim, f],
and `shared.w1/w2/w3` (an nn.Linear SwiGLU of width f * moe_shared_experts).

Load balancing: the auxiliary loss is injected into backward by `AddAuxLoss` (the output is
unchanged; the router receives coef * d(aux)/d(router) on top of its task gradient), so the
trainer's loss, pipelining and compile plumbing never see it. The auxiliary-loss-free expert
bias is updated from outside (train/moe_stats.py) after each optimizer step; this module only
records what it routed (`pop_stats`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import ModelConfig
from scaletrain.model.flops import expert_ffn_dim


# ----------------------------------------------------------------------------- routing


class Router(nn.Module):
    """Top-k gate in fp32 (autocast off: the scores decide discrete choices, and bf16 rounding
    flips near-ties between runs).

    "softmax" (Mixtral, Qwen3-MoE): probabilities = softmax(logits) over all experts; the top-k
    are chosen and their probabilities renormalised to sum to 1.
    "sigmoid" (DeepSeek-V3): scores = sigmoid(logits); the top-k scores, normalised to sum to 1,
    are the weights.
    `expert_bias` (moe_balance = "bias", arXiv 2408.15664) is added for the top-k SELECTION only;
    the weights come from the unbiased scores.
    """

    def __init__(self, dim: int, n_experts: int, top_k: int, score: str):
        super().__init__()
        self.top_k, self.score = top_k, score
        self.gate = nn.Linear(dim, n_experts, bias=False)
        # Persistent: a resumed run must route as the saved one did. init_buffers zeroes it.
        self.register_buffer("expert_bias", torch.empty(n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, dim] -> (expert ids [T, k] int64, weights [T, k] fp32 summing to 1 per token,
        probabilities [T, E] fp32 for the auxiliary loss: the softmax, or the sigmoid scores
        normalised per token)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())  # [T, E]
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        ids = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(-1, ids)
        weights = weights / weights.sum(-1, keepdim=True)
        probs = scores if self.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        return ids, weights, probs


def sequence_aux_loss(probs: torch.Tensor, ids: torch.Tensor, n_experts: int,
                      sum_counts: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Switch/GShard load-balancing loss per SEQUENCE, averaged over the sequences:

        L = mean_b  E * sum_e f_{b,e} * P_{b,e}
        f_{b,e} = (token slots of sequence b routed to e) / (seq * k)   (no gradient)
        P_{b,e} = mean over the tokens of sequence b of probs[., e]

    probs [B, S, E], ids [B, S, k] -> scalar fp32. L = 1 when routing is uniform, E when every
    token of a sequence goes to the expert holding all probability. Sequence-wise (as
    DeepSeek-V3's complementary loss) rather than over the micro-batch: a mean over sequences is
    the same whatever the micro-batch size, gradient accumulation or data-parallel split, so
    every layout trains the same objective (docs/moe.md).

    When the S tokens are a part of each sequence (context parallelism), `sum_counts` adds the
    [B, E] slot counts of the other parts, so f is the whole sequence's; P stays the mean over
    the local tokens, and the mean of this loss over the parts (what averaging gradients over
    the parts computes) is the whole sequence's loss.
    """
    b, s, k = ids.shape
    counts = torch.zeros(b, n_experts, device=ids.device).scatter_add_(
        1, ids.reshape(b, s * k), torch.ones(b, s * k, device=ids.device))  # [B, E]
    if sum_counts is not None:
        counts = sum_counts(counts)
    f = counts / counts.sum(-1, keepdim=True)  # the sum is the sequence's slots, seq * k: exact
    return (n_experts * (f * probs.mean(1)).sum(-1)).mean()


class AddAuxLoss(torch.autograd.Function):
    """y = x in forward; in backward the scalar `aux` receives gradient `scale` (DeepSeek-V2's
    AddAuxiliaryLoss), so `scale * aux` joins the training objective without touching the loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


# ------------------------------------------------------------------------ permutation


@dataclass
class Dispatch:
    """Where every token slot (token t's j-th choice is slot t * k + j) goes.

    order  [N] int64: the kept slots grouped by expert (expert 0's first), token order within
           an expert (a stable sort, so capacity drops are deterministic: latest tokens first)
    counts [E] int64: kept slots per expert (sum N)
    routed [E] int64: slots routed per expert before the capacity cut (load statistics)
    """

    order: torch.Tensor
    counts: torch.Tensor
    routed: torch.Tensor


def permute(ids: torch.Tensor, n_experts: int, capacity: int | None = None) -> Dispatch:
    """Sort the token slots of `ids` [T, k] by expert; with `capacity`, keep at most that many
    slots per expert (the earliest tokens) and drop the rest."""
    flat = ids.reshape(-1)  # [T * k] expert of each slot
    order = torch.argsort(flat, stable=True)  # [T * k]
    routed = torch.bincount(flat, minlength=n_experts)  # [E]
    if capacity is None:
        return Dispatch(order, routed, routed)
    starts = torch.cumsum(routed, 0) - routed  # [E] first sorted position of each expert
    rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # [T * k]
    keep = rank_in_expert < capacity
    return Dispatch(order[keep], routed.clamp(max=capacity), routed)


def combine(y: torch.Tensor, dispatch: Dispatch, weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs y [N, dim] (in dispatch order) -> tokens [T, dim]: sum over each token's k
    slots of weight * output; a dropped slot contributes 0. Gathers only (no scatter-add), so
    the sum order is fixed and the result deterministic on every device."""
    t, k = weights.shape
    n = y.shape[0]
    position = torch.full((t * k,), n, dtype=torch.long, device=y.device)  # n = the zero row
    position[dispatch.order] = torch.arange(n, device=y.device)
    slots = torch.cat([y, y.new_zeros(1, y.shape[1])])[position]  # [T * k, dim]
    return (slots.view(t, k, -1) * weights.to(slots.dtype).unsqueeze(-1)).sum(1)  # [T, dim]


def capacity_for(tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """Slots each expert takes per micro-batch: ceil(factor * tokens * top_k / n_experts)."""
    return math.ceil(factor * tokens * top_k / n_experts)


# ---------------------------------------------------------------------------- experts


def experts_reference(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                      w3: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each expert on its rows: x [N, dim] grouped by expert with `counts` [E] rows
    each -> [N, dim]. Plain per-expert matmuls (autocast applies): the numerics oracle. Reads
    the counts on the host (one device sync)."""
    out = []
    for e, rows in enumerate(torch.split(x, counts.tolist())):
        out.append(F.linear(F.silu(F.linear(rows, w1[e])) * F.linear(rows, w3[e]), w2[e]))
    return torch.cat(out)


def experts_grouped(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                    w3: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The same computation as `experts_reference` with three `torch._grouped_mm` calls in
    `dtype` (bf16 on CUDA; fp32 and bf16 also run on the CPU in torch >= 2.9). The groups
    are delimited by int32 end offsets cumsum(counts); they must end exactly at N (rows past
    the last offset get no gradient). No host sync."""
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E] end row of each expert
    x = x.to(dtype)

    def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # a [N, in] x w [E, out, in]^T
        return torch._grouped_mm(a, w.to(dtype).transpose(-2, -1), offs=offs)

    return mm(F.silu(mm(x, w1)) * mm(x, w3), w2)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class GroupedExperts(nn.Module):
    """E SwiGLU experts stacked into 3-D weights: w1, w3 [E, f, dim], w2 [E, dim, f].

    forward(x, counts) is the boundary expert parallelism wraps from outside (its all-to-all
    dispatch before, combine after; torchtitan's ExpertParallel style fits it): rows of x are
    already grouped by expert, counts[e] rows for the e-th expert this module holds.
    `backend`: "reference" (per-expert loop), "grouped" (torch._grouped_mm), or "auto" (grouped
    on CUDA in bf16 when torch has it, else reference).
    """

    def __init__(self, dim: int, hidden: int, n_experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.backend = "auto"
        # Expert parallelism (parallel/ep.py) makes the weights sharded tensors of all E experts
        # and sets this to take their local part; counts then has one entry per local expert.
        self.local_weight: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        grouped = self.backend == "grouped" or (
            self.backend == "auto" and x.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"))
        w1, w2, w3 = self.w1, self.w2, self.w3
        if self.local_weight is not None:  # expert parallelism: this rank's experts only
            w1, w2, w3 = self.local_weight(w1), self.local_weight(w2), self.local_weight(w3)
        if grouped:
            return experts_grouped(x, counts, w1, w2, w3, dtype)
        return experts_reference(x, counts, w1, w2, w3)


# ------------------------------------------------------------------------------- layer


class MoE(nn.Module):
    """The MoE FFN of layer `layer_id`: x [batch, seq, dim] -> [batch, seq, dim].

    `shared` is the always-on expert module (a SwiGLU FeedForward of width f * shared experts)
    or None. Capacity drops apply in training only; evaluation and generation are dropless (as
    the Hugging Face Qwen3-MoE, so an exported model computes what eval computed).
    """

    def __init__(self, cfg: ModelConfig, layer_id: int, shared: nn.Module | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.capacity_factor = cfg.moe_capacity_factor
        self.aux_coef = cfg.moe_aux_coef if cfg.moe_balance == "aux_loss" else 0.0
        # Multiplies the aux-loss gradient like the trainer scales the task loss (1 / grad_accum).
        self.aux_grad_scale = 1.0
        self.router = Router(cfg.dim, cfg.moe_experts, cfg.moe_top_k, cfg.moe_router)
        self.experts = GroupedExperts(cfg.dim, expert_ffn_dim(cfg), cfg.moe_experts)
        self.shared = shared
        # Context parallelism sets this (parallel/ep.py): sums each sequence's expert counts over
        # the ranks holding the sequence's other tokens. None: whole sequences are here.
        self.sum_sequence_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._stats: list[torch.Tensor] = []  # one record per forward pass; see pop_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, dim = x.shape
        tokens = x.reshape(b * s, dim)  # [T, dim]
        ids, weights, probs = self.router(tokens)  # [T, k], [T, k], [T, E]
        capacity = None
        if self.training and self.capacity_factor > 0:
            capacity = capacity_for(b * s, self.top_k, self.n_experts, self.capacity_factor)
        dispatch = permute(ids, self.n_experts, capacity)
        y = self.experts(tokens[dispatch.order // self.top_k], dispatch.counts)  # [N, dim]
        out = combine(y, dispatch, weights)  # [T, dim]
        if self.shared is not None:
            out = out + self.shared(tokens)
        aux = sequence_aux_loss(probs.view(b, s, -1), ids.view(b, s, -1), self.n_experts, self.sum_sequence_counts)
        if self.aux_coef > 0 and self.training and torch.is_grad_enabled():
            out = AddAuxLoss.apply(out, aux, self.aux_coef * self.aux_grad_scale)
        self._record(dispatch, aux)
        return out.view(b, s, dim)

    @torch.no_grad()
    def _record(self, dispatch: Dispatch, aux: torch.Tensor) -> None:
        # Activation checkpointing re-runs this forward inside backward: count each batch once.
        if torch._C._current_graph_task_id() != -1:
            return
        dropped = (dispatch.routed - dispatch.counts).sum()
        stats = torch.cat([dispatch.routed.float(), torch.stack([dropped.float(), aux.detach().float(),
                                                                  torch.ones((), device=aux.device)])])
        self._stats.append(stats)

    def pop_stats(self, last: int | None = None) -> torch.Tensor | None:
        """What this layer routed in its last `last` forward passes (default: all since the
        previous call), summed, as one fp32 tensor [E + 3] on the device: slots routed to each
        expert (before capacity), slots dropped, the sum of the auxiliary losses, the number of
        forward passes. None when it has not run. Forgets every record.

        `last` lets the caller drop passes it did not ask for: a pipeline schedule runs one
        forward to infer its stages' shapes before the step's micro-batches."""
        stats, self._stats = self._stats if last is None else self._stats[-last:], []
        if not stats:
            return None
        total = stats[0]
        for record in stats[1:]:
            total = total + record
        return total
