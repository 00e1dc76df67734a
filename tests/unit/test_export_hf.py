"""Hugging Face export/import: transformers loads our export and computes the same logits."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.export import export_hf, import_hf
from scaletrain.model import Transformer, build_model, model_config_for

transformers = pytest.importorskip("transformers", reason="HF export tests need transformers (pip install .[dev])")


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_transformers_loads_export_with_matching_logits(tmp_path, tie):
    # Non-default rope_theta and a large init_std, so a misread theta or a permuted RoPE
    # layout would move the logits far beyond the tolerance.
    cfg = model_config_for("debug", tie_embeddings=tie, rope_theta=500000.0, init_std=0.2)
    model = build_model(cfg, seed=3)
    out = export_hf(model.state_dict(), cfg, tmp_path / "hf", tokenizer_files={"tokenizer.json": '{"v": 1}'})

    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    # Tolerance 1e-4 absolute on logits of magnitude ~1: both models run the same fp32 math
    # (same weights, same rotate_half RoPE, same SDPA); only op order / kernel choice may
    # differ, which moves fp32 results by ~1e-6 per op across 2 layers.
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] == tie
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    assert (out / "tokenizer.json").read_text() == '{"v": 1}'
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) == (not tie)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_gives_identical_tensors(tmp_path, tie):
    cfg = model_config_for("debug", tie_embeddings=tie)
    sd = build_model(cfg, seed=1).state_dict()
    export_hf(sd, cfg, tmp_path / "hf")
    cfg2, sd2 = import_hf(tmp_path / "hf")
    assert cfg2 == cfg
    assert set(sd2) == set(sd)
    for k in sd:
        assert sd2[k].dtype == sd[k].dtype and torch.equal(sd2[k], sd[k]), k
    model = Transformer(cfg2)
    model.load_state_dict(sd2, strict=True)
    if tie:
        assert sd2["output.weight"] is sd2["tok_embeddings.weight"]


def test_import_recognises_a_registered_flavor(tmp_path):
    cfg = model_config_for("cpu_demo")
    export_hf(build_model(cfg).state_dict(), cfg, tmp_path / "hf")
    assert import_hf(tmp_path / "hf")[0].flavor == "cpu_demo"


def test_refuses_to_overwrite_unless_asked(tmp_path):
    cfg = model_config_for("debug")
    first = build_model(cfg, seed=0).state_dict()
    second = build_model(cfg, seed=1).state_dict()
    export_hf(first, cfg, tmp_path / "hf")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        export_hf(second, cfg, tmp_path / "hf")
    assert torch.equal(import_hf(tmp_path / "hf")[1]["norm.weight"], first["norm.weight"])
    assert torch.equal(import_hf(tmp_path / "hf")[1]["layers.0.attention.wq.weight"], first["layers.0.attention.wq.weight"])

    export_hf(second, cfg, tmp_path / "hf", overwrite=True)
    got = import_hf(tmp_path / "hf")[1]
    assert torch.equal(got["layers.0.attention.wq.weight"], second["layers.0.attention.wq.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp folders left behind

    (tmp_path / "empty").mkdir()
    export_hf(first, cfg, tmp_path / "empty")  # an existing empty folder is fine
    assert (tmp_path / "empty" / "model.safetensors").is_file()


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_export_follows_the_umask(tmp_path, umask, dir_mode, file_mode):
    """The exported folder and its files get the modes of any new file (0777/0666 less the
    umask), not mkdtemp's 0700 or safetensors' 0600."""
    cfg = model_config_for("debug")
    old = os.umask(umask)
    try:
        out = export_hf(build_model(cfg).state_dict(), cfg, tmp_path / "hf", tokenizer_files={"tokenizer.json": "{}"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        "model.safetensors": file_mode, "config.json": file_mode, "tokenizer.json": file_mode}


def test_squared_relu_cannot_be_exported(tmp_path):
    cfg = model_config_for("debug", ffn="squared_relu")
    with pytest.raises(ConfigError, match="squared_relu.*SwiGLU"):
        export_hf(build_model(cfg).state_dict(), cfg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_missing_or_unexpected_keys_are_named(tmp_path):
    cfg = model_config_for("debug")
    sd = build_model(cfg).state_dict()
    del sd["layers.1.ffn_norm.weight"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing \['layers.1.ffn_norm.weight'\].*unexpected \['extra.weight'\]"):
        export_hf(sd, cfg, tmp_path / "hf")


def test_import_rejects_folders_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="no .safetensors.*pytorch_model.bin.*never loaded"):
        import_hf(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        import_hf(tmp_path / "nowhere")
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks required Llama fields.*hidden_size"):
        import_hf(tmp_path)


def test_import_sharded_checkpoint(tmp_path):
    cfg = model_config_for("debug")
    sd = build_model(cfg).state_dict()
    export_hf(sd, cfg, tmp_path / "hf")
    full = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").unlink()
    names = sorted(full)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for file, keys in shards.items():
        save_file({k: full[k] for k in keys}, tmp_path / "hf" / file)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    _, sd2 = import_hf(tmp_path / "hf")
    assert all(torch.equal(sd2[k], sd[k]) for k in sd)

    (tmp_path / "hf" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="listed in the safetensors index but missing"):
        import_hf(tmp_path / "hf")


def test_import_rejects_unsupported_llama_features(tmp_path):
    cfg = model_config_for("debug")
    export_hf(build_model(cfg).state_dict(), cfg, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="rope scaling"):
        import_hf(tmp_path / "hf")


def test_export_accepts_views_into_one_flat_buffer(tmp_path):
    # A gathered/flattened state_dict hands out views; safetensors needs them copied.
    cfg = model_config_for("debug")
    sd = build_model(cfg).state_dict()
    flat = torch.cat([v.flatten() for v in sd.values()])
    views, offset = {}, 0
    for k, v in sd.items():
        views[k] = flat[offset : offset + v.numel()].view(v.shape)
        offset += v.numel()
    export_hf(views, cfg, tmp_path / "hf")
    _, sd2 = import_hf(tmp_path / "hf")
    assert all(torch.equal(sd2[k], sd[k]) for k in sd)
