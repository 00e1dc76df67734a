"""Which scaled-dot-product-attention kernel runs (train.sdpa_backend).

"auto" lets PyTorch choose by its own priority; a name restricts SDPA to that one kernel, so a
shape or dtype it cannot handle fails loudly instead of silently falling back to a slower one.
On an H100, cuDNN attention is usually faster than FlashAttention-2 for bf16 training (measure
with `scaletrain bench`); on the CPU only "flash" (PyTorch's CPU flash kernel) and "math" run.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scaletrain.errors import ConfigError

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
CUDA_ONLY = ("cudnn", "efficient")


def check_sdpa_backend(name: str, device: torch.device) -> None:
    """ConfigError for a backend that cannot run on `device`."""
    if name != "auto" and name not in BACKENDS:
        raise ConfigError(f"train.sdpa_backend = {name!r} is unknown; choose auto, {', '.join(BACKENDS)}.")
    if name in CUDA_ONLY and device.type != "cuda":
        raise ConfigError(f"train.sdpa_backend = {name!r} needs a CUDA device (this run is on {device.type}); "
                          "use 'auto', 'flash' or 'math' on the CPU.")


def sdpa_context(name: str) -> contextlib.AbstractContextManager:
    """Context manager restricting SDPA to backend `name` ("auto": no restriction)."""
    return contextlib.nullcontext() if name == "auto" else sdpa_kernel([BACKENDS[name]])
