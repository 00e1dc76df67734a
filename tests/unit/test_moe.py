"""model/moe.py piece by piece: router, permutation, capacity, experts (grouped vs reference),
the auxiliary loss and its injection, and train/moe_stats.py's statistics and expert-bias
update, each against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from scaletrain.model import build_model, model_config_for
from scaletrain.model.moe import (MoE, Router, capacity_for, combine, experts_grouped,
                                  experts_reference, permute, sequence_aux_loss)
from scaletrain.train.moe_stats import ExpertStats


def _router(score: str, first_column: list[float]) -> Router:
    """A 2-D router whose logits for the input [1, 0] are `first_column`."""
    r = Router(dim=2, n_experts=len(first_column), top_k=2, score=score)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[:, 0] = torch.tensor(first_column)
        r.expert_bias.zero_()
    return r


X = torch.tensor([[1.0, 0.0]])


def test_softmax_router_picks_top_k_and_renormalises():
    probs = [0.1, 0.4, 0.2, 0.3]
    ids, weights, p = _router("softmax", [math.log(v) for v in probs])(X)
    assert ids.tolist() == [[1, 3]]
    torch.testing.assert_close(weights, torch.tensor([[0.4 / 0.7, 0.3 / 0.7]]))
    torch.testing.assert_close(p, torch.tensor([probs]))


def test_sigmoid_router_normalises_and_bias_only_selects():
    scores = torch.tensor([0.9, 0.2, 0.6, 0.5])
    router = _router("sigmoid", torch.logit(scores).tolist())
    ids, weights, p = router(X)
    assert ids.tolist() == [[0, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.9 / 1.5, 0.6 / 1.5]]))
    torch.testing.assert_close(p, (scores / scores.sum())[None])
    with torch.no_grad():
        router.expert_bias[1] = 0.5  # expert 1 now outranks expert 2 (0.7 > 0.6) ...
    ids, weights, _ = router(X)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, torch.tensor([[0.9 / 1.1, 0.2 / 1.1]]))  # ... weighed unbiased


def test_router_runs_in_fp32_under_bf16_autocast():
    router = _router("softmax", [0.3, -0.2, 0.1, 0.25])
    x = torch.randn(5, 2)
    ref = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    for a, b in zip(ref, got):
        assert b.dtype == a.dtype and torch.equal(a, b)


def test_permutation_groups_by_expert_and_round_trips():
    t, k, e, d = 10, 3, 5, 4
    ids = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(i))[:k] for i in range(t)])
    dispatch = permute(ids, e)
    flat = ids.reshape(-1)
    assert torch.equal(dispatch.counts, torch.bincount(flat, minlength=e))
    assert torch.all(flat[dispatch.order].diff() >= 0)  # grouped by expert
    for expert in range(e):  # token order within an expert (a stable sort)
        slots = dispatch.order[flat[dispatch.order] == expert]
        assert torch.all(slots.diff() > 0)
    x = torch.randn(t, d)
    one_hot = torch.zeros(t, k)
    one_hot[:, 0] = 1.0
    assert torch.equal(combine(x[dispatch.order // k], dispatch, one_hot), x)
    # Experts that scale by (id + 1): each token gets sum_j w_j (e_j + 1) x.
    w = torch.rand(t, k)
    y = x[dispatch.order // k] * (flat[dispatch.order] + 1).unsqueeze(1)
    want = (w * (ids + 1)).sum(1, keepdim=True) * x
    torch.testing.assert_close(combine(y, dispatch, w), want)


def test_capacity_drops_the_latest_tokens_of_a_full_expert():
    ids = torch.tensor([[0], [0], [0], [1]])  # three tokens for expert 0, capacity 2
    dispatch = permute(ids, 2, capacity=2)
    assert dispatch.order.tolist() == [0, 1, 3]
    assert dispatch.counts.tolist() == [2, 1] and dispatch.routed.tolist() == [3, 1]
    x = torch.arange(8.0).view(4, 2)
    out = combine(x[dispatch.order], dispatch, torch.ones(4, 1))
    assert torch.equal(out, torch.tensor([[0.0, 1], [2, 3], [0, 0], [6, 7]]))  # token 2 dropped
    assert capacity_for(tokens=8, top_k=2, n_experts=3, factor=1.25) == math.ceil(1.25 * 16 / 3) == 7


def test_moe_layer_drops_in_training_only_and_reports_it():
    cfg = model_config_for("moe_debug", moe_experts=2, moe_top_k=1, moe_capacity_factor=1.0)
    layer = build_model(cfg).layers["1"].feed_forward
    with torch.no_grad():  # every (positive) token prefers expert 0
        layer.router.gate.weight.copy_(torch.stack([torch.ones(cfg.dim), -torch.ones(cfg.dim)]))
    x = torch.rand(2, 4, cfg.dim)
    layer.train()
    layer(x)
    stats = layer.pop_stats()  # [routed to 0, routed to 1, dropped, aux sum, passes]
    assert stats[:3].tolist() == [8.0, 0.0, 4.0]  # capacity ceil(1.0 * 8 * 1 / 2) = 4
    layer.eval()
    layer(x)
    assert layer.pop_stats()[2].item() == 0.0 and layer.pop_stats() is None


def _expert_case(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 7, 11])  # an expert with no tokens too
    x = torch.randn(int(counts.sum()), 16, generator=g)
    w1, w3 = torch.randn(4, 8, 16, generator=g) * 0.3, torch.randn(4, 8, 16, generator=g) * 0.3
    w2 = torch.randn(4, 16, 8, generator=g) * 0.3
    grad = torch.randn(x.shape[0], 16, generator=g)
    return [t.to(dtype).requires_grad_() for t in (x, w1, w2, w3)], counts, grad.to(dtype)


def _run(fn, tensors, counts, grad, *extra):
    y = fn(tensors[0], counts, *tensors[1:], *extra)
    y.backward(grad)
    return [y.detach()] + [t.grad for t in tensors]


def test_grouped_gemm_matches_the_reference_in_fp32():
    tensors, counts, grad = _expert_case(torch.float32)
    ref = _run(experts_reference, tensors, counts, grad)
    tensors, counts, grad = _expert_case(torch.float32)
    got = _run(experts_grouped, tensors, counts, grad, torch.float32)
    for a, b in zip(ref, got):  # the same products summed in another order: fp32 rounding only
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_grouped_gemm_in_bf16_is_close_to_the_fp32_reference():
    tensors, counts, grad = _expert_case(torch.bfloat16)
    got = _run(experts_grouped, tensors, counts, grad, torch.bfloat16)
    ref_in = [t.detach().float().requires_grad_() for t in tensors]
    ref = _run(experts_reference, ref_in, counts, grad.float())
    for a, b in zip(ref, got):  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
        torch.testing.assert_close(b.float(), a, rtol=3e-2, atol=3e-2)


def test_whole_model_with_grouped_experts_matches_the_reference():
    cfg = model_config_for("moe_debug", moe_shared_experts=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    results = []
    for backend in ("reference", "grouped"):
        model = build_model(cfg, seed=2)
        for m in model.modules():
            if isinstance(m, MoE):
                m.experts.backend = backend
        loss = model(tokens).logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-7, msg=name)


def test_sequence_aux_loss_closed_form():
    # Sequence 0: both tokens to expert 0 (f = [1, 0]), mean probabilities P = [0.625, 0.375]:
    # L = 2 * (1 * 0.625) = 1.25. Sequence 1: one token each (f = [.5, .5]), P = [.5, .5]: L = 1.
    probs = torch.tensor([[[0.75, 0.25], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]])
    ids = torch.tensor([[[0], [0]], [[0], [1]]])
    assert sequence_aux_loss(probs, ids, 2).item() == pytest.approx((1.25 + 1.0) / 2)
    # Gradient: dL/dp[b, t, e] = E * f[b, e] / S / B.
    p = probs.clone().requires_grad_()
    sequence_aux_loss(p, ids, 2).backward()
    torch.testing.assert_close(p.grad, torch.tensor([[[0.5, 0.0]] * 2, [[0.25, 0.25]] * 2]))


def test_aux_loss_is_injected_into_backward_only():
    cfg = model_config_for("moe_debug", moe_aux_coef=0.5)
    x = torch.randn(2, 6, cfg.dim, generator=torch.Generator().manual_seed(0))
    g = torch.randn(2, 6, cfg.dim, generator=torch.Generator().manual_seed(1))
    with_aux = build_model(cfg, seed=4).layers["2"].feed_forward
    out_a = with_aux(x)
    (out_a * g).sum().backward()
    # The same objective written out: task term + coef * aux of the same routing.
    plain = build_model(model_config_for("moe_debug", moe_balance="none"), seed=4).layers["2"].feed_forward
    out_b = plain(x)
    ids, _, probs = plain.router(x.reshape(-1, cfg.dim))
    aux = sequence_aux_loss(probs.view(2, 6, -1), ids.view(2, 6, -1), cfg.moe_experts)
    ((out_b * g).sum() + 0.5 * aux).backward()
    assert torch.equal(out_a, out_b)  # forward unchanged
    torch.testing.assert_close(with_aux.router.gate.weight.grad, plain.router.gate.weight.grad)


def _stats_model(balance: str):
    cfg = model_config_for("moe_debug", n_layers=3, moe_balance=balance, moe_bias_rate=0.01)
    model = build_model(cfg)
    return cfg, model, [model.layers["1"].feed_forward, model.layers["2"].feed_forward]


def test_statistics_and_bias_update_closed_form():
    cfg, model, (first, second) = _stats_model("bias")
    stats = ExpertStats.for_model([model], cfg, loss_scale=2, passes=2)
    assert first.aux_grad_scale == 0.5
    # [counts of the 8 experts, dropped, aux sum, passes]
    # One record per forward pass; a pass before the step's 2 (a pipeline's shape inference) is dropped.
    extra = torch.tensor([9.0] * 8 + [9, 9, 1])
    first._stats = [extra, torch.tensor([2.0, 1, 0, 2, 1, 1, 1, 0, 1, 1.0, 1]),
                    torch.tensor([1.0, 0, 0, 2, 1, 1, 1, 2, 2, 1.0, 1])]  # sum [3, 1, 0, 4, 2, 2, 2, 2, 3, 2, 2]
    second._stats = [extra, torch.tensor([1.0] * 8 + [0, 1.5, 1]), torch.tensor([1.0] * 8 + [0, 1.5, 1])]
    aux, imbalance, dropped = stats.reduce(torch.device("cpu")).tolist()
    assert aux == pytest.approx(5.0 / 4)  # (2 + 3) over 2 + 2 forward passes
    assert imbalance == pytest.approx((4 + 2) / (2 + 2))  # busiest expert 4 and 2, mean 2 and 2
    assert dropped == pytest.approx(3 / 32)
    stats.update_bias()  # b += 0.01 * sign(mean - count)
    torch.testing.assert_close(first.router.expert_bias, 0.01 * torch.tensor([-1.0, 1, 1, -1, 0, 0, 0, 0]))
    assert torch.equal(second.router.expert_bias, torch.zeros(8))
    assert first.pop_stats() is None  # reduce consumed the records


def test_no_bias_update_without_bias_balancing():
    cfg, model, (first, _) = _stats_model("aux_loss")
    stats = ExpertStats.for_model([model], cfg, loss_scale=1, passes=1)
    first._stats = [torch.tensor([3.0, 1, 0, 4, 2, 2, 2, 2, 0, 1.0, 1])]
    stats.reduce(torch.device("cpu"))
    stats.update_bias()
    assert torch.equal(first.router.expert_bias, torch.zeros(8))
    assert ExpertStats.for_model([model], model_config_for("debug"), 1, 1) is None
