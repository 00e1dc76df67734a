"""One writer per run folder: an exclusive lock on RUN/.lock.

Rank 0 of a training run holds a POSIX record lock (fcntl, through `fcntl.lockf`) on
`RUN/.lock` from before it reads or writes anything of the folder until training ends; the file
records the holder's pid, host and start time. A second writer is refused at once (a
CheckpointError naming the holder), before it writes a byte. The kernel drops the lock when the
holding process dies, however it dies (SIGKILL, OOM killer, the hang watchdog), so there is no
stale lock to clean up; the file stays, naming the last holder. POSIX locks also work on NFS
(through the lock manager), unlike BSD `flock` on some older NFS clients.

Readers (`generate`, `export`, `plan check`) take no lock: a committed checkpoint never
changes, so reading next to a running trainer is safe.

A POSIX lock belongs to the process, not to the file descriptor: a process re-locking a file it
holds succeeds, and closing any descriptor of the file drops the lock. So nothing else in a
trainer may open RUN/.lock, and two trainers in one process (tests) do not exclude each other.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from scaletrain.errors import CheckpointError
from scaletrain.fsutil import storage_error

LOCK_FILE = ".lock"


def _holder(fd: int) -> str:
    """"pid 123 on host h, since 12:00:00" from the lock file (what its holder wrote)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


class RunLock:
    """The exclusive writer lock of one run folder; `release()` (or process exit) drops it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, new: bool = False) -> RunLock:
        """Take the lock (creating the folder and the lock file if needed) or raise
        CheckpointError naming the process that holds it. `new`: the caller found no folder
        (or an empty one) without the lock; refuse if another run has written into it since."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise storage_error(e, f"creating the run-folder lock {self.path}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise storage_error(e, f"locking {self.path}") from None
            raise CheckpointError(
                f"run folder {self.run_dir} is in use by another training run ({holder}): one run folder takes "
                "one writer. Wait for that run to end (or stop it), or choose another --run-dir.") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        except OSError as e:
            os.close(fd)
            raise storage_error(e, f"writing {self.path}") from None
        self._fd = fd
        if new and any(p.name != LOCK_FILE for p in self.run_dir.iterdir()):
            self.release()
            raise CheckpointError(f"run folder {self.run_dir} was written by another run while this one was starting; "
                                  "pass --resume auto to continue it, or choose another --run-dir.")
        return self

    def release(self) -> None:
        """Drop the lock (closing the descriptor drops it); idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
