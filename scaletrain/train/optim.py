"""AdamW with weight-decay groups, and the learning-rate schedules.

Weight decay applies to matrices (linear weights) only; norms and embeddings are not decayed
(as in nanoGPT and torchtitan's Llama recipes), because decaying an embedding row that is
rarely seen pulls it to zero between its updates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scaletrain.config.schema import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into decayed groups (2-D weights except embeddings) and the rest, one
    group per device mesh (expert parallelism puts the experts on their own mesh, and the
    optimizer's foreach kernels take one mesh at a time)."""
    groups: dict[tuple[bool, object], list[nn.Parameter]] = {}
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # tied weights appear once
        decay = p.ndim >= 2 and id(p) not in embedding_params
        groups.setdefault((decay, getattr(p, "device_mesh", None)), []).append(p)
    # Decayed groups first; a pipeline stage may lack one kind.
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0}
            for (decay, _), params in sorted(groups.items(), key=lambda item: not item[0][0])]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; fused on CUDA when `cfg.fused` is "auto" (the fused kernel is CUDA-only there)."""
    fused = {"true": True, "false": False, "auto": device.type == "cuda"}[cfg.fused]
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


# Param-group values a checkpoint must not override: the config's hyperparameters (lr excepted:
# the schedule sets it every step) and how this process runs the kernels.
_FROM_CONFIG = ("weight_decay", "betas", "eps", "foreach", "fused")


def _as_config(key: str, old, new) -> list[tuple]:
    """(config key, checkpoint value, config value) of a param-group entry the user sets."""
    if key == "betas":
        return [("beta1", old[0], new[0]), ("beta2", old[1], new[1])]
    return [(key, old, new)] if key in ("weight_decay", "eps") else []


class PartsOptimizer:
    """One AdamW per model part (a pipeline rank may hold several stage modules), used as one.

    `param_groups` lists every part's groups (the same dicts), so LRSchedule drives them all.
    """

    def __init__(self, parts: list[nn.Module], cfg: OptimConfig, device: torch.device):
        self.parts = parts
        self.optimizers = [build_optimizer(part, cfg, device) for part in parts]

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def settings(self) -> list[dict]:
        """Each param group's values that come from the config (`_FROM_CONFIG`), in order."""
        return [{k: g[k] for k in _FROM_CONFIG if k in g} for g in self.param_groups]

    def apply_settings(self, settings: list[dict]) -> dict[str, tuple]:
        """Set `settings` (from `settings()` before a checkpoint's param groups were loaded)
        back on the groups, so a resumed run uses its config's weight decay, betas and eps (lr
        follows the schedule). Returns {"optim.<key>": (checkpoint value, config value)} for
        each user-visible setting that differed."""
        changed: dict[str, tuple] = {}
        for group, want in zip(self.param_groups, settings, strict=True):
            for key, value in want.items():
                for name, old, new in _as_config(key, group[key], value):
                    if old != new:
                        changed[f"optim.{name}"] = (old, new)
                group[key] = value
        return changed

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (1-based) out of `total_steps`.

    Warmup is linear from 1/warmup to 1. Then "cosine" decays to `min_lr_ratio` over the
    remaining steps, "linear" decays linearly to it, "constant" stays at 1, and "wsd"
    (warmup-stable-decay) stays at 1 until the last `decay_fraction` of the steps, which decay
    linearly to `min_lr_ratio`.
    """
    warmup = cfg.warmup_steps
    if warmup > 0 and step <= warmup:
        return step / warmup
    if cfg.kind == "constant":
        return 1.0
    lo = cfg.min_lr_ratio
    if cfg.kind == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = max(warmup, total_steps - decay_steps)
        if step <= decay_start:
            return 1.0
        frac = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - lo) * frac
    frac = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.kind == "linear":
        return 1.0 - (1.0 - lo) * frac
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))  # cosine


class LRSchedule:
    """Sets each param group's lr before an optimizer step; its state is the step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, total_steps: int, cfg: ScheduleConfig):
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.total_steps = total_steps
        self.cfg = cfg
        self.last_step = 0

    def lr_at(self, step: int) -> float:
        return self.peak_lr * lr_factor(step, self.total_steps, self.cfg)

    def set_for_step(self, step: int) -> float:
        """Apply the lr of optimizer step `step` (1-based) and return it."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_step = step
        return lr

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "peak_lr": self.peak_lr, "total_steps": self.total_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.last_step = int(sd["last_step"])
