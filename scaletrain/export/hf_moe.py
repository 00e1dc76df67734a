"""The MoE part of the Hugging Face mapping: our MoE layers <-> `Qwen3MoeForCausalLM`.

On disk Qwen3-MoE keeps one tensor per expert (transformers 5 fuses them into 3-D parameters
when it loads, and splits them again when it saves):

    layers.N.feed_forward.router.gate.weight  [E, dim]    model.layers.N.mlp.gate.weight
    layers.N.feed_forward.experts.w1[e]       [f, dim]    model.layers.N.mlp.experts.e.gate_proj.weight
    layers.N.feed_forward.experts.w3[e]       [f, dim]    model.layers.N.mlp.experts.e.up_proj.weight
    layers.N.feed_forward.experts.w2[e]       [dim, f]    model.layers.N.mlp.experts.e.down_proj.weight
    layers.N.feed_forward.router.expert_bias  [E]         (none: must be zero, see below)

Layers before moe_dense_layers keep the dense `mlp.{gate,up,down}_proj` keys and are listed in
`mlp_only_layers`. What Qwen3-MoE cannot hold is refused (`check_exportable`): shared experts,
the sigmoid router, a selection bias, a model without q/k norms. Capacity dropping is allowed:
it is a training-time policy, our evaluation is dropless like Hugging Face's forward, so the
exported model computes what our eval computed.
"""

from __future__ import annotations

import torch

from scaletrain.config.schema import ModelConfig
from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.model.flops import expert_ffn_dim, is_moe_layer

_EXPERTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # ours -> Hugging Face


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ConfigError naming every MoE feature of `cfg` that Qwen3-MoE cannot express."""
    problems = []
    if not cfg.qk_norm:
        problems.append("model.qk_norm = false (Qwen3-MoE always RMS-normalises q and k per head; "
                        "no other Hugging Face MoE layout is written yet)")
    if cfg.moe_shared_experts:
        problems.append(f"model.moe_shared_experts = {cfg.moe_shared_experts} (Qwen3-MoE has no shared experts)")
    if cfg.moe_router != "softmax":
        problems.append(f"model.moe_router = {cfg.moe_router!r} (Qwen3-MoE routes by softmax)")
    if cfg.moe_balance == "bias":
        problems.append("model.moe_balance = 'bias' (the learned expert bias changes which experts are "
                        "chosen; Qwen3-MoE has no selection bias)")
    if problems:
        raise ConfigError("this MoE model cannot be exported as a Hugging Face Qwen3-MoE: "
                          + "; ".join(problems) + ".")


def config_fields(cfg: ModelConfig) -> dict:
    """The Qwen3-MoE entries of config.json for `cfg` (next to the common Llama-style ones)."""
    return {
        "num_experts": cfg.moe_experts,
        "num_experts_per_tok": cfg.moe_top_k,
        "moe_intermediate_size": expert_ffn_dim(cfg),
        "norm_topk_prob": True,  # our softmax router renormalises the top-k weights
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(cfg.moe_dense_layers)),
        "router_aux_loss_coef": cfg.moe_aux_coef,
        "output_router_logits": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.n_layers,
    }


def model_fields(hf: dict, where: str) -> dict:
    """Our moe_* ModelConfig fields from a Qwen3-MoE config.json; ConfigError for what our
    MoE layer does not compute the same way."""
    n_layers = hf["num_hidden_layers"]
    dense = sorted(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step", 1)
    if step != 1 or dense != list(range(len(dense))) or len(dense) >= n_layers:
        raise ConfigError(f"{where}: only leading dense layers are supported (decoder_sparse_step 1 and "
                          f"mlp_only_layers = [0, 1, ..]); got decoder_sparse_step {step}, mlp_only_layers {dense}")
    if not hf.get("norm_topk_prob", False):
        raise ConfigError(f"{where}: norm_topk_prob is false; scaletrain's softmax router always renormalises "
                          "the top-k weights, so it would compute a different model")
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{where}: sliding-window attention is not supported")
    experts = hf.get("num_experts", hf.get("num_local_experts"))  # transformers 5 saves the latter
    if not experts:
        raise CheckpointError(f"{where}: a qwen3_moe config without num_experts")
    return {
        "moe_experts": experts,
        "moe_top_k": hf["num_experts_per_tok"],
        "moe_ffn_dim": hf["moe_intermediate_size"],
        "moe_dense_layers": len(dense),
        "moe_aux_coef": float(hf.get("router_aux_loss_coef", 0.001)),
        "moe_router": "softmax",
        "moe_balance": "aux_loss",
    }


def layer_key_map(cfg: ModelConfig, layer: int) -> dict[str, str]:
    """Our key -> Hugging Face key of the one-to-one tensors of MoE layer `layer` (the router)."""
    return {f"layers.{layer}.feed_forward.router.gate.weight": f"model.layers.{layer}.mlp.gate.weight"}


def split_experts(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Pop the stacked expert tensors and expert biases of `sd` (our names) and return the
    per-expert tensors under their Hugging Face names (views of ours)."""
    out = {}
    for i in _moe_layers(cfg):
        p = f"layers.{i}.feed_forward."
        bias = sd.pop(p + "router.expert_bias", None)
        if bias is not None and bool(bias.ne(0).any()):
            raise CheckpointError(f"{p}router.expert_bias is not zero; Qwen3-MoE has no selection bias")
        for ours, theirs in _EXPERTS.items():
            stacked = sd.pop(p + "experts." + ours)
            for e in range(cfg.moe_experts):
                out[f"model.layers.{i}.mlp.experts.{e}.{theirs}.weight"] = stacked[e]
    return out


def stack_experts(hf: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """Pop the per-expert tensors of `hf` (Hugging Face names) and return them stacked under our
    names, plus zero expert biases."""
    out = {}
    for i in _moe_layers(cfg):
        p = f"layers.{i}.feed_forward."
        for ours, theirs in _EXPERTS.items():
            keys = [f"model.layers.{i}.mlp.experts.{e}.{theirs}.weight" for e in range(cfg.moe_experts)]
            missing = [k for k in keys if k not in hf]
            if missing:
                raise CheckpointError(f"the safetensors in {where} lack expert tensors, e.g. {missing[0]} "
                                      f"({len(missing)} missing)")
            out[p + "experts." + ours] = torch.stack([hf.pop(k) for k in keys])
        out[p + "router.expert_bias"] = torch.zeros(cfg.moe_experts)  # fp32, as the buffer
    return out


def _moe_layers(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.n_layers) if is_moe_layer(cfg, i)]
