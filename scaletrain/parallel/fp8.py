"""Float8 training of the transformer blocks' linears with torchao (`train.precision = "fp8"`).

What changes: every nn.Linear inside `layers.*` (attention wq/wk/wv/wo, feed-forward w1/w2/w3)
whose in and out features are both multiples of 16 becomes a torchao `Float8Linear`: its
three matmuls (output, grad_input, grad_weight) cast their operands to float8 with dynamic
scales and run `torch._scaled_mm`. The output head, the embedding, norms, attention and the
loss stay as they are and run under bf16 autocast; master weights and optimizer state stay
fp32, exactly as for precision "bf16". Parameter names do not change, so checkpoints move
freely between fp8 and bf16 runs.

Recipes (torchao's `Float8LinearConfig.from_recipe_name`):
- "tensorwise": one scale per tensor; e4m3 for inputs and weights, e5m2 for gradients. Under
  FSDP the weights are cast to float8 *before* the all-gather (1 byte per element instead of
  the fp32 parameter's 4) and all their scales come from one all-reduce after each optimizer
  step (`precompute_scales`).
- "rowwise": one power-of-two scale per row, e4m3 everywhere; more accurate, slower kernel,
  no float8 all-gather (FSDP gathers the fp32 weights as for bf16).

Ordering: the conversion swaps modules, so it runs first, on the meta-device model, before the
pipeline split, TP, AC, torch.compile and FSDP (parallel/__init__.py); FSDP then shards the
float8-aware weights. Tensor parallelism would need torchao's float8 TP styles and is refused.

Hardware: `torch._scaled_mm` needs CUDA compute capability >= 8.9 (Ada, Hopper, Blackwell).
On the CPU, torch has a reference `_scaled_mm` kernel; it runs both recipes (the unit tests use
it), for testing only: it brings no speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from torch import nn

from scaletrain.errors import ConfigError

FP8_RECIPES = ("tensorwise", "rowwise")
_MIN_CAPABILITY = (8, 9)  # torch._scaled_mm: Ada (sm_89), Hopper (sm_90) and newer


@contextlib.contextmanager
def _quiet_torchao_import():
    """torchao's first import logs a warning per compiled extension it cannot load (CPU-only
    torch, or a torch it was not built against) and torch logs a deprecation about one of its
    enums; float8 training uses none of those extensions, so the noise is held back."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def fp8_supported(device: torch.device | str) -> str | None:
    """Why float8 training cannot run on `device`, or None when it can.

    Not supported: torchao missing, a CUDA device of compute capability below 8.9, any device
    type other than CUDA and CPU. The CPU is allowed, for testing only (see the module doc).
    """
    try:
        with _quiet_torchao_import():
            import torchao.float8  # noqa: F401
    except ImportError:
        return ("train.precision = 'fp8' needs torchao, which is not installed; "
                "run `pip install 'torchao>=0.16'` (or `pip install -e '.[fp8]'`)")
    device = torch.device(device)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < _MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            return (f"{name} has CUDA compute capability {capability[0]}.{capability[1]}, but float8 matmuls "
                    f"(torch._scaled_mm) need >= {_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]} (Ada, Hopper or newer); "
                    "use --train.precision bf16")
        return None
    if device.type == "cpu":
        return None
    return f"float8 training runs on CUDA (or on the CPU, for testing), not on device type '{device.type}'"


def check_fp8(recipe: str, device: torch.device | str) -> None:
    """Raise ConfigError when precision "fp8" cannot run with this recipe on this device (fp8 with
    tensor parallelism is refused earlier, by parallel/layout.py)."""
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"train.fp8_recipe must be one of {', '.join(FP8_RECIPES)}, got {recipe!r}")
    reason = fp8_supported(device)
    if reason is not None:
        raise ConfigError(reason)


def fp8_filter(module: nn.Module, fqn: str) -> bool:
    """True for the linears that become float8: inside a transformer block (`layers.*`, so never
    the output head) with in and out features divisible by 16 (`torch._scaled_mm`'s layout
    requirement)."""
    return (isinstance(module, nn.Linear) and fqn.startswith("layers.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_fp8(model: nn.Module, recipe: str, fsdp: bool) -> int:
    """Swap the eligible linears of `model` (see `fp8_filter`) for torchao Float8Linear, in place;
    returns how many were converted. `fsdp`: the model will be sharded with FSDP2, so with the
    tensorwise recipe its weights are all-gathered in float8. Works on the meta device."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if fsdp and recipe == "tensorwise":  # torchao supports float8 all-gather for tensorwise scales only
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    converted: list[str] = []

    def take(module: nn.Module, fqn: str) -> bool:  # torchao asks once per linear and swaps the True ones
        if fp8_filter(module, fqn):
            converted.append(fqn)
            return True
        return False

    convert_to_float8_training(model, module_filter_fn=take, config=config)
    if config.enable_fsdp_float8_all_gather:
        for name in converted:
            model.get_submodule(name).register_state_dict_post_hook(_plain_weight_in_state_dict)
    return len(converted)


def _plain_weight_in_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """With float8 all-gather the weight is torchao's wrapper subclass (inside FSDP's DTensor),
    which DCP would pickle as such: checkpoints would then need torchao to load, and not load
    into a bf16 or single-device model. The state dict gets the plain fp32 tensor instead (the
    same storage, so loading in place still fills the parameter)."""
    from torch.distributed.tensor import DTensor
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    key = prefix + "weight"
    weight = state_dict.get(key)
    if isinstance(weight, DTensor) and isinstance(weight._local_tensor, WeightWithDynamicFloat8CastTensor):
        plain = weight._local_tensor._tensor.detach()  # this rank's shard
        state_dict[key] = DTensor.from_local(plain, weight.device_mesh, weight.placements, shape=weight.shape,
                                             stride=weight.stride(), run_check=False)
    elif isinstance(weight, WeightWithDynamicFloat8CastTensor):
        state_dict[key] = weight._tensor.detach()


def precompute_scales(parts: list[nn.Module]) -> None:
    """After an optimizer step: compute the float8 scales of every FSDP-sharded tensorwise weight
    in one all-reduce per part, instead of one per weight at its next all-gather. A no-op for
    parts without float8 all-gather (rowwise, no FSDP, not fp8)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for part in parts:
        precompute_float8_dynamic_scale_for_fsdp(part)
