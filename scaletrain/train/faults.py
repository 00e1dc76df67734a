"""Surviving faults during training: non-finite numerics, hangs, and injected faults for tests.

Numerics (train.nan_policy): after backward the trainer already computes the global gradient
norm (over every shard and stage) and needs the loss for logging, so one host sync per step
checks both for NaN/Inf *before* the optimizer step:
  - "skip": drop the update (gradients zeroed, optimizer and weights untouched), count it;
  - "rollback": reload the newest complete checkpoint and run again. The first time a batch
    fails it is retried (a transient fault then costs only the lost steps and the run stays
    identical to a clean one); if the same batch fails again it is skipped when the loader
    reaches it (bad data). The skipped positions are part of the checkpointed state;
  - "abort": stop with a report (step, sample ids of this rank's batch, first non-finite
    tensor) and exit code 3.

Hangs (train.hang_timeout_s): a watchdog thread per rank expects a heartbeat at least every
timeout; otherwise it writes every thread's Python stack and the last phase this rank entered
(the last collective it started, the step) to stderr and to RUN_DIR/hang-rank<r>.txt, then
exits the process with code 4, so torchrun (--max-restarts) can restart the job, which resumes
from the newest checkpoint. Peers blocked in a collective with the stuck rank time out too.

Fault injection (tests and scripts/chaos.py), from the environment so configs stay clean:
  SCALETRAIN_FAULT_NAN_STEPS="5,9"   gradients of rank 0 become NaN at these steps (1-based),
                                     once per process
  SCALETRAIN_FAULT_NAN_SAMPLES="17"  rank 0's gradients become NaN whenever sample 17 is in its
                                     batch (persistent, like bad data)
  SCALETRAIN_FAULT_SLEEP="1:3:30[:FILE]"  rank 1 sleeps 30 s inside step 3 (once, if FILE given)
  SCALETRAIN_FAULT_KILL="2:5:FILE"   rank 2 SIGKILLs itself inside step 5 unless FILE exists
                                     (it creates FILE first, so a restarted job runs clean)
  SCALETRAIN_FAULT_SIGNAL="1:3:TERM" rank 1 sends itself SIGTERM (or USR1, INT) inside step 3
                                     (preemption, train/preempt.py)
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from scaletrain.errors import EXIT_HANG, NumericsError
from scaletrain.parallel import unwrapped_name

Position = tuple[int, int]  # (epoch, global position) of a batch in the loader's order


def first_nonfinite(parts: list[nn.Module]) -> str | None:
    """Name of the first parameter whose (local) gradient holds a NaN or Inf, or None."""
    for part in parts:
        for name, p in part.named_parameters():
            grad = p.grad
            if grad is None:
                continue
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            if not bool(torch.isfinite(local).all()):
                return unwrapped_name(name)
    return None


class NonFiniteSteps:
    """train.nan_policy's state: how many steps were non-finite, which batches a rollback skips
    (part of the checkpointed state), which failed once (retried first), and the rollbacks done.
    The trainer has already dropped the bad update (gradients zeroed) when it calls these."""

    def __init__(self, policy: str, rank: int):
        self.policy, self.rank = policy, rank
        self.count = 0  # non-finite steps met, under every policy
        self.skip_positions: set[Position] = set()
        self.failed_positions: set[Position] = set()
        self.rollbacks: list[dict] = []  # {"step", "to", "skipped"} per rollback

    def skips(self, position: Position) -> bool:
        """Whether the loader's batch at `position` is passed over (it failed twice)."""
        return position in self.skip_positions

    def state_dict(self) -> list[list[int]]:
        return sorted(list(p) for p in self.skip_positions)

    def load_state_dict(self, positions: list[list[int]]) -> None:
        self.skip_positions = {tuple(p) for p in positions}

    def report(self, step: int, loss: float, grad_norm: float, parts: list[nn.Module], sample_ids: list[int]) -> str:
        """What went wrong at `step` (1-based): the values, this rank's sample ids, the first
        non-finite tensor on this rank."""
        bad_loss = not math.isfinite(loss)
        culprit = first_nonfinite(parts) or ("the loss" if bad_loss else "a gradient on another rank")
        return (f"non-finite {'loss' if bad_loss else 'gradient norm'} at step {step} "
                f"(loss {loss}, grad norm {grad_norm}); rank {self.rank}'s batch had sample ids "
                f"{sample_ids[:16]}{' ...' if len(sample_ids) > 16 else ''}; first non-finite tensor on this rank: "
                f"{culprit}")

    def rollback(self, step: int, positions: list[Position], latest: Path | None, report: str,
                 reload: Callable[[Path], int]) -> None:
        """Policy "rollback" for `step`, whose batches were at `positions`: `reload(latest)` loads
        the newest checkpoint and returns its step. The first failure of these batches retries
        them (a transient fault); a repeat skips them. NumericsError when there is no
        checkpoint, or when the step failed 4 times (the weights, not the data, are bad)."""
        if sum(r["step"] == step for r in self.rollbacks) >= 4:
            raise NumericsError(report + f". Step {step} failed 4 times, also after its batches were skipped: "
                                "the weights or the optimizer state are the problem, not the data.")
        if latest is None:
            raise NumericsError(report + ". train.nan_policy = 'rollback' but there is no checkpoint yet; "
                                "set checkpoint.interval, or use 'skip'.")
        repeat = [p for p in positions if p in self.failed_positions]
        self.skip_positions.update(repeat)
        self.failed_positions.update(positions)
        skip = set(self.skip_positions)
        to = reload(latest)  # restores the checkpoint's skipped positions; the new ones are kept
        self.skip_positions |= skip
        self.rollbacks.append({"step": step, "to": to, "skipped": [list(p) for p in repeat]})

    @staticmethod
    def abort(report: str, step: int, saved: Path | None, save_error: Exception | None) -> NumericsError:
        """The error of policy "abort", saying where the last good state (after `step`) is."""
        if save_error is not None:
            kept = f" Saving the last good state (after step {step}) failed: {save_error}"
        elif saved is not None:
            kept = f" The last good state (after step {step}) is in {saved}."
        else:
            kept = " No step had finished, so there was no state to save."
        return NumericsError(report + " (train.nan_policy = 'abort'; 'skip' drops such steps, 'rollback' "
                             "reloads the last checkpoint and skips the batch)." + kept)


def host_values(*values: torch.Tensor) -> tuple[float, ...]:
    """These scalar tensors as Python floats, in one device-to-host copy (one host sync)."""
    return tuple(torch.stack([v.detach().float().reshape(()) for v in values]).cpu().tolist())


def _parse_steps(text: str) -> set[int]:
    return {int(s) for s in text.replace(" ", "").split(",") if s}


class Injector:
    """Faults requested through SCALETRAIN_FAULT_* (see the module docstring)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.nan_steps = _parse_steps(os.environ.get("SCALETRAIN_FAULT_NAN_STEPS", ""))
        self.nan_samples = _parse_steps(os.environ.get("SCALETRAIN_FAULT_NAN_SAMPLES", ""))
        self.sleep: tuple[int, int, float, Path | None] | None = None
        spec = os.environ.get("SCALETRAIN_FAULT_SLEEP", "")
        if spec:
            r, step, seconds, *marker = spec.split(":", 3)
            self.sleep = (int(r), int(step), float(seconds), Path(marker[0]) if marker else None)
        self.kill: tuple[int, int, Path] | None = None
        spec = os.environ.get("SCALETRAIN_FAULT_KILL", "")
        if spec:
            r, step, marker = spec.split(":", 2)
            self.kill = (int(r), int(step), Path(marker))
        self.signal: tuple[int, int, signal.Signals] | None = None
        spec = os.environ.get("SCALETRAIN_FAULT_SIGNAL", "")
        if spec:
            r, step, name = spec.split(":", 2)
            self.signal = (int(r), int(step), signal.Signals[f"SIG{name}"])

    def after_backward(self, step: int, parts: list[nn.Module], sample_ids: list[int]) -> None:
        """Apply the faults planned for optimizer step `step` (1-based) on this rank, whose
        batch held `sample_ids`."""
        bad_data = self.rank == 0 and bool(self.nan_samples.intersection(sample_ids))
        if (step in self.nan_steps and self.rank == 0) or bad_data:
            self.nan_steps.discard(step)  # a step fault happens once: a rolled-back step reruns clean
            grad = next((p.grad for part in parts for p in part.parameters() if p.grad is not None), None)
            if grad is not None:  # the first gradient is enough; the other faults of the step still fire
                (grad.to_local() if hasattr(grad, "to_local") else grad).fill_(float("nan"))
        if self.sleep and self.sleep[0] == self.rank and self.sleep[1] == step:
            marker = self.sleep[3]
            if marker is None or not marker.exists():
                if marker is not None:
                    marker.write_text(f"rank {self.rank} hung at step {step}\n")
                time.sleep(self.sleep[2])
        if self.kill and self.kill[0] == self.rank and self.kill[1] == step and not self.kill[2].exists():
            self.kill[2].write_text(f"rank {self.rank} killed itself at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        if self.signal and self.signal[:2] == (self.rank, step):
            os.kill(os.getpid(), self.signal[2])


class Watchdog:
    """Per-rank hang detector; `beat(phase)` marks progress and names what comes next."""

    def __init__(self, timeout_s: float, rank: int, run_dir: Path):
        self.timeout_s, self.rank, self.run_dir = timeout_s, rank, Path(run_dir)
        self.last_beat = time.monotonic()
        self.phase = "start"
        self.step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="scaletrain-watchdog", daemon=True)
            self._thread.start()

    def beat(self, phase: str, step: int | None = None) -> None:
        self.last_beat = time.monotonic()
        self.phase = phase
        if step is not None:
            self.step = step

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last_beat
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        header = (f"[rank {self.rank}] watchdog: no progress for {idle:.0f} s (train.hang_timeout_s = "
                  f"{self.timeout_s:g}) in step {self.step}; last phase / collective entered: {self.phase}. "
                  f"Python stacks of every thread follow; exiting with code {EXIT_HANG} so the launcher "
                  "can restart from the newest checkpoint.\n")
        sys.stderr.write(header)
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:
            path = self.run_dir / f"hang-rank{self.rank}.txt"
            if self.run_dir.is_dir():
                with path.open("w") as fh:
                    fh.write(header)
                    fh.flush()
                    faulthandler.dump_traceback(file=fh, all_threads=True)
        except OSError:
            pass
        sys.stderr.flush()
        os._exit(EXIT_HANG)
