"""Data: corpus -> tokenizer -> memory-mapped shards -> resumable loader.

``prepare_data(data_cfg, tok_cfg)`` is the one call the trainer needs. It caches everything
under ``data_cfg.cache_dir``: a second call with unchanged inputs only stats the source files,
loads the tokenizer and manifest, verifies checksums and maps the shards (no tokenization).
Ranks: call it on rank 0 first, then on the others after a barrier; concurrent calls are safe
anyway (every cache entry is written to a temporary name and renamed into place).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from scaletrain.config.schema import DataConfig, TokenizerConfig
from scaletrain.data.corpus import Corpus, CorpusStats, Doc, corpus_fingerprint, list_documents, load_corpus
from scaletrain.data.loader import TokenLoader, val_batches
from scaletrain.data.shards import ShardError, build_shards, find_shards, open_split, read_manifest, shard_dir_for
from scaletrain.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer_dir,
    train_bpe,
)

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    shard_dir: str
    manifest: dict
    train_tokens: np.ndarray  # read-only memmap, [tokens]
    val_tokens: np.ndarray  # read-only memmap, [tokens]
    stats: dict  # corpus counts + tokens_train/val, built (this call tokenized), seconds


def prepare_data(data_cfg: DataConfig, tok_cfg: TokenizerConfig, force: bool = False,
                 verify: str = "auto", note: Callable[[str], None] | None = None) -> PreparedData:
    """Corpus -> tokenizer -> shards, each cached; returns the mapped token streams.

    ``force`` re-tokenizes even when valid shards exist. ``verify`` is passed to ``open_split``
    ("auto": sha256 for files < 256 MB). Cached shards that fail verification are rebuilt once,
    with a warning; a DataError explains any bad input (missing path, empty corpus, ...).
    ``note(message)`` is told what is being built (reading the corpus, training the tokenizer,
    tokenizing) and when the data is ready, so a cold cache is not a silent wait; a warm cache
    tells it nothing.
    """
    t0 = time.perf_counter()
    note = note or (lambda msg: None)
    source_fp = corpus_fingerprint(data_cfg)
    corpus: list[Corpus] = []  # loaded at most once, and only when something must be built

    def get_corpus() -> Corpus:
        if not corpus:
            note(f"reading the {data_cfg.source!r} corpus ...")
            start = time.perf_counter()
            corpus.append(load_corpus(data_cfg))
            c = corpus[0]
            note(f"read {len(c.train):,} train + {len(c.val):,} validation documents in "
                 f"{time.perf_counter() - start:.1f} s")
        return corpus[0]

    tokenizer = build_tokenizer(tok_cfg, data_cfg.cache_dir, train_docs_fn=lambda: get_corpus().train,
                                source_fingerprint=source_fp, note=note)
    shard_dir = shard_dir_for(data_cfg.cache_dir, source_fp, tokenizer.fingerprint())
    manifest = None if force else find_shards(shard_dir, source_fp, tokenizer.fingerprint())
    built = manifest is None

    def build(replace: bool) -> dict:
        c = get_corpus()
        note(f"tokenizing {len(c.train) + len(c.val):,} documents into shards in {shard_dir} ...")
        return build_shards(shard_dir, c.train, c.val, tokenizer, source_fp, stats=c.stats.as_dict(), force=replace,
                            note=note)

    if built:
        manifest = build(force)
    try:
        train, val = (open_split(shard_dir, s, verify) for s in ("train", "val"))
    except ShardError as e:
        if built:
            raise
        manifest, built = build(True), True
        train, val = (open_split(shard_dir, s, verify) for s in ("train", "val"))
        log.warning("cached shards in %s failed verification (%s); rebuilt them from the corpus", shard_dir,
                    e.problem)
    stats = {**manifest.get("stats", {}), "tokens_train": int(len(train)), "tokens_val": int(len(val)),
             "built": built, "seconds": round(time.perf_counter() - t0, 3)}
    log.info("data ready in %.1f s (%s): %d train / %d val tokens, vocab %d, %s", stats["seconds"],
             "built" if built else "cached", len(train), len(val), tokenizer.vocab_size, shard_dir)
    if built:
        note(f"ready in {stats['seconds']:.1f} s: {len(train):,} train + {len(val):,} validation tokens "
             f"(tokenizer vocab {tokenizer.vocab_size})")
    return PreparedData(tokenizer, shard_dir, manifest, train, val, stats)


__all__ = [
    "ByteTokenizer", "Corpus", "CorpusStats", "Doc", "HFTokenizer", "PreparedData", "TokenLoader", "Tokenizer",
    "build_shards", "build_tokenizer", "corpus_fingerprint", "find_shards", "list_documents", "load_corpus",
    "load_tokenizer_dir", "open_split", "prepare_data", "read_manifest", "shard_dir_for", "train_bpe",
    "val_batches",
]
