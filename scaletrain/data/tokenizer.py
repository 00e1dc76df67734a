"""Tokenizers: raw bytes, a byte-level BPE trained locally, or any ``tokenizer.json``.

Every tokenizer has ``vocab_size``, ``bos_id``, ``eos_id``, ``encode``/``decode``,
``encode_batch`` (numpy arrays, for sharding), ``hf_files()`` and ``fingerprint()``.

Two rules hold for all of them:

- Special tokens never come from text: a literal ``"<|eos|>"`` in a document encodes as its
  characters, so a corpus cannot inject document boundaries. ``hf_files()`` sets
  ``split_special_tokens`` so Hugging Face tokenizers behave the same way.
- ``encode`` adds no special tokens (``add_special_tokens=False``). ``hf_files()`` of the byte
  and trained BPE tokenizers have no post-processor, so ``AutoTokenizer.from_pretrained(dir)``
  gives the same ids with its defaults; a ``file`` tokenizer whose post-processor adds a BOS
  (Llama) matches ours with ``add_special_tokens=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from abc import ABC, abstractmethod
from typing import Callable, Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer as HFCore, decoders, models, pre_tokenizers, trainers

from scaletrain.config.schema import TokenizerConfig
from scaletrain.errors import DataError

log = logging.getLogger(__name__)

BOS, EOS = "<|bos|>", "<|eos|>"
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", BOS, "<|endoftext|>")
EOS_CANDIDATES = ("<|end_of_text|>", "</s>", EOS, "<|endoftext|>")
BPE_CACHE_VERSION = 1


class Tokenizer(ABC):
    """Text <-> token ids. Ids are ints in [0, vocab_size)."""

    vocab_size: int
    bos_id: int
    eos_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; specials render as their strings, ids >= vocab_size are dropped."""

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """``encode`` of each text as an unsigned integer array (parallel where possible)."""

    @abstractmethod
    def hf_files(self) -> dict[str, str]:
        """File name -> content of a folder ``transformers.AutoTokenizer`` loads to the same ids."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Stable id of the vocabulary and rules; stored in shard manifests and checkpoints."""

    def save(self, directory: str) -> None:
        """Write ``hf_files()`` into ``directory`` (created); ``load_tokenizer_dir`` reads it."""
        os.makedirs(directory, exist_ok=True)
        files = self.hf_files()
        for name in sorted(files, key=lambda n: n == "tokenizer.json"):  # tokenizer.json last:
            _atomic_write(os.path.join(directory, name), files[name])  # its presence = complete

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"


def _atomic_write(path: str, content: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _hf_config_files(bos: str, eos: str) -> dict[str, str]:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "split_special_tokens": True,  # literal "<|eos|>" in text stays text, as in ours
        "clean_up_tokenization_spaces": False,  # decode must not rewrite spaces
        "add_bos_token": False,
        "add_eos_token": False,
    }
    specials = {"bos_token": bos, "eos_token": eos}
    return {"tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(specials, indent=2) + "\n"}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (the ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then ``<|bos|>`` = 256 and ``<|eos|>`` = 257 (vocab 258)."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257
    _specials = {256: BOS, 257: EOS}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # One memcpy per document: ~1 GB/s, where a Python loop over bytes would be ~20 MB/s.
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                run.append(i)
            elif i in self._specials:
                out += [run.decode("utf-8", errors="replace"), self._specials[i]]
                run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    @staticmethod
    def hf_core() -> HFCore:
        """The equivalent ``tokenizers`` object: a BPE whose vocab is the 256 ByteLevel
        characters in byte order and which has no merges, so every byte is its own token."""
        vocab = {ch: b for b, ch in _byte_to_unicode().items()}
        core = HFCore(models.BPE(vocab=vocab, merges=[]))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        core.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in (BOS, EOS)])
        return core

    def hf_files(self) -> dict[str, str]:
        return {"tokenizer.json": self.hf_core().to_str(pretty=True), **_hf_config_files(BOS, EOS)}

    def fingerprint(self) -> str:
        return "byte-v1"  # fixed: the mapping is the definition, not a file

    @staticmethod
    def matches(tokenizer_json: dict) -> bool:
        """True when a parsed tokenizer.json is the byte tokenizer (vocab, merges, specials)."""
        model = tokenizer_json.get("model", {})
        added = [(t.get("id"), t.get("content")) for t in tokenizer_json.get("added_tokens", [])]
        return (model.get("type") == "BPE" and not model.get("merges")
                and model.get("vocab") == {ch: b for b, ch in _byte_to_unicode().items()}
                and added == [(256, BOS), (257, EOS)])


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (trained BPE or any tokenizer.json) with known bos/eos ids."""

    def __init__(self, core: HFCore, bos_id: int | None = None, eos_id: int | None = None, source: str = ""):
        self.core = core
        self.core.encode_special_tokens = True  # specials never parsed from text (not serialised)
        self.vocab_size = max(core.get_vocab(with_added_tokens=True).values(), default=-1) + 1  # ids may skip
        self.eos_id = eos_id if eos_id is not None else _find_special(core, EOS_CANDIDATES)
        self.bos_id = bos_id if bos_id is not None else _find_special(core, BOS_CANDIDATES, self.eos_id)
        if self.eos_id is None:
            raise DataError(f"tokenizer {source or ''} has none of the end-of-text tokens "
                            f"{', '.join(EOS_CANDIDATES)}; documents cannot be separated. Use a "
                            "tokenizer with one of them, or tokenizer.kind = 'bpe'.")
        self._json = core.to_str()

    def encode(self, text: str) -> list[int]:
        return self.core.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # encode_batch_fast (tokenizers >= 0.21) skips offsets; both spread texts over all cores.
        encode = getattr(self.core, "encode_batch_fast", self.core.encode_batch)
        encs = encode(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        return self.core.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=False)

    def hf_files(self) -> dict[str, str]:
        return {"tokenizer.json": self.core.to_str(pretty=True),
                **_hf_config_files(self.core.id_to_token(self.bos_id), self.core.id_to_token(self.eos_id))}

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self._json}|bos={self.bos_id}|eos={self.eos_id}".encode()).hexdigest()
        return f"hf-{digest[:24]}"


def _find_special(core: HFCore, candidates: Iterable[str], default: int | None = None) -> int | None:
    for token in candidates:
        tid = core.token_to_id(token)
        if tid is not None:
            return tid
    return default


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE with ``<|bos|>``/``<|eos|>`` (ids 0, 1) and all 256 bytes in the
    alphabet, so any text encodes. ``vocab_size`` counts the specials; a small corpus may
    stop short of it. Uses all cores (~0.25 s per million characters on 2 cores)."""
    if vocab_size < 259:
        raise DataError(f"tokenizer.vocab_size = {vocab_size} is too small for a byte-level BPE: it "
                        "needs 256 bytes + 2 specials + at least one merge (>= 259).")
    core = HFCore(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    return HFTokenizer(core, bos_id=core.token_to_id(BOS), eos_id=core.token_to_id(EOS), source="trained BPE")


def _training_texts(docs, max_chars: int) -> list[str]:
    """Up to ``max_chars`` characters of ``docs``, taken in doc-id hash order: a deterministic
    sample spread over the whole corpus rather than its alphabetically first files."""
    from scaletrain.data.corpus import doc_hash_unit

    texts, total = [], 0
    for doc in sorted(docs, key=lambda d: doc_hash_unit(d.doc_id)):
        if total >= max_chars:
            break
        texts.append(doc.text[: max_chars - total])
        total += len(texts[-1])
    return texts


def build_tokenizer(tok_cfg: TokenizerConfig, cache_dir: str, train_docs_fn: Callable[[], list] | None = None,
                    source_fingerprint: str | None = None, note: Callable[[str], None] | None = None) -> Tokenizer:
    """The tokenizer of ``tok_cfg``.

    ``bpe`` is trained on up to ``tok_cfg.train_chars`` characters of ``train_docs_fn()`` (a list
    of Doc, called only when training is needed) and cached as
    ``cache_dir/tokenizers/bpe-<key>/tokenizer.json`` with key = (source_fingerprint,
    vocab_size, train_chars); a second call loads it without touching the corpus. ``note``
    (a progress callback) is told when training starts and ends.
    """
    if tok_cfg.kind == "byte":
        return ByteTokenizer()
    if tok_cfg.kind == "file":
        if not tok_cfg.path:
            raise DataError("tokenizer.kind = 'file' needs tokenizer.path (a tokenizer.json or its folder).")
        return load_tokenizer_dir(os.path.expanduser(tok_cfg.path))
    if tok_cfg.kind != "bpe":
        raise DataError(f"tokenizer.kind = {tok_cfg.kind!r} is unknown; use 'byte', 'bpe' or 'file'.")
    if source_fingerprint is None or train_docs_fn is None:
        raise ValueError("build_tokenizer(kind='bpe') needs train_docs_fn and source_fingerprint")
    key = hashlib.sha256(f"{BPE_CACHE_VERSION}:{source_fingerprint}:{tok_cfg.vocab_size}:{tok_cfg.train_chars}"
                         .encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, "tokenizers", f"bpe-{key}")
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        try:
            return load_tokenizer_dir(folder)
        except DataError as e:
            log.warning("cached BPE in %s is unreadable (%s); training it again", folder, e)
    texts = _training_texts(train_docs_fn(), tok_cfg.train_chars)
    t0 = time.perf_counter()
    if note:
        note(f"training a BPE tokenizer (vocab {tok_cfg.vocab_size}) on {sum(map(len, texts)):,} characters ...")
    tok = train_bpe(texts, tok_cfg.vocab_size)
    log.info("trained BPE (vocab %d) on %d chars in %.1f s -> %s", tok.vocab_size,
             sum(map(len, texts)), time.perf_counter() - t0, folder)
    if note:
        note(f"trained the tokenizer in {time.perf_counter() - t0:.1f} s")
    tok.save(folder)  # concurrent trainers write identical files; each write is atomic
    return tok


def load_tokenizer_dir(path: str) -> Tokenizer:
    """Reload a tokenizer saved by ``Tokenizer.save``: ``path`` is its folder (any HF folder with a
    tokenizer.json) or the tokenizer.json itself. The byte tokenizer comes back as
    ``ByteTokenizer`` (same fingerprint, so checkpoints match); bos/eos come from a
    tokenizer_config.json beside it when present, else from the usual special tokens."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise DataError(f"{path!r} does not exist. Point tokenizer.path at a tokenizer.json or the "
                        "folder holding it (a run folder's tokenizer/), or use tokenizer.kind = 'byte' / 'bpe'.")
    try:
        with open(path, encoding="utf-8") as f:
            parsed = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a valid tokenizer.json (not JSON: {e}).") from None
    if ByteTokenizer.matches(parsed):
        return ByteTokenizer()
    try:
        core = HFCore.from_str(json.dumps(parsed))
    except Exception as e:  # tokenizers raises a plain Exception for a wrong schema
        raise DataError(f"{path} is not a valid tokenizer.json ({e}).") from None
    ids = {}
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{config_path} is not valid JSON ({e}); fix or delete it.") from None
        for role in ("bos", "eos"):
            token = config.get(f"{role}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and core.token_to_id(token) is not None:
                ids[role] = core.token_to_id(token)
    return HFTokenizer(core, bos_id=ids.get("bos"), eos_id=ids.get("eos"), source=path)
