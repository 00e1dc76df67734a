"""Named model shapes (flavors): a registry of ModelConfig field values.

A flavor is the set of defaults for the `[model]` table; any key set next to `flavor` in a
config overrides it. Add shapes with :func:`register_flavor`, never by copying a config.

The registry lives in config/, not next to the model: a flavor is pure config data (ModelConfig
values, no model code), and the loader applies it (defaults < flavor < TOML < command line), so
keeping it here lets config/ import nothing above it without an import-order side effect (a
registry filled from model/ would be empty for a caller that had not imported model/ first).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from scaletrain.config.schema import ModelConfig
from scaletrain.config.validate import did_you_mean
from scaletrain.errors import ConfigError

FLAVORS: dict[str, dict[str, Any]] = {}

_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def register_flavor(name: str, **fields: Any) -> None:
    """Add (or replace) flavor `name`; `fields` are ModelConfig field values (not `flavor`)."""
    unknown = sorted(set(fields) - _FIELDS)
    if unknown or "flavor" in fields:
        raise ConfigError(f"flavor '{name}': unknown or reserved ModelConfig fields {unknown or ['flavor']}")
    FLAVORS[name] = dict(fields)


def flavor_names() -> list[str]:
    """Registered flavor names, in registration order (smallest first)."""
    return list(FLAVORS)


def model_config_for(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of flavor `name`, with `overrides` (ModelConfig field values) applied.

    Raises ConfigError for an unknown flavor (with a "did you mean" suggestion) or an unknown
    override key. Shapes are not validated here; see `validate.validate_model_config`.
    """
    if name not in FLAVORS:
        raise ConfigError(
            f"unknown model flavor '{name}'.{did_you_mean(name, flavor_names())} "
            f"Known flavors: {', '.join(flavor_names())}."
        )
    overrides.pop("flavor", None)
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        bad = unknown[0]
        raise ConfigError(
            f"unknown model field '{bad}'.{did_you_mean(bad, sorted(_FIELDS))} "
            f"Model fields: {', '.join(sorted(_FIELDS))}."
        )
    values = {**FLAVORS[name], **overrides}
    return ModelConfig(flavor=name, **values)


# Tiny: unit tests on CPU in milliseconds (about 0.2M parameters).
register_flavor(
    "debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=512, max_seq_len=256
)
# About 3.4M parameters: ~300 steps of batch 16 x seq 256 on 2 CPU cores in a few minutes.
register_flavor(
    "cpu_demo", dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=512, max_seq_len=512
)
# A GPT-2-small-sized Llama (about 134M parameters with the untied 32k vocab).
register_flavor(
    "125M", dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, vocab_size=32000, max_seq_len=2048
)
# A GPT-2-medium-sized Llama (about 370M parameters).
register_flavor(
    "350M", dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=2816, vocab_size=32000, max_seq_len=2048
)
# torchtitan's 1B reference shape: exactly 981,534,720 parameters (untied, 2048 vocab).
register_flavor(
    "anchor_1b",
    dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=2048,
    max_seq_len=2048, rope_theta=500000.0, tie_embeddings=False,
)  # fmt: skip
# The real Llama 3 shapes (Meta's released configs; no rope scaling).
register_flavor(
    "llama3_8b",
    dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
    max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5,
)  # fmt: skip
register_flavor(
    "llama3_70b",
    dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=128256,
    max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5,
)  # fmt: skip
register_flavor(
    "llama3_405b",
    dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248, vocab_size=128256,
    max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5,
)  # fmt: skip
# Mixture of experts (model/moe.py). moe_debug: the debug shape with 8 experts of width 64, top-2,
# a dense first layer and Qwen3's q/k norms (so it exports as Qwen3-MoE): seconds per CPU step.
register_flavor(
    "moe_debug",
    dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=512, max_seq_len=256,
    qk_norm=True, moe_experts=8, moe_top_k=2, moe_ffn_dim=64, moe_dense_layers=1,
)  # fmt: skip
# Qwen/Qwen3-30B-A3B config.json: hidden_size 2048, num_hidden_layers 48, num_attention_heads 32,
# num_key_value_heads 4, head_dim 128, intermediate_size 6144 (unused: mlp_only_layers []),
# moe_intermediate_size 768, num_experts 128, num_experts_per_tok 8, norm_topk_prob true,
# vocab_size 151936, max_position_embeddings 40960, rope_theta 1e6, rms_norm_eps 1e-6,
# router_aux_loss_coef 0.001, tie_word_embeddings false. 30.5B parameters, 3.3B active.
register_flavor(
    "qwen3_30b_a3b",
    dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, ffn_dim=6144, vocab_size=151936,
    max_seq_len=40960, rope_theta=1000000.0, norm_eps=1e-6, qk_norm=True,
    moe_experts=128, moe_top_k=8, moe_ffn_dim=768, moe_aux_coef=0.001,
)  # fmt: skip
# mistralai/Mixtral-8x7B-v0.1, from transformers' MixtralConfig (whose defaults document that
# checkpoint): hidden_size 4096, num_hidden_layers 32, num_attention_heads 32, num_key_value_heads
# 8, intermediate_size 14336 (each expert), num_local_experts 8, num_experts_per_tok 2, vocab_size
# 32000, rope_theta 1e6, rms_norm_eps 1e-5, no sliding window; 32768-token context (the model card;
# MixtralConfig defaults to 131072). 46.7B parameters, 12.9B active. No q/k norms, so it does not
# export as Qwen3-MoE.
register_flavor(
    "mixtral_8x7b",
    dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=32000,
    max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-5,
    moe_experts=8, moe_top_k=2, moe_ffn_dim=14336,
)  # fmt: skip
# openai/gpt-oss-120b, from transformers' GptOssConfig (whose defaults document that checkpoint;
# transformers 5.24): hidden_size 2880, num_hidden_layers 36, num_attention_heads 64,
# num_key_value_heads 8, head_dim 64, intermediate_size 2880 (each expert), num_local_experts 128,
# num_experts_per_tok 4, vocab_size 201088, rms_norm_eps 1e-5, rope_theta 150000 with YaRN x32
# (4096 original context), max_position_embeddings 131072, tie_word_embeddings false,
# router_aux_loss_coef 0.001. NOT modelled here: attention biases and sinks, the 128-token sliding
# window of every other layer, the experts' biases and clamped SwiGLU, YaRN: the planner prices it
# as plain GQA (docs/planner.md). 116.79B parameters here (the omitted biases and sinks are 40.1M more),
# 5.71B active (5.13B without the embedding: the "5.1B active" of the model card).
register_flavor(
    "gpt_oss_120b",
    dim=2880, n_layers=36, n_heads=64, n_kv_heads=8, head_dim=64, ffn_dim=2880, vocab_size=201088,
    max_seq_len=131072, rope_theta=150000.0, norm_eps=1e-5,
    moe_experts=128, moe_top_k=4, moe_ffn_dim=2880, moe_aux_coef=0.001,
)  # fmt: skip
