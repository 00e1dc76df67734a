"""precision = "fp8" on a CUDA GPU (compute capability >= 8.9; run on the H100): the loss curve
of a small model over a few dozen steps stays with bf16's, for both recipes.

Without a CUDA device the whole folder is skipped (tests/conftest.py; SCALETRAIN_REQUIRE_GPU=1
makes that a failure); on a GPU, a missing torchao or a GPU below sm_89 fails these tests. On the offline GPU
machine, install torchao first: `scripts/gpu_wheels.sh` here, then
`pip install --no-deps --target /tmp/site .wheels/*.whl` and `PYTHONPATH=/tmp/site` there.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import debug_train_args, run_cli
from scaletrain.parallel.fp8 import fp8_supported
from scaletrain.train.metrics import read_metrics

pytestmark = pytest.mark.gpu

STEPS = 40
# cpu_demo: dim 256, 8 heads x 32, 4 kv heads, ffn 768, so every block linear is float8
# (multiples of 16); batch 16 x 256 tokens.
COMMON = ("--train.device", "cuda", "--model.flavor", "cpu_demo", "--data.seq_len", "256",
          "--data.batch_size", "16", "--metrics.tensorboard", "false", "--metrics.plot", "false",
          "--train.eval_interval", "0", "--checkpoint.interval", "0", "--train.deterministic", "false")


@pytest.fixture(scope="module", autouse=True)
def fp8_gpu():
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu need a CUDA device (run them on the H100)")
    reason = fp8_supported("cuda")
    if reason is not None:
        pytest.fail(reason)


def _losses(run_dir, data_cache, *extra: str, steps: int = STEPS) -> list[float]:
    run_cli(*debug_train_args(run_dir, data_cache, steps, *COMMON, *extra))
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")[0]]


@pytest.fixture(scope="module")
def bf16_losses(tmp_path_factory, data_cache) -> list[float]:
    return _losses(tmp_path_factory.mktemp("fp8_gpu") / "bf16", data_cache, "--train.precision", "bf16")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_loss_tracks_bf16(tmp_path, data_cache, bf16_losses, recipe):
    """Tolerance (not yet measured on a GPU): float8 training is reported to stay within ~1% of
    bf16's loss; over 40 steps of this model (loss ~6.2 -> ~3) the mean of the last 10 losses may
    differ by 0.05, a quarter of the step-to-step noise and far below a broken run's gap (> 1)."""
    fp8 = _losses(tmp_path / recipe, data_cache, "--train.precision", "fp8", "--train.fp8_recipe", recipe)
    assert len(fp8) == STEPS
    assert fp8 != bf16_losses  # the float8 matmuls ran: the curves are close, not identical
    last8, last16 = sum(fp8[-10:]) / 10, sum(bf16_losses[-10:]) / 10
    assert last8 < fp8[0] - 1.0
    assert abs(last8 - last16) < 0.05, (fp8, bf16_losses)


def test_fp8_tensorwise_with_compile_trains(tmp_path, data_cache):
    """torch.compile per block fuses the float8 casts (needed for speed); it must still learn."""
    fp8 = _losses(tmp_path / "compiled", data_cache, "--train.precision", "fp8", "--train.compile", "true", steps=20)
    assert all(x == x for x in fp8) and fp8[-1] < fp8[0] - 0.5
