"""Corpus sources, skipping and counting, the hash split, fingerprints and error messages."""

from __future__ import annotations

import json
import shutil

import pytest

from scaletrain.config.schema import DataConfig
from scaletrain.data.corpus import corpus_fingerprint, doc_hash_unit, list_documents, load_corpus
from scaletrain.errors import DataError


def write_text_tree(root, n=12):
    """n UTF-8 docs in two folders plus a binary, a latin-1, an empty and a hidden file."""
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text(f"document {i}\nhéllo wörld {i}\n" * 3, encoding="utf-8")
    (root / "blob.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    (root / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.md").write_text("  \n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


def text_cfg(path, **kw) -> DataConfig:
    return DataConfig(source="text", path=str(path), **kw)


def test_text_folder_reads_sorted_and_counts_skips(tmp_path):
    write_text_tree(tmp_path)
    c = load_corpus(text_cfg(tmp_path, val_fraction=0.3))
    ids = sorted(d.doc_id for d in c.train + c.val)
    assert ids == sorted(f"{'a' if i % 2 else 'b'}/doc{i:02d}.txt" for i in range(12))
    assert c.stats.skipped_undecodable == 2  # blob.bin (NUL byte) and latin.txt (not UTF-8)
    assert c.stats.skipped_empty == 1
    assert c.stats.files == 15  # .git/HEAD is hidden, never opened
    assert c.stats.documents_train + c.stats.documents_val == 12
    assert c.stats.chars_val == sum(len(d.text) for d in c.val)
    # train keeps sorted document order
    assert [d.doc_id for d in c.train] == sorted(d.doc_id for d in c.train)
    assert "héllo wörld 3" in dict(c.train + c.val)["a/doc03.txt"]


def test_cache_folder_inside_the_corpus_is_not_read(tmp_path):
    (tmp_path / "doc.txt").write_text("real text\n")
    (tmp_path / "other.txt").write_text("more text\n")
    (tmp_path / "data_cache" / "tokenizers").mkdir(parents=True)
    (tmp_path / "data_cache" / "tokenizers" / "tokenizer.json").write_text("{}")
    cfg = text_cfg(tmp_path, cache_dir=str(tmp_path / "data_cache"))
    fp = corpus_fingerprint(cfg)
    train, val = list_documents(cfg)
    assert sorted(d.doc_id for d in train + val) == ["doc.txt", "other.txt"]
    (tmp_path / "data_cache" / "manifest.json").write_text("{}")  # the cache grows ...
    assert corpus_fingerprint(cfg) == fp  # ... and the corpus stays the same


def test_split_follows_doc_id_hash_and_is_stable_when_files_change(tmp_path):
    for i in range(60):
        (tmp_path / f"f{i:03d}.txt").write_text(f"text {i}\n")
    cfg = text_cfg(tmp_path, val_fraction=0.2)
    train, val = list_documents(cfg)
    assert all(doc_hash_unit(d.doc_id) < 0.2 for d in val)
    assert all(doc_hash_unit(d.doc_id) >= 0.2 for d in train)
    assert 3 <= len(val) <= 25  # ~12 expected
    side = {d.doc_id: "val" for d in val} | {d.doc_id: "train" for d in train}
    # remove some files, add others: no surviving document changes side
    for i in range(0, 60, 3):
        (tmp_path / f"f{i:03d}.txt").unlink()
    for i in range(100, 140):
        (tmp_path / f"f{i:03d}.txt").write_text(f"new {i}\n")
    train2, val2 = list_documents(cfg)
    for d in train2:
        assert side.get(d.doc_id, "train") == "train"
    for d in val2:
        assert side.get(d.doc_id, "val") == "val"
    assert list_documents(cfg) == (train2, val2)  # deterministic


def test_tiny_corpora_get_both_splits(tmp_path):
    (tmp_path / "x.txt").write_text("one\n")
    (tmp_path / "y.txt").write_text("two\n")
    train, val = list_documents(text_cfg(tmp_path, val_fraction=0.001))
    assert len(train) == 1 and len(val) == 1
    train, val = list_documents(text_cfg(tmp_path, val_fraction=0.999))
    assert len(train) == 1 and len(val) == 1
    # one document: cut at a line boundary into a train and a val part
    single = tmp_path / "single.txt"
    text = "".join(f"line {i}\n" for i in range(100))
    single.write_text(text)
    train, val = list_documents(text_cfg(single, val_fraction=0.1))
    assert [d.doc_id for d in train] == ["single.txt#train"] and [d.doc_id for d in val] == ["single.txt#val"]
    assert train[0].text + val[0].text == text
    assert val[0].text.startswith("line ") and 5 <= val[0].text.count("\n") <= 15


def test_max_documents_takes_first_sorted(tmp_path):
    write_text_tree(tmp_path)
    train, val = list_documents(text_cfg(tmp_path, max_documents=4))
    assert sorted(d.doc_id for d in train + val) == ["a/doc01.txt", "a/doc03.txt", "a/doc05.txt", "a/doc07.txt"]


def test_fingerprint_tracks_content_not_location(tmp_path):
    src = write_text_tree(tmp_path / "src")
    fp = corpus_fingerprint(text_cfg(src))
    assert fp == corpus_fingerprint(text_cfg(src))
    copy = tmp_path / "elsewhere"
    shutil.copytree(src, copy)  # copy2 keeps mtimes: same files, same fingerprint
    assert corpus_fingerprint(text_cfg(copy)) == fp
    assert corpus_fingerprint(text_cfg(src, val_fraction=0.5)) != fp
    (src / "a" / "doc01.txt").write_text("changed\n")
    assert corpus_fingerprint(text_cfg(src)) != fp


def test_jsonl_documents_and_errors(tmp_path):
    f = tmp_path / "data.jsonl"
    rows = [{"text": "alpha"}, {"text": "beta", "meta": 1}, {"text": None}, {"text": "gamma"}]
    lines = [json.dumps(r) for r in rows]
    f.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # line 3 is blank
    c = load_corpus(DataConfig(source="jsonl", path=str(f)))
    docs = dict(c.train + c.val)
    assert docs == {"data.jsonl:1": "alpha", "data.jsonl:2": "beta", "data.jsonl:5": "gamma"}
    assert c.stats.skipped_empty == 1  # the null text

    f.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: malformed JSON"):
        load_corpus(DataConfig(source="jsonl", path=str(f)))
    f.write_text('{"body": "x", "id": 3}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:1: no key 'text' \(keys: 'body', 'id'\).*data\.text_field"):
        load_corpus(DataConfig(source="jsonl", path=str(f)))
    f.write_text('{"text": 17}\n')
    with pytest.raises(DataError, match="holds a int, not a string"):
        load_corpus(DataConfig(source="jsonl", path=str(f)))


def test_parquet_documents_and_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet source needs pyarrow (scaletrain[data])")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["first doc", None, "third doc"], "n": [1, 2, 3]}), tmp_path / "p.parquet")
    c = load_corpus(DataConfig(source="parquet", path=str(tmp_path), text_field="content"))
    assert dict(c.train + c.val) == {"p.parquet:0": "first doc", "p.parquet:2": "third doc"}
    with pytest.raises(DataError, match=r"no column 'text' \(columns: 'content', 'n'\)"):
        load_corpus(DataConfig(source="parquet", path=str(tmp_path)))


def test_hf_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets", reason="hf_disk source needs datasets (scaletrain[data])")
    ds = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(20)]})
    ds.save_to_disk(str(tmp_path / "plain"))
    c = load_corpus(DataConfig(source="hf_disk", path=str(tmp_path / "plain"), val_fraction=0.25))
    assert sorted(d.text for d in c.train + c.val) == sorted(f"row {i}" for i in range(20))
    assert all(doc_hash_unit(d.doc_id) < 0.25 for d in c.val)

    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"text": ["v0", "v1"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    c = load_corpus(DataConfig(source="hf_disk", path=str(tmp_path / "dict")))
    assert [d.text for d in c.val] == ["v0", "v1"]  # the given split, not a hash split
    assert len(c.train) == 20

    datasets.DatasetDict({"other": ds}).save_to_disk(str(tmp_path / "nosplit"))
    with pytest.raises(DataError, match="no 'train' split"):
        load_corpus(DataConfig(source="hf_disk", path=str(tmp_path / "nosplit")))
    with pytest.raises(DataError, match="no column 'body'"):
        load_corpus(DataConfig(source="hf_disk", path=str(tmp_path / "plain"), text_field="body"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("not a dataset")
    with pytest.raises(DataError, match="not a dataset saved with datasets.save_to_disk"):
        load_corpus(DataConfig(source="hf_disk", path=str(tmp_path / "junk")))


def test_bad_input_errors_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="does not exist.*Point it at"):
        load_corpus(text_cfg(tmp_path / "nope"))
    with pytest.raises(DataError, match="needs data.path"):
        load_corpus(DataConfig(source="text"))
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match=r"has no documents: 2 files read, 1 skipped as binary/non-UTF-8, 1 empty"):
        load_corpus(text_cfg(tmp_path))
    with pytest.raises(DataError, match=r"holds no \.jsonl files"):
        load_corpus(DataConfig(source="jsonl", path=str(tmp_path)))
    with pytest.raises(DataError, match="unknown"):
        load_corpus(DataConfig(source="s3", path=str(tmp_path)))


def test_builtin_corpus_is_real_and_deterministic():
    cfg = DataConfig(source="builtin", max_documents=40, val_fraction=0.1)
    c1, c2 = load_corpus(cfg), load_corpus(cfg)
    assert c1.train == c2.train and c1.val == c2.val and c1.fingerprint == c2.fingerprint
    docs = c1.train + c1.val
    assert len(docs) == 40 and len(c1.val) >= 1
    assert all(d.doc_id.startswith("stdlib/") and d.doc_id.endswith(".py") for d in docs)
    assert sum(len(d.text) for d in docs) > 100_000
    assert any("def " in d.text or "import " in d.text for d in docs)


def test_builtin_full_corpus_has_stdlib_and_pydoc_topics():
    c = load_corpus(DataConfig(source="builtin"))  # ~30 MB, reads in well under a second
    ids = [d.doc_id for d in c.train + c.val]
    assert len(ids) == len(set(ids)) > 500
    assert "stdlib/os.py" in ids and any(i.startswith("pydoc/") for i in ids)
    assert not any("site-packages" in i or i == "stdlib/pydoc_data/topics.py" for i in ids)
    assert c.stats.chars_train > 5_000_000 and c.stats.documents_val >= 1
