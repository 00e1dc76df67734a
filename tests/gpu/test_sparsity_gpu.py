"""The "cuda" 2:4 backend (sparse tensor cores) against the dense "reference" backend, forward
and backward. Run on the H100: `pytest -m gpu tests/gpu`; skipped where no CUDA GPU is visible.

Both backends get the same CUDA tensors, so h = x W1^T comes from the same cuBLAS call and the
2:4 mask (exact comparisons of relu(h)) is identical; what differs is the accumulation order
of the 2:4 GEMMs (y and dx) and, in bf16/fp16, the rounding of their outputs. Tolerance: the
relative Frobenius error ||cuda - ref|| / ||ref|| stays below a few output ulps, 1e-2 for bf16
(8-bit mantissa) and 2e-3 for fp16 (11-bit).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaletrain.errors import ConfigError
from scaletrain.model.sparsity import semi_structured_kernel, sparse_squared_relu_ffn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the H100)"),
]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _sparse_tensor_cores() -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip(f"{torch.cuda.get_device_name()} has no 2:4 sparse tensor cores (compute capability < 8.0)")


def _inputs(dtype, tokens=512, dim=256, hidden=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g)
    w1 = torch.randn(hidden, dim, generator=g) * dim ** -0.5  # h = x W1^T ~ N(0, 1)
    w2 = torch.randn(dim, hidden, generator=g) * hidden ** -0.5
    dy = torch.randn(tokens, dim, generator=g)
    return [t.to("cuda", dtype) for t in (x, w1, w2, dy)]


def _run(backend, x, w1, w2, dy):
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    y = sparse_squared_relu_ffn(*leaves, backend=backend)
    return (y.detach(), *torch.autograd.grad(y, leaves, dy))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kernel", ["cusparselt", "cutlass"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_backend_matches_reference_forward_and_backward(kernel, dtype, monkeypatch):
    _sparse_tensor_cores()
    from torch.sparse import SparseSemiStructuredTensor

    monkeypatch.setattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", kernel == "cutlass")
    if semi_structured_kernel() != kernel:
        pytest.skip(f"this PyTorch build has no {kernel}")
    x, w1, w2, dy = _inputs(dtype)
    cuda = _run("cuda", x, w1, w2, dy)
    ref = _run("reference", x, w1, w2, dy)
    for name, a, b in zip(("y", "dx", "dw1", "dw2"), cuda, ref):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert _rel_err(a, b) < TOLERANCE[dtype], (name, _rel_err(a, b))
    dense = F.linear(F.relu(F.linear(x, w1)).square(), w2)
    assert _rel_err(cuda[0], dense) > 10 * TOLERANCE[dtype]  # random input: the mask really drops units


def test_cuda_backend_under_autocast_trains_a_2to4_model():
    _sparse_tensor_cores()
    from scaletrain.model import build_model, model_config_for

    cfg = model_config_for("debug", dim=128, n_heads=4, n_kv_heads=2, ffn_dim=512,
                           ffn="squared_relu", activation_sparsity="2:4")
    model = build_model(cfg, device="cuda", seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 65), device="cuda")  # 2 * 64 = 128 tokens per FFN call
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_cuda_backend_rejects_fp32_and_unaligned_shapes():
    _sparse_tensor_cores()
    x, w1, w2, _ = _inputs(torch.bfloat16)
    with pytest.raises(ConfigError, match="bf16/fp16"):
        sparse_squared_relu_ffn(x.float(), w1.float(), w2.float(), backend="cuda")
    with pytest.raises(ConfigError, match="multiples of 64"):
        sparse_squared_relu_ffn(x[:100], w1, w2, backend="cuda")


def test_ffn_bench_on_cuda_reports_sparse_hardware_timings():
    _sparse_tensor_cores()
    from scaletrain.bench.ffn import run_ffn_bench

    r = run_ffn_bench(tokens=1024, dim=256, hidden=1024, iters=20, warmup=3, dtype="bf16", device="cuda")
    assert r["sparse_hardware"] is True and r["kernel"] in ("cusparselt", "cutlass")
    assert all(v["median"] > 0 for v in r["ms"].values()) and set(r["speedup"]) == {"fwd", "fwd_bwd"}
