"""Value checks on a fully assembled Config. Each error names the offending key and a fix.

Checks that need data (tokenizer vocab vs model.vocab_size) or the world size (parallel
degrees vs ranks) run where that information exists: the trainer and parallel/dims.py.
"""

from __future__ import annotations

import re

from scaletrain.config.load import _did_you_mean
from scaletrain.config.schema import Config, DataConfig
from scaletrain.errors import ConfigError

CHOICES = {
    "model.moe_router": ("softmax", "sigmoid"),
    "model.moe_balance": ("aux_loss", "bias", "none"),
    "tokenizer.kind": ("byte", "bpe", "file"),
    "data.source": ("builtin", "builtin_code", "builtin_prose", "text", "jsonl", "parquet", "hf_disk"),
    "optim.name": ("adamw",),
    "optim.fused": ("auto", "true", "false"),
    "schedule.kind": ("cosine", "wsd", "constant", "linear"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "fp32", "bf16", "fp8"),
    "train.fp8_recipe": ("tensorwise", "rowwise"),
    "train.sdpa_backend": ("auto", "flash", "cudnn", "efficient", "math"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"),
    "train.nan_policy": ("skip", "rollback", "abort"),
    "checkpoint.verify": ("checksum", "size"),
    "metrics.progress": ("auto", "rich", "plain", "none"),
    "parallel.pp_schedule": ("gpipe", "1f1b", "interleaved_1f1b"),
    "parallel.ac": ("none", "full", "selective"),
}


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate_config(cfg: Config) -> None:
    """Raise ConfigError for impossible values; returns None when the config is usable."""
    from scaletrain.model.transformer import validate_model_config

    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        _require(value in allowed, f"{key} = {value!r} is not one of {', '.join(map(repr, allowed))}.")

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
        allowed = CHOICES["data.source"]
        _require(dom.source in allowed, f"{where}: source = {dom.source!r} is not one of {', '.join(map(repr, allowed))}.")
        _require(dom.source.startswith("builtin") or dom.path != "",
                 f"{where}: source = '{dom.source}' needs path (a file or folder).")
        _require(dom.weight >= 0, f"{where}: weight must be >= 0 (0 = validation only), got {dom.weight}.")
    _require(sum(dom.weight for dom in d.domains) > 0 or d.domain != "",
             "every [[data.domains]] weight is 0: nothing to train on. Give at least one domain a weight > 0.")
    if d.domain:
        _require(d.domain in names, f"data.domain = {d.domain!r} is not one of the [[data.domains]] names "
                                    f"({', '.join(names)}).{_did_you_mean(d.domain, names)}")
