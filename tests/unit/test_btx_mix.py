"""The BTX mix is exact (recipes/mix.py): means of the branches' tensors, experts stacked from
their FFNs, and with identical branches the mixed MoE computes the seed's logits.

Why identical branches give the seed's logits: every averaged tensor is the mean of n copies
of the seed's tensor, which float64 accumulation makes bit-exact (k*x is exact in float64 for
a float32 x and k < 2**29, and (n*x)/n = x); every expert is the seed's FFN, so a token's MoE
output is sum_j w_j * FFN(x) over its top-k choices with weights w_j that sum to 1, i.e. FFN(x),
whatever the router. In floating point the weighted sum of equal vectors is exact when the
weights are 1/2 each (the zero router, top-2) and within a few float32 ulps otherwise (weights
that sum to 1 up to rounding); the experts' matmuls run on the same rows as the dense FFN's.
Tolerances below follow from that: equality for the zero router, 1e-5 relative for a random one.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scaletrain.config.load import config_to_dict
from scaletrain.config.schema import CheckpointConfig, Config
from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.model import build_model
from scaletrain.model import model_config_for
from scaletrain.recipes import mix
from scaletrain.train.checkpoint import Checkpointer

DENSE = model_config_for("debug", qk_norm=True)


def save_dense(tmp_path, name: str, model) -> "Path":  # noqa: F821
    """A model-only checkpoint of `model` at step 1 in run folder tmp_path/name."""
    meta = {"contents": mix.MODEL_ONLY, "model": config_to_dict(Config(model=DENSE))["model"]}
    return Checkpointer(tmp_path / name, CheckpointConfig()).save(1, {"model": model.state_dict()}, meta)


def mixed_model(state: dict[str, torch.Tensor], cfg) -> torch.nn.Module:
    model = build_model(cfg, seed=123)  # every weight is then replaced by `state`
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def branches(tmp_path_factory):
    """Three different dense debug models (as three branches) and their checkpoints."""
    tmp = tmp_path_factory.mktemp("branches")
    models = [build_model(DENSE, seed=s) for s in (1, 2, 3)]
    return models, [save_dense(tmp, f"b{i}", m) for i, m in enumerate(models)]


def test_means_are_exact_and_experts_are_the_branches_ffns(branches):
    models, ckpts = branches
    state = mix.combine(ckpts, ckpts, DENSE)
    sds = [m.state_dict() for m in models]
    for key, value in state.items():
        if ".feed_forward." in key:
            continue
        ref = torch.stack([sd[key].double() for sd in sds]).mean(0).float()  # another summation order
        assert torch.equal(value, ref), key
    for i in range(DENSE.n_layers):
        p = f"layers.{i}.feed_forward."
        for e, sd in enumerate(sds):
            for name in ("w1", "w2", "w3"):
                assert torch.equal(state[p + f"experts.{name}"][e], sd[p + f"{name}.weight"])
    btm = mix.combine(ckpts, None, DENSE)  # Branch-Train-Merge: the FFNs are averaged too
    key = "layers.1.feed_forward.w2.weight"
    assert torch.equal(btm[key], torch.stack([sd[key].double() for sd in sds]).mean(0).float())


def test_identical_branches_give_the_seed_bit_for_bit(branches, tmp_path):
    seed_model, seed = branches[0][0], branches[1][0]
    copies = [save_dense(tmp_path, f"copy{i}", seed_model) for i in range(3)]
    state = mix.combine(copies, copies, DENSE)
    for key, value in seed_model.state_dict().items():
        if ".feed_forward." not in key:
            assert torch.equal(state[key], value), key  # (3x)/3 = x exactly
    assert torch.equal(mix.combine(copies, None, DENSE)["layers.0.feed_forward.w1.weight"],
                       seed_model.state_dict()["layers.0.feed_forward.w1.weight"])


@pytest.mark.parametrize("router_init, extra_seed_expert", [("zero", False), ("normal", False), ("normal", True)])
def test_identical_branches_mix_into_an_moe_with_the_seeds_logits(branches, tmp_path, router_init, extra_seed_expert):
    seed_model, seed = branches[0][0], branches[1][0]
    copies = [save_dense(tmp_path, f"copy{i}", seed_model) for i in range(2)]
    experts = copies + ([seed] if extra_seed_expert else [])
    cfg = mix.moe_config(DENSE, len(experts))
    state = mix.add_routers(mix.combine(copies, experts, DENSE), cfg, router_init, seed=0)
    mix.check_state(state, cfg)
    tokens = torch.randint(0, DENSE.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = seed_model.eval()(tokens), mixed_model(state, cfg)(tokens)
    if router_init == "zero":  # uniform probabilities: the first two experts at 1/2 each, an exact sum
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_routers_are_new_and_documented(branches):
    _, ckpts = branches
    cfg = mix.moe_config(DENSE, 3)
    normal = mix.add_routers(mix.combine(ckpts, ckpts, DENSE), cfg, "normal", seed=7)
    again = mix.add_routers({}, cfg, "normal", seed=7)
    gate = normal["layers.0.feed_forward.router.gate.weight"]
    assert gate.shape == (3, DENSE.dim) and torch.equal(gate, again["layers.0.feed_forward.router.gate.weight"])
    assert abs(float(gate.std()) - DENSE.init_std) < 0.2 * DENSE.init_std  # N(0, init_std)
    assert not torch.equal(gate, normal["layers.1.feed_forward.router.gate.weight"])  # one draw per layer
    zero = mix.add_routers({}, cfg, "zero", seed=7)
    assert not zero["layers.1.feed_forward.router.gate.weight"].any()
    assert not normal["layers.1.feed_forward.router.expert_bias"].any()


def test_state_checks_and_sizes(branches):
    _, ckpts = branches
    cfg = mix.moe_config(DENSE, 3)
    state = mix.add_routers(mix.combine(ckpts[:2], ckpts, DENSE), cfg, "normal", seed=0)
    with pytest.raises(CheckpointError, match="missing .*router.gate.weight"):
        mix.check_state({k: v for k, v in state.items() if k != "layers.1.feed_forward.router.gate.weight"}, cfg)
    with pytest.raises(CheckpointError, match="shapes"):
        mix.check_state({**state, "norm.weight": torch.ones(3)}, cfg)
    # peak_bytes: the mixed parameters + one dense checkpoint in float32 + the float64 accumulator
    params = sum(v.numel() for k, v in state.items() if not k.endswith("expert_bias"))
    dense = sum(v.numel() for v in build_model(DENSE).parameters())
    ffn = DENSE.n_layers * 3 * DENSE.dim * DENSE.ffn_dim
    assert mix.peak_bytes(DENSE, 3) == 4 * (params + dense) + 8 * (dense - ffn)


def test_models_that_do_not_mix_are_refused():
    with pytest.raises(ConfigError, match="model.moe_experts = 8; set it to 0"):
        mix.check_mixable(model_config_for("moe_debug"), 2)
    with pytest.raises(ConfigError, match="not a valid MoE: model.moe_top_k = 3"):
        mix.check_mixable(dataclasses.replace(DENSE, moe_top_k=3), 2)
    with pytest.raises(ConfigError, match="SwiGLU"):
        mix.check_mixable(dataclasses.replace(DENSE, ffn="squared_relu"), 2)
