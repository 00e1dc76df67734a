"""Run folder <-> model: load a run's checkpoint for sampling, export it to Hugging Face, and
import a Hugging Face (Llama, Qwen3, Qwen3-MoE) folder as a new run folder (model-only
checkpoint at step 0)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from scaletrain.config.load import config_to_dict, write_config
from scaletrain.config.schema import Config
from scaletrain.errors import CheckpointError
from scaletrain.train.checkpoint import Checkpointer, read_marker
from scaletrain.train.rundir import latest_checkpoint, load_run_config

MODEL_ONLY = "model"  # marker "contents" of an imported checkpoint (no optimizer state)


def _tokenizer_dir(run_dir: Path) -> Path:
    tok = Path(run_dir) / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        raise CheckpointError(f"run folder {run_dir} has no tokenizer/tokenizer.json; it was not written by scaletrain train.")
    return tok


def load_run_model(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"):
    """(model in eval mode, tokenizer, config) from a run folder's newest (or given) checkpoint."""
    from scaletrain.data import load_tokenizer_dir
    from scaletrain.model import build_model

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    model = build_model(cfg.model, device=device, seed=cfg.train.seed)
    state = {"model": model.state_dict()}
    Checkpointer.load(ckpt, state)  # verifies the files; DCP reshards from any saved layout
    model.load_state_dict(state["model"])
    model.eval()
    return model, load_tokenizer_dir(_tokenizer_dir(run_dir)), cfg


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None,
               overwrite: bool = False) -> tuple[Path, Path, int]:
    """Write a run's checkpoint (default: its newest good one) as Hugging Face safetensors (Llama,
    Qwen3 or Qwen3-MoE layout) + config.json + tokenizer files; returns (output folder, checkpoint
    folder, its step). An occupied `out` is refused before the model is loaded, unless `overwrite`."""
    from scaletrain.export.hf import export_hf

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; choose a new --out folder, or pass --overwrite "
                              "to replace it.")
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    model, _, cfg = load_run_model(run_dir, ckpt)
    tok_dir = _tokenizer_dir(Path(run_dir))
    files = {f.name: f.read_bytes() for f in sorted(tok_dir.iterdir()) if f.is_file()}
    export_hf(model.state_dict(), cfg.model, out, tokenizer_files=files, overwrite=overwrite)
    return out, ckpt, int(read_marker(ckpt)["step"])


def import_run(src: str | Path, run_dir: str | Path, allow_pickle: bool = False) -> Path:
    """Create `run_dir` from a Hugging Face model folder: config.toml, tokenizer/ and a model-only
    checkpoint at step 0 that `generate`, `export` and `train --resume PATH` accept.
    `allow_pickle` lets a folder with only pytorch_model.bin weights in (see `import_hf`)."""
    from scaletrain.config.validate import validate_config
    from scaletrain.export.hf import import_hf

    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"run folder {run_dir} already exists and is not empty; choose a new --run-dir.")
    src = Path(src)
    if not (src / "tokenizer.json").is_file():
        raise CheckpointError(f"{src} has no tokenizer.json; scaletrain needs the tokenizer next to the weights.")
    model_cfg, state = import_hf(src, allow_pickle=allow_pickle)
    cfg = Config(model=model_cfg)
    cfg.tokenizer = dataclasses.replace(cfg.tokenizer, kind="file", path=str((run_dir / "tokenizer" / "tokenizer.json").resolve()))
    cfg.data = dataclasses.replace(cfg.data, seq_len=min(cfg.data.seq_len, model_cfg.max_seq_len))
    validate_config(cfg)
    tmp = run_dir.with_name(run_dir.name + ".importing")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / "tokenizer" / name)
    write_config(cfg, tmp / "config.toml")
    (tmp / "imported_from.json").write_text(json.dumps({"source": str(src.resolve()), "format": "hf"}))
    state = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
    meta = {"contents": MODEL_ONLY, "model": config_to_dict(cfg)["model"], "tokenizer": None}
    Checkpointer(tmp, cfg.checkpoint).save(0, {"model": state}, meta)
    if run_dir.exists():
        run_dir.rmdir()  # empty (checked above)
    tmp.replace(run_dir)
    return run_dir / "checkpoints" / "step-00000000"
