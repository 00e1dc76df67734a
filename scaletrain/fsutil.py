"""Durable-file helpers shared by the shard writer, the checkpointer and the run files."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from scaletrain.errors import StorageError

# errno -> what it means for the user, and what to do about it.
_CAUSES = {
    errno.ENOSPC: ("the disk is full (no space left on the device)", "free space there"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within the quota or raise it"),
    errno.EFBIG: ("the file exceeds the file-size limit (ulimit -f, or the file system's largest file)",
                  "raise the limit or write elsewhere"),
    errno.EACCES: ("permission denied", "give this user access to it or choose another folder"),
    errno.EPERM: ("the operation is not permitted", "give this user access to it or choose another folder"),
    errno.EROFS: ("the file system is read-only", "write to a writable file system"),
}
STORAGE_ERRNOS = frozenset(_CAUSES)


def storage_cause(exc: OSError) -> str:
    """What `exc` means and what to do, e.g. "the disk is full (...) [ENOSPC]; free space there"."""
    cause, fix = _CAUSES.get(exc.errno, (exc.strerror or str(exc), "fix the storage"))
    code = errno.errorcode.get(exc.errno, "")
    return f"{cause}{f' [{code}]' if code else ''}; {fix}"


def storage_error(exc: OSError, doing: str, then: str = "") -> StorageError:
    """The user error for `exc` raised while `doing` (e.g. "writing RUN/metrics.jsonl"), worded
    after its cause (disk full, quota, permission, read-only, ...); `then` is appended (e.g.
    how to continue the run)."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in doing else ""
    return StorageError(f"{doing} failed{where}: {storage_cause(exc)}{f', then {then}' if then else ''}.")


def sha256_file(path: str | Path, chunk: int = 16 * 2**20) -> str:
    """Hex sha256 of a file's bytes, read in `chunk`-byte blocks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            hasher.update(block)
    return hasher.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """fsync a folder, so renames and new entries in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
