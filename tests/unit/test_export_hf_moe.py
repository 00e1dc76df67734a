"""Hugging Face Qwen3-MoE (and dense Qwen3) export/import: transformers loads our export and
computes the same logits; what transformers writes back imports to the same tensors; what the
layout cannot hold is refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from scaletrain.errors import ConfigError
from scaletrain.export import export_hf, import_hf
from scaletrain.model import build_model, model_config_for

transformers = pytest.importorskip("transformers", reason="HF export tests need transformers (pip install .[dev])")


def _random_model(cfg, seed=3):
    """A model whose norms are not all ones (a swapped or missing norm mapping shows)."""
    model = build_model(cfg, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


@pytest.mark.parametrize("flavor,hf_class", [("moe_debug", "Qwen3MoeForCausalLM"), ("debug", "Qwen3ForCausalLM")])
def test_transformers_computes_our_logits(tmp_path, flavor, hf_class):
    # Large init_std and rope_theta off the default: a wrong expert, gate, norm or RoPE mapping
    # moves the logits far beyond the tolerance. head_dim 24 != dim / n_heads for the dense one.
    extra = {} if flavor == "moe_debug" else {"head_dim": 24}
    cfg = model_config_for(flavor, qk_norm=True, init_std=0.2, rope_theta=20000.0, moe_capacity_factor=1.0, **extra)
    model = _random_model(cfg)
    out = export_hf(model.state_dict(), cfg, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [hf_class]
    hf = getattr(transformers, hf_class).from_pretrained(out, dtype=torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    # fp32 on both sides, same weights and routing: only op order differs (~1e-6 per op on
    # logits of magnitude ~5 over 4 layers). Our eval is dropless, as transformers' forward.
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_moe_layout_on_disk_and_round_trip_through_transformers(tmp_path):
    cfg = model_config_for("moe_debug")
    model = _random_model(cfg)
    out = export_hf(model.state_dict(), cfg, tmp_path / "hf")
    on_disk = load_file(out / "model.safetensors")
    assert torch.equal(on_disk["model.layers.2.mlp.experts.5.gate_proj.weight"],
                       model.layers["2"].feed_forward.experts.w1[5])
    assert torch.equal(on_disk["model.layers.2.mlp.experts.5.down_proj.weight"],
                       model.layers["2"].feed_forward.experts.w2[5])
    assert on_disk["model.layers.1.mlp.gate.weight"].shape == (8, 64)
    assert "model.layers.0.mlp.gate_proj.weight" in on_disk  # the dense first layer
    assert json.loads((out / "config.json").read_text())["mlp_only_layers"] == [0]
    # What transformers itself writes (its fused experts split back per expert) imports to
    # exactly our tensors and config.
    transformers.Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.float32).save_pretrained(tmp_path / "saved")
    cfg2, sd2 = import_hf(tmp_path / "saved")
    assert cfg2 == cfg and cfg2.flavor == "moe_debug"
    sd = model.state_dict()
    assert set(sd2) == set(sd)
    for key in sd:
        assert torch.equal(sd2[key], sd[key]), key


def test_qwen3_30b_a3b_config_maps_to_the_published_fields():
    from scaletrain.export.hf import hf_config_dict

    config = hf_config_dict(model_config_for("qwen3_30b_a3b"))
    assert {k: config[k] for k in ("model_type", "hidden_size", "head_dim", "num_experts", "num_experts_per_tok",
                                   "moe_intermediate_size", "norm_topk_prob", "mlp_only_layers")} == {
        "model_type": "qwen3_moe", "hidden_size": 2048, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True, "mlp_only_layers": []}


@pytest.mark.parametrize("overrides,needle", [
    (dict(moe_shared_experts=1), "no shared experts"),
    (dict(moe_router="sigmoid"), "routes by softmax"),
    (dict(moe_balance="bias"), "no selection bias"),
    (dict(qk_norm=False), "always RMS-normalises q and k"),
])
def test_refuses_what_qwen3_moe_cannot_hold(tmp_path, overrides, needle):
    cfg = model_config_for("moe_debug", **overrides)
    with pytest.raises(ConfigError, match="cannot be exported as a Hugging Face Qwen3-MoE") as info:
        export_hf(build_model(cfg).state_dict(), cfg, tmp_path / "hf")
    assert needle in str(info.value)
    assert not (tmp_path / "hf").exists()


def test_import_refuses_routing_it_does_not_compute(tmp_path):
    cfg = model_config_for("moe_debug")
    out = export_hf(build_model(cfg).state_dict(), cfg, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    for change, needle in ((dict(norm_topk_prob=False), "norm_topk_prob is false"),
                           (dict(mlp_only_layers=[1]), "only leading dense layers")):
        (out / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=needle):
            import_hf(out)
