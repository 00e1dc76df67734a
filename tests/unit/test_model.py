"""The single-device Transformer: shapes, attention semantics, init, validation, counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scaletrain.config.validate import validate_model_config
from scaletrain.errors import ConfigError
from scaletrain.model import Transformer, build_model, flavor_names, model_config_for
from scaletrain.model.flops import param_counts
from scaletrain.model.transformer import apply_rope, rope_cos_sin


def test_forward_shape_and_backward_reaches_every_parameter():
    cfg = model_config_for("debug")
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, cfg.vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_parameter_names_follow_the_contract():
    cfg = model_config_for("debug")
    names = set(build_model(cfg).state_dict())
    assert isinstance(Transformer(cfg).layers, torch.nn.ModuleDict)
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(cfg.n_layers):
        expected |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        expected |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    assert names == expected  # no biases, and RoPE tables are not persistent


def test_gqa_attention_matches_per_head_reference():
    cfg = model_config_for("debug", n_heads=4, n_kv_heads=2)
    model = build_model(cfg, seed=1)
    attn = model.layers["0"].attention
    x = torch.randn(2, 9, cfg.dim)
    ours = attn(x, model.rope_cos, model.rope_sin)

    hd, seq = cfg.dim // cfg.n_heads, 9
    q = attn.wq(x).view(2, seq, cfg.n_heads, hd).transpose(1, 2)  # [b, heads, s, hd]
    k = attn.wk(x).view(2, seq, cfg.n_kv_heads, hd).transpose(1, 2)  # [b, kv_heads, s, hd]
    v = attn.wv(x).view(2, seq, cfg.n_kv_heads, hd).transpose(1, 2)
    cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    heads = []
    for h in range(cfg.n_heads):
        kv = h // (cfg.n_heads // cfg.n_kv_heads)  # query heads 0,1 -> kv 0; 2,3 -> kv 1
        scores = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(hd)  # [b, s, s]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        heads.append(probs @ v[:, kv])  # [b, s, hd]
    reference = attn.wo(torch.cat(heads, dim=-1))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    cfg = model_config_for("debug")
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % cfg.vocab_size
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-6)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_cos_sin(head_dim=16, seq_len=64, theta=10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(i, j):
        qi = apply_rope(q.expand(64, 16), cos, sin)[i]
        kj = apply_rope(k.expand(64, 16), cos, sin)[j]
        return float(qi @ kj)

    assert score(10, 3) == pytest.approx(score(40, 33), rel=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 9), rel=1e-2)
    rotated = apply_rope(q.expand(64, 16), cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm().expand(64))  # a pure rotation


def test_build_is_deterministic_and_leaves_global_rng_alone():
    cfg = model_config_for("debug")
    rng_before = torch.get_rng_state()
    a, b = build_model(cfg, seed=7).state_dict(), build_model(cfg, seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_model(cfg, seed=8).state_dict()
    assert not torch.equal(a["layers.0.attention.wq.weight"], c["layers.0.attention.wq.weight"])


def test_init_statistics():
    cfg = model_config_for("cpu_demo")
    model = build_model(cfg)
    wq = model.layers["0"].attention.wq.weight
    wo = model.layers["0"].attention.wo.weight
    w2 = model.layers["3"].feed_forward.w2.weight
    assert float(wq.detach().std()) == pytest.approx(cfg.init_std, rel=0.03)
    scaled = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert float(wo.detach().std()) == pytest.approx(scaled, rel=0.03)
    assert float(w2.detach().std()) == pytest.approx(scaled, rel=0.03)
    assert torch.equal(model.norm.weight, torch.ones(cfg.dim))
    assert torch.equal(model.layers["1"].ffn_norm.weight, torch.ones(cfg.dim))
    assert model.rope_cos.shape == (cfg.max_seq_len, cfg.dim // cfg.n_heads)
    assert torch.equal(model.rope_cos[0], torch.ones(cfg.dim // cfg.n_heads))


def test_meta_construction_allocates_nothing_and_init_weights_materialises():
    cfg = model_config_for("debug")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters()) and model.rope_cos.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    reference = build_model(cfg, seed=0)
    assert torch.equal(model.rope_sin, reference.rope_sin)
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()


def test_tied_embeddings_share_one_parameter():
    cfg = model_config_for("debug", tie_embeddings=True)
    model = build_model(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)["total"]
    assert float(model.output.weight.detach().std()) == pytest.approx(cfg.init_std, rel=0.05)


def test_squared_relu_ffn_has_no_w3_and_computes_relu_squared():
    cfg = model_config_for("debug", ffn="squared_relu")
    model = build_model(cfg)
    ffn = model.layers["0"].feed_forward
    assert not hasattr(ffn, "w3")
    assert not any("w3" in name for name in model.state_dict())
    x = torch.randn(2, 5, cfg.dim)
    torch.testing.assert_close(ffn(x), ffn.w2(torch.relu(ffn.w1(x)) ** 2))
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)["total"]


@pytest.mark.parametrize("flavor", ["debug", "cpu_demo"])
@pytest.mark.parametrize("tie", [False, True])
def test_built_parameter_count_matches_formula(flavor, tie):
    cfg = model_config_for(flavor, tie_embeddings=tie)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)["total"]


@pytest.mark.parametrize("flavor", ["125M", "350M", "anchor_1b", "llama3_8b", "llama3_70b", "llama3_405b"])
def test_meta_parameter_count_matches_formula(flavor):
    cfg = model_config_for(flavor)
    with torch.device("meta"):  # nothing is allocated, even for 405B
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)["total"]


def test_every_registered_flavor_is_valid():
    assert {"debug", "cpu_demo", "125M", "350M", "anchor_1b", "llama3_8b"} <= set(flavor_names())
    for name in flavor_names():
        cfg = model_config_for(name)
        validate_model_config(cfg)
        assert cfg.flavor == name


def test_unknown_flavor_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown model flavor 'lama3_8b'.*Did you mean 'llama3_8b'"):
        model_config_for("lama3_8b")
    with pytest.raises(ConfigError, match=r"unknown model field 'dimm'.*Did you mean 'dim'"):
        model_config_for("debug", dimm=3)
    assert model_config_for("debug", dim=128).dim == 128


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_heads": 4, "n_kv_heads": 3}, "not divisible by model.n_kv_heads"),
        ({"dim": 66, "n_heads": 4}, "not divisible by model.n_heads"),
        ({"dim": 60, "n_heads": 4, "n_kv_heads": 4}, "head_dim .* is odd"),
        ({"ffn": "gelu"}, "model.ffn = 'gelu' is not one of 'swiglu', 'squared_relu'"),
        ({"activation_sparsity": "2:4"}, "needs model.ffn='squared_relu'"),
        ({"activation_sparsity": "1:2"}, "model.activation_sparsity = '1:2' is not one of 'none', '2:4'"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"norm_eps": 0.0}, "norm_eps must be > 0"),
    ],
)
def test_invalid_shapes_raise_config_error(overrides, message):
    cfg = model_config_for("debug", **overrides)
    with pytest.raises(ConfigError, match=message):
        validate_model_config(cfg)
    with pytest.raises(ConfigError, match=message):
        Transformer(cfg)


def test_sequence_longer_than_rope_table_is_rejected():
    cfg = model_config_for("debug", max_seq_len=8)
    model = build_model(cfg)
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, cfg.vocab_size)
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_materialize_stage_equals_full_model():
    """A meta-built part holding only some layers (a pipeline stage) initialises to exactly the
    full model's values for what it holds: the RNG stream skips what it lacks."""
    from scaletrain.parallel.init import materialize

    cfg = model_config_for("debug", n_layers=4)
    full = build_model(cfg, seed=3).state_dict()
    with torch.device("meta"):
        stage = Transformer(cfg)
    del stage.layers["0"], stage.layers["1"]
    stage.tok_embeddings = None
    materialize([stage], "cpu", seed=3)
    got = stage.state_dict()
    assert set(got) == {k for k in full if not k.startswith(("layers.0.", "layers.1.", "tok_embeddings"))}
    for key, value in got.items():
        assert torch.equal(value, full[key]), key
