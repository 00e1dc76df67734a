"""2:4 activation sparsity for the Squared-ReLU FFN (Haziza et al. 2025, "Accelerating
Transformer Inference and Training with 2:4 Activation Sparsity", arXiv 2503.16672).

The FFN is y = W2 · S(relu(W1 x)^2): S keeps, for every token, the 2 largest of every 4
consecutive hidden units (the 2:4 pattern that sparse tensor cores run at up to twice the
dense rate, compute capability >= 8.0) and zeroes the other 2. Squared-ReLU activations of a
trained model are mostly zero already, so S drops little (the paper's premise). Only the
activation is sparse; W1 and W2 stay dense `nn.Linear` weights, so checkpoints are unchanged.

With T tokens, D = model dim, H = FFN hidden dim, M the 2:4 mask (bool [T, H]):

    forward   h   = x W1^T                  [T, D] x [D, H]  dense GEMM
              a   = M * relu(h)^2           [T, H]           M: top-2 of each 4 along H
              y   = a W2^T                  [T, H] x [H, D]  2:4 GEMM (sparse a, reduces over H)
    backward  g_a = dy W2                   [T, D] x [D, H]  dense GEMM
              g_h = M * g_a * 2 relu(h)     [T, H]           the same mask: 2:4 along H again
              dx  = g_h W1                  [T, H] x [H, D]  2:4 GEMM (sparse g_h, reduces over H)
              dW2 = dy^T a                  [D, T] x [T, H]  dense GEMM (reduces over T)
              dW1 = g_h^T x                 [H, T] x [T, D]  dense GEMM (reduces over T)

The forward step is the paper's: sparsify the Squared-ReLU output 2:4 along the hidden dim,
dropping whatever does not fit, and feed it to a 2:4 GEMM. In backward g_h inherits M exactly
(it is the gradient of the masked FFN), so the input-gradient GEMM of W1 is 2:4 as well, with
no further approximation. The two weight-gradient GEMMs reduce over tokens; a 2:4 kernel would
need `a` and `g_h` to be 2:4 along the *token* dim, which M does not give. The paper gets there
with extra machinery (per its summaries: a fixed token permutation and the densest ~5% of
features kept dense, so that sparsifying along tokens loses little; per a reimplementation, also
dense training for the first steps). That changes the gradient and is NOT implemented here: the
weight gradients are exact gradients of the masked FFN, computed by dense GEMMs over the
masked activations. 2 of the 6 FFN GEMMs run on sparse tensor cores (docs/sparsity.md).

Backends:
  "reference"  dense emulation: the same mask, dense matmuls. Any device and dtype; the
               numerics oracle and the CPU path.
  "cuda"       torch.sparse semi-structured kernels: cuSPARSELt (`torch._cslt_compress` +
               `torch._cslt_sparse_mm` behind `SparseSemiStructuredTensorCUSPARSELT`), or CUTLASS
               when `SparseSemiStructuredTensor._FORCE_CUTLASS` is set or cuSPARSELt is missing
               (its dense->sparse conversion is a slow Python routine: prefer cuSPARSELt).
               Needs CUDA compute capability >= 8.0, bf16/fp16, and T, D, H multiples of 64.

Memory: only x and h are saved for backward; relu(h)^2 and the mask are recomputed.
Parallelism: FSDP2 hands this function plain unsharded weights. Tensor parallelism replaces
the call from outside (`FeedForward.sparse_ffn`, set by parallel/tp.py) with one that runs this
function on the local shards of w1 / w2; the mask groups never straddle shards when
H / tp_degree is a multiple of 4.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from scaletrain.errors import ConfigError

BACKENDS = ("reference", "cuda")
CUDA_DTYPES = (torch.bfloat16, torch.float16)
CUDA_MULTIPLE = 64  # tokens, dim and hidden of the "cuda" backend: multiples of this
MIN_CAPABILITY = (8, 0)  # sparse tensor cores: Ampere (A100) and newer


def mask_2to4(t: torch.Tensor) -> torch.Tensor:
    """Bool mask of `t`'s shape [..., n] (n % 4 == 0) keeping the 2 largest |t| of every 4
    consecutive elements along the last dim: exactly 2 True per group; ties go to the lower
    index. Pure elementwise comparisons (no sort), so torch.compile fuses it into one kernel."""
    if t.shape[-1] % 4:
        raise ConfigError(f"2:4 sparsity groups the last dim by 4, got size {t.shape[-1]}")
    v0, v1, v2, v3 = t.abs().unflatten(-1, (-1, 4)).unbind(-1)  # each [..., n / 4]
    c01, c02, c03, c12, c13, c23 = v0 >= v1, v0 >= v2, v0 >= v3, v1 >= v2, v1 >= v3, v2 >= v3

    def n(*beaten_by: torch.Tensor) -> torch.Tensor:  # how many of the group rank above
        return sum(b.to(torch.uint8) for b in beaten_by)

    above = (n(~c01, ~c02, ~c03), n(c01, ~c12, ~c13), n(c02, c12, ~c23), n(c03, c13, c23))
    return torch.stack(above, -1).lt(2).flatten(-2)  # [..., n]


def squared_relu_2to4(h: torch.Tensor) -> torch.Tensor:
    """M * relu(h)^2 for pre-activations h [..., H] (dense storage, at least 2 zeros in each group of 4).

    The mask ranks relu(h), not its square: the order is the same, but relu is exact in any
    dtype, so every backend and every (compiled or eager) recomputation picks the same units."""
    r = F.relu(h)
    return r.square() * mask_2to4(r)


def _squared_relu_2to4_backward(h: torch.Tensor, g_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M * relu(h)^2, M * g_a * 2 relu(h)): the masked activation (for dW2) and the gradient
    w.r.t. h (2:4 with the forward mask M, recomputed from h)."""
    r = F.relu(h)
    m = mask_2to4(r)
    return r.square() * m, g_a * m * (2 * r)


_COMPILED: dict[Callable, Callable] = {}


def _fused(fn: Callable, *args: torch.Tensor):
    """fn(*args) through torch.compile (one fused elementwise kernel instead of ~20 eager ones;
    compiled once per function). Falls back to eager with a warning if compilation fails: same
    mask (it compares exact relu values), only slower."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    compiled = _COMPILED[fn]
    if compiled is not fn:
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - no Triton / Inductor failure: run eagerly
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(e).__name__}: {e}); "
                          "running it eagerly (same numerics, slower 2:4 sparsification)", stacklevel=2)
            _COMPILED[fn] = fn
    return fn(*args)


def semi_structured_kernel() -> str:
    """"cusparselt" or "cutlass": the library the "cuda" backend's 2:4 GEMMs use. CUTLASS when
    `torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS` is set or cuSPARSELt is missing."""
    from torch.sparse import SparseSemiStructuredTensor

    if SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return "cutlass"
    return "cusparselt"


def _sparse_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b on sparse tensor cores: a [M, K] holds at most 2 nonzeros in each group of 4 along
    K (dense storage), b [K, N] dense -> [M, N] in a's dtype."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cutlass = semi_structured_kernel() == "cutlass"
    cls = SparseSemiStructuredTensorCUTLASS if cutlass else SparseSemiStructuredTensorCUSPARSELT
    # from_dense compresses the kept values + metadata (cuSPARSELt: torch._cslt_compress); b is
    # made row-major so the kernel never depends on how a transposed operand is handled.
    return torch.mm(cls.from_dense(a.contiguous()), b.contiguous())


class _SparseSquaredReLUFFN(torch.autograd.Function):
    """x [T, D], w1 [H, D], w2 [D, H] -> y [T, D]; the step-by-step scheme is the module
    docstring's. All tensors share one dtype; `backend` is "reference" or "cuda"."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, backend: str) -> torch.Tensor:
        h = x @ w1.t()  # [T, H] dense GEMM
        if backend == "cuda":
            y = _sparse_mm(_fused(squared_relu_2to4, h), w2.t())  # [T, D] 2:4 GEMM
        else:
            y = squared_relu_2to4(h) @ w2.t()  # [T, D]
        ctx.save_for_backward(x, w1, w2, h)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w1, w2, h = ctx.saved_tensors
        cuda = ctx.backend == "cuda"
        dy = dy.contiguous()
        g_a = dy @ w2  # [T, H] dense GEMM
        if cuda:
            a, g_h = _fused(_squared_relu_2to4_backward, h, g_a)  # [T, H] each
        else:
            a, g_h = _squared_relu_2to4_backward(h, g_a)
        dx = dw1 = dw2 = None
        if ctx.needs_input_grad[0]:
            dx = _sparse_mm(g_h, w1) if cuda else g_h @ w1  # [T, D] 2:4 GEMM over H
        if ctx.needs_input_grad[1]:
            dw1 = g_h.t() @ x  # [H, D] dense: reduces over tokens
        if ctx.needs_input_grad[2]:
            dw2 = dy.t() @ a  # [D, H] dense: reduces over tokens
        return dx, dw1, dw2, None


def check_cuda_backend(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> None:
    """Raise ConfigError (saying how to fix it) unless the "cuda" backend can run x [T, D],
    w1 [H, D], w2 [D, H] (dtypes as they will be after autocast)."""
    fix = "set model.activation_sparsity='none' (direct callers: backend='reference' emulates 2:4 densely)"
    if not torch.cuda.is_available():
        raise ConfigError(f"2:4 activation sparsity on sparse tensor cores needs a CUDA GPU and none is visible; {fix}")
    if any(t.device.type != "cuda" for t in (x, w1, w2)):
        raise ConfigError(f"the 'cuda' 2:4 backend needs CUDA tensors, got {x.device}, {w1.device}, {w2.device}")
    capability = torch.cuda.get_device_capability(x.device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(f"2:4 sparse tensor cores need compute capability >= 8.0 (A100, H100, ...); "
                          f"{torch.cuda.get_device_name(x.device)} has {capability[0]}.{capability[1]}; {fix}")
    if x.dtype not in CUDA_DTYPES or w1.dtype != x.dtype or w2.dtype != x.dtype:
        raise ConfigError(f"2:4 sparse kernels run bf16/fp16 with one dtype for input and weights, got "
                          f"{x.dtype}, {w1.dtype}, {w2.dtype}; train with train.precision='bf16', or {fix}")
    sizes = {"tokens (batch * seq)": x.shape[0], "model.dim": x.shape[1],
             "model.ffn_dim (per TP rank)": w1.shape[0]}
    bad = {k: v for k, v in sizes.items() if v % CUDA_MULTIPLE}
    if bad:
        raise ConfigError(f"2:4 sparse kernels need multiples of {CUDA_MULTIPLE}: "
                          + ", ".join(f"{k} = {v}" for k, v in bad.items()) + f"; change them or {fix}")


def sparse_squared_relu_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                            backend: str | None = None) -> torch.Tensor:
    """y = W2 · (M * relu(W1 x)^2) with 2:4 activation sparsity (see the module docstring).

    x [..., D], w1 [H, D] and w2 [D, H] (the `nn.Linear` weights of FeedForward.w1 / w2) ->
    y [..., D]. `backend`: "reference", "cuda", or None = "cuda" for CUDA tensors and
    "reference" otherwise. Under autocast all three are cast to the autocast dtype first (the
    weights' gradients flow back through the cast, as with nn.Linear). Raises ConfigError when
    the backend cannot run these tensors.
    """
    backend = backend or ("cuda" if x.is_cuda else "reference")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown 2:4 sparsity backend {backend!r}; choose one of {list(BACKENDS)}")
    dim, hidden = x.shape[-1], w1.shape[0]
    if w1.shape != (hidden, dim) or w2.shape != (dim, hidden) or hidden % 4:
        raise ConfigError(f"2:4 FFN shapes: x [..., {dim}], w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}; need "
                          f"w1 [H, {dim}], w2 [{dim}, H] with H a multiple of 4 (model.ffn_dim per TP rank)")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
    x2d = x.reshape(-1, dim)  # [T, D]
    if backend == "cuda":
        check_cuda_backend(x2d, w1, w2)
        y = _apply_cuda(x2d, w1, w2)
    else:
        with torch.autocast(device_type, enabled=False):
            y = _SparseSquaredReLUFFN.apply(x2d, w1, w2, "reference")
    return y.view(*x.shape[:-1], dim)


@torch.compiler.disable
def _apply_cuda(x2d: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    # Kept out of an outer torch.compile graph: the SparseSemiStructuredTensor subclass is a
    # prototype API. The elementwise sparsification inside is compiled on its own (_fused).
    with torch.autocast("cuda", enabled=False):
        return _SparseSquaredReLUFFN.apply(x2d, w1, w2, "cuda")
