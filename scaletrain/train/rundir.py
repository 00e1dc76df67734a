"""The run folder: refuse to clobber it, decide where a run resumes from, read it back.

A run folder holds config.toml (resolved), run_info.json (revision, versions, hardware),
tokenizer/ (HF tokenizer files), metrics.jsonl, tb/, loss.png and checkpoints/step-*/.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

from scaletrain.config.schema import CheckpointConfig, Config
from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.train.checkpoint import Checkpointer, verify_checkpoint
from scaletrain.train.lock import LOCK_FILE


def check_writable(run_dir: Path) -> None:
    """ConfigError unless `run_dir` is (or can be created as) a writable folder."""
    run_dir = Path(run_dir)
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--run-dir {run_dir} cannot be created: {probe} is a file, not a folder. "
                          "Choose another --run-dir.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--run-dir {run_dir} is not writable ({probe} does not allow writing). "
                          "Choose a folder you can write to.")


def resolve_resume(run_dir: Path, resume: str, overwrite: bool,
                   cfg: CheckpointConfig | None = None) -> Path | None:
    """Check what may be done with `run_dir` and return the checkpoint to resume from.

    `resume` is "auto" (newest complete checkpoint, or a fresh start when there is none),
    "never" (the folder must be new or empty) or a path to one checkpoint folder. Nothing is
    deleted here; `overwrite` only permits `clear_run_dir` later.
    """
    if resume not in ("auto", "never"):
        ckpt = Path(resume)
        verify_checkpoint(ckpt)  # raises with what is wrong
        return ckpt
    exists = run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir())
    if resume == "auto" and not overwrite:
        return Checkpointer(run_dir, cfg or CheckpointConfig()).latest() if exists else None
    if exists and not overwrite:
        n = len(Checkpointer(run_dir, CheckpointConfig()).complete_steps())
        raise CheckpointError(
            f"run folder {run_dir} already exists ({n} complete checkpoint(s)). Pass --resume auto to "
            f"continue it, --overwrite to discard it, or choose another --run-dir."
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--run-dir {run_dir} exists and is not a folder.")
    return None


def clear_run_dir(run_dir: Path) -> None:
    """Delete a run folder's contents (only when the user passed --overwrite), except the
    writer lock this run holds (deleting it would let a second writer lock a new file)."""
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            if child.name == LOCK_FILE:
                continue
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run was trained with (RUN/config.toml)."""
    from scaletrain.config.load import config_from_dict, read_toml

    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a scaletrain run folder (no config.toml). Pass the --run-dir of a training run.")
    return config_from_dict(read_toml(path))


def train_config(config_path: str | None, overrides: list[str], run_dir: Path, resume: str,
                 overwrite: bool) -> tuple[Config, list[str]]:
    """The config a `train` command runs with, and lines saying where it came from.

    Continuing an existing run folder (`resume` is "auto" or a checkpoint, no `overwrite`, and
    RUN/config.toml exists): without `config_path` the run's own config.toml is the base, so a
    bare `--resume auto` trains what the run was training; with `config_path` that file is the
    base. Either way `--section.key` `overrides` go on top, and every key whose value differs
    from the run's config.toml gets a line `  section.key: old -> new`. Changes that cannot
    resume (model shape, tokenizer, data) are refused later, when the checkpoint is loaded.
    Otherwise `config_path` (or the defaults) plus `overrides`, and no lines."""
    from scaletrain.config.load import config_to_dict, load_config, read_toml

    run_toml = Path(run_dir) / "config.toml"
    if resume == "never" or overwrite or not run_toml.is_file():
        return load_config(config_path, overrides), []
    cfg = load_config(config_path if config_path is not None else run_toml, overrides)
    old, new = (_flat(config_to_dict(c)) for c in (load_run_config(run_dir), cfg))
    changes = [f"  {key}: {_toml_value(old.get(key))} -> {_toml_value(value)}"
               for key, value in new.items() if old.get(key) != value]
    if config_path is None:
        head = f"config: using {run_toml}" + (f" with {len(changes)} change(s):" if changes else "")
    elif changes:
        head = f"config: {config_path} differs from {run_toml} in {len(changes)} key(s), applied:"
    else:
        return cfg, []
    return cfg, [head, *changes]


def _flat(tree: dict[str, dict]) -> dict[str, object]:
    return {f"{section}.{key}": value for section, node in tree.items() for key, value in node.items()}


def _toml_value(value: object) -> str:
    """A config value spelled as in TOML (strings quoted, true/false)."""
    return json.dumps(value)


def latest_checkpoint(run_dir: str | Path) -> Path:
    """Newest complete checkpoint of a run, or CheckpointError saying how to get one."""
    ckpt = Checkpointer(run_dir, CheckpointConfig()).latest()
    if ckpt is None:
        raise CheckpointError(
            f"run folder {run_dir} holds no complete checkpoint; train it (checkpoint.save_final = true) first."
        )
    return ckpt


def steps_only_config(cfg: Config, steps: int) -> Config:
    """A copy of `cfg` that trains `steps` steps and does nothing else: no evaluation, samples,
    checkpoints, TensorBoard, plots, progress bar or hang watchdog. For in-process re-runs that
    measure a config (`scaletrain bench`, `plan check --measure-tensors`)."""
    cfg = copy.deepcopy(cfg)
    cfg.train.steps = steps
    cfg.train.eval_interval = 0
    cfg.train.sample_tokens = 0
    cfg.train.hang_timeout_s = 0.0
    cfg.checkpoint.interval = 0
    cfg.checkpoint.save_final = False
    cfg.checkpoint.async_save = False
    cfg.metrics.tensorboard = False
    cfg.metrics.plot = False
    cfg.metrics.progress = "none"
    return cfg
