"""precision = "fp8" on the CPU: which linears become torchao Float8Linear, how close an fp8
forward/backward stays to fp32, a short CLI training run (in this process), float8 weights
saved as plain tensors, and the errors for missing torchao and unsupported combinations. The
2-rank FSDP checkpoint that loads without torchao is in tests/distributed/test_fp8_fsdp.py.

torch has a reference CPU kernel for `torch._scaled_mm`, so both recipes run here for real
(not emulated); GPU loss curves live in tests/gpu/test_fp8_gpu.py.
"""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import debug_train_args, main_exit, run_main
from scaletrain.config.schema import ParallelConfig
from scaletrain.errors import ConfigError
from scaletrain.model import Transformer, build_model
from scaletrain.config.flavors import model_config_for
from scaletrain.parallel.layout import resolve_dims
from scaletrain.parallel.fp8 import apply_fp8, check_fp8, fp8_filter, fp8_supported
from scaletrain.train.metrics import read_metrics

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (pip install -e '.[fp8]')")
RECIPES = ("tensorwise", "rowwise")
BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _kinds(model: nn.Module) -> dict[str, str]:
    """Class name of every linear, by module name."""
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@needs_torchao
@pytest.mark.parametrize("recipe", RECIPES)
def test_converts_every_block_linear_of_debug_but_not_the_head(recipe):
    cfg = model_config_for("debug")  # dim 64, head_dim 16, kv 2 x 16, ffn 192: all multiples of 16
    with torch.device("meta"):  # parallelize converts the meta-device model, before materialising
        model = Transformer(cfg)
    assert apply_fp8(model, recipe, fsdp=False) == cfg.n_layers * len(BLOCK_LINEARS)
    kinds = _kinds(model)
    expected = {f"layers.{i}.{lin}" for i in range(cfg.n_layers) for lin in BLOCK_LINEARS}
    assert {n for n, k in kinds.items() if k == "Float8Linear"} == expected
    assert kinds["output"] == "Linear"
    # Same parameter names as the plain model: checkpoints move between fp8 and bf16 runs.
    with torch.device("meta"):
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in Transformer(cfg).named_parameters()]


@needs_torchao
def test_skips_linears_whose_features_are_not_multiples_of_16():
    cfg = model_config_for("debug", ffn_dim=200)  # w1/w3: 64 -> 200, w2: 200 -> 64
    model = build_model(cfg)
    assert apply_fp8(model, "tensorwise", fsdp=False) == cfg.n_layers * 4  # only wq, wk, wv, wo
    kinds = _kinds(model)
    for i in range(cfg.n_layers):
        for lin in BLOCK_LINEARS:
            assert kinds[f"layers.{i}.{lin}"] == ("Linear" if lin.startswith("feed_forward") else "Float8Linear")
    assert not fp8_filter(nn.Linear(64, 512), "output")  # the head, even with eligible shapes
    assert not fp8_filter(nn.Linear(64, 100), "layers.0.attention.wq")


def _loss_and_grads(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(tokens)  # [batch, seq, vocab]
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    return logits.detach().float(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@needs_torchao
@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_forward_backward_close_to_fp32(recipe):
    """fp8 (float8 block linears + bf16 autocast) against the same model in fp32.

    Tolerances: e4m3 keeps 3 mantissa bits, so one rounding is off by up to 2^-4 = 6.25% (RMS
    ~3.6%); a matmul of two rounded operands is off by ~5% RMS relative, and tensorwise's e5m2
    gradients (2 mantissa bits, RMS ~7%) make gradient matmuls worse. Measured on this model:
    logits 1.6%, loss 3e-4 absolute, worst parameter gradient 11% (tensorwise) / 8% (rowwise).
    The bounds below leave 2-3x headroom; a wrong scale or a missing cast errs by O(1).
    bf16 alone errs 0.3% on the logits: the fp8 error must be clearly above it, which proves the
    float8 path ran.
    """
    cfg = model_config_for("debug")
    reference = build_model(cfg, seed=0)
    bf16, fp8 = copy.deepcopy(reference), copy.deepcopy(reference)
    assert apply_fp8(fp8, recipe, fsdp=False) == 14
    g = torch.Generator().manual_seed(0)
    tokens, targets = (torch.randint(0, cfg.vocab_size, (4, 64), generator=g) for _ in range(2))

    logits32, loss32, grads32 = _loss_and_grads(reference, tokens, targets, autocast=False)
    logits16, _, _ = _loss_and_grads(bf16, tokens, targets, autocast=True)
    logits8, loss8, grads8 = _loss_and_grads(fp8, tokens, targets, autocast=True)

    assert _rel(logits8, logits32) < 0.05
    assert _rel(logits8, logits32) > 2 * _rel(logits16, logits32)
    assert abs(float(loss8 - loss32)) < 2e-3
    for name, grad in grads32.items():
        assert grads8[name] is not None, name
        assert _rel(grads8[name], grad) < 0.25, name


@needs_torchao
def test_fsdp_float8_weights_save_as_plain_tensors():
    """With float8 all-gather the block weights are torchao wrapper tensors; the state dict (what
    DCP writes) must hold plain tensors so checkpoints load without torchao."""
    model = build_model(model_config_for("debug"))
    apply_fp8(model, "tensorwise", fsdp=True)
    assert type(model.layers["0"].attention.wq.weight.data).__name__ == "WeightWithDynamicFloat8CastTensor"
    state = model.state_dict()
    assert all(type(v) is torch.Tensor for v in state.values()), {k: type(v) for k, v in state.items()}
    wq = model.layers["0"].attention.wq.weight
    assert state["layers.0.attention.wq.weight"].data_ptr() == wq._tensor.data_ptr()  # loads fill the parameter


CLI_STEPS = 20
CLI_COMMON = ("--metrics.tensorboard", "false", "--metrics.plot", "false", "--train.eval_interval", "0",
              "--checkpoint.interval", "0")


def _train_losses(run_dir, data_cache, *extra: str) -> list[float]:
    run_main(*debug_train_args(run_dir, data_cache, CLI_STEPS, *CLI_COMMON, *extra))
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")[0]]


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory, data_cache) -> list[float]:
    return _train_losses(tmp_path_factory.mktemp("fp8_ref") / "fp32", data_cache, "--train.precision", "fp32")


@needs_torchao
@pytest.mark.parametrize("recipe", RECIPES)
def test_cli_fp8_training_loss_decreases_like_fp32(tmp_path, data_cache, fp32_losses, recipe):
    fp8 = _train_losses(tmp_path / "fp8", data_cache, "--train.precision", "fp8", "--train.fp8_recipe", recipe)
    assert len(fp8) == CLI_STEPS
    last8, last32 = sum(fp8[-5:]) / 5, sum(fp32_losses[-5:]) / 5
    assert last8 < fp8[0] - 1.0  # 6.25 -> ~3.96 in 20 steps
    # Measured on CPU: the mean of the last 5 losses is 3.9578 in fp32, 3.9572 (tensorwise) and
    # 3.9570 (rowwise). 0.05 is half the step-to-step noise of the loss there and far below a
    # broken run's gap (> 1).
    assert abs(last8 - last32) < 0.05


def test_missing_torchao_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao...` now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    reason = fp8_supported("cpu")
    assert reason is not None and "pip install" in reason and "torchao" in reason
    with pytest.raises(ConfigError, match="pip install"):
        check_fp8("tensorwise", "cpu")


def test_cli_without_torchao_exits_2_before_writing(tmp_path, data_cache, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed (see the test above)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    run = tmp_path / "run"
    code, err = main_exit(capsys, *debug_train_args(run, data_cache, 2, "--train.precision", "fp8"))
    assert code == 2, err[-3000:]
    assert "needs torchao" in err and "pip install" in err
    assert "Traceback" not in err
    assert not run.exists()


@needs_torchao
def test_unsupported_combinations_are_refused_before_any_process_group(monkeypatch):
    with pytest.raises(ConfigError, match="fp8_recipe"):
        check_fp8("blockwise", "cpu")
    # fp8 + tensor parallelism: the one layout checker refuses it before anything is built.
    from scaletrain.errors import LayoutError
    from scaletrain.parallel.layout import check_layout

    dims = resolve_dims(ParallelConfig(tp=2, dp_shard=1), world_size=2)
    with pytest.raises(LayoutError, match=r"train.precision='fp8' with parallel.tp=2 is not supported yet"):
        check_layout(dims, ParallelConfig(tp=2, dp_shard=1), model_config_for("debug"), 64, 2, precision="fp8")
    # An Ampere GPU has no float8 tensor cores: torch._scaled_mm needs compute capability 8.9.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert "8.9" in fp8_supported("cuda") and "A100" in fp8_supported("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_supported("cuda") is None
    assert "mps" in fp8_supported("mps")
    assert fp8_supported("cpu") is None  # allowed, for testing
