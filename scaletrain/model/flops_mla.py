"""Multi-head latent attention (MLA, DeepSeek-V2/V3): its projection shapes and the parameters,
FLOPs and saved tensors they imply. Part of THE one formula set: model/flops.py dispatches here
when model.attention = "mla", and the planner (plan/cost.py) prices the GEMMs `mla_projections`
lists. scaletrain's own model does not build MLA (model/transformer.py refuses it).

With d = dim, h = n_heads, r_q = mla_q_lora_rank (0 = no query compression, DeepSeek-V2-Lite),
r_kv = mla_kv_lora_rank, n = mla_qk_nope_dim, r = mla_qk_rope_dim, v = mla_v_dim, one layer is
(DeepSeek-V2 report, arXiv 2405.04434, section 2.1; DeepSeek-V3's config.json):

  q:   wq_a [d -> r_q], RMSNorm(r_q), wq_b [r_q -> h (n + r)]   (r_q = 0: wq [d -> h (n + r)])
  kv:  wkv_a [d -> r_kv + r] (the r channels are the one RoPE key all heads share),
       RMSNorm(r_kv), wkv_b [r_kv -> h (n + v)]
  attention: h heads, query/key head width n + r, value head width v (no GQA sharing)
  out: wo [h v -> d]

Training materialises K [h, n + r] and V [h, v] per head (Megatron-Core's MultiLatentAttention:
no weight absorption, which is an inference trick). Tensor parallelism follows Megatron-Core with
sequence parallelism: wq_b, wkv_b (column-parallel) and wo (row-parallel) split their heads over
the tp ranks; wq_a and wkv_a are replicated (`linear_*_down_proj` is a plain Linear) and run on
the rank's sequence shard, and the up-projections all-gather the normalised latents (r_q + r_kv
channels) and the RoPE key (r) instead of the d-wide block input. Widths are channels, counts
scalars, sizes elements per token unless a function says bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.schema import ModelConfig


@dataclass(frozen=True)
class Projection:
    """One linear of the MLA block: [d_in -> d_out]; `split` says how tensor parallelism runs it:
    "column" (the output features, i.e. the heads, are split), "row" (the input features are
    split: wo) or "sequence" (replicated weight, run on the rank's 1/tp of the tokens)."""

    name: str
    d_in: int
    d_out: int
    split: str

    @property
    def params(self) -> int:
        return self.d_in * self.d_out


def mla_projections(cfg: ModelConfig) -> list[Projection]:
    """The MLA block's linears in forward order (module docstring)."""
    d, h = cfg.dim, cfg.n_heads
    rq, rkv, rope = cfg.mla_q_lora_rank, cfg.mla_kv_lora_rank, cfg.mla_qk_rope_dim
    qk, v = mla_head_dims(cfg)
    if rq:
        q = [Projection("wq_a", d, rq, "sequence"), Projection("wq_b", rq, h * qk, "column")]
    else:
        q = [Projection("wq", d, h * qk, "column")]
    return q + [Projection("wkv_a", d, rkv + rope, "sequence"),
                Projection("wkv_b", rkv, h * (cfg.mla_qk_nope_dim + v), "column"),
                Projection("wo", h * v, d, "row")]


def mla_head_dims(cfg: ModelConfig) -> tuple[int, int]:
    """(query/key head width n + r, value head width v) in channels."""
    return cfg.mla_qk_nope_dim + cfg.mla_qk_rope_dim, cfg.mla_v_dim


def mla_kv_widths(cfg: ModelConfig) -> tuple[int, int]:
    """Channels per token of the materialised keys (h (n + r)) and values (h v), all heads."""
    qk, v = mla_head_dims(cfg)
    return cfg.n_heads * qk, cfg.n_heads * v


def mla_norm_params(cfg: ModelConfig) -> int:
    """Weights of the latent RMSNorms: r_q (when the query is compressed) + r_kv."""
    return cfg.mla_q_lora_rank + cfg.mla_kv_lora_rank


def mla_replicated_params(cfg: ModelConfig) -> int:
    """Weights tensor parallelism does not split: wq_a and wkv_a."""
    return sum(p.params for p in mla_projections(cfg) if p.split == "sequence")


def mla_gathered_width(cfg: ModelConfig) -> int:
    """Channels per token the attention's sequence-parallel all-gather moves: the normalised
    latents and the RoPE key (r_q + r_kv + r), or, without query compression, the block input
    for wq (d) + r_kv + r. Grouped-query attention gathers d."""
    return (cfg.mla_q_lora_rank or cfg.dim) + cfg.mla_kv_lora_rank + cfg.mla_qk_rope_dim


def mla_forward_flops(cfg: ModelConfig, seq_len: int, pairs: int) -> dict[str, int]:
    """Forward FLOPs of one MLA block on one sequence (`pairs` = query-key pairs attended):
    qkv (every projection but wo), attn_scores 2 h (n + r) pairs, attn_values 2 h v pairs,
    out_proj (wo); the keys of flops.forward_flops_per_layer."""
    projs = mla_projections(cfg)
    qk, v = mla_head_dims(cfg)
    return {"qkv": 2 * seq_len * sum(p.params for p in projs[:-1]),
            "attn_scores": 2 * cfg.n_heads * qk * pairs,
            "attn_values": 2 * cfg.n_heads * v * pairs,
            "out_proj": 2 * seq_len * projs[-1].params}


def mla_saved_elements(cfg: ModelConfig, tp: int = 1, decomposed_norm: bool = False) -> tuple[float, float]:
    """(compute-dtype elements, fp32 elements) per token that ONE rank's MLA block keeps for
    backward with no activation checkpointing, past the block's attention_norm (its input and
    1/rms are counted with the FFN norm's by flops.saved_activation_bytes):

      attention input (norm output) on the sequence shard     d/tp    (wq_a, wkv_a's input);
                                                               r_q = 0: + d gathered (wq's input;
                                                               the same tensor when tp = 1)
      wq_a / wkv_a outputs (the latent norms' inputs)         (r_q + r_kv + r)/tp (the RoPE key is
                                                               a view of wkv_a's output)
      latent norms' 1/rms                                     (1 + [r_q > 0])/tp   fp32
      their normalised x (decomposed_norm, CPU eager)         (r_q + r_kv)/tp
      normalised latents, all-gathered (wq_b, wkv_b input)    r_q + r_kv
      q, k per head (after RoPE), v, attention output O       (2 h (n + r) + 2 h v)/tp
                                                               (O is also wo's input, a view)
      attention logsumexp                                     h/tp     fp32
    """
    d, h, rq, rkv = cfg.dim, cfg.n_heads, cfg.mla_q_lora_rank, cfg.mla_kv_lora_rank
    k, v = mla_kv_widths(cfg)
    attn_input = d / tp if rq else d + (d / tp if tp > 1 else 0.0)
    down = (rq + rkv + cfg.mla_qk_rope_dim) / tp
    normed = (rq + rkv) * (1 + (1 / tp if decomposed_norm else 0.0))
    elems = attn_input + down + normed + (2 * k + 2 * v) / tp
    return elems, ((2 if rq else 1) + h) / tp


def mla_op_saved_elements(cfg: ModelConfig, tp: int = 1) -> tuple[float, int]:
    """(elements per token, matmul count) of the MLA block under torchtitan's op-level selective
    AC, which saves the output of every second matmul of a checkpointed block (the 1st, 3rd, ...)
    and of the attention kernel: the saved projections' outputs (the row-parallel wo's partial
    sum whole, T d, plus its reduce-scatter output d/tp when tp > 1; the others on 1/tp), the
    attention output O (h v/tp) and its logsumexp (counted by the caller). The matmul count
    tells the FFN where the alternation continues."""
    projs = mla_projections(cfg)
    saved = 0.0
    for p in projs[0::2]:
        saved += (p.d_out + (p.d_out / tp if tp > 1 else 0.0)) if p.split == "row" else p.d_out / tp
    return saved + mla_kv_widths(cfg)[1] / tp, len(projs)
