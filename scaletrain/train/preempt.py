"""Stopping on a signal without losing a step: SIGTERM/SIGUSR1 (what Slurm and other schedulers
send on preemption and before a time limit) and Ctrl-C (SIGINT).

While the trainer sets up (data preparation, model build, checkpoint load) a stop signal ends
the process at once: nothing has been trained, so nothing needs saving (`Stopped`, exit 5, or
KeyboardInterrupt for Ctrl-C). Inside `Trainer.fit` the signal only records a request; every
rank then finishes the step in flight, the ranks agree on the stop inside the all-reduce the
step already does for its loss (the request rides along as one more element, so stopping costs
no collective of its own, and ranks that were not signalled stop at the same step), a
checkpoint of that step is committed with the usual atomic commit, and `Stopped` ends the
process: exit 5 (`EXIT_PREEMPTED`) for SIGTERM/SIGUSR1, 130 (`EXIT_INTERRUPTED`) for Ctrl-C.
Further signals during the save are ignored. The launcher's job is to deliver the signal to
the workers (torchrun forwards SIGTERM and kills them ~30 s later; the Slurm script forwards
SIGUSR1), with enough time for one step and one save.
"""

from __future__ import annotations

import shlex
import signal
import threading
from pathlib import Path

from scaletrain.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, Stopped
from scaletrain.train.runinfo import typed_argv

EXIT_CODES = {signal.SIGTERM: EXIT_PREEMPTED, signal.SIGUSR1: EXIT_PREEMPTED, signal.SIGINT: EXIT_INTERRUPTED}


class StopSignals:
    """Handlers for SIGTERM/SIGUSR1 (installed at construction) and, once `defer()` was called,
    SIGINT; `restore()` puts the previous handlers back. Only the main thread can handle
    signals: constructed elsewhere, it installs nothing and never requests a stop."""

    def __init__(self):
        self.signum: int | None = None  # the first stop signal received
        self.agreed = False  # some rank was signalled: set by the trainer from the step's all-reduce
        self._deferred = False
        self._previous: dict[int, object] = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._install(sig)

    def _install(self, sig: int) -> None:
        if threading.current_thread() is threading.main_thread() and sig not in self._previous:
            self._previous[sig] = signal.signal(sig, self._handle)

    def defer(self) -> None:
        """From now on a stop signal (Ctrl-C included) is only recorded (`requested`)."""
        self._deferred = True
        self._install(signal.SIGINT)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        if not self._deferred:
            self.restore()
            raise Stopped(f"stopped by {signal.Signals(signum).name} before training started; no step had run, "
                          "so there was nothing to save.", EXIT_CODES[signum])

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.signum is not None

    def stopped(self, step: int, folder: Path) -> Stopped:
        """The exception ending the process after the checkpoint of `step` was committed in `folder`."""
        code = EXIT_CODES[self.signum] if self.signum is not None else EXIT_PREEMPTED  # signalled elsewhere
        verb = "interrupted" if code == EXIT_INTERRUPTED else "preempted"
        return Stopped(f"{verb} at step {step}, saved {folder}; resume with: {resume_command()}", code)

    def restore(self) -> None:
        """Put back the handlers that were installed before (idempotent). After a stop, SIGTERM
        and SIGUSR1 stay ignored while the process exits: torchrun SIGTERMs the other workers as
        soon as the first one exits, which must not turn their exit 5 into a kill."""
        for sig, previous in self._previous.items():
            stopping = self.agreed and sig != signal.SIGINT and previous == signal.SIG_DFL
            signal.signal(sig, signal.SIG_IGN if stopping else previous)
        self._previous.clear()


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that continues this run: the one the user typed (`argv`, default
    runinfo.typed_argv: under torchrun the launcher's), with `--resume auto` and without
    `--overwrite` (which would discard the checkpoint just saved)."""
    if argv is None:
        argv = typed_argv()
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif arg != "--overwrite" and not arg.startswith("--resume="):
            out.append(arg)
    return shlex.join([*out, "--resume", "auto"])
