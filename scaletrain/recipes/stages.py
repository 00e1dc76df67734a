"""Stages of a multi-run recipe: each an ordinary run folder, skipped when complete, resumed when not.

A stage is complete when its run folder holds a verified checkpoint (completion marker, file
sizes) at exactly its expected final step; a folder with a later step is an error (the recipe's
config asks for fewer steps than were trained). An incomplete stage runs again with
``--resume auto``: a stage killed mid-way continues from its newest checkpoint, bit-exactly on
CPU, as any run does.

Accounting. Each stage's run folder holds ``stage.json``: the stage's name, what it started from,
its expected step and one entry per attempt (``start`` / ``end`` in Unix seconds, ``outcome``:
"complete", "killed" or the exception's name, the steps it began and ended at). An attempt
killed without a chance to record its end (SIGKILL, power loss) is closed by the next attempt
with ``end`` = the last write of the run's metrics.jsonl. ``stage_accounting`` turns that and the
run's metrics.jsonl into:

- ``tokens``: global tokens of every step kept in metrics.jsonl (a step repeated after a crash
  counts once): tokens the stage's final model was trained on, whatever the layouts were;
- ``train_seconds``: the summed ``step_time_s`` of those steps (pure training steps);
- ``wall_seconds``: the summed duration of every attempt (setup, evaluation, checkpoints and
  work lost to crashes included), i.e. what the stage cost in wall-clock time.

Only rank 0 writes; every rank reads the same files (run folders live on a shared filesystem,
as checkpoints require).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from scaletrain.config.schema import CheckpointConfig
from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.train.checkpoint import Checkpointer, read_marker, verify_checkpoint
from scaletrain.train.metrics import METRICS_FILE, read_metrics

STAGE_FILE = "stage.json"


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, None when absent; CheckpointError when unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON; delete it (it is rewritten from the run folders) "
                              "or restore it.") from None


def final_checkpoint(run_dir: Path, step: int, what: str) -> Path | None:
    """The verified checkpoint of `run_dir` at exactly `step` (a complete stage), or None.
    ConfigError when the folder holds a later step: the config asks for fewer steps than were
    trained, and a stage never trains backwards. `what` names the stage and its step key."""
    steps = Checkpointer(run_dir, CheckpointConfig()).complete_steps()
    later = [s for s, _ in steps if s > step]
    if later:
        raise ConfigError(f"{run_dir} holds a checkpoint at step {max(later)}, beyond the {step} steps of {what}. "
                          f"Set it back to {max(later)} or more, or delete {run_dir} to train that stage again.")
    for s, path in steps:
        if s == step:
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError:
                return None  # damaged: the stage runs again and resumes from an earlier one
    return None


def checkpoint_identity(ckpt: Path) -> dict[str, Any]:
    """What identifies a checkpoint for a later stage that starts from it: its step and commit
    time (a stage trained again commits a new time under the same path), with its absolute
    path and tokens for the reader."""
    marker = read_marker(ckpt)
    return {"path": str(Path(ckpt).resolve()), "step": int(marker["step"]), "time": marker.get("time"),
            "tokens_seen": marker.get("tokens_seen")}


def same_checkpoint(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two `checkpoint_identity` records name the same commit: step and commit time
    (not the path, so a recipe folder moved or copied elsewhere keeps its stages)."""
    return (a["step"], a["time"]) == (b["step"], b["time"])


def _metrics_mtime(run_dir: Path, default: float) -> float:
    path = run_dir / METRICS_FILE
    return max(default, path.stat().st_mtime) if path.is_file() else default


def begin_attempt(run_dir: Path, info: dict[str, Any], start: float, start_step: int) -> None:
    """Record a new attempt at the stage in `run_dir/stage.json` (rank 0), begun at Unix time
    `start` at step `start_step`: `info` (name, expected step, what it started from) is stored;
    an earlier attempt left without an end is closed as killed at the last write of metrics.jsonl."""
    state = read_json(run_dir / STAGE_FILE) or {"attempts": []}
    for attempt in state["attempts"]:
        if attempt.get("end") is None:
            attempt.update(end=_metrics_mtime(run_dir, attempt["start"]), outcome="killed")
    state.update(info)
    state["attempts"].append({"start": start, "end": None, "outcome": None, "start_step": start_step})
    write_json(run_dir / STAGE_FILE, state)


def end_attempt(run_dir: Path, outcome: str, end_step: int | None) -> None:
    """Close the open attempt of `run_dir/stage.json` with `outcome` (rank 0)."""
    state = read_json(run_dir / STAGE_FILE)
    if state and state["attempts"] and state["attempts"][-1].get("end") is None:
        state["attempts"][-1].update(end=time.time(), outcome=outcome, end_step=end_step)
        write_json(run_dir / STAGE_FILE, state)


def stage_accounting(run_dir: Path) -> dict[str, Any]:
    """Tokens, seconds and the last validation of the stage in `run_dir` (module docstring)."""
    state = read_json(run_dir / STAGE_FILE) or {"attempts": []}
    out: dict[str, Any] = {k: v for k, v in state.items() if k != "attempts"}
    wall = 0.0
    for a in state["attempts"]:
        end = a["end"] if a.get("end") is not None else _metrics_mtime(run_dir, a["start"])
        wall += max(0.0, end - a["start"])
    train, evals = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else ([], [])
    out.update(
        attempts=len(state["attempts"]),
        steps=train[-1]["step"] if train else 0,
        # tokens_seen / step is the global tokens per step of the layout that ran that step
        tokens=sum(r["tokens_seen"] // r["step"] for r in train),
        train_seconds=round(sum(r["step_time_s"] for r in train), 3),
        wall_seconds=round(wall, 3),
        final_eval={k: v for k, v in evals[-1].items() if k.startswith("val_loss")} if evals else None,
    )
    return out

