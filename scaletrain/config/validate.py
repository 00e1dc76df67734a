"""Value checks on the config. Each error names the offending key and a fix.

Allowed string values come from the schema's `Literal` types (`check_choice`, used by
config/load.py's `coerce` for every value read, and by `check_choices` for a node built in
code). Checks that need data (tokenizer vocab vs model.vocab_size) or the world size (parallel
degrees vs ranks) run where that information exists: the trainer and parallel/dims.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

from scaletrain.config.schema import Config, DataConfig, ModelConfig, head_dim_of
from scaletrain.errors import ConfigError


def did_you_mean(name: str, options: Iterable[str], spell: Callable[[str], str] = str) -> str:
    """' Did you mean X?' for the option closest to `name` (written as `spell(option)`), or ''."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{spell(close[0])}'?" if close else ""


def is_choice(typ: Any) -> bool:
    """Whether a field type is a `Literal[...]` of allowed values."""
    return typing.get_origin(typ) is Literal


def check_choice(key: str, value: Any, typ: Any) -> Any:
    """`value` if it is one of the values of the `Literal` type `typ`; else ConfigError naming
    `key`, the allowed values and the nearest one."""
    allowed = typing.get_args(typ)
    if isinstance(value, str) and value in allowed:
        return value
    raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(repr, allowed))}."
                      + did_you_mean(str(value), allowed))


def check_choices(key: str, node: Any) -> None:
    """check_choice for every `Literal` field of dataclass `node` (the config node `key`), for
    nodes built in code rather than read by config/load.py."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        if is_choice(hints[f.name]):
            check_choice(f"{key}.{f.name}", getattr(node, f.name), hints[f.name])


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise ConfigError (saying how to fix it) if `cfg` does not describe a buildable model."""
    check_choices("model", cfg)
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
        value = getattr(cfg, name)
        _require(isinstance(value, int) and value > 0, f"model.{name} must be a positive integer, got {value!r}")
    for name in ("rope_theta", "norm_eps", "init_std"):
        _require(getattr(cfg, name) > 0, f"model.{name} must be > 0, got {getattr(cfg, name)!r}")
    _require(isinstance(cfg.head_dim, int) and cfg.head_dim >= 0,
             f"model.head_dim must be an integer >= 0 (0 = dim / n_heads), got {cfg.head_dim!r}")
    _require(cfg.head_dim != 0 or cfg.dim % cfg.n_heads == 0,
             f"model.dim={cfg.dim} is not divisible by model.n_heads={cfg.n_heads}; "
             "choose n_heads dividing dim (head_dim = dim / n_heads), or set model.head_dim")
    _require(cfg.n_heads % cfg.n_kv_heads == 0,
             f"model.n_heads={cfg.n_heads} is not divisible by model.n_kv_heads={cfg.n_kv_heads}; "
             "grouped-query attention shares each kv head among n_heads / n_kv_heads query heads")
    head_dim = head_dim_of(cfg)
    _require(head_dim % 2 == 0, f"head_dim = {head_dim} is odd; RoPE rotates pairs of channels, "
                                "so choose dim and n_heads (or model.head_dim) giving an even head_dim")
    _require(cfg.activation_sparsity != "2:4" or cfg.ffn == "squared_relu",
             "model.activation_sparsity='2:4' needs model.ffn='squared_relu' "
             "(the sparse activations come from the squared ReLU)")
    _validate_moe(cfg)
    _validate_mla(cfg)


def _validate_mla(cfg: ModelConfig) -> None:
    """mla_* widths of a multi-head latent attention model (model/flops_mla.py)."""
    if cfg.attention != "mla":
        return
    for key in ("mla_kv_lora_rank", "mla_qk_nope_dim", "mla_qk_rope_dim", "mla_v_dim"):
        value = getattr(cfg, key)
        _require(isinstance(value, int) and value > 0, f"model.{key} must be a positive integer, got {value!r}")
    _require(isinstance(cfg.mla_q_lora_rank, int) and cfg.mla_q_lora_rank >= 0,
             f"model.mla_q_lora_rank must be an integer >= 0 (0 = no query compression), got {cfg.mla_q_lora_rank!r}")
    _require(cfg.mla_qk_rope_dim % 2 == 0, f"model.mla_qk_rope_dim = {cfg.mla_qk_rope_dim} is odd; RoPE rotates "
                                           "pairs of channels, so choose an even width (DeepSeek-V3: 64)")
    _require(not cfg.qk_norm, "model.qk_norm normalises the heads of grouped-query attention; multi-head latent "
                              "attention normalises its latents instead: set model.qk_norm = false with "
                              "model.attention = 'mla'")


def _validate_moe(cfg: ModelConfig) -> None:
    """moe_* values that do not make a model (model/moe.py, docs/moe.md)."""
    _require(isinstance(cfg.moe_experts, int) and cfg.moe_experts >= 0,
             f"model.moe_experts must be an integer >= 0 (0 = dense), got {cfg.moe_experts!r}")
    if cfg.moe_experts == 0:
        return
    _require(1 <= cfg.moe_top_k <= cfg.moe_experts,
             f"model.moe_top_k = {cfg.moe_top_k} must be between 1 and model.moe_experts = "
             f"{cfg.moe_experts} (each token is sent to top_k distinct experts)")
    for key in ("moe_ffn_dim", "moe_shared_experts", "moe_dense_layers"):
        value = getattr(cfg, key)
        _require(isinstance(value, int) and value >= 0, f"model.{key} must be an integer >= 0, got {value!r}")
    _require(cfg.moe_dense_layers < cfg.n_layers,
             f"model.moe_dense_layers = {cfg.moe_dense_layers} leaves no MoE layer of the {cfg.n_layers}; "
             f"use at most {cfg.n_layers - 1}, or moe_experts = 0 for a dense model")
    for key in ("moe_aux_coef", "moe_bias_rate", "moe_capacity_factor"):
        _require(getattr(cfg, key) >= 0, f"model.{key} must be >= 0, got {getattr(cfg, key)!r}")
    _require(cfg.ffn == "swiglu" and cfg.activation_sparsity == "none",
             "MoE experts are SwiGLU: set model.ffn = 'swiglu' and model.activation_sparsity = 'none' with "
             f"model.moe_experts > 0 (got ffn={cfg.ffn!r}, activation_sparsity={cfg.activation_sparsity!r})")


def validate_config(cfg: Config) -> None:
    """Raise ConfigError for impossible values; returns None when the config is usable."""
    for f in dataclasses.fields(cfg):
        check_choices(f.name, getattr(cfg, f.name))
    validate_model_config(cfg.model)
    m, d, o, s, t = cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.train
    _require(d.seq_len >= 1, f"data.seq_len must be >= 1, got {d.seq_len}.")
    _require(
        d.seq_len <= m.max_seq_len,
        f"data.seq_len = {d.seq_len} exceeds model.max_seq_len = {m.max_seq_len} of flavor "
        f"'{m.flavor}'. Lower data.seq_len or raise model.max_seq_len.",
    )
    _require(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}.")
    _require(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}.")
    _require(d.max_documents >= 0, f"data.max_documents must be >= 0 (0 = all), got {d.max_documents}.")
    _require(d.source.startswith("builtin") or d.path != "", f"data.source = '{d.source}' needs data.path (a file or folder).")
    _validate_domains(d)
    _require(cfg.tokenizer.kind != "file" or cfg.tokenizer.path != "", "tokenizer.kind = 'file' needs tokenizer.path (a tokenizer.json).")
    _require(cfg.tokenizer.vocab_size >= 259, f"tokenizer.vocab_size must be >= 259 (256 bytes + specials), got {cfg.tokenizer.vocab_size}.")

    _require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}.")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1/beta2 must be in [0, 1), got {o.beta1}, {o.beta2}.")
    _require(o.eps > 0, f"optim.eps must be > 0, got {o.eps}.")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}.")
    _require(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}.")

    _require(s.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}.")
    _require(0 <= s.min_lr_ratio <= 1, f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}.")
    _require(0 < s.decay_fraction <= 1, f"schedule.decay_fraction must be in (0, 1], got {s.decay_fraction}.")

    _require(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}.")
    _require(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}.")
    _require(t.eval_interval >= 0, f"train.eval_interval must be >= 0, got {t.eval_interval}.")
    _require(t.eval_batches >= 1, f"train.eval_batches must be >= 1, got {t.eval_batches}.")
    _require(t.hang_timeout_s >= 0, f"train.hang_timeout_s must be >= 0 (0 = off), got {t.hang_timeout_s}.")
    _require(t.sample_tokens >= 0, f"train.sample_tokens must be >= 0, got {t.sample_tokens}.")
    _require(t.threads >= 0, f"train.threads must be >= 0 (0 = default), got {t.threads}.")

    c = cfg.checkpoint
    _require(c.interval >= 0, f"checkpoint.interval must be >= 0 (0 = only the final), got {c.interval}.")
    _require(c.keep >= 0, f"checkpoint.keep must be >= 0 (0 = keep all), got {c.keep}.")
    _require(cfg.metrics.log_interval >= 0,
             f"metrics.log_interval must be >= 0 (0 = auto, about 50 lines per run), got {cfg.metrics.log_interval}.")

    p = cfg.parallel
    for name in ("dp_replicate", "tp", "pp", "cp", "ep"):
        v = getattr(p, name)
        _require(v >= 1, f"parallel.{name} must be >= 1, got {v}.")
    _require(p.dp_shard >= 1 or p.dp_shard == -1, f"parallel.dp_shard must be >= 1 or -1 (the rest), got {p.dp_shard}.")
    _require(p.ac_every >= 1, f"parallel.ac_every must be >= 1 (checkpoint every k-th block), got {p.ac_every}.")
    _require(p.pp_microbatches >= 0, f"parallel.pp_microbatches must be >= 0, got {p.pp_microbatches}.")
    for name in ("seed_steps", "branch_steps", "finetune_steps"):
        v = getattr(cfg.btx, name)
        _require(v >= 1, f"btx.{name} must be >= 1, got {v}.")


_DOMAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _validate_domains(d: DataConfig) -> None:
    """[[data.domains]]: named, unique, a known source with its path, weights >= 0 summing > 0;
    data.domain names one of them; data.source/path/text_field are left to the domain tables."""
    if not d.domains:
        _require(d.domain == "", f"data.domain = {d.domain!r} selects a domain, but the config has no "
                                 "[[data.domains]] tables; add them or drop data.domain.")
        return
    _require((d.source, d.path, d.text_field) == ("builtin", "", "text"),
             "data.source / data.path / data.text_field are set per domain when [[data.domains]] is "
             "present; move them into the domain tables.")
    names = []
    for i, dom in enumerate(d.domains):
        where = f"data.domains[{i}]" + (f" ('{dom.name}')" if dom.name else "")
        _require(_DOMAIN_NAME.fullmatch(dom.name) is not None,
                 f"{where}: name = {dom.name!r} must be non-empty letters, digits, '_' or '-' "
                 "(it names the metrics key val_loss_<name> and a folder).")
        _require(dom.name not in names, f"{where}: the name '{dom.name}' is used twice; domain names must be unique.")
        names.append(dom.name)
        check_choices(f"data.domains[{i}]", dom)
        _require(dom.source.startswith("builtin") or dom.path != "",
                 f"{where}: source = '{dom.source}' needs path (a file or folder).")
        _require(dom.weight >= 0, f"{where}: weight must be >= 0 (0 = validation only), got {dom.weight}.")
    _require(sum(dom.weight for dom in d.domains) > 0 or d.domain != "",
             "every [[data.domains]] weight is 0: nothing to train on. Give at least one domain a weight > 0.")
    if d.domain:
        _require(d.domain in names, f"data.domain = {d.domain!r} is not one of the [[data.domains]] names "
                                    f"({', '.join(names)}).{did_you_mean(d.domain, names)}")
