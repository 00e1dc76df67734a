"""Shard layout, manifest, no-op rebuilds, corruption detection and prepare_data caching."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading

import numpy as np
import pytest

from scaletrain.config.schema import DataConfig, TokenizerConfig
from scaletrain.data import prepare_data
from scaletrain.data.corpus import Doc
from scaletrain.data.shards import build_shards, find_shards, open_split, shard_dir_for, token_dtype
from scaletrain.data.tokenizer import ByteTokenizer, train_bpe
from scaletrain.errors import DataError

TRAIN = [Doc("t1", "first document\n"), Doc("t2", "zweites Dokument — ünïcödé\n"), Doc("t3", "x")]
VAL = [Doc("v1", "validation text\n")]


class WideByteTokenizer(ByteTokenizer):
    """Byte ids in a vocab > 65536, to exercise uint32 shards."""

    vocab_size = 70_000
    eos_id = 69_999

    def fingerprint(self) -> str:
        return "wide-byte"


class Untouchable(list):
    """A document list that fails if read: proves a no-op build never looks at the corpus."""

    def __iter__(self):
        raise AssertionError("documents were read")

    __getitem__ = __len__ = __iter__


def expected_stream(docs, tok):
    return [i for d in docs for i in tok.encode(d.text) + [tok.eos_id]]


def test_layout_dtype_and_manifest(tmp_path):
    tok = ByteTokenizer()
    d = str(tmp_path / "s")
    m = build_shards(d, TRAIN, VAL, tok, "src-fp", stats={"documents_train": 3})
    train, val = open_split(d, "train"), open_split(d, "val")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert train.tolist() == expected_stream(TRAIN, tok)
    assert val.tolist() == expected_stream(VAL, tok)
    on_disk = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert on_disk == m
    assert (m["format_version"], m["source_fingerprint"], m["tokenizer_fingerprint"]) == (1, "src-fp", "byte-v1")
    assert m["total_tokens"] == len(train) + len(val)
    assert m["stats"] == {"documents_train": 3}
    for split, arr in (("train", train), ("val", val)):
        entry = m["files"][split]
        raw = (tmp_path / "s" / entry["file"]).read_bytes()
        assert entry["tokens"] == len(arr) and entry["bytes"] == len(raw) == 2 * len(arr)
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest() and entry["dtype"] == "uint16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # temp folder gone


def test_uint32_for_large_vocab(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    tok = WideByteTokenizer()
    build_shards(str(tmp_path), TRAIN, VAL, tok, "fp")
    train = open_split(str(tmp_path), "train")
    assert train.dtype == np.uint32 and train.tolist() == expected_stream(TRAIN, tok)


def test_bpe_shards_match_encode(tmp_path):
    tok = train_bpe([d.text for d in TRAIN] * 20, vocab_size=270)
    build_shards(str(tmp_path), TRAIN, VAL, tok, "fp")
    assert open_split(str(tmp_path), "train").tolist() == expected_stream(TRAIN, tok)


def test_rerun_is_a_noop_and_force_rebuilds(tmp_path):
    tok, d = ByteTokenizer(), str(tmp_path)
    m1 = build_shards(d, TRAIN, VAL, tok, "fp")
    files = (tmp_path / "train.bin", tmp_path / "val.bin", tmp_path / "manifest.json")
    before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in files}
    m2 = build_shards(d, Untouchable(), Untouchable(), tok, "fp")
    assert m2 == m1
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in before} == before  # not rewritten
    assert find_shards(d, "fp", "byte-v1") == m1
    assert find_shards(d, "other-fp", "byte-v1") is None
    build_shards(d, TRAIN, VAL, tok, "fp", force=True)
    assert os.stat(tmp_path / "train.bin").st_ino != before[tmp_path / "train.bin"][0]


def test_truncated_and_corrupt_shards_are_detected(tmp_path):
    d = str(tmp_path)
    build_shards(d, TRAIN, VAL, ByteTokenizer(), "fp")
    path = tmp_path / "train.bin"
    raw = path.read_bytes()
    path.write_bytes(raw[:-2])
    with pytest.raises(DataError, match=rf"{path}.*bytes but its manifest says {len(raw)}.*Delete that folder"):
        open_split(d, "train")
    assert find_shards(d, "fp", "byte-v1") is None  # a rebuild would replace it
    path.write_bytes(raw[:5] + bytes([raw[5] ^ 0xFF]) + raw[6:])  # same size, one byte flipped
    with pytest.raises(DataError, match=rf"{path} fails its sha256 checksum.*rerun"):
        open_split(d, "train")
    assert len(open_split(d, "train", verify="size")) == len(raw) // 2  # size-only check passes
    (tmp_path / "val.bin").unlink()
    with pytest.raises(DataError, match="val.bin is missing"):
        open_split(d, "val")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(DataError, match="no readable manifest.json"):
        open_split(d, "train")


def test_edited_manifest_is_refused(tmp_path):
    """A manifest whose dtype or token count no longer matches its file (bytes = tokens x
    itemsize) is refused before the tokens are mapped, instead of training on garbage or on a
    prefix of the stream; so is a dtype the vocabulary does not call for."""
    narrow, wide = tmp_path / "narrow", tmp_path / "wide"
    build_shards(str(narrow), TRAIN, VAL, ByteTokenizer(), "fp")
    build_shards(str(wide), TRAIN, VAL, WideByteTokenizer(), "fp")
    n = json.loads((narrow / "manifest.json").read_text())["files"]["train"]["tokens"]
    edits = [
        (narrow, {"dtype": "uint32"}, rf"{n} tokens x 4 bytes \(uint32\) = {4 * n} bytes, but the file holds {2 * n}"),
        (narrow, {"tokens": n - 7}, rf"{n - 7} tokens x 2 bytes \(uint16\) = {2 * n - 14} bytes, but the file holds {2 * n}"),
        (narrow, {"dtype": "uint8", "tokens": 2 * n}, r"records dtype 'uint8' and \d+ tokens; expected one of"),
        (wide, {"dtype": "uint16", "tokens": 2 * n}, r"dtype uint16, but a vocabulary of 70000 ids is stored as uint32"),
        (narrow, {"file": "../../secret.bin"}, r"names file '../../secret.bin' for 'train', not train.bin"),
    ]
    for folder, edit, message in edits:
        manifest = folder / "manifest.json"
        original = manifest.read_text()
        edited = json.loads(original)
        edited["files"]["train"].update(edit)
        manifest.write_text(json.dumps(edited))
        with pytest.raises(DataError, match=message):
            open_split(str(folder), "train", verify="size")
        manifest.write_text(original)
        assert len(open_split(str(folder), "train")) == n


def test_prepare_data_rebuilds_an_edited_manifest_and_says_so(tmp_path, caplog):
    cfg = DataConfig(source="builtin", max_documents=25, cache_dir=str(tmp_path))
    first = prepare_data(cfg, TokenizerConfig(kind="byte"))
    expected = np.array(first.train_tokens)
    manifest = os.path.join(first.shard_dir, "manifest.json")
    edited = json.loads(open(manifest).read())
    edited["files"]["train"]["tokens"] //= 2  # a prefix of the stream, bytes unchanged
    with open(manifest, "w") as f:
        json.dump(edited, f)
    with caplog.at_level(logging.WARNING, logger="scaletrain.data"):
        healed = prepare_data(cfg, TokenizerConfig(kind="byte"))
    assert healed.stats["built"] and np.array_equal(healed.train_tokens, expected)
    assert "rebuilt them" in caplog.text and "Delete that folder" not in caplog.text
    assert first.shard_dir in caplog.text


def test_shard_folder_depends_on_source_and_tokenizer():
    a = shard_dir_for("cache", "src1", "byte-v1")
    assert a == shard_dir_for("cache", "src1", "byte-v1")
    assert len({a, shard_dir_for("cache", "src2", "byte-v1"), shard_dir_for("cache", "src1", "hf-x")}) == 3


def test_concurrent_builders_leave_one_valid_folder(tmp_path):
    d, errors = str(tmp_path / "shards" / "k"), []
    docs = [Doc(f"d{i}", f"document number {i} " * 200) for i in range(200)]

    def build():
        try:
            build_shards(d, docs, VAL, ByteTokenizer(), "fp", force=True)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert open_split(d, "train", verify="full").tolist() == expected_stream(docs, ByteTokenizer())
    assert os.listdir(tmp_path / "shards") == ["k"]  # no temp or trash folders left


def write_corpus(root):
    root.mkdir()
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text(f"Document {i}. " + "The quick brown fox. " * 40)
    return root


def test_prepare_data_caches_and_heals(tmp_path, caplog):
    cfg = DataConfig(source="text", path=str(write_corpus(tmp_path / "corpus")), cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg, TokenizerConfig(kind="byte"))
    assert first.stats["built"] and first.stats["documents_train"] + first.stats["documents_val"] == 30
    assert first.stats["tokens_train"] == len(first.train_tokens) > 20_000
    expected = np.array(first.train_tokens)  # a copy: the memmap sees later writes to the file
    train_bin = os.path.join(first.shard_dir, "train.bin")
    inode = os.stat(train_bin).st_ino

    second = prepare_data(cfg, TokenizerConfig(kind="byte"))
    assert not second.stats["built"] and second.shard_dir == first.shard_dir
    assert os.stat(train_bin).st_ino == inode
    assert np.array_equal(second.train_tokens, expected)
    assert second.stats["documents_train"] == first.stats["documents_train"]  # from the manifest

    # a corrupted cache is rebuilt once, with a warning
    with open(train_bin, "r+b") as f:
        f.write(b"\xff\xff")
    with caplog.at_level(logging.WARNING, logger="scaletrain.data"):
        healed = prepare_data(cfg, TokenizerConfig(kind="byte"))
    assert healed.stats["built"] and "failed verification" in caplog.text and "rebuilt them" in caplog.text
    assert np.array_equal(healed.train_tokens, expected)

    # another tokenizer -> another shard folder; editing the corpus -> new shards
    bpe_cfg = TokenizerConfig(kind="bpe", vocab_size=300, train_chars=20_000)
    bpe = prepare_data(cfg, bpe_cfg)
    assert bpe.shard_dir != first.shard_dir and bpe.tokenizer.vocab_size <= 300
    assert prepare_data(cfg, bpe_cfg).stats["built"] is False
    (tmp_path / "corpus" / "doc00.txt").write_text("edited and longer " * 50)
    assert prepare_data(cfg, TokenizerConfig(kind="byte")).shard_dir != first.shard_dir


def test_prepare_data_on_builtin_corpus(tmp_path):
    cfg = DataConfig(source="builtin", max_documents=25, cache_dir=str(tmp_path))
    p = prepare_data(cfg, TokenizerConfig(kind="byte"))
    assert p.tokenizer.vocab_size == 258 and p.train_tokens.dtype == np.uint16
    eos = np.flatnonzero(np.asarray(p.train_tokens) == 257)
    assert len(eos) == p.stats["documents_train"] and eos[-1] == len(p.train_tokens) - 1
    assert p.tokenizer.decode(p.train_tokens[: eos[0]].tolist()).strip() != ""
    assert prepare_data(cfg, TokenizerConfig(kind="byte")).stats["built"] is False


def test_prepare_data_tells_its_progress_on_a_cold_cache(tmp_path):
    """Each stage of a build (corpus, BPE training, tokenizing, ready) is reported through the
    `note` callback; a warm cache reports nothing."""
    cfg = DataConfig(source="text", path=str(write_corpus(tmp_path / "corpus")), cache_dir=str(tmp_path / "cache"))
    bpe = TokenizerConfig(kind="bpe", vocab_size=300, train_chars=20_000)
    notes: list[str] = []
    prepare_data(cfg, bpe, note=notes.append)
    stages = ["reading the 'text' corpus", "read 28 train + 2 validation documents", "training a BPE tokenizer",
              "trained the tokenizer in", "tokenizing 30 documents into shards", "ready in"]
    assert len(notes) == len(stages) and all(n.startswith(s) for n, s in zip(notes, stages)), notes
    notes.clear()
    prepare_data(cfg, bpe, note=notes.append)
    assert notes == []


def test_tokenizing_reports_how_far_it_got(tmp_path, monkeypatch):
    """A long tokenization tells `note` its progress between chunks (here every chunk)."""
    from scaletrain.data import shards

    monkeypatch.setattr(shards, "_CHUNK_CHARS", 1000)
    docs = [Doc(f"d{i}", "The quick brown fox. " * 30) for i in range(4)]  # 630 chars each: 2 per chunk
    notes: list[str] = []
    entry = shards._write_split(str(tmp_path / "train.bin"), docs, ByteTokenizer(), np.dtype(np.uint16),
                                note=notes.append, every_s=0.0)
    assert notes == ["tokenized 2 of 4 train documents (1,262 tokens) ..."]
    assert entry["documents"] == 4
