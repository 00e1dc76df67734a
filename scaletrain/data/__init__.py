"""Data: corpus -> tokenizer -> memory-mapped shards -> resumable loader.

``prepare_data(data_cfg, tok_cfg)`` is the one call the trainer needs. It caches everything
under ``data_cfg.cache_dir``: a second call with unchanged inputs only stats the source files,
loads the tokenizer and manifest, verifies checksums and maps the shards (no tokenization).
Ranks: call it on rank 0 first, then on the others after a barrier; concurrent calls are safe
anyway (every cache entry is written to a temporary name and renamed into place).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Callable

import numpy as np

from scaletrain.config.schema import DataConfig, TokenizerConfig
from scaletrain.errors import DataError
from scaletrain.data.corpus import Corpus, CorpusStats, Doc, corpus_fingerprint, list_documents, load_corpus
from scaletrain.data.loader import MixedLoader, TokenLoader, val_batches
from scaletrain.data.pysplit import split_python_source
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
class DomainData:
    """The token streams of one domain (the whole corpus of a config without [[data.domains]])."""

    name: str  # "" without [[data.domains]]
    weight: float  # share of training sequences as configured (before data.domain selects one)
    shard_dir: str
    manifest: dict
    train_tokens: np.ndarray  # read-only memmap, [tokens]
    val_tokens: np.ndarray  # read-only memmap, [tokens]
    stats: dict  # corpus counts + tokens_train/val, built (this call tokenized)


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    domains: list[DomainData]  # one unnamed entry without [[data.domains]], else in table order
    stats: dict  # one domain: its stats; several: tokens_train/val summed; both: built, seconds

    def _only(self) -> DomainData:
        if len(self.domains) != 1:
            raise ValueError(f"the data has {len(self.domains)} domains; read PreparedData.domains")
        return self.domains[0]

    # The single stream of a config without domains (as before domains existed).
    shard_dir = property(lambda self: self._only().shard_dir)
    manifest = property(lambda self: self._only().manifest)
    train_tokens = property(lambda self: self._only().train_tokens)
    val_tokens = property(lambda self: self._only().val_tokens)


def domain_configs(data_cfg: DataConfig) -> list[tuple[str, float, DataConfig]]:
    """(name, weight, DataConfig reading only that domain) for each [[data.domains]] table, or
    [("", 1.0, data_cfg)] without them. Every setting but source/path/text_field is shared."""
    if not data_cfg.domains:
        return [("", 1.0, data_cfg)]
    return [(d.name, d.weight, dataclasses.replace(data_cfg, source=d.source, path=d.path, text_field=d.text_field,
                                                   domains=[], domain="")) for d in data_cfg.domains]


def prepare_data(data_cfg: DataConfig, tok_cfg: TokenizerConfig, force: bool = False,
                 verify: str = "auto", note: Callable[[str], None] | None = None) -> PreparedData:
    """Corpus -> tokenizer -> shards, each cached; returns the mapped token streams.

    With [[data.domains]] every domain gets its own shards (all of them, whatever data.domain
    selects, because validation covers every domain) and one tokenizer serves them all: a BPE is
    trained on the training documents of every domain, so a run on one domain and a run on the
    mixture share it. ``force`` re-tokenizes even when valid shards exist. ``verify`` is passed
    to ``open_split`` ("auto": sha256 for files < 256 MB). Cached shards that fail verification
    are rebuilt once, with a warning; a DataError explains any bad input (missing path, ...).
    ``note(message)`` is told what is being built (reading a corpus, training the tokenizer,
    tokenizing) and when the data is ready, so a cold cache is not a silent wait; a warm cache
    tells it nothing.
    """
    t0 = time.perf_counter()
    note = note or (lambda msg: None)
    views = domain_configs(data_cfg)
    fingerprints = [corpus_fingerprint(cfg) for _, _, cfg in views]
    corpora: dict[int, Corpus] = {}  # each loaded at most once, and only when something must be built

    def get_corpus(i: int) -> Corpus:
        if i not in corpora:
            name, _, cfg = views[i]
            note(f"reading the {cfg.source!r} corpus{f' (domain {name})' if name else ''} ...")
            start = time.perf_counter()
            corpora[i] = c = load_corpus(cfg)
            note(f"read {len(c.train):,} train + {len(c.val):,} validation documents in "
                 f"{time.perf_counter() - start:.1f} s")
        return corpora[i]

    source_fp = fingerprints[0] if not data_cfg.domains else hashlib.sha256(
        ("domains:" + ",".join(fingerprints)).encode()).hexdigest()[:32]
    tokenizer = build_tokenizer(
        tok_cfg, data_cfg.cache_dir, source_fingerprint=source_fp,
        train_docs_fn=lambda: [doc for i in range(len(views)) for doc in get_corpus(i).train], note=note)
    domains = [_prepare_shards(name, weight, data_cfg.cache_dir, fp, tokenizer, lambda i=i: get_corpus(i), force, verify, note)
               for i, ((name, weight, _), fp) in enumerate(zip(views, fingerprints))]
    split_python_source.cache_clear()  # the built-in domains' texts are in the shards now
    seconds = round(time.perf_counter() - t0, 3)
    built = any(d.stats["built"] for d in domains)
    if built:
        note(f"ready in {seconds:.1f} s: {sum(d.stats['tokens_train'] for d in domains):,} train + "
             f"{sum(d.stats['tokens_val'] for d in domains):,} validation tokens (tokenizer vocab {tokenizer.vocab_size})")
    if data_cfg.domains:
        stats = {"tokens_train": sum(d.stats["tokens_train"] for d in domains),
                 "tokens_val": sum(d.stats["tokens_val"] for d in domains)}
    else:
        stats = dict(domains[0].stats)
    stats.update(built=built, seconds=seconds)
    log.info("data ready in %.1f s (%s): %d train / %d val tokens, vocab %d%s", seconds, "built" if built else "cached",
             stats["tokens_train"], stats["tokens_val"], tokenizer.vocab_size,
             "".join(f"; {d.name or 'all'}: {d.stats['tokens_train']} / {d.stats['tokens_val']} in {d.shard_dir}"
                     for d in domains))
    return PreparedData(tokenizer, domains, stats)


def _prepare_shards(name: str, weight: float, cache_dir: str, source_fp: str, tokenizer: Tokenizer,
                    get_corpus: Callable[[], Corpus], force: bool, verify: str,
                    note: Callable[[str], None]) -> DomainData:
    """The (cached) shards of one corpus under ``tokenizer``, mapped; ``note`` hears what is built."""
    shard_dir = shard_dir_for(cache_dir, source_fp, tokenizer.fingerprint())
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
    stats = {**manifest.get("stats", {}), "tokens_train": int(len(train)), "tokens_val": int(len(val)), "built": built}
    if built and name:
        note(f"domain {name}: {len(train):,} train + {len(val):,} validation tokens")
    return DomainData(name, weight, shard_dir, manifest, train, val, stats)


def build_loader(data: PreparedData, cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1) -> TokenLoader | MixedLoader:
    """This rank's training loader: a ``TokenLoader`` over the one corpus without [[data.domains]],
    else a ``MixedLoader`` over every domain, by weight, or only ``cfg.domain`` when it is set."""
    if not cfg.domains:
        return TokenLoader(data.train_tokens, cfg.seq_len, cfg.batch_size, cfg.seed, dp_rank, dp_size)
    weights = [float(d.name == cfg.domain) if cfg.domain else d.weight for d in data.domains]
    return MixedLoader([d.train_tokens for d in data.domains], [d.name for d in data.domains], weights,
                       cfg.seq_len, cfg.batch_size, cfg.seed, dp_rank, dp_size)


def validation_sets(data: PreparedData, cfg: DataConfig, n_batches: int, dp_rank: int = 0,
                    dp_size: int = 1) -> dict[str, list[tuple]]:
    """Domain name ("" without [[data.domains]]) -> this rank's fixed validation batches: up to
    ``n_batches`` global batches of ``batch_size * dp_size`` sequences from the start of the
    domain's validation split, rows ``[dp_rank*batch_size, (dp_rank+1)*batch_size)`` of each, so
    every layout validates on the same sequences. Every domain is validated, whatever
    ``cfg.domain`` selects for training."""
    rows = slice(dp_rank * cfg.batch_size, (dp_rank + 1) * cfg.batch_size)
    out = {}
    for d in data.domains:
        try:
            batches = val_batches(d.val_tokens, cfg.seq_len, cfg.batch_size * dp_size, n_batches)
        except DataError as e:
            raise (DataError(f"domain '{d.name}': {e}") if d.name else e) from None
        out[d.name] = [(x[rows], y[rows]) for x, y in batches]
    return out


__all__ = [
    "ByteTokenizer", "Corpus", "CorpusStats", "Doc", "DomainData", "HFTokenizer", "MixedLoader", "PreparedData", "TokenLoader",
    "Tokenizer", "build_loader",
    "build_shards", "build_tokenizer", "corpus_fingerprint", "domain_configs", "find_shards", "list_documents", "load_corpus",
    "load_tokenizer_dir", "open_split", "prepare_data", "read_manifest", "shard_dir_for", "train_bpe",
    "val_batches", "validation_sets",
]
