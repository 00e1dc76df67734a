"""The mixture-of-experts side of the planner's cost model: which parameters a rank holds,
the expert GEMMs it runs, and where its expert-parallel groups sit (docs/planner.md
"Mixture of experts").

Counting and placement only: plan/cost.py prices what this returns with its GEMM and
collective models, and model/flops.py holds every model-side formula (parameter counts,
activation bytes, the all-to-all bytes `moe_dispatch_bytes`). The layout follows
parallel/ep.py (and torchtitan): the `ep` ranks of an expert-parallel group are ep consecutive
ranks of the flattened (dp_replicate, dp_shard, cp) axes, so in global ranks they are `tp`
apart; each holds E / ep whole experts, which FSDP shards further over the dp_shard * cp / ep
ranks outside the group; the MoE FFN (router, routed and shared experts) is replicated over
tp and runs on the whole gathered sequence. Megatron-Core takes its expert-parallel ranks from
data x context parallel in the same order (`tp-cp-ep-dp-pp`), so published Megatron rows
(DDP, `Stack.fsdp = False`) use the same groups, with the expert gradients all-reduced over
the dp * cp / ep ranks of the expert-data-parallel group. Counts are scalars, sizes bytes,
times seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.schema import ModelConfig
from scaletrain.model.flops import expert_ffn_dim, is_mla
from scaletrain.model.flops_mla import mla_replicated_params
from scaletrain.plan.hardware import Hardware


@dataclass(frozen=True)
class ParamSplit:
    """Parameter counts of some layers (and the embedding / head) by how they are sharded:
    `tp`: split by tensor parallelism (attention, dense FFN, norms, embedding, head; norms are
    replicated in fact, counted with the rest as the dense model always has); `replicated`: the
    MoE router and shared experts, replicated over tp; `experts`: the routed experts, sharded
    over ep and then by FSDP."""

    tp: float = 0.0
    replicated: float = 0.0
    experts: float = 0.0

    def __add__(self, other: ParamSplit) -> ParamSplit:
        return ParamSplit(self.tp + other.tp, self.replicated + other.replicated, self.experts + other.experts)

    def scaled(self, k: float) -> ParamSplit:
        return ParamSplit(self.tp * k, self.replicated * k, self.experts * k)

    @property
    def total(self) -> float:
        return self.tp + self.replicated + self.experts


def layer_split(c: dict[str, int], moe: bool, m: ModelConfig) -> ParamSplit:
    """One transformer layer's parameters (`c` = flops.param_counts of the model `m`): a dense
    layer, or an MoE layer (`moe`). Multi-head latent attention's wq_a and wkv_a are replicated
    over tp (flops_mla.mla_replicated_params)."""
    latent = mla_replicated_params(m) if is_mla(m) else 0
    base = float(c["attention_per_layer"] - latent + c["norm_per_layer"])
    if not moe:
        return ParamSplit(tp=base + c["ffn_per_layer"], replicated=float(latent))
    return ParamSplit(tp=base, replicated=float(c["router_per_moe_layer"] + c["shared_per_moe_layer"] + latent),
                      experts=float(c["experts_per_moe_layer"]))


def moe_layers_in(m: ModelConfig, first: float, count: float) -> float:
    """How many of the layers [first, first + count) are MoE layers (the first
    moe_dense_layers are dense). Fractional bounds (a published layout whose pp does not divide
    the layers) count proportionally."""
    if m.moe_experts == 0:
        return 0.0
    return max(0.0, min(first + count, m.n_layers) - max(first, m.moe_dense_layers))


def layers_split(m: ModelConfig, c: dict[str, int], first: float, count: float) -> ParamSplit:
    """Parameters of the layers [first, first + count) (`c` = flops.param_counts(m))."""
    n_moe = moe_layers_in(m, first, count)
    return layer_split(c, False, m).scaled(count - n_moe) + layer_split(c, True, m).scaled(n_moe)


def largest_layer(m: ModelConfig, c: dict[str, int]) -> ParamSplit:
    """The layer with the most parameters (what one FSDP unit gathers at most)."""
    return layer_split(c, m.moe_experts > 0, m)


def dense_shard(layout, stack) -> int:
    """Ranks FSDP shards the non-expert parameters over: dp_shard * cp (1 without FSDP)."""
    return layout.dp_shard * layout.cp if stack.fsdp else 1


def expert_shard(layout, stack) -> int:
    """Ranks one routed expert parameter is split over: ep x the expert-FSDP ranks
    (dp_shard * cp / ep, x tp under MoE parallel folding; 1 without FSDP) -- ep_groups'
    "expert_shard" group."""
    shard = dense_shard(layout, stack) * (layout.tp if stack.moe_folding and stack.fsdp else 1)
    return layout.ep * max(1, shard // layout.ep)


def local_params(split: ParamSplit, layout, stack) -> float:
    """Parameters of `split` stored on one rank (weights, gradients and optimizer state)."""
    shard = dense_shard(layout, stack)
    return split.tp / layout.tp / shard + split.replicated / shard + split.experts / expert_shard(layout, stack)


def gathered_params(split: ParamSplit, layout) -> float:
    """Parameters of `split` one rank holds once FSDP has gathered them (split by tp and ep only)."""
    return split.tp / layout.tp + split.replicated + split.experts / layout.ep


def expert_gemms(m: ModelConfig, tokens: float, ep: int, imbalance: float = 1.0) -> dict[str, tuple[float, ...]]:
    """Forward GEMMs of one MoE layer on one rank for `tokens` tokens (a micro-batch's, the
    whole gathered sequence under tp), as name -> (count, m, n, k) of [m, k] x [k, n] products:

      "router"         1 x [T, d] x [d, E]
      "w13", "w2"      E/ep experts, each w1 and w3 [M, d] x [d, f], w2 [M, f] x [f, d], with
                       M = T k ep / E x imbalance rows per expert (balanced routing sends T k
                       slots from every rank of the group to its E/ep local experts; the
                       busiest rank of the group gets `imbalance` x the mean, and every rank
                       waits for it at the combine)
      "shared_w13", "shared_w2"   w1, w3 [T, d] x [d, f S], w2 [T, f S] x [f S, d]

    A grouped GEMM (torch._grouped_mm, Transformer Engine GroupedLinear) runs the routed
    experts in one launch; its efficiency is that of the per-expert shape."""
    d, f, E, k = m.dim, expert_ffn_dim(m), m.moe_experts, m.moe_top_k
    rows = tokens * k * ep / E * (imbalance if ep > 1 else 1.0)
    out = {"router": (1.0, tokens, E, d), "w13": (2.0 * E / ep, rows, f, d), "w2": (1.0 * E / ep, rows, d, f)}
    if m.moe_shared_experts:
        fs = f * m.moe_shared_experts
        out |= {"shared_w13": (2.0, tokens, fs, d), "shared_w2": (1.0, tokens, d, fs)}
    return out


# Kernels an MoE FFN launches beyond a dense SwiGLU FFN per micro-batch, forward + backward:
# router (gate, softmax, top-k, load-balancing loss), permutation (sort, counts, gather), the
# expert-parallel exchange (counts all-to-all, split sizes to the host, row order, the dispatch
# and combine all-to-alls and their gradients), grouped expert GEMMs, combine. Counted, not
# fitted: aten ops that launch a kernel (views excluded) of model/moe.py's MoE with grouped-GEMM
# experts under parallel/ep.py's exchange, 107, minus model/transformer.py's FeedForward, 17
# (tests/unit/test_plan_moe.py recounts them on the CPU, one all-to-all kernel per collective).
MOE_FFN_EXTRA_LAUNCHES = 90


def moe_host_prior_s(layer_ops: float, hw: Hardware) -> float:
    """Prior of the host seconds one MoE layer exposes per micro-batch (forward + backward): the
    dispatch's device-to-host sync (the token counts the all-to-all and the grouped GEMM need)
    drains the GPU queue, so the layer's launches -- `layer_ops` (a dense layer's kernels,
    Params.ops_per_layer_*) plus MOE_FFN_EXTRA_LAUNCHES -- run with the GPU waiting,
    `hw.host_overhead_s` each, instead of ahead of it. Params.moe_host_scale (fitted on the MoE
    rows only) scales it to what a framework really spends per MoE layer."""
    return (layer_ops + MOE_FFN_EXTRA_LAUNCHES) * hw.host_overhead_s


def fp8_elements(m: ModelConfig, tokens: float, ep: int) -> tuple[float, float, float]:
    """(inputs, output gradients, weights) elements of one MoE FFN's fp8 GEMMs per rank and
    micro-batch: the expert inputs of w1/w3 (one cast) and w2 on the T k slots, their output
    gradients, the E/ep local experts' weights, and the same for the shared experts. The
    router stays in fp32 (model/moe.py; Megatron-Core keeps it out of fp8 too)."""
    d, f, k = m.dim, expert_ffn_dim(m), m.moe_top_k
    fs = f * m.moe_shared_experts
    inputs = tokens * k * (d + f) + (tokens * (d + fs) if fs else 0.0)
    grads = tokens * k * (2 * f + d) + (tokens * (2 * fs + d) if fs else 0.0)
    weights = 3 * d * f * m.moe_experts / ep + 3 * d * fs
    return inputs, grads, weights


def group_link(size: int, stride: int, hw: Hardware) -> tuple[float, float]:
    """(bandwidth, latency) of a ring over `size` ranks `stride` global ranks apart: NVLink when
    the group's extent (size x stride) fits in one NVLink domain; otherwise NCCL's one ring per
    NIC: with k members per domain the group sees k x the per-GPU network bandwidth, capped by
    the domain's fabric."""
    if size * stride <= hw.gpus_per_node:
        return hw.intra_bw, hw.intra_latency
    k = max(1, min(size, hw.gpus_per_node // stride))
    return min(hw.intra_bw, k * hw.inter_bw), hw.inter_latency


def all_to_all_seconds(sent_bytes: float, n: int, stride: int, hw: Hardware, comm_eff: float) -> float:
    """One all-to-all over `n` ranks `stride` apart in which every rank sends `sent_bytes` in
    all to the n - 1 others, equal parts each (NCCL: n - 1 concurrent send/recv pairs). Inside
    one NVLink domain all of it crosses NVLink; a group spanning domains sends (n - k) / (n - 1)
    of it over the rank's own NIC (k = members per domain; an all-to-all is no ring, so the
    node's NICs do not add up) while the rest crosses NVLink at the same time: the slower of the
    two, plus (n - 1) latency steps."""
    if n <= 1:
        return 0.0
    if n * stride <= hw.gpus_per_node:
        return (n - 1) * hw.intra_latency + sent_bytes / (hw.intra_bw * comm_eff)
    k = max(1, min(n, hw.gpus_per_node // stride))
    intra = sent_bytes * (k - 1) / (n - 1) / hw.intra_bw
    inter = sent_bytes * (n - k) / (n - 1) / hw.inter_bw
    return (n - 1) * hw.inter_latency + max(intra, inter) / comm_eff


def moe_token_share(layout, stack) -> int:
    """How many ranks share one micro-batch's tokens in an MoE layer: 1 when the MoE FFN runs
    replicated over tp on the gathered sequence (scaletrain, torchtitan), tp under Megatron's
    MoE parallel folding (Stack.moe_folding: each rank routes its sequence-parallel shard)."""
    return layout.tp if stack.moe_folding else 1


def ep_groups(layout, stack) -> dict[str, tuple[int, int]]:
    """(size, stride in global ranks) of the groups expert parallelism adds:
    "ep" -- the all-to-all group (ep consecutive data ranks, tp apart; under MoE parallel
            folding ep consecutive global ranks drawn from tp x cp x dp);
    "expert_shard" -- FSDP of the local experts over dp_shard * cp / ep ranks (FSDP only);
    "expert_reduce" -- the ranks the expert gradients are all-reduced over once per step:
    dp_replicate (HSDP replicas) under FSDP, or the dp * cp / ep expert-data-parallel ranks
    without FSDP (Megatron-Core DDP)."""
    tp, ep = layout.tp, layout.ep
    data = layout.dp * layout.cp
    if stack.moe_folding:  # expert tensor parallel 1: tp ranks hold whole experts too
        ranks = data * tp
        if stack.fsdp:
            return {"ep": (ep, 1), "expert_shard": (max(1, layout.dp_shard * layout.cp * tp // ep), ep),
                    "expert_reduce": (layout.dp_replicate, layout.dp_shard * layout.cp * tp)}
        return {"ep": (ep, 1), "expert_shard": (1, ep), "expert_reduce": (max(1, ranks // ep), ep)}
    if stack.fsdp:
        efsdp = max(1, layout.dp_shard * layout.cp // ep)
        return {"ep": (ep, tp), "expert_shard": (efsdp, ep * tp),
                "expert_reduce": (layout.dp_replicate, layout.dp_shard * layout.cp * tp)}
    return {"ep": (ep, tp), "expert_shard": (1, ep * tp), "expert_reduce": (max(1, data // ep), ep * tp)}


def check_ep(m: ModelConfig, layout, stack=None) -> str | None:
    """Why the cost model cannot price `layout.ep` for `m` (None when it can): ep must divide the
    experts and the ranks it is taken from (data x context parallel; x tp under MoE parallel
    folding, `stack.moe_folding`)."""
    if layout.ep == 1:
        return None
    if m.moe_experts == 0:
        return "expert parallelism (ep > 1) needs an MoE model"
    folding = stack is not None and stack.moe_folding
    ranks = layout.dp * layout.cp * (layout.tp if folding else 1)
    if m.moe_experts % layout.ep or ranks % layout.ep:
        what = "tensor x data x context-parallel" if folding else "data x context-parallel"
        return f"ep {layout.ep} must divide the {m.moe_experts} experts and the {ranks} {what} ranks"
    return None
