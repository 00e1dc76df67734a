"""Hugging Face import/export (safetensors; pickled .bin files are loaded only when the
caller opts in with allow_pickle, and then with torch.load(weights_only=True)).

The layout follows the model: `LlamaForCausalLM` for a dense model, `Qwen3ForCausalLM` for a
dense model with model.qk_norm, `Qwen3MoeForCausalLM` for an MoE model (export/hf_moe.py holds
its expert mapping and what it refuses). Our parameter names map 1:1 onto the Hugging Face
names (no permutation: our RoPE uses the same rotate_half layout as Hugging Face):

    tok_embeddings.weight                  model.embed_tokens.weight
    layers.N.attention.w{q,k,v,o}.weight   model.layers.N.self_attn.{q,k,v,o}_proj.weight
    layers.N.feed_forward.w1.weight        model.layers.N.mlp.gate_proj.weight
    layers.N.feed_forward.w3.weight        model.layers.N.mlp.up_proj.weight
    layers.N.feed_forward.w2.weight        model.layers.N.mlp.down_proj.weight
    layers.N.attention_norm.weight         model.layers.N.input_layernorm.weight
    layers.N.ffn_norm.weight               model.layers.N.post_attention_layernorm.weight
    norm.weight                            model.norm.weight
    output.weight                          lm_head.weight (omitted when embeddings are tied)
    layers.N.attention.{q,k}_norm.weight   model.layers.N.self_attn.{q,k}_norm.weight (Qwen3)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from scaletrain.config.schema import ModelConfig
from scaletrain.config.validate import validate_model_config
from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.export import hf_moe
from scaletrain.config.flavors import FLAVORS, model_config_for
from scaletrain.model.flops import head_dim_of, is_moe_layer

_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_FFN = {k for k in _LAYER if k.startswith("feed_forward.")}
_QK_NORM = {"attention.q_norm.weight": "self_attn.q_norm.weight", "attention.k_norm.weight": "self_attn.k_norm.weight"}
_RESERVED = {"model.safetensors", "config.json", "model.safetensors.index.json"}
# model_type -> (architecture, q/k norms, MoE)
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", False, False), "qwen3": ("Qwen3ForCausalLM", True, False),
                  "qwen3_moe": ("Qwen3MoeForCausalLM", True, True)}


def _model_type(cfg: ModelConfig) -> str:
    return "qwen3_moe" if cfg.moe_experts else "qwen3" if cfg.qk_norm else "llama"


def hf_key_map(cfg: ModelConfig) -> dict[str, str]:
    """Our state_dict key -> Hugging Face key, for every tensor a HF checkpoint of `cfg` holds
    one-to-one (output.weight is absent when the embeddings are tied; the experts of MoE
    layers are split and stacked by export/hf_moe.py)."""
    mapping = {k: v for k, v in _TOP.items() if not (cfg.tie_embeddings and k == "output.weight")}
    layer = {**_LAYER, **(_QK_NORM if cfg.qk_norm else {})}
    for i in range(cfg.n_layers):
        moe = is_moe_layer(cfg, i)
        for ours, theirs in layer.items():
            if not (moe and ours in _FFN):
                mapping[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
        if moe:
            mapping.update(hf_moe.layer_key_map(cfg, i))
    return mapping


def _check_exportable(cfg: ModelConfig) -> None:
    validate_model_config(cfg)
    if cfg.ffn != "swiglu":
        raise ConfigError(
            f"model.ffn={cfg.ffn!r} cannot be exported as a Hugging Face Llama: LlamaForCausalLM "
            "only has the gated SwiGLU MLP. Export needs model.ffn='swiglu'."
        )
    if cfg.moe_experts:
        hf_moe.check_exportable(cfg)


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of the Hugging Face model equivalent to `cfg` (weights stored as
    `dtype`): LlamaForCausalLM, Qwen3ForCausalLM (q/k norms) or Qwen3MoeForCausalLM (MoE)."""
    _check_exportable(cfg)
    dtype_name = str(dtype).removeprefix("torch.")
    model_type = _model_type(cfg)
    extra = hf_moe.config_fields(cfg) if cfg.moe_experts else {}
    return {
        "architectures": [_ARCHITECTURES[model_type][0]],
        "model_type": model_type,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "head_dim": head_dim_of(cfg),
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta; >= 5 reads rope_parameters (and converts the former).
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "torch_dtype": dtype_name,  # transformers < 5
        "dtype": dtype_name,  # transformers >= 5
        "use_cache": True,
        **extra,
    }


def export_hf(
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer_files: dict[str, str | bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `state_dict` (our names, full unsharded tensors) as a Hugging Face model folder
    (Llama, Qwen3 or Qwen3-MoE, see `hf_config_dict`).

    Writes model.safetensors, config.json and every `tokenizer_files` entry (file name ->
    text or bytes) into a temporary sibling folder, then renames it into place, so `out_dir`
    is never left half-written; its folder and files get the modes the umask gives new files.
    Raises CheckpointError if `out_dir` exists and is not empty (unless overwrite=True), or if
    keys are missing/unexpected; ConfigError for a model that the layout cannot express
    (squared-ReLU FFN; for MoE see hf_moe.check_exportable). DTensors must be gathered by the
    caller (e.g. `full_tensor()`) first. Returns the output folder.
    """
    _check_exportable(cfg)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; choose a new folder or pass overwrite=True")
    mapping = hf_key_map(cfg)
    sd = dict(state_dict)
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)  # the same tensor as tok_embeddings.weight
    try:
        experts = hf_moe.split_experts(sd, cfg)  # pops the expert tensors out of sd
    except KeyError as e:
        raise CheckpointError(f"the state_dict to export lacks the MoE tensor {e}") from None
    _check_keys(set(sd), set(mapping), "the state_dict to export")
    tensors, storages = {}, set()
    named = [(ours, theirs, sd[ours]) for ours, theirs in mapping.items()]
    for ours, theirs, t in named + [(theirs, theirs, t) for theirs, t in experts.items()]:
        if not isinstance(t, torch.Tensor) or hasattr(t, "full_tensor"):  # full_tensor: a DTensor
            raise CheckpointError(f"{ours} is a {type(t).__name__}; gather it to a full tensor before export")
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses views and shared storage; copy only those (not every tensor:
        # a full copy of an 8B model would double the host memory export needs).
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[theirs] = t
    dtypes = {t.dtype for t in tensors.values()}
    config = hf_config_dict(cfg, dtypes.pop() if len(dtypes) == 1 else torch.float32)
    files = dict(tokenizer_files or {})
    for name in files:
        if name in _RESERVED or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name.startswith("."):
            raise CheckpointError(f"tokenizer file name {name!r} is not a plain, non-reserved file name")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, content in files.items():
            path = tmp / name
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        # mkdtemp makes the folder 0700 and safetensors writes 0600: give the export the modes
        # every other new file gets (0666 / 0777 less the umask), so others on a shared cluster
        # can read it when the umask says so.
        mask = _umask()
        for path in tmp.iterdir():
            path.chmod(0o666 & ~mask)
        tmp.chmod(0o777 & ~mask)
        if out.exists():
            # Move the old folder aside first, so a crash leaves either the old or the new one.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _umask() -> int:
    """The process's umask (reading it means setting it; it is restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def import_hf(src_dir: str | Path, allow_pickle: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face Llama, Qwen3 or Qwen3-MoE folder (config.json + safetensors) into
    (cfg, state_dict).

    The state_dict uses our names and loads with `Transformer(cfg).load_state_dict(sd)`; for
    a tied model output.weight is the same tensor as tok_embeddings.weight. Sharded folders
    (model.safetensors.index.json) are supported. Raises CheckpointError for a folder without
    safetensors or with missing/unexpected tensors; ConfigError for features this model
    lacks (rope scaling, biases, sliding windows, ...). A folder with only pickled weights
    (pytorch_model.bin, or its sharded index) is refused unless `allow_pickle`, and even then it is read with
    torch.load(weights_only=True), which unpickles tensors and plain containers only.
    `cfg.flavor` names the registered flavor with the same shape, or "debug" if none matches
    (every field is set explicitly, so the flavor only names defaults that were all overridden).
    """
    src = Path(src_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{src} has no config.json; is it a Hugging Face model folder?")
    files = _weight_files(src, allow_pickle)  # before parsing config.json: a .bin folder fails clearly
    cfg = _config_from_hf(json.loads(config_path.read_text()), str(config_path))
    hf = _read_weights(src, files)
    theirs_to_ours = {v: k for k, v in hf_key_map(cfg).items()}
    if cfg.tie_embeddings and "lm_head.weight" in hf:
        # Some tied checkpoints still store the head; accept it only if it is the table.
        if not torch.equal(hf.pop("lm_head.weight"), hf.get("model.embed_tokens.weight", torch.empty(0))):
            raise CheckpointError(f"{src}: tie_word_embeddings is true but lm_head differs from embed_tokens")
    for key in [k for k in hf if k.endswith("rotary_emb.inv_freq")]:
        del hf[key]  # a buffer some old exports saved; we recompute it
    experts = hf_moe.stack_experts(hf, cfg, str(src))  # pops the per-expert tensors out of hf
    _check_keys(set(hf), set(theirs_to_ours), f"the safetensors in {src}")
    sd = {theirs_to_ours[k]: v for k, v in hf.items()} | experts
    if cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return cfg, sd


def _check_keys(have: set[str], want: set[str], where: str) -> None:
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match the model: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )


def _config_from_hf(hf: dict, where: str) -> ModelConfig:
    if hf.get("model_type") not in _ARCHITECTURES:
        raise ConfigError(f"{where}: model_type is {hf.get('model_type')!r}; only "
                          f"{', '.join(map(repr, _ARCHITECTURES))} can be imported")
    _, qk_norm, moe = _ARCHITECTURES[hf["model_type"]]
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{where}: sliding-window attention is not supported")
    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ConfigError(
            f"{where}: rope scaling ({hf.get('rope_scaling') or rope}) is not supported by "
            "scaletrain's model; only plain RoPE checkpoints can be imported"
        )
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, want) != want:
            raise ConfigError(f"{where}: {key}={hf[key]!r} is not supported (scaletrain needs {want!r})")
    required = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
    missing = [key for key in required if key not in hf]
    if missing:
        raise CheckpointError(f"{where} lacks required Llama fields {missing}")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    # Absent head_dim: Qwen3Config's default is 128, the others use hidden_size / heads.
    head_dim = hf.get("head_dim") or (128 if hf["model_type"] == "qwen3" else dim // n_heads)
    fields = {
        "dim": dim,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "ffn_dim": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"],
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
        "ffn": "swiglu",
        "activation_sparsity": "none",
        "head_dim": 0 if head_dim * n_heads == dim else head_dim,
        "qk_norm": qk_norm,
        "moe_experts": 0,  # every field is set, so no flavor lends a dense model its experts
        **(hf_moe.model_fields(hf, where) if moe else {}),
    }
    flavor = next((name for name in FLAVORS if model_config_for(name, **fields) == model_config_for(name)), "debug")
    cfg = model_config_for(flavor, **fields)
    validate_model_config(cfg)
    return cfg


def _weight_files(src: Path, allow_pickle: bool) -> list[str]:
    """Safetensors weight files of `src`; pickled ones only when there are no safetensors and
    `allow_pickle`."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (src / "model.safetensors").is_file():
        return ["model.safetensors"]
    files = sorted(p.name for p in src.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
    if not pickles:
        raise CheckpointError(f"{src} holds no .safetensors files")
    if not allow_pickle:
        raise CheckpointError(
            f"{src} holds no .safetensors files (found {pickles}): only safetensors weights are accepted; "
            "pickled checkpoints are never loaded by default, because unpickling a file can run arbitrary code. "
            "Convert them to safetensors, or pass --allow-pickle (import_hf(allow_pickle=True)) to read them "
            "with torch.load(weights_only=True)."
        )
    index = src / "pytorch_model.bin.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (src / "pytorch_model.bin").is_file():
        return ["pytorch_model.bin"]
    raise CheckpointError(f"{src}: --allow-pickle reads pytorch_model.bin or pytorch_model.bin.index.json; found {pickles}")


def _read_weights(src: Path, files: list[str]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = src / name
        if not path.is_file():
            kind = "safetensors" if name.endswith(".safetensors") else "pytorch_model.bin"
            raise CheckpointError(f"{path} is listed in the {kind} index but missing")
        if name.endswith(".safetensors"):
            part = load_file(str(path))
        else:
            try:
                # weights_only: tensors and plain containers only; any other pickled object is refused
                part = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{path} cannot be read as plain tensors with torch.load(weights_only=True): {e}") from None
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise CheckpointError(f"{path} is not a flat dict of tensors (name -> tensor)")
        dup = set(part) & set(tensors)
        if dup:
            raise CheckpointError(f"{path} repeats tensors already read: {sorted(dup)[:3]}")
        tensors.update(part)
    return tensors
