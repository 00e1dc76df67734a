"""Byte and BPE tokenizers, the BPE cache, tokenizer.json loading and HF equivalence."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, Tokenizer as HFCore, models, pre_tokenizers

from scaletrain.config.schema import TokenizerConfig
from scaletrain.data.corpus import Doc
from scaletrain.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    build_tokenizer,
    load_tokenizer_dir,
    train_bpe,
)
from scaletrain.errors import DataError

SAMPLES = [
    "hello world",
    "  leading spaces\tand tabs\n\nnew lines  ",
    "naïve café — 日本語のテキスト 🚀 ∑x²",
    "def f(x):\n    return x ** 2  # comment\n",
    "literal <|eos|> and <|bos|> stay text",
    "",
]


def corpus_docs(n=60):
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "self", "import", "class", "naïve", "日本"]
    return [Doc(f"d{i}", " ".join(words[(i * 7 + k) % len(words)] for k in range(200)) + "\n") for i in range(n)]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([d.text for d in corpus_docs()], vocab_size=300)


def test_byte_tokenizer_ids_and_round_trip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.encode_batch([text])[0].tolist() == ids
    assert tok.decode([104, 105, 257, 256, 104]) == "hi<|eos|><|bos|>h"
    assert tok.decode([104, 300, 105]) == "hi"  # ids beyond the vocab (padded model rows) dropped


def test_bpe_covers_every_byte_and_round_trips(bpe):
    assert 258 < bpe.vocab_size <= 300
    assert bpe.encode("<|eos|>") != [bpe.eos_id]  # specials never parsed from text
    assert {bpe.bos_id, bpe.eos_id} == {0, 1}
    for text in SAMPLES + ["\x00\x01 unseen ǅ characters ₿"]:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
        assert bpe.encode_batch([text])[0].tolist() == ids
    assert len(bpe.encode("alpha beta gamma delta")) < len("alpha beta gamma delta")  # merges learned


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_saved_folder_reloads_to_identical_tokenizer(tmp_path, bpe, kind):
    tok = ByteTokenizer() if kind == "byte" else bpe
    tok.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                            "tokenizer_config.json"]
    again = load_tokenizer_dir(str(tmp_path))
    assert type(again) is type(tok)
    assert again.fingerprint() == tok.fingerprint()
    assert (again.vocab_size, again.bos_id, again.eos_id) == (tok.vocab_size, tok.bos_id, tok.eos_id)
    for text in SAMPLES:
        assert again.encode(text) == tok.encode(text)
    # tokenizer.kind = "file" pointing at the saved tokenizer.json (how imported runs resume)
    as_file = build_tokenizer(TokenizerConfig(kind="file", path=str(tmp_path / "tokenizer.json")), "")
    assert type(as_file) is type(tok) and as_file.fingerprint() == tok.fingerprint()


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_hf_files_load_in_transformers_with_the_same_ids(tmp_path, bpe, kind):
    transformers = pytest.importorskip("transformers", reason="HF equivalence needs transformers (scaletrain[hf])")
    tok = ByteTokenizer() if kind == "byte" else bpe
    tok.save(str(tmp_path))
    for cls in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        hf = cls.from_pretrained(str(tmp_path))
        assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
        for text in SAMPLES:
            ids = tok.encode(text)
            assert hf(text)["input_ids"] == ids, (cls.__name__, text)  # defaults: no specials added
            assert hf.decode(ids) == text
        assert hf.decode([tok.encode("a")[0], tok.eos_id]) == "a<|eos|>"


def test_bpe_is_trained_once_then_loaded_from_cache(tmp_path):
    calls = []

    def docs():
        calls.append(1)
        return corpus_docs()

    cfg = TokenizerConfig(kind="bpe", vocab_size=290, train_chars=50_000)
    first = build_tokenizer(cfg, str(tmp_path), docs, source_fingerprint="fp1")
    assert calls == [1]
    cached = list((tmp_path / "tokenizers").glob("bpe-*/tokenizer.json"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns

    def must_not_train():
        raise AssertionError("the corpus was read although the tokenizer is cached")

    second = build_tokenizer(cfg, str(tmp_path), must_not_train, source_fingerprint="fp1")
    assert second.fingerprint() == first.fingerprint()
    assert second.encode("gamma delta self") == first.encode("gamma delta self")
    assert cached[0].stat().st_mtime_ns == mtime  # not rewritten
    # another corpus, vocab or budget is another cache entry
    build_tokenizer(cfg, str(tmp_path), docs, source_fingerprint="fp2")
    build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=280, train_chars=50_000), str(tmp_path), docs, "fp1")
    assert calls == [1, 1, 1]
    assert len(list((tmp_path / "tokenizers").glob("bpe-*"))) == 3


def test_bpe_training_budget_counts_characters(tmp_path):
    from scaletrain.data.tokenizer import _training_texts

    texts = _training_texts(corpus_docs(), 5_000)
    assert sum(map(len, texts)) == 5_000
    assert texts == _training_texts(list(reversed(corpus_docs())), 5_000)  # order-independent sample


def _write_tokenizer_json(path, specials):
    vocab = {c: i for i, c in enumerate("abcdefghij ")}
    core = HFCore(models.WordLevel(vocab=vocab, unk_token="a"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(s, special=True) for s in specials])
    core.save(str(path))


def test_file_tokenizer_finds_specials_and_reports_bad_files(tmp_path):
    path = tmp_path / "tokenizer.json"
    _write_tokenizer_json(path, ["<s>", "</s>"])
    tok = build_tokenizer(TokenizerConfig(kind="file", path=str(path)), str(tmp_path / "cache"))
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id) == (tok.core.token_to_id("<s>"), tok.core.token_to_id("</s>"))
    assert tok.encode("abc cab") == [tok.core.token_to_id("a")] * 2  # WordLevel, unknown words -> "a"
    # GPT-2 style: only <|endoftext|>, used as both bos and eos
    _write_tokenizer_json(path, ["<|endoftext|>"])
    tok = build_tokenizer(TokenizerConfig(kind="file", path=str(tmp_path)), "")  # a folder works too
    assert tok.bos_id == tok.eos_id == tok.core.token_to_id("<|endoftext|>")

    _write_tokenizer_json(path, ["<pad>"])
    with pytest.raises(DataError, match="none of the end-of-text tokens"):
        build_tokenizer(TokenizerConfig(kind="file", path=str(path)), "")
    # an HF folder names its own specials in tokenizer_config.json (string or AddedToken dict)
    _write_tokenizer_json(path, ["<|im_start|>", "<|im_end|>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>"}))
    tok = build_tokenizer(TokenizerConfig(kind="file", path=str(path)), "")
    assert (tok.bos_id, tok.eos_id) == (tok.core.token_to_id("<|im_start|>"), tok.core.token_to_id("<|im_end|>"))
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer(TokenizerConfig(kind="file", path=str(tmp_path / "missing.json")), "")
    path.write_text(json.dumps({"version": "1.0", "model": {"type": "Nope"}}))
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        build_tokenizer(TokenizerConfig(kind="file", path=str(path)), "")
    (tmp_path / "cache").mkdir()
    with pytest.raises(DataError, match=r"cache/tokenizer.json' does not exist"):
        load_tokenizer_dir(str(tmp_path / "cache"))
    path.write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer_dir(str(path))


def test_fingerprints_differ_between_tokenizers(bpe):
    other = train_bpe([d.text for d in corpus_docs(30)], vocab_size=280)
    prints = {ByteTokenizer().fingerprint(), bpe.fingerprint(), other.fingerprint()}
    assert len(prints) == 3
    assert ByteTokenizer().fingerprint() == ByteTokenizer().fingerprint()
    with pytest.raises(DataError, match=">= 259"):
        train_bpe(["abc"], vocab_size=200)
