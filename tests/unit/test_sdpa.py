"""train.sdpa_backend: kernel restriction numerics on the CPU and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaletrain.errors import ConfigError
from scaletrain.model.sdpa import check_sdpa_backend, sdpa_context
from conftest import debug_train_args, run_main


@pytest.mark.parametrize("name", ["flash", "math"])
def test_restricted_backend_matches_auto_on_cpu(name):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=g, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    with sdpa_context(name):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # fp32: kernels differ in summation order only
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cuda_only_backends_are_refused_on_cpu():
    check_sdpa_backend("auto", torch.device("cpu"))
    check_sdpa_backend("cudnn", torch.device("cuda"))
    for name in ("cudnn", "efficient"):
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            check_sdpa_backend(name, torch.device("cpu"))


def test_cli_math_backend_trains_and_cudnn_on_cpu_is_exit_2(tmp_path, data_cache):
    run_main(*debug_train_args(tmp_path / "math", data_cache, 3, "--train.sdpa_backend", "math"))
    proc = run_main(*debug_train_args(tmp_path / "cudnn", data_cache, 3, "--train.sdpa_backend", "cudnn",
                                      "--train.device", "cpu"), check=False)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr
    assert not (tmp_path / "cudnn").exists()
