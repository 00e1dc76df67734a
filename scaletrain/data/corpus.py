"""Corpora: where documents come from and how they split into train and validation.

A document is ``Doc(doc_id, text)``. Every source yields its documents in one sorted,
deterministic order (files sorted by relative path, rows in file order), so
``data.max_documents = N`` always means the same first N documents.

Sources (``DataConfig.source``):

- ``builtin``: the standard library of the running interpreter: every ``*.py`` under
  ``sysconfig.get_paths()["stdlib"]`` (``site-packages``, ``dist-packages`` and
  ``__pycache__`` excluded; the ``test`` packages are kept: they are real code and double the
  text), then one document per ``pydoc_data.topics`` entry. ``pydoc_data/topics.py`` itself is
  skipped because its text is those topics. About 30 MB of text, no download.
- ``builtin_code`` / ``builtin_prose``: the same corpus split into two domains
  (``data/pysplit.py``): the code of every file without its docstrings and comments, and the
  prose, i.e. those docstrings and comments plus the pydoc topics. A file keeps its document
  id (``stdlib/<relpath>``) in both, so its code and its prose land in the same split.
- ``text``: a file, or a folder read recursively (hidden entries skipped); every file is a
  document. Binary (a NUL byte) or non-UTF-8 files are skipped and counted.
- ``jsonl``: a ``*.jsonl`` file or folder of them; each non-blank line is a JSON object whose
  ``text_field`` key is one document (id ``relpath:line``).
- ``parquet``: a ``*.parquet`` file or folder of them; ``text_field`` column, one row per doc.
- ``hf_disk``: a dataset saved by ``datasets.save_to_disk``. A DatasetDict uses its ``train``
  split, and ``validation`` (else ``test``) as the validation split when present.

The split is by document id, not by position: sha1(doc_id) maps to [0, 1) and the document goes
to validation when that number is below ``val_fraction``. Adding, removing or reordering other
documents never moves a document between splits. With >= 2 documents both splits get at least
one; a corpus of one document is cut at a line boundary into a train and a val part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, NamedTuple

from scaletrain.config.schema import DataConfig
from scaletrain.errors import DataError

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1
BUILTIN_SOURCES = ("builtin", "builtin_code", "builtin_prose")
_BUILTIN_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class Doc(NamedTuple):
    doc_id: str
    text: str


@dataclass
class CorpusStats:
    """Counts of one corpus load. Characters are Python str lengths (code points)."""

    source: str
    files: int = 0  # files opened
    documents_train: int = 0
    documents_val: int = 0
    skipped_undecodable: int = 0  # binary or non-UTF-8 files (builtin, text) skipped
    skipped_empty: int = 0  # empty / whitespace-only / null documents skipped
    chars_train: int = 0
    chars_val: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Corpus:
    train: list[Doc]
    val: list[Doc]
    stats: CorpusStats
    fingerprint: str  # corpus_fingerprint() of the config it was loaded from


def doc_hash_unit(doc_id: str) -> float:
    """Map a document id to a stable number in [0, 1) (first 8 bytes of its sha1)."""
    return int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64


# --------------------------------------------------------------------------- file listing

def _stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _walk(root: str, suffixes: tuple[str, ...] | None, skip_dirs: set[str], hidden: bool,
          skip_path: str = "") -> list[tuple[str, str]]:
    """Sorted (relpath with '/', abspath) of the files under root with one of the suffixes,
    skipping folders named in skip_dirs, hidden entries unless ``hidden``, and ``skip_path``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and (hidden or not d.startswith("."))
                       and os.path.join(dirpath, d) != skip_path]
        for name in filenames:
            if (not hidden and name.startswith(".")) or (suffixes and not name.endswith(suffixes)):
                continue
            path = os.path.join(dirpath, name)
            out.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    out.sort()
    return out


def _source_files(cfg: DataConfig) -> list[tuple[str, str]]:
    """The (relpath, abspath) files a source reads, in document order. DataError if missing."""
    if cfg.source in BUILTIN_SOURCES:
        return _walk(_stdlib_root(), (".py",), _BUILTIN_EXCLUDED_DIRS, hidden=True)
    if cfg.source not in _READERS:
        raise DataError(f"data.source = {cfg.source!r} is unknown; use one of {', '.join(sorted(_READERS))}.")
    if not cfg.path:
        raise DataError(f"data.source = '{cfg.source}' needs data.path (a file or folder).")
    path = os.path.abspath(os.path.expanduser(cfg.path))
    if not os.path.exists(path):
        raise DataError(f"data.path = {cfg.path!r} does not exist ({path}). Point it at your "
                        f"{cfg.source} file or folder.")
    if os.path.isfile(path):
        return [(os.path.basename(path), path)]
    suffixes = {"text": None, "jsonl": (".jsonl",), "parquet": (".parquet",), "hf_disk": None}[cfg.source]
    # The cache may live inside the corpus folder (data.path = "."): never read our own shards.
    cache = os.path.abspath(os.path.expanduser(cfg.cache_dir)) if cfg.cache_dir else ""
    files = _walk(path, suffixes, set(), hidden=cfg.source == "hf_disk", skip_path=cache)
    if not files:
        kind = "files" if suffixes is None else f"{'/'.join(suffixes)} files"
        raise DataError(f"data.path = {cfg.path!r} holds no {kind}; the {cfg.source} source has "
                        "nothing to read. Check data.path and data.source.")
    return files


def corpus_fingerprint(cfg: DataConfig, files: list[tuple[str, str]] | None = None) -> str:
    """Cheap hash of everything that decides the documents and their split: source, settings
    and (relpath, size in bytes, mtime in ns) of every file read. Costs one stat per file."""
    from scaletrain.data.pysplit import SPLIT_VERSION

    files = _source_files(cfg) if files is None else files
    payload = {
        "version": FINGERPRINT_VERSION,
        "source": cfg.source,
        "text_field": cfg.text_field if cfg.source in ("jsonl", "parquet", "hf_disk") else None,
        "val_fraction": cfg.val_fraction,
        "max_documents": cfg.max_documents,
        "python": sys.version if cfg.source in BUILTIN_SOURCES else None,
        "files": [(rel, st.st_size, st.st_mtime_ns) for rel, st in ((r, os.stat(p)) for r, p in files)],
    }
    if cfg.source in ("builtin_code", "builtin_prose"):  # only here: other fingerprints stay as they were
        payload["split_version"] = SPLIT_VERSION
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- readers
# A reader yields (Doc, fixed_split) in document order; fixed_split is None (split by hash),
# "train" or "val" (the source said so). Empty texts are yielded too and dropped by the caller.

Reader = Callable[[DataConfig, list, CorpusStats], Iterator[tuple[Doc, str | None]]]


def _read_text_file(path: str, stats: CorpusStats) -> str | None:
    stats.files += 1
    with open(path, "rb") as f:
        data = f.read()
    if b"\x00" in data:
        stats.skipped_undecodable += 1
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped_undecodable += 1
        return None


def _read_builtin(cfg, files, stats, part: int | None = None):
    """The stdlib files then the pydoc topics; ``part`` 0 / 1 keeps only the code / prose of
    each file (``split_python_source``), and the topics only as prose."""
    from scaletrain.data.pysplit import split_python_source

    for rel, path in files:
        if rel == "pydoc_data/topics.py":
            continue
        text = _read_text_file(path, stats)
        if text is not None:
            yield Doc(f"stdlib/{rel}", text if part is None else split_python_source(text)[part]), None
    if part == 0:
        return
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Doc(f"pydoc/{name}", topics[name]), None


def _read_text(cfg, files, stats):
    for rel, path in files:
        text = _read_text_file(path, stats)
        if text is not None:
            yield Doc(rel, text), None


def _check_text(value, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: the text field holds a {type(value).__name__}, not a string. "
                        "Set data.text_field to the key/column that holds the document text.")
    return value


def _read_jsonl(cfg, files, stats):
    for rel, path in files:
        stats.files += 1
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DataError(f"{where}: malformed JSON line ({e}). Each line must be one "
                                    "UTF-8 JSON object; fix or delete that line.") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
                if cfg.text_field not in obj:
                    raise DataError(f"{where}: no key {cfg.text_field!r} (keys: {', '.join(map(repr, obj))}). "
                                    "Set data.text_field to the key holding the text.")
                yield Doc(f"{rel}:{lineno}", _check_text(obj[cfg.text_field], where)), None


def _read_parquet(cfg, files, stats):
    import pyarrow.parquet as pq

    for rel, path in files:
        stats.files += 1
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a non-parquet file
            raise DataError(f"{path} is not a readable parquet file ({e}).") from None
        names = pf.schema_arrow.names
        if cfg.text_field not in names:
            raise DataError(f"{path}: no column {cfg.text_field!r} (columns: {', '.join(map(repr, names))}). "
                            "Set data.text_field to the column holding the text.")
        row = 0
        for batch in pf.iter_batches(columns=[cfg.text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                yield Doc(f"{rel}:{row}", _check_text(value, f"{path} row {row}")), None
                row += 1


def _read_hf_disk(cfg, files, stats):
    import datasets

    try:
        ds = datasets.load_from_disk(os.path.abspath(os.path.expanduser(cfg.path)))
    except Exception as e:  # FileNotFoundError or a datasets error for a folder of other files
        raise DataError(f"data.path = {cfg.path!r} is not a dataset saved with datasets.save_to_disk "
                        f"({type(e).__name__}: {e}).") from None
    stats.files += len(files)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{cfg.path}: the DatasetDict has no 'train' split (splits: {', '.join(ds)}). "
                            "Save the training data under the 'train' key.")
        val_name = next((s for s in ("validation", "test") if s in ds), None)
        parts = [("train", ds["train"], "train" if val_name else None)]
        if val_name:
            parts.append((val_name, ds[val_name], "val"))
    else:
        parts = [("train", ds, None)]
    for name, part, fixed in parts:
        if cfg.text_field not in part.column_names:
            raise DataError(f"{cfg.path} split {name!r}: no column {cfg.text_field!r} (columns: "
                            f"{', '.join(map(repr, part.column_names))}). Set data.text_field.")
        row = 0
        for batch in part.select_columns([cfg.text_field]).iter(batch_size=4096):
            for value in batch[cfg.text_field]:
                yield Doc(f"{name}:{row}", _check_text(value, f"{cfg.path} {name} row {row}")), fixed
                row += 1


_READERS: dict[str, Reader] = {
    "builtin": _read_builtin, "builtin_code": lambda cfg, files, stats: _read_builtin(cfg, files, stats, 0),
    "builtin_prose": lambda cfg, files, stats: _read_builtin(cfg, files, stats, 1), "text": _read_text, "jsonl": _read_jsonl,
    "parquet": _read_parquet, "hf_disk": _read_hf_disk,
}


# --------------------------------------------------------------------------- split

def _split_single(doc: Doc, val_fraction: float) -> tuple[Doc, Doc] | None:
    """Cut one document at the line boundary nearest (1 - val_fraction) of its length."""
    cut = int(len(doc.text) * (1.0 - val_fraction))
    nl = doc.text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut
    if cut <= 0 or cut >= len(doc.text):
        return None
    return Doc(doc.doc_id + "#train", doc.text[:cut]), Doc(doc.doc_id + "#val", doc.text[cut:])


def split_documents(docs: list[tuple[Doc, str | None]], val_fraction: float) -> tuple[list[Doc], list[Doc]]:
    """Split (doc, fixed_split) pairs by doc-id hash; both sides non-empty when >= 2 docs."""
    train, val = [], []
    for doc, fixed in docs:
        to_val = fixed == "val" if fixed else doc_hash_unit(doc.doc_id) < val_fraction
        (val if to_val else train).append(doc)
    if len(train) + len(val) == 1:
        pair = _split_single((train or val)[0], val_fraction)
        return ([pair[0]], [pair[1]]) if pair else (train + val, [])
    if train and not val:  # tiny corpus: the train doc with the smallest hash goes to val
        i = min(range(len(train)), key=lambda k: doc_hash_unit(train[k].doc_id))
        val.append(train.pop(i))
    elif val and not train:
        i = max(range(len(val)), key=lambda k: doc_hash_unit(val[k].doc_id))
        train.append(val.pop(i))
    return train, val


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read every document of ``cfg`` (up to ``max_documents``) and split it.

    Holds all text in memory (the builtin corpus is ~30 MB). DataError for a missing path,
    a missing text field, a malformed jsonl line or an empty corpus, saying how to fix it.
    """
    files = _source_files(cfg)
    fingerprint = corpus_fingerprint(cfg, files)
    stats = CorpusStats(source=cfg.source)
    kept: list[tuple[Doc, str | None]] = []
    for doc, fixed in _READERS[cfg.source](cfg, files, stats):
        if doc.text is None or not doc.text.strip():
            stats.skipped_empty += 1
            continue
        kept.append((doc, fixed))
        if cfg.max_documents and len(kept) >= cfg.max_documents:
            break
    if not kept:
        where = "the builtin corpus" if cfg.source in BUILTIN_SOURCES else f"data.path = {cfg.path!r}"
        raise DataError(f"{where} (source '{cfg.source}') has no documents: {stats.files} files read, "
                        f"{stats.skipped_undecodable} skipped as binary/non-UTF-8, {stats.skipped_empty} "
                        "empty. Point data.path at UTF-8 text (or set data.source/data.text_field).")
    train, val = split_documents(kept, cfg.val_fraction)
    stats.documents_train, stats.documents_val = len(train), len(val)
    stats.chars_train = sum(len(d.text) for d in train)
    stats.chars_val = sum(len(d.text) for d in val)
    log.info("corpus %s: %d train / %d val documents, %d / %d chars, %d undecodable and %d empty skipped",
             cfg.source, stats.documents_train, stats.documents_val, stats.chars_train, stats.chars_val,
             stats.skipped_undecodable, stats.skipped_empty)
    return Corpus(train, val, stats, fingerprint)


def list_documents(cfg: DataConfig) -> tuple[list[Doc], list[Doc]]:
    """(train, val) documents of ``cfg``; ``load_corpus`` also returns the stats."""
    corpus = load_corpus(cfg)
    return corpus.train, corpus.val
