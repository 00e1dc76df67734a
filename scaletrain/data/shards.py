"""Pre-tokenized, memory-mapped token files with a manifest and checksums.

A shard folder holds one flat token stream per split, ``train.bin`` and ``val.bin``: the
documents in corpus order, each followed by the eos token (no bos is inserted: eos already
marks every boundary and the model learns "after eos comes a new document"). Tokens are
little-endian uint16 when vocab_size <= 65536, else uint32. ``manifest.json`` records the
format version, tokenizer and source fingerprints, and per file: tokens, bytes, dtype, sha256,
documents.

The folder name is derived from (source fingerprint, tokenizer fingerprint), so a new corpus or
tokenizer gets new shards. A folder is built under a temporary name and renamed into place
complete (fsync'ed), so readers see all of it or none; two processes building the same folder
at once both produce identical content and the loser discards its copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Sequence

import numpy as np

from scaletrain.data.corpus import Doc
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.errors import DataError
from scaletrain.fsutil import fsync_dir, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val")
FULL_VERIFY_MAX_BYTES = 256 * 2**20  # "auto" verification hashes files below this size
_CHUNK_CHARS = 8_000_000  # characters tokenized per encode_batch call (bounds memory to ~100 MB)
_REBUILD_HINT = "Delete that folder and rerun `scaletrain data prepare` (or the training command) to rebuild it."
_DTYPES = ("uint16", "uint32")  # what token_dtype() writes


class ShardError(DataError):
    """A shard folder that cannot be used as it is; `problem` says why without the rebuild hint
    (prepare_data rebuilds a cached folder itself and reports the problem)."""

    def __init__(self, problem: str):
        super().__init__(f"{problem} {_REBUILD_HINT}")
        self.problem = problem


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest on-disk dtype holding ids < vocab_size: uint16 up to 65536, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_dir_for(cache_dir: str, source_fingerprint: str, tokenizer_fingerprint: str) -> str:
    """``cache_dir/shards/<16 hex>``: the folder of one (corpus, tokenizer) pair."""
    key = hashlib.sha256(f"{FORMAT_VERSION}:{source_fingerprint}:{tokenizer_fingerprint}".encode()).hexdigest()
    return os.path.join(cache_dir, "shards", key[:16])


def read_manifest(shard_dir: str) -> dict | None:
    """The parsed ``manifest.json`` of ``shard_dir``, or None when absent or unreadable."""
    try:
        with open(os.path.join(shard_dir, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def find_shards(shard_dir: str, source_fingerprint: str, tokenizer_fingerprint: str) -> dict | None:
    """The manifest when ``shard_dir`` is complete for these fingerprints (every file present at
    its recorded size); None when it must be built. Checksums are left to ``open_split``."""
    m = read_manifest(shard_dir)
    if (m is None or m.get("format_version") != FORMAT_VERSION
            or m.get("source_fingerprint") != source_fingerprint
            or m.get("tokenizer_fingerprint") != tokenizer_fingerprint):
        return None
    for split in SPLITS:
        entry = m.get("files", {}).get(split)
        path = os.path.join(shard_dir, entry["file"]) if entry else None
        if path is None or not os.path.isfile(path) or os.path.getsize(path) != entry["bytes"]:
            return None
    return m


def _chunks(docs: Sequence[Doc], max_chars: int):
    start, chars = 0, 0
    for i, doc in enumerate(docs):
        chars += len(doc.text)
        if chars >= max_chars:
            yield docs[start : i + 1]
            start, chars = i + 1, 0
    if start < len(docs):
        yield docs[start:]


def _write_split(path: str, docs: Sequence[Doc], tokenizer: Tokenizer, dtype: np.dtype,
                 note: Callable[[str], None] | None = None, every_s: float = 10.0) -> dict:
    """Tokenize ``docs`` into ``path`` (each doc then eos); returns its manifest entry.
    ``note`` is told how far it got at most every ``every_s`` seconds."""
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    hasher, tokens, done = hashlib.sha256(), 0, 0
    last = time.perf_counter()
    with open(path, "wb") as f:
        for chunk in _chunks(docs, _CHUNK_CHARS):
            parts = []
            for ids in tokenizer.encode_batch([d.text for d in chunk]):
                parts += [ids, eos]
            arr = np.concatenate(parts, dtype=dtype, casting="same_kind")  # [tokens of the chunk]
            f.write(arr.data)
            hasher.update(arr.data)
            tokens += arr.size
            done += len(chunk)
            if note and done < len(docs) and time.perf_counter() - last >= every_s:
                split = os.path.splitext(os.path.basename(path))[0]
                note(f"tokenized {done:,} of {len(docs):,} {split} documents ({tokens:,} tokens) ...")
                last = time.perf_counter()
        f.flush()
        os.fsync(f.fileno())
    return {"file": os.path.basename(path), "tokens": tokens, "bytes": tokens * dtype.itemsize,
            "dtype": dtype.name, "sha256": hasher.hexdigest(), "documents": len(docs)}


def build_shards(shard_dir: str, train_docs: Sequence[Doc], val_docs: Sequence[Doc], tokenizer: Tokenizer,
                 source_fingerprint: str, stats: dict | None = None, force: bool = False,
                 note: Callable[[str], None] | None = None) -> dict:
    """Tokenize the splits into ``shard_dir`` and return its manifest.

    A no-op (nothing read or written) when ``shard_dir`` already holds shards of the same
    source and tokenizer fingerprints, unless ``force``. ``stats`` (corpus counts) is stored
    in the manifest so later loads can report it without reading the corpus. ``note`` (a
    progress callback) hears how far tokenizing got every few seconds.
    """
    tok_fp = tokenizer.fingerprint()
    if not force:
        existing = find_shards(shard_dir, source_fingerprint, tok_fp)
        if existing is not None:
            return existing
    t0 = time.perf_counter()
    parent = os.path.dirname(os.path.abspath(shard_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(shard_dir)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        files = {split: _write_split(os.path.join(tmp, f"{split}.bin"), docs, tokenizer, dtype, note)
                 for split, docs in (("train", train_docs), ("val", val_docs))}
        manifest = {
            "format_version": FORMAT_VERSION,
            "source_fingerprint": source_fingerprint,
            "tokenizer_fingerprint": tok_fp,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "layout": "each document followed by eos_id; no bos inserted",
            "dtype": dtype.name,
            "files": files,
            "total_tokens": sum(f["tokens"] for f in files.values()),
            "stats": stats or {},
        }
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if not force and find_shards(shard_dir, source_fingerprint, tok_fp) is not None:
            return read_manifest(shard_dir)  # another process finished the same build first
        _install(tmp, shard_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    fsync_dir(parent)
    log.info("tokenized %d train + %d val tokens into %s in %.1f s", files["train"]["tokens"],
             files["val"]["tokens"], shard_dir, time.perf_counter() - t0)
    return manifest


def _install(tmp: str, shard_dir: str) -> None:
    """Rename the finished ``tmp`` folder to ``shard_dir``, moving a stale one out of the way.
    Readers that already mapped the old files keep reading them (POSIX unlink semantics)."""
    if os.path.exists(shard_dir):
        trash = f"{tmp}-old"
        try:
            os.rename(shard_dir, trash)
        except FileNotFoundError:  # another process just moved it
            pass
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, shard_dir)
    except OSError:
        # Another builder renamed its identical folder into place between our two renames.
        if read_manifest(shard_dir) is None:
            raise


def open_split(shard_dir: str, split: str, verify: str = "auto") -> np.ndarray:
    """Memory-map the token stream of ``split`` ("train" | "val"), read-only, shape [tokens].

    ``verify``: "size" checks the byte size against the manifest; "full" also checks the
    sha256 (~1 s per GB); "auto" = full below 256 MB, else size. A missing, truncated or
    corrupt file raises DataError naming it and saying how to rebuild.
    """
    if verify not in ("auto", "size", "full"):
        raise ValueError(f"verify must be 'auto', 'size' or 'full', got {verify!r}")
    manifest = read_manifest(shard_dir)
    if manifest is None:
        raise ShardError(f"{shard_dir} has no readable manifest.json (unfinished or not a shard folder).")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{shard_dir} uses shard format {manifest.get('format_version')}, this scaletrain "
                         f"reads {FORMAT_VERSION}.")
    entry = manifest.get("files", {}).get(split)
    if entry is None:
        have = ", ".join(manifest.get("files", {}))
        raise ShardError(f"{shard_dir}/manifest.json has no split {split!r} (has {have}).")
    if entry.get("file") != f"{split}.bin":  # never a path out of the folder
        raise ShardError(f"{shard_dir}/manifest.json names file {entry.get('file')!r} for {split!r}, not {split}.bin.")
    path = os.path.join(shard_dir, entry["file"])
    if not os.path.isfile(path):
        raise ShardError(f"shard file {path} is missing.")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise ShardError(f"shard file {path} is {size} bytes but its manifest says {entry['bytes']} "
                         "(truncated or overwritten).")
    dtype = _check_entry(shard_dir, split, entry, manifest.get("vocab_size"), size)
    if verify == "full" or (verify == "auto" and size < FULL_VERIFY_MAX_BYTES):
        if sha256_file(path) != entry["sha256"]:
            raise ShardError(f"shard file {path} fails its sha256 checksum (corrupt).")
    if entry["tokens"] == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(entry["tokens"],))


def _check_entry(shard_dir: str, split: str, entry: dict, vocab_size: int | None, size: int) -> np.dtype:
    """The little-endian dtype of a manifest entry, once its fields agree with each other and
    with the file: an edited dtype or token count would map garbage or a prefix of the stream."""
    where = f"{shard_dir}/manifest.json ({split})"
    name, tokens = entry.get("dtype"), entry.get("tokens")
    if name not in _DTYPES or not isinstance(tokens, int) or tokens < 0:
        raise ShardError(f"{where} records dtype {name!r} and {tokens!r} tokens; expected one of {_DTYPES} "
                         "and a token count (edited manifest).")
    dtype = np.dtype(name).newbyteorder("<")
    if tokens * dtype.itemsize != size:
        raise ShardError(f"{where} says {tokens} tokens x {dtype.itemsize} bytes ({name}) = "
                         f"{tokens * dtype.itemsize} bytes, but the file holds {size} (edited manifest).")
    if vocab_size is not None and name != token_dtype(vocab_size).name:
        raise ShardError(f"{where} records dtype {name}, but a vocabulary of {vocab_size} ids is stored as "
                         f"{token_dtype(vocab_size).name} (edited manifest).")
    return dtype
