"""Peak memory per GPU of one layout: the planner's memory model (docs/planner.md "Memory per
GPU"). Tensor counts come from model/flops.py, the MoE split of the parameters from
plan/cost_moe.py; sizes are bytes. plan/cost.py re-exports `estimate_memory`."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.schema import ModelConfig
from scaletrain.model.flops import _dims as attention_dims  # (head_dim, q_dim, kv_dim): flops' one definition
from scaletrain.model.flops import (backward_transient_bytes, head_activation_bytes, is_mla, loss_activation_bytes,
                                    moe_dispatch_buffer_bytes, moe_ffn_activation_bytes, param_counts, recompute_bytes,
                                    saved_activation_bytes)
from scaletrain.model.flops_mla import mla_kv_widths
from scaletrain.plan import cost_moe
from scaletrain.plan.cost_moe import ParamSplit, gathered_params, layers_split, local_params
from scaletrain.plan.cost_types import PARAMS, Layout, Memory, Params, Stack, Workload, is_cpu
from scaletrain.plan.hardware import Hardware


@dataclass(frozen=True)
class Stage:
    """One pipeline stage's layers [first, first + layers) and parameters (unsharded counts by
    how they shard; `root` = the embedding / final norm / head, FSDP's root unit)."""

    first: float
    layers: float
    has_head: bool
    params: ParamSplit
    root: ParamSplit


def stages(m: ModelConfig, layout: Layout, c: dict[str, int] | None = None) -> list[Stage]:
    """The whole model (pp = 1), or the first and the last pipeline stage (the candidates for
    the heaviest one: the first holds the embedding and the most micro-batches in flight, the
    last the head; an MoE model's leading dense layers sit on the first). `c`: param_counts(m)."""
    c = c or param_counts(m)
    L_s = m.n_layers / layout.pp
    if layout.pp == 1:
        root = ParamSplit(tp=float(c["embedding"] + c["output"] + c["final_norm"]))
        return [Stage(0.0, float(m.n_layers), True, layers_split(m, c, 0, m.n_layers) + root, root)]
    emb = ParamSplit(tp=float(c["embedding"]))
    head = ParamSplit(tp=float((c["output"] or c["embedding"]) + c["final_norm"]))
    return [Stage(0.0, L_s, False, layers_split(m, c, 0, L_s) + emb, emb),
            Stage(m.n_layers - L_s, L_s, True, layers_split(m, c, m.n_layers - L_s, L_s) + head, head)]


def cp_gathered_kv_bytes(m: ModelConfig, mb: int, seq_len: int, B: int, layout: Layout, stack: Stack) -> float:
    """Bytes of keys and values from the other context-parallel ranks that one layer's attention
    holds (per micro-batch): parallel/cp.py gathers K, V of the whole sequence and repeats them to
    all query heads (GQA) before SDPA, which keeps them for its backward: 2 mb (S - S/cp) q B / tp
    beyond the local part flops.saved_activation_bytes counts. torchtitan's all-gather keeps the
    kv heads only; Transformer Engine's ring re-sends K, V in backward and keeps nothing extra.
    Multi-head latent attention gathers its per-head keys and values (flops_mla.mla_kv_widths:
    h (n + r) + h v channels) either way."""
    if layout.cp == 1 or stack.cp_comm == "ring":
        return 0.0
    _, q, kv = attention_dims(m)
    width = q if stack.cp_comm == "allgather" else kv
    if is_mla(m):
        width = sum(mla_kv_widths(m)) / 2
    return 2 * mb * (seq_len - seq_len / layout.cp) * width * B / layout.tp


def estimate_memory(w: Workload, layout: Layout, hw: Hardware, stack: Stack = Stack(), p: Params | None = None) -> Memory:
    """Peak bytes per GPU (the worst pipeline stage). State: fp32 weights and Adam (m, v),
    FSDP-sharded over dp_shard*cp, split by TP/PP; MoE routed experts split over ep and
    FSDP-sharded over dp_shard*cp/ep (cost_moe.local_params). On top of it the peak of the step is
    the largest of three moments (docs/planner.md "Memory per GPU"): the start of backward
    (all saved activations + the cross-entropy's tensors), one layer's backward (saved
    activations + what AC recomputes + the layer's gradient transients) and the optimizer step
    (all gradients + the optimizer's temporaries; activations freed). Saved tensors per layer
    from flops.saved_activation_bytes (an MoE layer's FFN from its `layer` argument)."""
    p = p or PARAMS
    m = w.model
    B = 4 if w.precision == "fp32" else 2
    tp, pp = layout.tp, layout.pp
    wrapped = stack.fsdp and layout.dp * layout.cp > 1  # FSDP2 units (replicate-only HSDP too)
    reshard = stack.reshard_after_forward if stack.reshard_after_forward is not None else pp == 1
    cpu = is_cpu(hw)
    decomposed = cpu and not stack.fused  # eager CPU RMSNorm saves the normalised x too
    mb, s_local = layout.micro_batch, w.seq_len // layout.cp
    n_micro = max(1, w.global_batch // (layout.dp * mb))
    accumulate = n_micro > 1 or pp > 1  # earlier micro-batches' gradients are alive all step
    gathered_kv = cp_gathered_kv_bytes(m, mb, w.seq_len, B, layout, stack)
    moe_layer = m.moe_dense_layers  # the first MoE layer (a layer index for the flops functions)
    share = cost_moe.moe_token_share(layout, stack)  # tp under MoE parallel folding, else 1

    def layer_memory(layer: int | None) -> tuple[float, float, float]:
        """(saved, recompute, backward transient) bytes of one dense (None) or MoE layer."""
        saved = saved_activation_bytes(m, mb, s_local, B, layout.ac, tp=tp, fused=stack.fused,
                                       decomposed_norm=decomposed, layer=layer)
        recompute = recompute_bytes(m, mb, s_local, B, layout.ac, tp=tp, decomposed_norm=decomposed, layer=layer)
        if layout.ac in ("none", "op"):  # SDPA keeps the gathered keys and values for its backward
            saved += gathered_kv
        else:  # rebuilt with the recomputed attention
            recompute += gathered_kv
        transient = backward_transient_bytes(m, mb, s_local, B, tp=tp, layer=layer)
        if layer is not None:  # the gradient all-to-all's send and receive buffers
            transient += moe_dispatch_buffer_bytes(m, mb, s_local, layout.ep, B) * w.expert_imbalance / share
            # MoE parallel folding: the MoE FFN's tensors hold this rank's T / tp tokens, not all T
            folded = (1 - 1 / share) * moe_ffn_activation_bytes(m, mb, s_local, B)
            if layout.ac in ("none", "selective"):
                saved -= folded
            elif layout.ac == "full":
                recompute -= folded
        return saved, recompute, transient

    dense, moe = layer_memory(None), layer_memory(moe_layer) if m.moe_experts else None
    head = head_activation_bytes(m, mb, s_local, B, tp=tp, decomposed_norm=cpu)  # the final norm is never compiled
    loss = loss_activation_bytes(m, mb, s_local, B, compiled=stack.compiled_loss,
                                 vocab_shards=tp if stack.loss_parallel else 1)
    boundary = 2 * mb * s_local * m.dim * B if pp > 1 else 0.0  # received activation + its gradient
    if pp == 1:
        in_flight = [1.0]
    elif layout.pp_schedule == "gpipe":
        in_flight = [float(n_micro)] * 2
    else:  # 1f1b: pp micro-batches; interleaved: x (1 + (pp-1)/(pp*v)) (Narayanan et al. 2021)
        v = layout.virtual_stages
        first = pp * (1 + (pp - 1) / (pp * v)) if v > 1 else float(pp)
        in_flight = [min(first, float(n_micro)), 1.0]  # never more in flight than the step has
    c = param_counts(m)
    largest = gathered_params(cost_moe.largest_layer(m, c), layout)  # one FSDP unit / one layer's gradients
    head_params = float((c["output"] or c["embedding"]) + c["final_norm"]) / tp
    best = None
    for st, flight in zip(stages(m, layout, c), in_flight):
        local = local_params(st.params, layout, stack)
        weights, states, grads_all = 4 * local, 8 * local, 4 * local
        if wrapped and pp > 1:  # torch.distributed.pipelining turns FSDP's gradient sync off until the
            # last micro-batch (stage.py backward_maybe_with_nosync): the stage's gradients accumulate
            # unsharded, in fp32 (the reduce dtype), until the step's one reduce-scatter
            grads_all = 4 * gathered_params(st.params, layout)
        # foreach AdamW (the trainer's choice on the CPU) holds one fp32 temporary per parameter
        # (sqrt of the second moment); the fused CUDA kernel none.
        opt_temp = 4 * local if cpu else 0.0
        root = gathered_params(st.root, layout)
        if wrapped:  # all-gathered copies: current + prefetched layer (all when not resharding) + the root unit
            layers_gathered = gathered_params(layers_split(m, c, st.first, st.layers), layout)
            gathered = B * ((2 * largest if reshard else layers_gathered) + root)
        elif B < 4:  # bf16 copies of every weight, saved for backward (autocast; Megatron's bf16 params)
            gathered = B * local
        else:
            gathered = 0.0
        n_moe = cost_moe.moe_layers_in(m, st.first, st.layers)
        saved = (st.layers - n_moe) * dense[0] + (n_moe * moe[0] if n_moe else 0.0)
        acts = saved * flight + boundary
        # the head's saved tensors are freed once its backward is done, before any layer's
        head_acts = head * flight if st.has_head else 0.0
        grads_layer = grads_all if accumulate else 4 * (largest + (head_params if st.has_head else 0.0))
        # full/op AC re-materialise the whole layer before its FFN backward runs: both at once;
        # selective recomputes the attention only after the FFN's backward has freed its part
        kinds = [dense] * (st.layers - n_moe > 0) + [moe] * (n_moe > 0)
        extra = max(max(r, t) if layout.ac == "selective" else r + t for _, r, t in kinds)
        phases = [("layer backward", grads_layer, gathered, acts + extra),
                  ("optimizer step", grads_all, opt_temp, 0.0)]
        if st.has_head:
            phases.append(("loss", grads_all if accumulate else 0.0, gathered, acts + head_acts + loss))
        name, g, buf, a = max(phases, key=lambda ph: ph[1] + ph[2] + ph[3])
        mem = Memory(weights=weights, grads=g, optimizer=states, activations=a, buffers=buf, phase=name)
        if best is None or mem.total > best.total:
            best = mem
    best.fragmentation = p.fragmentation * best.total
    return best
