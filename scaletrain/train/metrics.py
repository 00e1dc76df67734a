"""What a run measured: throughput, MFU, memory, and where it is written.

Record keys shared by the trainer, `metrics.jsonl`, the log line and the progress bar:
`step`, `loss`, `lr`, `tokens_per_s` (global tokens/s over all ranks), `tflops` (achieved
TFLOP/s over all ranks), `mfu` (fraction 0..1, or None when the peak is unknown),
`mem_bytes` (peak bytes on this rank, see `peak_memory_bytes`), `step_time_s` (seconds),
optionally `total_steps`. Train lines carry
`"kind": "train"`, eval lines `"kind": "eval"`.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import resource
import sys
from pathlib import Path
from typing import Any, Protocol

import torch

from scaletrain.config.schema import MetricsConfig
from scaletrain.errors import CheckpointError
from scaletrain.fsutil import storage_error

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None,
        n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation as a fraction (0.41 = 41 %).

    tokens_per_s: tokens/s summed over all `n_devices`; flops_per_token: model FLOPs per token
    for forward + backward (from model/flops.py); peak: dense FLOP/s of ONE device, or None
    when unknown -- then MFU is None ("n/a"), never a guess.
    """
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * n_devices)


class Phases(Protocol):
    """Where a training step's time goes: the trainer calls `mark(phase)` when a phase ends
    ("data", "forward", "backward", ...). bench/phases.py's PhaseTimer books the time since the
    previous mark to that phase; the default, NullPhases, records nothing."""

    def mark(self, phase: str) -> None: ...


class NullPhases:
    """The trainer's default Phases: a mark costs one attribute lookup and a call."""

    def mark(self, phase: str) -> None:
        pass


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss: KiB on Linux, bytes on
    macOS). This is RSS: it counts the Python heap, libraries and CPU tensors together."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory in bytes since the last reset: on CUDA the caching allocator's peak of
    *allocated* tensor memory; on CPU the process's peak RSS (not tensor memory alone)."""
    device = torch.device(device)
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else _peak_rss_bytes()


def peak_reserved_bytes(device: torch.device | str) -> int:
    """Peak memory in bytes the CUDA caching allocator *reserved* from the driver (>= the
    allocated peak; the gap is fragmentation and cache). On CPU: the peak RSS, as above."""
    device = torch.device(device)
    return int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else _peak_rss_bytes()


def reset_peak_memory(device: torch.device | str) -> None:
    """Restart the CUDA peak counters (e.g. after warm-up). The CPU peak RSS is kept by the
    kernel for the life of the process and cannot be reset, so this is a no-op there."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _to_python(value: Any) -> Any:
    """JSON-ready value: 0-d tensors and numpy scalars become Python numbers."""
    if isinstance(value, torch.Tensor):
        return _to_python(value.detach().cpu().tolist())
    if isinstance(value, dict):
        return {str(k): _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item"):  # numpy scalar types that are not numbers.Real (bfloat16, ...)
        return _to_python(value.item())
    return str(value)


def repair_torn_tail(path: Path) -> int:
    """Make a metrics file end with a whole line: a crash or a full disk in the middle of a
    write leaves a torn last line, and the next record appended would be glued to it. A tail
    that is a complete JSON record only lacking its newline gets the newline; anything else
    after the last newline is cut off. Returns the bytes removed."""
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        keep, pos = 0, size
        while pos > 0:  # find the last newline, reading backwards 64 KiB at a time
            start = max(0, pos - 2**16)
            f.seek(start)
            newline = f.read(pos - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            pos = start
        if keep == size:
            return 0
        f.seek(keep)
        try:
            json.loads(f.read())
            f.write(b"\n")
            return 0
        except ValueError:
            f.truncate(keep)
            return size - keep


class MetricsWriter:
    """Appends every step to `run_dir/metrics.jsonl` and, when `cfg.tensorboard`, to
    TensorBoard events in `run_dir/tb`. Only rank 0 writes; elsewhere methods are no-ops.

    The JSONL file is opened for append, so a resumed run continues it (after repairing a torn
    last line, `repair_torn_tail`); `read_metrics` lets a later line for a step replace an
    earlier one. Each line is one `os.write` call (no buffering of ours can tear it); if the
    disk fills in the middle of a line, the file is cut back to the line's start. A write that
    fails (disk full, permission, read-only) raises StorageError naming the cause."""

    def __init__(self, run_dir: str | Path, cfg: MetricsConfig, rank: int):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.cfg = cfg
        self.enabled = rank == 0
        self._fd: int | None = None
        self._tb = None
        if not self.enabled:
            return
        with self._storage(f"opening {self.path}"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            torn = repair_torn_tail(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if torn:
            print(f"warning: {self.path}: removed a torn last line ({torn} bytes) left by a crash or a full disk",
                  file=sys.stderr, flush=True)
        if cfg.tensorboard:
            # Imported here: tensorboard is heavy and unneeded when disabled.
            from torch.utils.tensorboard import SummaryWriter

            with self._storage(f"writing TensorBoard events to {self.run_dir / 'tb'}"):
                self._tb = SummaryWriter(str(self.run_dir / "tb"), flush_secs=30)

    @staticmethod
    @contextlib.contextmanager
    def _storage(doing: str):
        """OSError -> StorageError worded after its cause."""
        try:
            yield
        except OSError as e:
            raise storage_error(e, doing, then="resume with --resume auto") from None

    def _write_line(self, record: dict[str, Any]) -> None:
        # json writes floats with repr(): shortest round-trip, so full precision; NaN and
        # inf are written as NaN/Infinity, which Python's json reads back.
        data = (json.dumps(record) + "\n").encode()
        with self._storage(f"appending to {self.path}"):
            start = os.fstat(self._fd).st_size
            try:
                written = os.write(self._fd, data)
                while written < len(data):  # a short write (the disk filled): this raises why
                    written += os.write(self._fd, data[written:])
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)  # no torn line left behind
                raise

    def log_step(self, record: dict[str, Any]) -> None:
        """Write one training step. `record` must hold an integer `step`; numeric values
        also go to TensorBoard as `train/<key>`."""
        if not self.enabled:
            return
        clean = _to_python(record)
        if "step" not in clean:
            raise ValueError("metrics record needs a 'step'")
        clean.pop("kind", None)
        clean = {"step": int(clean.pop("step")), "kind": "train", **clean}
        self._write_line(clean)
        if self._tb is not None:
            with self._storage(f"writing TensorBoard events to {self.run_dir / 'tb'}"):
                for key, value in clean.items():
                    if key != "step" and type(value) in (int, float):  # not bool, str, None
                        self._tb.add_scalar(f"train/{key}", value, clean["step"])

    def log_eval(self, step: int, val_loss: float, extra: dict[str, float] | None = None) -> None:
        """Write one validation result (mean cross-entropy, nats/token) for `step`; `extra`
        adds more losses by key (the trainer's `val_loss_<domain>`)."""
        if not self.enabled:
            return
        record = {"step": int(step), "kind": "eval", "val_loss": _to_python(val_loss), **_to_python(extra or {})}
        self._write_line(record)
        if self._tb is not None:
            with self._storage(f"writing TensorBoard events to {self.run_dir / 'tb'}"):
                for key, value in record.items():
                    if key not in ("step", "kind"):
                        self._tb.add_scalar(f"eval/{key}", value, record["step"])

    def close(self) -> None:
        """Close the JSONL file and flush and close the TensorBoard writer (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tb is not None:
            tb, self._tb = self._tb, None
            with self._storage(f"writing TensorBoard events to {self.run_dir / 'tb'}"):
                tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) from a metrics.jsonl (or the run folder holding it),
    each sorted by step, a later line for a step replacing an earlier one (resumed runs).

    A torn last line (crash mid-write) is skipped; a bad line elsewhere is an error.
    """
    path = Path(path)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"no metrics file at {path}: is this a scaletrain run folder?")
    lines = path.read_text(encoding="utf-8").splitlines()
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue
            raise CheckpointError(f"{path}:{i + 1} is not valid JSON ({e}); "
                                  "delete or repair that line") from e
        kind = record.get("kind", "train")
        by_kind.setdefault(kind, {})[int(record["step"])] = record
    return ([by_kind["train"][s] for s in sorted(by_kind["train"])],
            [by_kind["eval"][s] for s in sorted(by_kind["eval"])])


def plot_loss(run_dir: str | Path) -> Path:
    """Write `run_dir/loss.png` (train loss line, val loss points) and return its path.

    matplotlib's object API renders with Agg: no pyplot, display or global backend switch.
    Written to a temporary name and renamed, so no plot is ever left half-written."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    points = [(r["step"], r["loss"]) for r in train if finite(r.get("loss"))]
    if points:
        ax.plot(*zip(*points), label="train loss", linewidth=1.2)
    vals = [(r["step"], r["val_loss"]) for r in evals if finite(r.get("val_loss"))]
    if vals:
        ax.plot(*zip(*vals), "o", label="val loss", markersize=5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.resolve().name)
    ax.grid(alpha=0.3)
    if points or vals:
        ax.legend()
    out, tmp = run_dir / PLOT_FILE, run_dir / (PLOT_FILE + ".tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    os.replace(tmp, out)
    return out


# (record key, format) of the log line, in order; memory is scaled to GiB before formatting.
_LOG_FIELDS = (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("tokens_per_s", "{:,.0f} tok/s"),
               ("tflops", "{:.2f} TFLOP/s"))


def format_mfu(value: float | None) -> str:
    """`mfu 41.2%` for a fraction, `mfu n/a` when the peak (hence MFU) is unknown."""
    return "mfu n/a" if value is None else f"mfu {100 * float(value):.1f}%"


def format_log_line(record: dict[str, Any], total_steps: int | None = None) -> str:
    """One log line: `step 12/100 | loss 3.4521 | lr 3.00e-04 | 12,345 tok/s | 1.23 TFLOP/s
    | mfu n/a | mem 1.20 GiB`. Missing fields are left out; MFU (percent) reads "n/a" when
    absent or None; `mem_bytes` is shown in GiB; `total_steps` defaults to the record's."""
    total_steps = record.get("total_steps") if total_steps is None else total_steps
    step = f"step {int(record['step'])}" + ("" if total_steps is None else f"/{total_steps}")
    parts = [step] + [fmt.format(float(record[key])) for key, fmt in _LOG_FIELDS
                      if record.get(key) is not None]
    parts.append(format_mfu(record.get("mfu")))
    if record.get("mem_bytes") is not None:
        parts.append(f"mem {float(record['mem_bytes']) / 2**30:.2f} GiB")
    return " | ".join(parts)
