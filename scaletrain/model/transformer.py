"""A plain single-device Llama-3-style decoder (no distributed code in it).

Parameter names follow torchtitan's Llama (`tok_embeddings`, `layers.{i}.attention.wq`, ...)
so the `apply_*` functions in scaletrain/parallel can address them by name; export/hf.py maps
them 1:1 onto Hugging Face `LlamaForCausalLM` names. RoPE uses Hugging Face's "rotate_half"
layout (first half / second half of head_dim), so HF weights need no permutation.

Build big models with :func:`build_model` (meta device, then one materialisation) or, for
parallel runs, construct under `torch.device("meta")`, apply parallelism from outside and
materialise the parts with parallel/init.py (the same values, shard by shard).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import ModelConfig
from scaletrain.config.validate import validate_model_config
from scaletrain.errors import ConfigError
from scaletrain.model.flops import expert_ffn_dim, head_dim_of, is_moe_layer
from scaletrain.model.moe import MoE
from scaletrain.model.sparsity import sparse_squared_relu_ffn

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (statistics accumulated in fp32).

    F.rms_norm is a fused kernel on CUDA that saves only x and 1/rms for backward (the count
    flops.activation_bytes_per_layer assumes); a hand-written fp32 version saves fp32 copies.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cos_sin(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [seq_len, head_dim] fp32, in the rotate_half layout.

    Channel j and channel j + head_dim/2 form one rotating pair with frequency
    theta^(-2j / head_dim); both halves of the table hold the same angles.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim)
    positions = torch.arange(seq_len, device=device, dtype=torch.int64).float()
    angles = torch.outer(positions, inv_freq)  # [seq, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)  # [seq, head_dim]
    return angles.cos(), angles.sin()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA over q, k, v [batch, heads, seq, head_dim] (k/v already repeated for GQA)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, seq, head_dim] by the angles in cos/sin [seq, head_dim]."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE, no biases; with cfg.qk_norm, every query
    and key head is RMS-normalised over head_dim before RoPE (Qwen3's q_norm / k_norm)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = head_dim_of(cfg)
        # Kept as a ratio, not as head counts: under tensor parallelism the local head counts
        # shrink but each query head still shares its kv head with n_rep - 1 others.
        self.n_rep = cfg.n_heads // cfg.n_kv_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        # The attention kernel, (q, k, v) -> out. Context parallelism swaps in its own from
        # outside (parallel/cp.py); the layer itself never changes.
        self.attention_fn = causal_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 heads: local head count, which tensor parallelism divides by its degree.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)  # [b, s, heads, hd]
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)  # [b, s, kv_heads, hd]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, heads | kv_heads, s, hd]
        v = self.wv(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # [b, kv_heads, s, hd]
        q, k = apply_rope(q, cos[:seq], sin[:seq]), apply_rope(k, cos[:seq], sin[:seq])
        if self.n_rep > 1:
            # Query head i uses kv head i // n_rep (the HF repeat_kv order). Explicit repeat
            # rather than enable_gqa: every SDPA backend and context parallelism accept it.
            k = k.repeat_interleave(self.n_rep, dim=1)  # [b, heads, s, hd]
            v = v.repeat_interleave(self.n_rep, dim=1)  # [b, heads, s, hd]
        out = self.attention_fn(q, k, v)  # [b, heads, s, hd]
        out = out.transpose(1, 2).reshape(bsz, seq, -1)  # [b, s, heads * hd]
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU `w2(silu(w1 x) * w3 x)` or non-gated Squared-ReLU `w2(relu(w1 x)^2)` (no w3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.ffn
        self.sparse_2to4 = cfg.activation_sparsity == "2:4"  # model/sparsity.py
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        if self.kind == "swiglu":
            self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        # The 2:4 FFN, (x, w1.weight, w2.weight) -> y (backend by device: "cuda" for CUDA
        # tensors, else "reference"). Tensor parallelism swaps in its own from outside
        # (parallel/tp.py); the layer itself never changes.
        self.sparse_ffn = sparse_squared_relu_ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        if self.sparse_2to4:
            return self.sparse_ffn(x, self.w1.weight, self.w2.weight)
        return self.w2(F.relu(self.w1(x)).square())


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h)). The FFN of layer
    `layer_id` is dense, or the MoE layer (model/moe.py) from cfg.moe_dense_layers on."""

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = _feed_forward(cfg, layer_id)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


def _feed_forward(cfg: ModelConfig, layer_id: int) -> nn.Module:
    if not is_moe_layer(cfg, layer_id):
        return FeedForward(cfg)
    width = expert_ffn_dim(cfg) * cfg.moe_shared_experts
    shared = FeedForward(dataclasses.replace(cfg, ffn_dim=width)) if width else None
    return MoE(cfg, layer_id, shared)


MLA_NOT_BUILT = ("model.attention = 'mla': scaletrain's trainer implements only 'gqa' (grouped-query attention); "
                 "multi-head latent attention is priced by the planner only (`scaletrain plan validate`, "
                 "`scaletrain plan search` without --write-config). Set model.attention = 'gqa' to train.")


class Transformer(nn.Module):
    """Llama-3-style decoder: tokens [batch, seq] -> logits [batch, seq, vocab].

    `layers` is an nn.ModuleDict keyed by str(i) so pipeline parallelism can delete layers
    and keep the others' names (and checkpoint keys). `tok_embeddings`, `norm` and `output`
    may be set to None by a pipeline split; forward then passes its input through that step.
    Construction leaves weights and RoPE tables uninitialised: call `init_weights()` after
    materialising (build_model does both).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model_config(cfg)
        if cfg.attention != "gqa":
            raise ConfigError(MLA_NOT_BUILT)
        self.cfg = cfg
        self.head_dim = head_dim_of(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        # Non-persistent: derived from the config, so never in checkpoints; filled by
        # init_buffers so that construction on the meta device allocates nothing.
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, self.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, self.head_dim), persistent=False)

    def tie_weights(self) -> None:
        """Make output.weight the same Parameter as tok_embeddings.weight when cfg asks for it.

        Call again after `to_empty` (materialising from meta creates separate Parameters).
        """
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def init_plan(self) -> list[tuple[str, tuple[int, ...], float | None]]:
        """(parameter name, full shape, std) of the FULL model in initialisation order; std
        None means ones (norm weights). Derived from the config, so a pipeline stage or a
        sharded copy walks the same list as the single-device model."""
        cfg, hd = self.cfg, self.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        plan: list[tuple[str, tuple[int, ...], float | None]] = [
            ("tok_embeddings.weight", (cfg.vocab_size, cfg.dim), cfg.init_std)]
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            ffn_in, ffn_out = _ffn_init_plan(cfg, p + "feed_forward.", i)
            plan += [(p + "attention.wq.weight", (cfg.n_heads * hd, cfg.dim), cfg.init_std),
                     (p + "attention.wk.weight", (cfg.n_kv_heads * hd, cfg.dim), cfg.init_std),
                     (p + "attention.wv.weight", (cfg.n_kv_heads * hd, cfg.dim), cfg.init_std),
                     *[(name, shape, cfg.init_std) for name, shape in ffn_in],
                     (p + "attention.wo.weight", (cfg.dim, cfg.n_heads * hd), out_std),
                     *[(name, shape, out_std) for name, shape in ffn_out],
                     (p + "attention_norm.weight", (cfg.dim,), None), (p + "ffn_norm.weight", (cfg.dim,), None)]
            if cfg.qk_norm:
                plan += [(p + "attention.q_norm.weight", (hd,), None), (p + "attention.k_norm.weight", (hd,), None)]
        plan.append(("norm.weight", (cfg.dim,), None))
        if not cfg.tie_embeddings:
            plan.append(("output.weight", (cfg.vocab_size, cfg.dim), cfg.init_std))
        return plan

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill the RoPE tables and zero the MoE selection biases, on their current device."""
        cfg = self.cfg
        cos, sin = rope_cos_sin(self.head_dim, cfg.max_seq_len, cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for name, buffer in self.named_buffers():
            if name.endswith("router.expert_bias"):  # MoE selection bias starts at 0
                buffer.zero_()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and the buffers of this (whole, single-device) model in
        place, on their current device.

        Linears and embeddings ~ N(0, init_std); the residual-branch output projections (wo,
        w2) use init_std / sqrt(2 * n_layers) so the residual stream's variance stays O(1)
        with depth; RMSNorm weights = 1. Uses the global RNG (build_model seeds it) in
        `init_plan` order. Parallelised parts (pipeline stages, sharded parameters) are
        initialised to exactly these values by parallel/init.py, which walks the same plan.
        """
        self.init_buffers()
        params = dict(self.named_parameters())
        for name, _, std in self.init_plan():
            if std is None:
                nn.init.ones_(params[name])
            else:
                nn.init.normal_(params[name], mean=0.0, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 [batch, seq] with seq <= max_seq_len -> logits [batch, seq, vocab]
        in the compute dtype. (A pipeline stage without tok_embeddings takes hidden states
        [batch, seq, dim] instead; one without output returns hidden states.)"""
        seq = tokens.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ConfigError(
                f"sequence of {seq} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                "raise model.max_seq_len or shorten data.seq_len"
            )
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # [b, s, dim]
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h  # [b, s, vocab]


def _ffn_init_plan(cfg: ModelConfig, p: str, layer: int) -> tuple[list, list]:
    """(input-side, output-side) (name, full shape) of layer `layer`'s FFN parameters, prefix
    `p`: input-side ones draw N(0, init_std), output-side (w2) the residual-scaled std."""
    if not is_moe_layer(cfg, layer):
        ffn_in = [(p + "w1.weight", (cfg.ffn_dim, cfg.dim))]
        if cfg.ffn == "swiglu":
            ffn_in.append((p + "w3.weight", (cfg.ffn_dim, cfg.dim)))
        return ffn_in, [(p + "w2.weight", (cfg.dim, cfg.ffn_dim))]
    e, f = cfg.moe_experts, expert_ffn_dim(cfg)
    ffn_in = [(p + "router.gate.weight", (e, cfg.dim)), (p + "experts.w1", (e, f, cfg.dim)),
              (p + "experts.w3", (e, f, cfg.dim))]
    ffn_out = [(p + "experts.w2", (e, cfg.dim, f))]
    if cfg.moe_shared_experts:
        fs = f * cfg.moe_shared_experts
        ffn_in += [(p + "shared.w1.weight", (fs, cfg.dim)), (p + "shared.w3.weight", (fs, cfg.dim))]
        ffn_out.append((p + "shared.w2.weight", (cfg.dim, fs)))
    return ffn_in, ffn_out


def materialize(model: nn.Module, device: str | torch.device, seed: int,
                init: Callable[[nn.Module], None] | None = None) -> None:
    """Allocate `model`, built on the meta device, on `device` and initialise it from `seed`
    with `init(model)` (default: its own `init_weights`; parallel/init.py passes the sharded
    walk). The caller's RNG streams (CPU and the target accelerator) are untouched."""
    device = torch.device(device)
    model.to_empty(device=device)
    model.tie_weights()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        init(model) if init is not None else model.init_weights()


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0) -> Transformer:
    """Construct on the meta device, materialise on `device`, and initialise from `seed`.

    The same (cfg, device, seed) gives bit-identical weights every time. The global RNG state
    (CPU and the target accelerator) is saved and restored, so callers' randomness is untouched.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    materialize(model, device, seed)
    return model
