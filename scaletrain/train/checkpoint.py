"""DCP checkpoints with atomic commit, a completion marker, retention and resume lookup.

Layout: `RUN/checkpoints/step-<8 digits>/` holds one torch.distributed.checkpoint (DCP) save
of {"model", "optim", "train"} plus `COMPLETE`, a JSON marker written last with the step, the
size and sha256 of every file, and metadata (model config, tokenizer fingerprint). A save is
written into `.tmp-step-<n>` and renamed into place only after every rank finished and the
marker is on disk, so a folder named `step-*` with a marker is always whole; a crash mid-save
leaves only a `.tmp-*` folder, removed by the next save.

With `checkpoint.async_save` the state is copied to CPU memory inside `save()` (so training may
mutate the live tensors as soon as it returns) and written by a background thread with
`torch.distributed.checkpoint.async_save`; the same commit (fsync, marker, rename, retention)
runs on that thread once the write finished. At most one save is in flight: `save()` first
waits for the previous one, and `wait()` blocks until it is committed. The files are the same
as a synchronous save's. A save that fails (disk full, I/O error) never touches the committed
checkpoints: it raises CheckpointError naming the folder and the OS error and removes its
`.tmp-*` folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions

from scaletrain.config.schema import CheckpointConfig
from scaletrain.errors import CheckpointError
from scaletrain.fsutil import STORAGE_ERRNOS, fsync_dir, sha256_file, storage_cause, storage_error
from scaletrain.parallel.dims import barrier
from scaletrain.train.safe_dcp import SafePlanner, SafeReader

MARKER = "COMPLETE"
_PREFIX = "step-"


def _single_process() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _root_cause(exc: BaseException) -> BaseException:
    """The OSError behind `exc` if there is one (DCP wraps each rank's failure in a
    CheckpointException, which derives from BaseException), else `exc` itself."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        if isinstance(e, CheckpointException):
            todo.extend(err for err, _trace in e.failures.values())
        todo.extend((e.__cause__, e.__context__))
    return exc


def _scaletrain_error(exc: BaseException) -> CheckpointError | None:
    """The CheckpointError a rank raised inside DCP (which wraps it in CheckpointException)."""
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, CheckpointException):
        return next((err for err, _trace in exc.failures.values() if isinstance(err, CheckpointError)), None)
    return None


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


# Optimizer state keyed per parameter name ("state.layers.0.attention.wq.weight.exp_avg"), so it
# reshards between layouts whose ranks hold different subsets of parameters.
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _damaged(path: Path, checksums: bool = False) -> bool:
    """Whether the committed checkpoint at `path` fails verification (missing marker, files
    missing or of the wrong size, and a wrong sha256 when `checksums`)."""
    try:
        verify_checkpoint(path, checksums)
        return False
    except CheckpointError:
        return True


def read_marker(ckpt: Path) -> dict[str, Any]:
    """The marker JSON of a checkpoint folder; CheckpointError if missing or unreadable."""
    marker = Path(ckpt) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no {MARKER} marker); it was not fully written.")
    try:
        return json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint marker {marker} is corrupt.") from None


def verify_checkpoint(ckpt: Path, checksums: bool = False) -> dict[str, Any]:
    """Check every file listed in the marker exists with its recorded size (and sha256 when
    `checksums`); returns the marker. Raises CheckpointError naming the bad file."""
    meta = read_marker(ckpt)
    for name, info in meta.get("files", {}).items():
        f = Path(ckpt) / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: file {name} is missing.")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint {ckpt}: file {name} has {f.stat().st_size} bytes, expected {info['bytes']} (truncated?)."
            )
        if checksums and sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt}: file {name} fails its sha256 checksum (corrupt).")
    return meta


class Checkpointer:
    """Saves and finds checkpoints of one run. Collective: every rank calls save/load."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, rank: int = 0):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.rank = rank
        self._pending: Future | None = None  # committed folder of the in-flight async save
        self._async_group: dist.ProcessGroup | None = None

    def check_writable(self) -> None:
        """Rank 0, before training: create `checkpoints/` and write and delete a probe file in
        it, so a read-only or unwritable folder fails now, not at the first save."""
        probe = self.root / f".write-test-{os.getpid()}"
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointError(f"{self.root} is a file, not a folder; move it away so checkpoints can be saved.")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"scaletrain write test\n")
            probe.unlink()
        except OSError as e:
            raise storage_error(e, f"checking that {self.root} takes checkpoints, before training,") from None

    def set_aside_newer(self, step: int) -> None:
        """Rank 0, after `--resume auto` chose the checkpoint of `step`: every complete one newer
        than it failed verification (`latest()` skipped it). Rename them `damaged-step-<n>-<time>`
        (kept for inspection), so the folder holds only checkpoints that load even when the run
        never saves those steps again (a preemption checkpoint between two interval steps)."""
        for s, path in self.complete_steps():
            if s > step:
                aside = path.with_name(f"damaged-{path.name}-{int(time.time())}")
                path.replace(aside)
                warnings.warn(f"moved damaged checkpoint {path} to {aside} (resuming from step {step})", stacklevel=2)

    def complete_steps(self) -> list[tuple[int, Path]]:
        """(step, folder) of checkpoints holding the completion marker, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith(_PREFIX) and (p / MARKER).is_file():
                try:
                    out.append((int(p.name[len(_PREFIX):]), p))
                except ValueError:
                    continue
        return sorted(out)

    def latest(self) -> Path | None:
        """Newest checkpoint that verifies (file sizes, and sha256 when checkpoint.verify =
        "checksum"); a damaged one is skipped with a warning naming the bad file, and the
        previous one is used."""
        for _, path in reversed(self.complete_steps()):
            try:
                verify_checkpoint(path, checksums=self.cfg.verify == "checksum")
                return path
            except CheckpointError as e:
                warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
        return None

    def has_good(self, step: int) -> bool:
        """Whether a checkpoint of `step` is committed and verifies as `latest()` checks it. A
        damaged one does not count: saving `step` again moves it aside and replaces it."""
        path = self.root / step_dir_name(step)
        return path.is_dir() and not _damaged(path, checksums=self.cfg.verify == "checksum")

    def save(self, step: int, state: dict[str, Any], metadata: dict[str, Any]) -> Path:
        """Write `state` (model/optim/train state dicts) for optimizer step `step`; returns the
        folder it is committed to. `metadata` (JSON-able) is stored in the marker.

        Synchronous (default): returns once the checkpoint is committed. With
        `cfg.async_save`: returns once the state is staged in CPU memory; the folder appears
        when the background write and commit finish (see `wait()`). A pending save is waited
        for first, so its failure is raised here. CheckpointError if the step exists or the
        save fails; the committed checkpoints are untouched either way."""
        self.wait()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            if final.exists() and _damaged(final, checksums=self.cfg.verify == "checksum"):
                # Resuming skipped this damaged checkpoint; move it aside (kept for inspection)
                # so the re-run step can commit a good one under its name.
                aside = final.with_name(f"damaged-{final.name}-{int(time.time())}")
                final.replace(aside)
                warnings.warn(f"moved damaged checkpoint {final} to {aside} before saving step {step} again",
                              stacklevel=2)
            if final.exists():
                raise CheckpointError(f"checkpoint {final} already exists; refusing to overwrite it.")
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        barrier()
        t0 = time.perf_counter()
        if not self.cfg.async_save:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
                    dcp.save(state, checkpoint_id=str(tmp))
                barrier()  # every rank's shard is on disk before the commit
                if self.rank == 0:
                    self._commit(step, tmp, final, metadata, t0)
            except (Exception, CheckpointException) as e:
                raise self._failed(step, tmp, e) from None
            barrier()
            return final

        # async_save stages (deep-copies to CPU) before it returns; its writer thread runs
        # collectives, so in a process group it gets a gloo group of its own: a CPU backend is
        # required, and sharing the default group with the training thread could interleave
        # the two threads' collectives.
        if self._async_group is None and not _single_process():
            self._async_group = dist.new_group(backend="gloo")
        if _single_process():
            # DCP warns on every single-process save; the write runs on another thread, where
            # a catch_warnings() block of this one cannot reach, so the filter is global.
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        committed: Future = Future()

        def commit_when_written(write: Future) -> None:  # runs on DCP's writer thread
            try:
                write.result()  # returns on rank 0 only after every rank's files are written
                if self.rank == 0:
                    self._commit(step, tmp, final, metadata, t0)
                committed.set_result(final)
            except (Exception, CheckpointException) as e:
                committed.set_exception(self._failed(step, tmp, e))

        try:
            write = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group)
        except (Exception, CheckpointException) as e:
            raise self._failed(step, tmp, e) from None
        self._pending = committed
        write.add_done_callback(commit_when_written)
        return final

    def wait(self) -> Path | None:
        """Block until the pending async save (if any) is committed; returns its folder, or
        None when nothing was pending. Collective like `save`. Raises the save's
        CheckpointError if the background write or commit failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            path = pending.result()
        finally:
            barrier()  # no rank reads checkpoints before rank 0 committed (or gave up)
        return path

    def _commit(self, step: int, tmp: Path, final: Path, metadata: dict[str, Any], t0: float) -> None:
        """Rank 0: fsync every file, write the marker (sizes + sha256), rename `tmp` to `final`,
        apply retention."""
        files = {}
        for f in sorted(tmp.iterdir()):
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
            files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        marker = {"step": step, "time": time.time(), "save_seconds": time.perf_counter() - t0,
                  "files": files, **metadata}
        mtmp = tmp / (MARKER + ".tmp")
        with mtmp.open("w") as fh:
            json.dump(marker, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        mtmp.replace(tmp / MARKER)
        fsync_dir(tmp)
        tmp.replace(final)  # the atomic commit
        fsync_dir(self.root)
        self._retain()

    def _failed(self, step: int, tmp: Path, exc: BaseException) -> CheckpointError:
        """The error for a save of `step` into `tmp` that raised `exc`. Rank 0 removes `tmp`
        (DCP reports a failure only after every rank's write phase ended), which frees the
        space a full disk needs for the next attempt."""
        cause = _root_cause(exc)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        committed = self.complete_steps()
        previous = (f"the previous checkpoint {committed[-1][1]} is intact and loadable"
                    if committed else "no earlier checkpoint of this run was touched")
        if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
            why = f": {storage_cause(cause)}."
        elif isinstance(cause, FileNotFoundError):  # the folder vanished under the writers
            why = (": another process removed files of the save; is a second run writing to "
                   f"{self.root.parent}? (one run folder takes one writer: see its .lock file).")
        elif isinstance(cause, OSError):
            why = ": an I/O error of the storage; check the file system."
        else:  # not a file error: a rank died or the process group broke during the save
            why = ": another rank or the process group failed during the save; see the first rank's error."
        return CheckpointError(
            f"saving checkpoint step {step} failed while writing {tmp} ({type(cause).__name__}: {cause}){why} "
            f"Nothing was committed for this step and {previous}; resume with --resume auto."
        )

    def _retain(self) -> None:
        if self.cfg.keep <= 0:
            return
        complete = self.complete_steps()
        for _, path in complete[: max(0, len(complete) - self.cfg.keep)]:
            # rename first so a crash mid-delete never leaves a marker-holding partial folder
            doomed = path.with_name(f".tmp-delete-{path.name}")
            path.replace(doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    @staticmethod
    def load(path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
        """Load checkpoint `path` into `state` in place (DCP reshards to the current layout);
        returns the marker metadata. Runs no code from the files (see train/safe_dcp.py):
        CheckpointError if they hold anything but DCP metadata, tensors and plain values."""
        meta = verify_checkpoint(Path(path))
        reader = SafeReader(path)
        reader.read_metadata()  # refuses a hostile .metadata here, on every rank alike
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            try:
                dcp.load(state, storage_reader=reader, planner=SafePlanner())
            except (RuntimeError, KeyError, ValueError, CheckpointException) as e:
                if (refusal := _scaletrain_error(e)) is not None:  # raised on some rank inside DCP
                    raise refusal from None
                raise CheckpointError(f"checkpoint {path} does not match this model/optimizer: {e}") from None
        return meta


def capture_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """RNG states of this process (CPU, and the current CUDA device when used)."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(states: dict[str, torch.Tensor], device: torch.device) -> None:
    """Set the RNG states `capture_rng` returned (those present)."""
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
