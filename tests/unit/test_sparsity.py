"""2:4 activation sparsity of the Squared-ReLU FFN (model/sparsity.py) and its microbenchmark
(bench/ffn.py), on CPU with the dense "reference" backend."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from scaletrain.bench import ffn as bench_ffn
from scaletrain.config.validate import validate_model_config
from scaletrain.errors import ConfigError
from scaletrain.model import build_model, model_config_for
from scaletrain.model.sparsity import mask_2to4, sparse_squared_relu_ffn


def _dense_ffn(x, w1, w2):
    return F.linear(F.relu(F.linear(x, w1)).square(), w2)


def _grads(fn, x, w1, w2, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    y = fn(*leaves)
    return (y.detach(), *torch.autograd.grad(y, leaves, dy))


def test_mask_keeps_the_two_largest_magnitudes_of_every_group_of_four():
    t = torch.randn(5, 3, 64)
    m = mask_2to4(t)
    assert m.shape == t.shape and m.dtype == torch.bool
    groups, kept = t.abs().view(-1, 4), m.view(-1, 4)
    assert (kept.sum(-1) == 2).all()
    # Every kept magnitude is >= every dropped one of its group.
    assert (groups.masked_fill(~kept, float("inf")).amin(-1) >= groups.masked_fill(kept, -1.0).amax(-1)).all()
    # Signs do not matter; ties go to the lower index.
    assert mask_2to4(torch.tensor([1.0, -5.0, 4.0, 0.5])).tolist() == [False, True, True, False]
    assert mask_2to4(torch.zeros(4)).tolist() == [True, True, False, False]
    with pytest.raises(ConfigError, match="groups the last dim by 4"):
        mask_2to4(torch.zeros(2, 6))


def test_ffn_equals_dense_ffn_when_the_activation_is_already_2to4():
    torch.manual_seed(0)
    dim, hidden = 16, 32
    x, w2 = torch.randn(2, 8, dim), torch.randn(dim, hidden)
    half = torch.randn(hidden // 2, dim).view(-1, 2, dim)  # units 4g, 4g+1 of each group
    w1 = torch.cat((half, -half), dim=1).reshape(hidden, dim)  # units 4g+2, 4g+3 = -(4g, 4g+1)
    positive = (F.linear(x, w1) > 0).view(-1, 4).sum(-1)
    assert (positive <= 2).all()  # so relu(w1 x)^2 is 2:4 along the hidden dim: the mask drops nothing
    dy = torch.randn(2, 8, dim)
    ours = _grads(sparse_squared_relu_ffn, x, w1, w2, dy)
    dense = _grads(_dense_ffn, x, w1, w2, dy)
    for name, a, b in zip(("y", "dx", "dw1", "dw2"), ours, dense):
        # The same fp32 products and sums in the same order; 1e-6 only allows for a different
        # GEMM blocking between x @ w.t() and F.linear.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_ffn_matches_masked_dense_autograd_in_float64():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    w1, w2 = torch.randn(24, 12, dtype=torch.float64), torch.randn(12, 24, dtype=torch.float64)
    dy = torch.randn(3, 5, 12, dtype=torch.float64)

    def masked(x, w1, w2):
        a = F.relu(x @ w1.t()).square()  # [b, s, H]
        top2 = a.detach().unflatten(-1, (-1, 4)).topk(2, dim=-1).indices  # an independent mask
        m = torch.zeros_like(a.detach().unflatten(-1, (-1, 4))).scatter_(-1, top2, 1.0).flatten(-2)
        return (a * m) @ w2.t()

    ours = _grads(sparse_squared_relu_ffn, x, w1, w2, dy)
    ref = _grads(masked, x, w1, w2, dy)
    assert (ours[0] != _dense_ffn(x, w1, w2)).any()  # random input: the mask really drops units
    for name, a, b in zip(("y", "dx", "dw1", "dw2"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    small = [x[0, :3, :4], w1[:8, :4], w2[:4, :8]]  # finite differences: keep the Jacobian small
    assert torch.autograd.gradcheck(sparse_squared_relu_ffn, [t.clone().requires_grad_() for t in small])


def test_ffn_under_cpu_autocast_runs_in_the_autocast_dtype():
    x, w1, w2 = torch.randn(4, 8), torch.randn(16, 8, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_squared_relu_ffn(x, w1, w2)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w1.grad.dtype == torch.float32 and w2.grad.abs().sum() > 0


def test_ffn_rejects_unusable_inputs():
    x, w1, w2 = torch.randn(4, 8), torch.randn(16, 8), torch.randn(8, 16)
    with pytest.raises(ConfigError, match="unknown 2:4 sparsity backend"):
        sparse_squared_relu_ffn(x, w1, w2, backend="triton")
    with pytest.raises(ConfigError, match="H a multiple of 4"):
        sparse_squared_relu_ffn(x, torch.randn(18, 8), torch.randn(8, 18))
    with pytest.raises(ConfigError, match="need\\s+w1"):
        sparse_squared_relu_ffn(x, w1, torch.randn(16, 8))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            sparse_squared_relu_ffn(x, w1, w2, backend="cuda")


def test_debug_model_with_2to4_ffn_validates_and_trains():
    cfg = model_config_for("debug", ffn="squared_relu", activation_sparsity="2:4")
    validate_model_config(cfg)
    with pytest.raises(ConfigError, match="needs model.ffn='squared_relu'"):
        validate_model_config(model_config_for("debug", activation_sparsity="2:4"))
    model = build_model(cfg, seed=0)
    dense_keys = build_model(model_config_for("debug", ffn="squared_relu")).state_dict().keys()
    assert model.state_dict().keys() == dense_keys  # checkpoints and export see the same names

    ffn = model.layers["0"].feed_forward
    h = torch.randn(2, 8, cfg.dim)
    torch.testing.assert_close(ffn(h), sparse_squared_relu_ffn(h, ffn.w1.weight, ffn.w2.weight), rtol=0, atol=0)
    assert not torch.allclose(ffn(h), _dense_ffn(h, ffn.w1.weight, ffn.w2.weight))  # the sparse path ran

    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


def _bench_args(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    bench_ffn.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_ffn_bench_runs_on_cpu_and_reports_sane_numbers(tmp_path, capsys):
    out = tmp_path / "ffn.json"
    args = _bench_args("--device", "cpu", "--tokens", "64", "--dim", "32", "--hidden", "64", "--iters", "20",
                       "--warmup", "1", "--json", str(out))
    assert bench_ffn.main(args) == 0
    printed = capsys.readouterr().out
    assert "No sparse hardware is used" in printed and "speedup" in printed
    r = json.loads(out.read_text())
    assert (r["tokens"], r["dim"], r["hidden"], r["dtype"], r["backend"]) == (64, 32, 64, "fp32", "reference")
    assert r["sparse_hardware"] is False and r["kernel"] is None
    for case in ("dense_fwd", "sparse_fwd", "dense_fwd_bwd", "sparse_fwd_bwd"):
        assert 0 < r["ms"][case]["median"] and 0 < r["ms"][case]["mean"]
        assert r["dense_equiv_tflops"][case] > 0
    assert set(r["speedup"]) == {"fwd", "fwd_bwd"} and all(v > 0 for v in r["speedup"].values())
    assert 0 < r["activation_density"] < 1


def test_bench_ffn_is_a_sub_command_of_bench(tmp_path, capsys):
    from conftest import main_exit, main_run

    small = ("--device", "cpu", "--tokens", "64", "--dim", "32", "--hidden", "64", "--warmup", "1")
    code, out, err = main_run(capsys, "bench", "ffn", *small, "--iters", "20", "--json", str(tmp_path / "f.json"))
    assert code == 0 and "speedup" in out, err
    assert json.loads((tmp_path / "f.json").read_text())["backend"] == "reference"
    code, err = main_exit(capsys, "bench", "ffn", *small, "--iters", "5")
    assert code == 2 and "--iters must be >= 20" in err
    code, err = main_exit(capsys, "bench", "ffn", *small, "--train.steps", "3")
    assert code == 2 and "bench ffn takes no config overrides" in err


@pytest.mark.parametrize("argv, message", [
    (("--iters", "5"), "--iters must be >= 20"),
    (("--hidden", "66"), "--hidden must be a multiple of 4"),
    (("--tokens", "0"), "--tokens must be a positive integer"),
    (("--warmup", "-1"), "--warmup must be >= 0"),
])
def test_ffn_bench_rejects_bad_arguments(argv, message):
    with pytest.raises(ConfigError, match=message):
        bench_ffn.main(_bench_args("--device", "cpu", "--tokens", "64", "--dim", "32", "--hidden", "64", *argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no GPU is visible")
def test_ffn_bench_on_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        bench_ffn.main(_bench_args("--device", "cuda"))
