"""Parameter counts, FLOPs and activation bytes of the model: THE one formula set.

Runtime MFU (train/metrics.py) and the planner (plan/cost.py) both use these functions, so a
prediction and a measurement can only disagree about the hardware, never about the model.
Everything here is a pure function of ModelConfig (plain Python ints, no tensors), so it
works for 405B-parameter shapes without allocating anything.

Conventions:
  * A matmul of [m, k] x [k, n] costs 2*m*n*k FLOPs (one multiply + one add per term).
  * Training = forward + backward = 3 x forward FLOPs (backward computes the gradients of
    both the inputs and the weights, each as expensive as the forward).
  * Elementwise ops (norms, RoPE, activations, softmax, residual adds) are not counted.
"""

from __future__ import annotations

from typing import get_args

from scaletrain.config.schema import AcMode, ModelConfig, head_dim_of
from scaletrain.model.flops_mla import (mla_forward_flops, mla_head_dims, mla_norm_params, mla_op_saved_elements,
                                        mla_projections, mla_saved_elements)

AC_MODES = get_args(AcMode)


def _dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(head_dim, q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim) of grouped-query
    attention; a multi-head latent attention model (cfg.attention == "mla") takes its widths from
    model/flops_mla.py instead, as every function below does."""
    head_dim = head_dim_of(cfg)
    return head_dim, cfg.n_heads * head_dim, cfg.n_kv_heads * head_dim


def is_mla(cfg: ModelConfig) -> bool:
    """Whether `cfg` has multi-head latent attention (model/flops_mla.py) instead of GQA."""
    return cfg.attention == "mla"


def _ffn_matrices(cfg: ModelConfig) -> int:
    return 3 if cfg.ffn == "swiglu" else 2  # SwiGLU: w1, w3, w2; squared ReLU: w1, w2


def expert_ffn_dim(cfg: ModelConfig) -> int:
    """Hidden width of one routed (and of one shared) expert: moe_ffn_dim, or ffn_dim when 0."""
    return cfg.moe_ffn_dim or cfg.ffn_dim


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """Whether layer `layer` (0-based) has the MoE FFN: every layer from moe_dense_layers on,
    when moe_experts > 0."""
    return cfg.moe_experts > 0 and layer >= cfg.moe_dense_layers


def moe_layer_count(cfg: ModelConfig) -> int:
    """Number of MoE layers (0 for a dense model)."""
    return cfg.n_layers - cfg.moe_dense_layers if cfg.moe_experts > 0 else 0


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts (number of scalars) of the model described by `cfg`.

    Keys:
      embedding            vocab * dim (the tok_embeddings table)
      output               vocab * dim, or 0 when tied (the table is then counted once)
      attention_per_layer  wq + wk + wv + wo = dim*q_dim + 2*dim*kv_dim + q_dim*dim (MLA: its
                           projections, flops_mla.mla_projections)
      ffn_per_layer        one DENSE FFN: 3 * dim * ffn_dim (SwiGLU) or 2 * dim * ffn_dim
                           (squared ReLU)
      norm_per_layer       2 * dim (attention_norm + ffn_norm) + 2 * head_dim with qk_norm
                           (MLA: + its latent norms, r_q + r_kv)
      final_norm           dim
      dense_layers         layers with a dense FFN (all of them for a dense model)
      moe_layers           layers with the MoE FFN (model/moe.py)
      router_per_moe_layer          moe_experts * dim (the router's gate)
      experts_per_moe_layer         moe_experts * 3 * dim * f_e, every routed expert (f_e =
                                    moe_ffn_dim, or ffn_dim when 0)
      active_experts_per_moe_layer  moe_top_k * 3 * dim * f_e, the routed experts one token uses
      shared_per_moe_layer          3 * dim * f_e * moe_shared_experts
      total                every unique parameter (what sum(p.numel()) of the model gives)
      active               the parameters one token uses: total minus the routed experts it is
                           not sent to ((moe_experts - moe_top_k) per MoE layer); = total for a
                           dense model. The router and the shared experts are active.
      non_embedding        total - embedding: torchtitan's convention, which keeps the output
                           head (untied) in the count because it is a matmul in every step
      non_embedding_no_output  total - embedding - output: Kaplan et al.'s "N" (the
                           transformer blocks and the final norm only)
      active_non_embedding active - embedding (what MoE FLOPs per token count)
    """
    head_dim, q_dim, kv_dim = _dims(cfg)
    embedding = cfg.vocab_size * cfg.dim
    output = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    attention = cfg.dim * q_dim + 2 * cfg.dim * kv_dim + q_dim * cfg.dim
    ffn = _ffn_matrices(cfg) * cfg.dim * cfg.ffn_dim
    norm = 2 * cfg.dim + (2 * head_dim if cfg.qk_norm else 0)
    if is_mla(cfg):
        attention = sum(p.params for p in mla_projections(cfg))
        norm = 2 * cfg.dim + mla_norm_params(cfg)
    final_norm = cfg.dim
    moe_layers = moe_layer_count(cfg)
    dense_layers = cfg.n_layers - moe_layers
    expert = 3 * cfg.dim * expert_ffn_dim(cfg)  # one SwiGLU expert: w1, w3, w2
    router = cfg.moe_experts * cfg.dim if moe_layers else 0
    experts = cfg.moe_experts * expert if moe_layers else 0
    active_experts = cfg.moe_top_k * expert if moe_layers else 0
    shared = cfg.moe_shared_experts * expert if moe_layers else 0
    total = (embedding + output + cfg.n_layers * (attention + norm) + dense_layers * ffn
             + moe_layers * (router + experts + shared) + final_norm)
    active = total - moe_layers * (experts - active_experts)
    return {
        "embedding": embedding,
        "output": output,
        "attention_per_layer": attention,
        "ffn_per_layer": ffn,
        "norm_per_layer": norm,
        "final_norm": final_norm,
        "dense_layers": dense_layers,
        "moe_layers": moe_layers,
        "router_per_moe_layer": router,
        "experts_per_moe_layer": experts,
        "active_experts_per_moe_layer": active_experts,
        "shared_per_moe_layer": shared,
        "total": total,
        "active": active,
        "non_embedding": total - embedding,
        "non_embedding_no_output": total - embedding - output,
        "active_non_embedding": active - embedding,
    }


def forward_flops_per_layer(cfg: ModelConfig, seq_len: int, causal: bool = False,
                            layer: int | None = None) -> dict[str, int]:
    """Forward FLOPs of ONE transformer layer on ONE sequence of `seq_len` tokens.

    Keys (each 2*m*n*k over the matmuls named):
      qkv          2*s*dim*(q_dim + 2*kv_dim)   (GQA: wk, wv project to n_kv_heads*head_dim)
      attn_scores  Q K^T: 2*n_heads*head_dim * (s*s, or s*(s+1)/2 query-key pairs if causal)
      attn_values  P V: same count as attn_scores
      out_proj     2*s*q_dim*dim
      ffn          2*s*dim*ffn_dim * (3 for SwiGLU, 2 for squared ReLU); for an MoE layer the
                   experts each token is computed by: 2*s*dim*f_e*3 * (moe_top_k +
                   moe_shared_experts), capacity drops not discounted (an upper bound)
      router       MoE layers only: 2*s*dim*moe_experts (the gate)
    MLA (flops_mla.mla_forward_flops): qkv = every projection but wo, attn_scores at the query/key
    head width n + r, attn_values at the value width v, out_proj = wo.

    `causal=True` counts only the unmasked (query, key) pairs, which is what a causal
    flash-attention kernel actually executes; `False` counts the full s x s square.
    `layer` (0-based) selects the FFN kind of that layer; None means a dense layer.
    Multiply by batch for a micro-batch and sum over the layers for the stack.
    """
    head_dim, q_dim, kv_dim = _dims(cfg)
    s = seq_len
    pairs = s * (s + 1) // 2 if causal else s * s
    attn = 2 * cfg.n_heads * head_dim * pairs
    flops = {
        "qkv": 2 * s * cfg.dim * (q_dim + 2 * kv_dim),
        "attn_scores": attn,
        "attn_values": attn,
        "out_proj": 2 * s * q_dim * cfg.dim,
        "ffn": 2 * s * cfg.dim * cfg.ffn_dim * _ffn_matrices(cfg),
    }
    if is_mla(cfg):
        flops.update(mla_forward_flops(cfg, s, pairs))
    if layer is not None and is_moe_layer(cfg, layer):
        experts_per_token = cfg.moe_top_k + cfg.moe_shared_experts
        flops["ffn"] = 2 * s * cfg.dim * expert_ffn_dim(cfg) * 3 * experts_per_token
        flops["router"] = 2 * s * cfg.dim * cfg.moe_experts
    return flops


def output_head_forward_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of the output projection (dim -> vocab) on one sequence: 2*s*dim*vocab."""
    return 2 * seq_len * cfg.dim * cfg.vocab_size


def flops_per_token(
    cfg: ModelConfig, seq_len: int, convention: str = "torchtitan", causal: bool = False
) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len` (tokens).

    convention="torchtitan" (the MFU number other Llama trainers report):
        6 * matmul_params + 12 * n_layers * n_heads * head_dim * seq_len
      (MLA: 6 * n_layers * n_heads * (qk head width + v head width) * seq_len for the attention)
      where matmul_params = active - embedding (the embedding lookup is not a matmul). For a
      tied model we add back vocab*dim, because the output head still runs a matmul with the
      shared table; torchtitan itself drops it there (it de-duplicates the tied parameter),
      so for tied models this is 6*vocab*dim larger than torchtitan's number. It counts norm
      weights as if they were matmul weights (negligible) and never discounts the causal
      mask; `causal` must be False. For an MoE model only the ACTIVE parameters count (the
      top-k routed experts, the shared experts and the router of every MoE layer), as in
      torchtitan's MoE models; docs/moe.md compares this with Megatron-Bridge's formula.
    convention="exact": 3 x the per-matmul count of forward_flops_per_layer(cfg, seq_len,
      causal, layer) summed over the layers + output_head_forward_flops, divided by seq_len.
      With causal=False it equals the torchtitan number minus 6 * (norm parameters).
    """
    head_dim, _, _ = _dims(cfg)
    if convention == "torchtitan":
        if causal:
            raise ValueError("the torchtitan convention does not discount the causal mask")
        counts = param_counts(cfg)
        matmul_params = counts["active_non_embedding"] + (counts["embedding"] if cfg.tie_embeddings else 0)
        if is_mla(cfg):
            return float(6 * matmul_params + 6 * cfg.n_layers * cfg.n_heads * sum(mla_head_dims(cfg)) * seq_len)
        return float(6 * matmul_params + 12 * cfg.n_layers * cfg.n_heads * head_dim * seq_len)
    if convention == "exact":
        layers = sum(sum(forward_flops_per_layer(cfg, seq_len, causal, i).values()) for i in range(cfg.n_layers))
        forward = layers + output_head_forward_flops(cfg, seq_len)
        return 3 * forward / seq_len
    raise ValueError(f"unknown FLOPs convention {convention!r}; use 'torchtitan' or 'exact'")


def activation_bytes_per_layer(
    cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: int = 2, ac: str = "none", layer: int | None = None
) -> int:
    """Bytes of activations ONE transformer layer keeps for backward (per micro-batch).

    Following Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
    Models" (2022), adapted to this model (pre-norm RMSNorm, GQA, SDPA/flash attention, no
    dropout, no biases). With b = batch, s = seq_len, d = dim, q = n_heads*head_dim,
    f = ffn_dim, h = n_heads, and `dtype_bytes` per element of compute-dtype tensors:

      attention_norm input x              b*s*d      (RMSNorm backward needs its input)
      attention_norm 1/rms                b*s        fp32 (4 bytes)
      wq/wk/wv input (norm output)        b*s*d      (one tensor shared by the 3 matmuls)
      q, k, v after RoPE / repeat         3*b*s*q    (k, v are saved after the kv heads are
                                                      repeated to n_heads, as SDPA sees them)
      SDPA output                         b*s*q      (flash backward needs O; the softmax
      SDPA logsumexp                      b*h*s      fp32; the s x s probabilities are not kept)
      wo input (output, made contiguous)  b*s*q
      ffn_norm input + 1/rms              b*s*d + b*s fp32
      w1/w3 input (norm output)           b*s*d
      SwiGLU: w1 out, silu(w1 out), w3 out, w2 input      4*b*s*f
      squared ReLU: relu(w1 out), w2 input = relu^2       2*b*s*f

    Residual adds and RoPE multiplications (which save only the cos/sin buffers) add nothing.

    ac="none": everything above. ac="selective" (parallel/ac.py checkpoints each block's
    attention module): drops what the attention keeps past its input (q, k, v, SDPA output,
    logsumexp, wo input); backward recomputes them from the stored wq/wk/wv input. ac="full": only the layer input b*s*d is kept (backward then transiently needs one
    layer's "none" activations while it recomputes that layer; the planner adds that peak).
    `layer` (0-based) selects the FFN of that layer (ffn_activation_bytes): an MoE layer's
    replaces the SwiGLU tensors; None means a dense layer.

    MLA (cfg.attention == "mla"): wo's input is h*v wide, and "none" keeps instead of q, k, v, O
    and logsumexp what flops_mla.mla_saved_elements lists at tp = 1 past the wq_a/wkv_a input
    (the latents, the normalised latents, per-head q, k, v and O).

    Returns bytes (int).
    """
    if ac not in AC_MODES:
        raise ValueError(f"unknown activation checkpointing mode {ac!r}; choose one of {AC_MODES}")
    _, q_dim, _ = _dims(cfg)
    tokens = batch * seq_len
    if ac == "full":
        return tokens * cfg.dim * dtype_bytes
    fp32 = 4
    norms = 2 * (tokens * cfg.dim * dtype_bytes + tokens * fp32)  # inputs + 1/rms, both norms
    linear_inputs = 2 * tokens * cfg.dim * dtype_bytes  # qkv input, ffn input
    wo_input = tokens * q_dim * dtype_bytes
    total = norms + linear_inputs + ffn_activation_bytes(cfg, batch, seq_len, dtype_bytes, layer)
    if ac == "none" and is_mla(cfg):
        elems, fp32_elems = mla_saved_elements(cfg)
        v_width = cfg.n_heads * mla_head_dims(cfg)[1]
        # mla_saved_elements counts the attention input (here in linear_inputs) and not wo's input
        total += int(tokens * ((elems - cfg.dim + v_width) * dtype_bytes + fp32_elems * fp32))
    elif ac == "none":
        sdpa_inputs_and_output = 4 * tokens * q_dim * dtype_bytes  # q, k, v, O
        logsumexp = batch * cfg.n_heads * seq_len * fp32
        total += wo_input + sdpa_inputs_and_output + logsumexp
    return total


def moe_ffn_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: int = 2) -> int:
    """Bytes the FFN of ONE MoE layer (model/moe.py, dropless, no activation checkpointing)
    keeps for backward per micro-batch: what replaces the dense SwiGLU's 4*T*f*B in
    activation_bytes_per_layer / saved_activation_bytes (the ffn_norm output, which the router
    and the shared experts read, is counted there already). With T = batch*seq_len tokens,
    k = moe_top_k, E = moe_experts, f = expert width, S = moe_shared_experts, B = dtype_bytes:

      router probabilities (softmax / normalised sigmoid)   T*E*4     fp32
      top-k ids; their weights, gathered and normalised     T*k*8 int64 + 2*T*k*4 + T*4 fp32
      slot -> token and slot -> position indices            2*T*k*8   int64
      tokens gathered by expert (the experts' input)        T*k*d*B
      per expert slot: w1 out, silu(w1 out), w3 out, w2 in  4*T*k*f*B (SwiGLU on T*k rows)
      expert outputs in slot order (for the weights' grad)  T*k*d*B
      shared experts (width f*S)                            4*T*f*S*B
      the aux loss's routed fractions                       batch*E*4 fp32

    The router never saves a bf16 copy (it runs in fp32 on the fp32 norm output); in bf16 the
    gathered tokens are cast once for the experts. Measured tensor by tensor on the CPU in fp32
    (tests/unit/test_moe_model.py). Capacity drops make the T*k terms an upper bound.
    Returns bytes (int)."""
    t, k, e, f = batch * seq_len, cfg.moe_top_k, cfg.moe_experts, expert_ffn_dim(cfg)
    router = t * e * 4 + t * k * 8 + 2 * t * k * 4 + t * 4 + 2 * t * k * 8 + batch * e * 4
    experts = 2 * t * k * cfg.dim * dtype_bytes + 4 * t * k * f * dtype_bytes
    return router + experts + 4 * t * f * cfg.moe_shared_experts * dtype_bytes


def ffn_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: int = 2,
                         layer: int | None = None) -> int:
    """Bytes the FFN of layer `layer` keeps for backward per micro-batch past its input (the
    ffn_norm output): the dense SwiGLU's 4*T*f*B (w1 out, silu, w3 out, w2 input; 2*T*f*B for
    squared ReLU), or moe_ffn_activation_bytes for an MoE layer. None = a dense layer."""
    if layer is not None and is_moe_layer(cfg, layer):
        return moe_ffn_activation_bytes(cfg, batch, seq_len, dtype_bytes)
    return (4 if cfg.ffn == "swiglu" else 2) * batch * seq_len * cfg.ffn_dim * dtype_bytes


def moe_dispatch_bytes(cfg: ModelConfig, batch: int, seq_len: int, ep: int, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes ONE rank sends to the other ranks of its expert-parallel group for ONE MoE layer
    and micro-batch (parallel/ep.py), at balanced routing, by collective:

      T = batch * seq_len   the tokens the layer sees on this rank (seq_len / cp of a sequence
                            under context parallelism; under tensor parallelism every tp rank
                            sees, and sends, the whole sequence: pass the full seq_len)
      N = T * k             token slots (dropless; a capacity factor sends at most that many)
      "dispatch"            forward all-to-all of the slots' token rows:  N * (ep-1)/ep * dim * B
      "combine"             forward all-to-all of the expert outputs:    N * (ep-1)/ep * dim * B
      "combine_grad"        backward of "combine" (the output gradients go to the experts): as "combine"
      "dispatch_grad"       backward of "dispatch" (the input gradients come home): as "dispatch"
      "counts"              forward all-to-all of the slots per expert:  E * 8 * (ep-1)/ep (int64)

    B = dtype_bytes of the compute dtype (rows are cast to it before dispatch). (ep-1)/ep of
    the slots leave the rank when routing is balanced; the rest stay local. A rank receives as
    much as it sends on average; the rank holding the busiest experts receives up to
    `expert_imbalance` (docs/moe.md) times the mean, and everyone waits for it. Activation
    checkpointing ("full") repeats "dispatch", "combine" and "counts" in backward. The split
    sizes also cost one device-to-host sync per layer and forward. Returns bytes (ints); all zero
    for ep = 1."""
    if ep <= 1:
        return dict.fromkeys(("dispatch", "combine", "combine_grad", "dispatch_grad", "counts"), 0)
    rows = batch * seq_len * cfg.moe_top_k * cfg.dim * dtype_bytes * (ep - 1) // ep
    return {"dispatch": rows, "combine": rows, "combine_grad": rows, "dispatch_grad": rows,
            "counts": cfg.moe_experts * 8 * (ep - 1) // ep}


def moe_dispatch_buffer_bytes(cfg: ModelConfig, batch: int, seq_len: int, ep: int, dtype_bytes: int = 2) -> int:
    """Bytes of the send and receive buffers of one token all-to-all of an MoE layer (ep > 1)
    at balanced routing: 2 * T * k * dim * B (all T k slot rows are laid out to send, and as
    many arrive). They are alive on top of the saved tensors while the layer's dispatch runs,
    in forward and, for the gradients, in backward. Returns bytes; 0 for ep = 1."""
    return 2 * batch * seq_len * cfg.moe_top_k * cfg.dim * dtype_bytes if ep > 1 else 0


# ---------------------------------------------------------------------------------------------
# Saved tensors, as autograd actually holds them (the planner's MEMORY model).
#
# `activation_bytes_per_layer` above is the published Korthikanti et al. count; the cost model
# keeps it as the unit of elementwise HBM traffic (and plan/calibrate.py measures CPU
# elementwise rates in that unit). The functions below count what this implementation keeps
# alive, tensor by tensor, checked against the peak live tensor bytes measured on the CPU
# (plan/memtrace.py, docs/planner.md): the SDPA output is stored [b, s, heads, head_dim], so
# the attention output fed to wo is a view of it (no extra copy); under tensor parallelism
# with sequence parallelism (torch DTensor, as in scaletrain and torchtitan) the all-gathered
# inputs of the column-parallel linears are saved whole by those matmuls, everything else is
# split over the tp ranks; eager CPU RMSNorm (F.rms_norm has no fused CPU kernel) also saves
# the normalised x for the weight gradient; a compiled (or hand-fused) SwiGLU recomputes
# silu(w1 x) in backward instead of saving it.
# ---------------------------------------------------------------------------------------------

SAVED_AC_MODES = AC_MODES + ("op",)  # "op": torchtitan's op-level selective AC policy


def saved_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: int = 2, ac: str = "none", *,
                           tp: int = 1, fused: bool = False, decomposed_norm: bool = False,
                           layer: int | None = None) -> float:
    """Bytes ONE transformer layer keeps for backward per rank, per micro-batch.

    With T = batch*seq_len tokens (seq_len: this rank's sequence chunk under context
    parallelism), B = dtype_bytes, d, q = n_heads*head_dim, f = ffn_dim, h = n_heads:

      ac="none":
        norm inputs x (layer input) and h (residual)    2*T*d*B/tp   (sequence-parallel shards)
        1/rms of both norms                             2*T*4/tp     fp32
        normalised x of both norms (decomposed_norm)    2*T*d*B/tp   CPU eager only
        wq/wk/wv input and w1/w3 input (norm outputs)   2*T*d*B      all-gathered: not split by tp
        q (after RoPE), k, v (repeated to h heads), O   4*T*q*B/tp   O is also wo's input (a view)
        SDPA logsumexp                                  b*h*s*4/tp   fp32
        SwiGLU w1 out, silu(w1 out), w3 out, w2 input   4*T*f*B/tp   (3*T*f*B/tp when fused:
                                                                     silu is recomputed)
        squared ReLU relu(w1 out), w2 input             2*T*f*B/tp
        with qk_norm: q and k before their norms        T*(q+kv)*B/tp, + 1/rms T*(h+h_kv)*4/tp,
                                                        + the normalised q, k when decomposed_norm
      ac="selective" (parallel/ac.py: each block's attention module is checkpointed): drops
        q, k, v, O and logsumexp; the attention's input is kept as the checkpoint saved it, the
        norm output's sequence shard (T*d*B/tp) instead of the gathered copy.
      ac="full": the block input only, T*d*B/tp.
      ac="op" (torchtitan's op-level SAC: inside a checkpointed block the outputs of matmuls
        and SDPA are saved, except every second matmul): the block input T*d*B/tp, the outputs
        of wq (T*q*B/tp), wv (T*kv*B/tp), w1 (T*f*B/tp) and w2 (T*d*B: the row-parallel partial
        sum before its reduce-scatter; plus the reduce-scatter output T*d*B/tp when tp > 1),
        SDPA's O and logsumexp (T*q*B/tp + b*h*s*4/tp). Everything else (norms, RoPE, SiLU,
        wk, wo, w3) is recomputed in backward.

    `layer` (0-based) selects that layer's FFN; None = dense. An MoE layer (model/moe.py) runs
    replicated over the tp ranks on the gathered sequence (parallel/ep.py), so its FFN tensors,
    moe_ffn_activation_bytes, are not split by tp; they replace the SwiGLU's 4*T*f*B/tp under
    "none" and "selective". Under "op" the expert w1 outputs and the slot-order outputs are
    kept, silu and w3 outputs (2*T*k*f*B, and the shared experts' 2*T*f*S*B) recomputed: an
    approximation of torchtitan's policy for grouped GEMMs, not measured.

    MLA (cfg.attention == "mla", Megatron-Core's layout under tp: flops_mla module docstring):
    "none" keeps, past the two block norms and the gathered FFN input T*d*B, the attention
    tensors of flops_mla.mla_saved_elements (the attention input on its sequence shard, the
    latents, the gathered normalised latents, per-head q, k, v, O, logsumexp); "selective" and
    "full" are as above; "op" keeps the outputs of the 1st, 3rd, ... matmul of the block
    (flops_mla.mla_op_saved_elements), and the FFN continues that alternation (with wq_a, five
    attention matmuls: w3 is saved, w1 and w2 recomputed).
    """
    if ac not in SAVED_AC_MODES:
        raise ValueError(f"unknown activation checkpointing mode {ac!r}; choose one of {SAVED_AC_MODES}")
    _, q_dim, kv_dim = _dims(cfg)
    T = batch * seq_len
    B = dtype_bytes
    d, f = cfg.dim, cfg.ffn_dim
    moe = layer is not None and is_moe_layer(cfg, layer)
    block_input = T * d * B / tp
    if ac == "full":
        return block_input
    lse = batch * cfg.n_heads * seq_len * 4 / tp
    if ac == "op":
        if is_mla(cfg):
            elems, n_mm = mla_op_saved_elements(cfg, tp)
            saved = block_input + T * elems * B + lse
        else:  # wq, wv, SDPA (every second of wq, wk, wv, wo)
            saved, n_mm = block_input + T * (q_dim + kv_dim) * B / tp + T * q_dim * B / tp + lse, 4
        if moe:
            recomputed = 2 * T * expert_ffn_dim(cfg) * (cfg.moe_top_k + cfg.moe_shared_experts) * B
            return saved + moe_ffn_activation_bytes(cfg, batch, seq_len, B) - recomputed
        if n_mm % 2:  # MLA with wq_a: the FFN's w1 is an even matmul, recomputed; w3 (squared ReLU: w2) kept
            kept = T * f * B / tp if cfg.ffn == "swiglu" else T * d * B + (T * d * B / tp if tp > 1 else 0.0)
            return saved + kept
        saved += T * f * B / tp + T * d * B
        return saved + (T * d * B / tp if tp > 1 else 0.0)
    norms = 2 * T * d * B / tp + 2 * T * 4 / tp + (2 * T * d * B / tp if decomposed_norm else 0.0)
    if moe:
        ffn = float(moe_ffn_activation_bytes(cfg, batch, seq_len, B))
    elif cfg.ffn == "swiglu":
        ffn = (3 if fused else 4) * T * f * B / tp
    else:
        ffn = 2 * T * f * B / tp
    if ac == "selective":
        return norms + T * d * B + T * d * B / tp + ffn
    if is_mla(cfg):  # the gathered FFN input, then the attention's tensors (flops_mla.mla_saved_elements)
        elems, fp32_elems = mla_saved_elements(cfg, tp, decomposed_norm)
        return norms + T * d * B + T * (elems * B + fp32_elems * 4) + ffn
    qk_norms = 0.0
    if cfg.qk_norm:  # RMSNorm over head_dim of every q and k head (Qwen3), inside the attention
        qk_norms = (T * (q_dim + kv_dim) * B * (2 if decomposed_norm else 1)
                    + T * (cfg.n_heads + cfg.n_kv_heads) * 4) / tp
    return norms + 2 * T * d * B + 4 * T * q_dim * B / tp + lse + qk_norms + ffn


def head_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: int = 2, *, tp: int = 1,
                          decomposed_norm: bool = False) -> float:
    """Bytes the final RMSNorm and the output head keep for backward per rank (last stage):
    the norm's input (T*d*B/tp) and 1/rms (T*4/tp), its normalised x when decomposed
    (T*d*B/tp), and the head's input, the norm output (all-gathered under TP: T*d*B)."""
    T = batch * seq_len
    B = dtype_bytes
    extra = T * cfg.dim * B / tp if decomposed_norm else 0.0
    return T * cfg.dim * B / tp + T * 4 / tp + extra + T * cfg.dim * B


def loss_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: int = 2, *,
                          compiled: bool = False, vocab_shards: int = 1) -> float:
    """Peak bytes of the cross-entropy on logits [T, V/vocab_shards] (the loss computed in fp32,
    `F.cross_entropy(logits.float(), ...)`), reached when its backward starts.

    Eager: the fp32 log-probabilities (saved by log_softmax), NLL's dense gradient and
    log_softmax's input gradient are alive together: 3 fp32 [T, V] tensors = 12*T*V bytes,
    whatever the logits' dtype (the compute-dtype logits and their fp32 copy are freed before
    backward). Compiled (scaletrain compiles the loss with train.compile): one fused kernel
    saves the logits and writes their gradient: 2*B*T*V bytes. Vocabulary-parallel
    (`vocab_shards` = tp > 1: torch's `loss_parallel`, used by torchtitan under TP): its fused
    NLL + log-softmax backward, `(zeros_like(x) + exp(x)) * grad`, holds the saved
    log-probabilities, the zeros, exp(x) and their sum: 4 fp32 tensors = 16*T*V/tp bytes
    (torch/distributed/tensor/parallel/loss.py). `vocab_shards` = 1 when every rank computes
    the loss on replicated logits (scaletrain's parallel/tp.py)."""
    tv = batch * seq_len * cfg.vocab_size / vocab_shards
    if vocab_shards > 1:
        return 16 * tv
    return 2 * dtype_bytes * tv if compiled else 12 * tv


def backward_transient_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: int = 2, *,
                             tp: int = 1, layer: int | None = None) -> float:
    """Gradient bytes alive on top of the saved tensors while one layer runs its backward:
    the FFN's gating-product backward holds the gradients of both product inputs (SwiGLU:
    2*T*f*B/tp; squared ReLU: T*f*B/tp) while the layer's output gradient (T*d*B) is alive.
    An MoE layer (`layer`, 0-based): the routed experts' SwiGLU backward on the T*k slots,
    2*T*k*f_e*B, or the shared experts' 2*T*S*f_e*B if larger (they run one after the other),
    plus the gradient of the slot-order outputs T*k*d*B; not split by tp (replicated MoE)."""
    T = batch * seq_len
    if layer is not None and is_moe_layer(cfg, layer):
        k = cfg.moe_top_k
        gating = 2 * T * max(k, cfg.moe_shared_experts) * expert_ffn_dim(cfg)
        return (gating + T * k * cfg.dim + T * cfg.dim) * dtype_bytes
    n = 2 if cfg.ffn == "swiglu" else 1
    return T * (n * cfg.ffn_dim / tp + cfg.dim) * dtype_bytes


def recompute_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: int = 2, ac: str = "none", *,
                    tp: int = 1, decomposed_norm: bool = False, layer: int | None = None) -> float:
    """Bytes a layer re-materialises in backward under activation checkpointing, beyond what
    its forward saved: full and op AC recompute the whole layer (its eager "none" set: inside
    the backward every intermediate the gradient ops need is live, compiled or not), selective
    recomputes the attention (q, k, v, O, logsumexp and the all-gathered attention input).
    `layer` as in saved_activation_bytes."""
    if ac == "none":
        return 0.0
    none = saved_activation_bytes(cfg, batch, seq_len, dtype_bytes, "none", tp=tp, decomposed_norm=decomposed_norm,
                                  layer=layer)
    if ac in ("full", "op"):
        return none - saved_activation_bytes(cfg, batch, seq_len, dtype_bytes, ac, tp=tp, layer=layer)
    sel = saved_activation_bytes(cfg, batch, seq_len, dtype_bytes, "selective", tp=tp, decomposed_norm=decomposed_norm,
                                 layer=layer)
    return none - sel
