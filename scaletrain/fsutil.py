"""Durable-file helpers shared by the shard writer and the checkpointer."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
