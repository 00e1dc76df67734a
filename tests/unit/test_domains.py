"""Data domains: [[data.domains]] parsing and errors, the built-in code/prose split, per-domain
shards and validation sets."""

from __future__ import annotations

import ast

import numpy as np
import pytest

from scaletrain.config import load_config, read_toml, write_config
from scaletrain.config.load import config_from_dict, config_to_dict
from scaletrain.config.schema import DataConfig, DomainConfig, TokenizerConfig
from scaletrain.data import build_loader, prepare_data, validation_sets
from scaletrain.data.corpus import load_corpus
from scaletrain.data.loader import MixedLoader, TokenLoader
from scaletrain.data.pysplit import split_python_source
from scaletrain.errors import ConfigError, DataError

DOMAINS = '''
[data]
seq_len = 32
[[data.domains]]
name = "code"
source = "builtin_code"
[[data.domains]]
name = "prose"
source = "builtin_prose"
weight = 2.5
'''


def _toml(tmp_path, text: str):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- config

def test_domains_parse_and_round_trip_through_config_toml(tmp_path):
    cfg = load_config(_toml(tmp_path, DOMAINS), ["--data.domain", "prose"])
    assert cfg.data.domains == [DomainConfig("code", "builtin_code"), DomainConfig("prose", "builtin_prose", weight=2.5)]
    assert cfg.data.domain == "prose"
    write_config(cfg, tmp_path / "config.toml")
    again = config_from_dict(read_toml(tmp_path / "config.toml"))
    assert again == cfg and config_to_dict(again) == config_to_dict(cfg)
    assert load_config(None).data.domains == []  # no tables: one corpus, as before
    plain = load_config(None)
    write_config(plain, tmp_path / "plain.toml")
    assert config_from_dict(read_toml(tmp_path / "plain.toml")) == plain


@pytest.mark.parametrize("extra,args,needle", [
    ('[[data.domains]]\nname = "x"\nwieght = 1\n', [], "unknown key 'wieght' in data.domains[2]. Did you mean 'weight'?"),
    ('[[data.domains]]\nname = "x"\nweight = "heavy"\n', [], "data.domains[2].weight must be a number"),
    ('[[data.domains]]\nname = "code"\n', [], "data.domains[2] ('code'): the name 'code' is used twice"),
    ('[[data.domains]]\nname = "a b"\n', [], "name = 'a b' must be non-empty letters, digits"),
    ('[[data.domains]]\nsource = "builtin"\n', [], "data.domains[2]: name = '' must be non-empty"),
    ('[[data.domains]]\nname = "t"\nsource = "text"\n', [], "data.domains[2] ('t'): source = 'text' needs path"),
    ('[[data.domains]]\nname = "t"\nsource = "csv"\n', [], "source = 'csv' is not one of"),
    ('[[data.domains]]\nname = "t"\nweight = -1.0\n', [], "weight must be >= 0"),
    ("", ["--data.domain", "cod"], "data.domain = 'cod' is not one of the [[data.domains]] names (code, prose). Did you mean 'code'?"),
    ("", ["--data.domains", "code"], "data.domains is a list of tables ([[data.domains]] in the TOML file) and cannot be set on the command line"),
    ("", ["--data.path", "x.txt"], "are set per domain when [[data.domains]] is present"),
])
def test_domain_errors_name_the_table_and_the_fix(tmp_path, extra, args, needle):
    with pytest.raises(ConfigError) as info:
        load_config(_toml(tmp_path, DOMAINS + extra), args)
    assert needle in str(info.value)


def test_other_domain_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no \\[\\[data.domains\\]\\] tables"):
        load_config(None, ["--data.domain", "code"])
    zero = DOMAINS.replace('weight = 2.5', 'weight = 0.0') + '[[data.domains]]\nname = "z"\nweight = 0.0\n'
    zero = zero.replace('source = "builtin_code"', 'source = "builtin_code"\nweight = 0.0')
    with pytest.raises(ConfigError, match="every \\[\\[data.domains\\]\\] weight is 0"):
        load_config(_toml(tmp_path, zero))
    assert load_config(_toml(tmp_path, zero), ["--data.domain", "z"]).data.domain == "z"  # selection trains it
    with pytest.raises(ConfigError, match="must be a list of tables"):
        load_config(_toml(tmp_path, "[data]\ndomains = 3\n"))


# --------------------------------------------------------------------------- the built-in split

SOURCE = '''#!/usr/bin/env python3
"""Module doc.

Second paragraph."""
# first comment
# second line
import os  # trailing

# ---------
class Empty:
    """Only a docstring."""

def f(x):
    """Doc of f."""  # after the doc
    s = "# not a comment"
    return x

def g(): "inline docstring stays"
'''


def test_split_moves_docstrings_and_comments_and_keeps_code_valid():
    code, prose = split_python_source(SOURCE)
    assert code == ('import os\n\nclass Empty:\n    pass\n\ndef f(x):\n    s = "# not a comment"\n    return x\n\n'
                    'def g(): "inline docstring stays"\n')
    assert prose.split("\n\n") == ["!/usr/bin/env python3", "Module doc.", "Second paragraph.",
                                   "first comment\nsecond line\ntrailing", "Only a docstring.", "Doc of f.",
                                   "after the doc"]
    ast.parse(code)
    assert split_python_source("def broken(:\n    # comment\n") == ("def broken(:\n    # comment\n", "")
    assert split_python_source("x = 1  # c\r\ny = 2\r\n") == ("x = 1\r\ny = 2\r\n", "c")  # CRLF kept
    assert split_python_source("x = 1\ry = 2  # c\n") == ("x = 1\ry = 2  # c\n", "")  # lone CR: left whole


def test_builtin_domains_are_disjoint_deterministic_and_keep_document_ids():
    kw = dict(max_documents=25, val_fraction=0.2)
    code = load_corpus(DataConfig(source="builtin_code", **kw))
    prose = load_corpus(DataConfig(source="builtin_prose", **kw))
    split_python_source.cache_clear()
    assert load_corpus(DataConfig(source="builtin_code", **kw)).train == code.train  # same bytes again
    whole = {d.doc_id: d.text for d in (lambda c: c.train + c.val)(load_corpus(DataConfig(source="builtin", **kw)))}
    code_docs = {d.doc_id: d.text for d in code.train + code.val}
    prose_docs = {d.doc_id: d.text for d in prose.train + prose.val}
    assert set(code_docs) <= set(whole) and len(code_docs) == 25
    for doc_id, text in code_docs.items():
        assert (text, prose_docs.get(doc_id, "")) == split_python_source(whole[doc_id])
    # a file keeps its split in both domains (its code and prose are held out together)
    assert {d.doc_id for d in code.val} & set(prose_docs) <= {d.doc_id for d in prose.val}
    assert sum(map(len, code_docs.values())) > 2 * sum(map(len, prose_docs.values())) > 0
    assert code.fingerprint != prose.fingerprint != load_corpus(DataConfig(source="builtin", **kw)).fingerprint


def test_builtin_domain_readers_on_a_small_stdlib(tmp_path, monkeypatch):
    from pydoc_data.topics import topics

    import scaletrain.data.corpus as corpus

    (tmp_path / "pydoc_data").mkdir()
    (tmp_path / "pydoc_data" / "topics.py").write_text("topics = {}\n")  # skipped: its text is the topics
    (tmp_path / "mod.py").write_text(SOURCE)
    (tmp_path / "bare.py").write_text('"""Only a docstring."""\n')  # no code left: not a code document
    (tmp_path / "two.py").write_text("x = 1\n")  # no prose: not a prose document
    monkeypatch.setattr(corpus, "_stdlib_root", lambda: str(tmp_path))
    kw = dict(val_fraction=0.05)
    code = load_corpus(DataConfig(source="builtin_code", **kw))
    prose = load_corpus(DataConfig(source="builtin_prose", **kw))
    assert dict(code.train + code.val) == {"stdlib/mod.py": split_python_source(SOURCE)[0], "stdlib/two.py": "x = 1\n"}
    prose_ids = [d.doc_id for d in prose.train + prose.val]
    assert set(prose_ids) == {"stdlib/bare.py", "stdlib/mod.py"} | {f"pydoc/{t}" for t in topics}
    assert (code.stats.skipped_empty, prose.stats.skipped_empty) == (1, 1)


# --------------------------------------------------------------------------- shards, loaders, validation

def _domains_cfg(cache, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(cache), seq_len=16, batch_size=2, max_documents=12, val_fraction=0.25,
                      domains=[DomainConfig("code", "builtin_code"), DomainConfig("prose", "builtin_prose", weight=3)],
                      **kw)


def test_prepare_data_builds_one_shard_set_per_domain_and_one_bpe(tmp_path):
    cfg = _domains_cfg(tmp_path)
    tok = TokenizerConfig(kind="bpe", vocab_size=300, train_chars=50_000)
    data = prepare_data(cfg, tok)
    assert [d.name for d in data.domains] == ["code", "prose"] and [d.weight for d in data.domains] == [1.0, 3.0]
    assert len({d.shard_dir for d in data.domains}) == 2
    assert data.stats["tokens_train"] == sum(len(d.train_tokens) for d in data.domains)
    with pytest.raises(ValueError, match="2 domains"):
        data.train_tokens  # noqa: B018 - several streams: there is no single one
    # selecting a domain changes neither the tokenizer nor any shard (a branch shares its seed's)
    again = prepare_data(_domains_cfg(tmp_path, domain="prose"), tok)
    assert again.tokenizer.fingerprint() == data.tokenizer.fingerprint() and again.stats["built"] is False
    assert [d.shard_dir for d in again.domains] == [d.shard_dir for d in data.domains]
    code_only = DataConfig(cache_dir=str(tmp_path), seq_len=16, max_documents=12, val_fraction=0.25, source="builtin_code")
    assert np.array_equal(prepare_data(code_only, TokenizerConfig(kind="byte")).val_tokens,
                          prepare_data(_domains_cfg(tmp_path), TokenizerConfig(kind="byte")).domains[0].val_tokens)


def test_validation_sets_cover_every_domain_and_split_rows_over_ranks(tmp_path):
    cfg = _domains_cfg(tmp_path, domain="code")
    data = prepare_data(cfg, TokenizerConfig(kind="byte"))
    single = validation_sets(data, cfg, n_batches=2)
    assert list(single) == ["code", "prose"] and all(len(v) == 2 for v in single.values())
    x, y = single["prose"][0]
    assert x.shape == (2, 16) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())
    halves = [validation_sets(data, DataConfig(**{**vars(cfg), "batch_size": 1}), 2, r, 2) for r in range(2)]
    for name in single:
        for b, (x, _) in enumerate(single[name]):
            assert np.array_equal(x.numpy(), np.concatenate([h[name][b][0].numpy() for h in halves]))
    loader = build_loader(data, cfg)
    assert isinstance(loader, MixedLoader) and loader.weights == [1.0, 0.0]  # data.domain selects code only
    mixed = build_loader(data, _domains_cfg(tmp_path))
    assert mixed.weights == [1.0, 3.0]
    plain = DataConfig(cache_dir=str(tmp_path), seq_len=16, batch_size=2, max_documents=12, val_fraction=0.25)
    plain_data = prepare_data(plain, TokenizerConfig(kind="byte"))
    assert isinstance(build_loader(plain_data, plain), TokenLoader) and list(validation_sets(plain_data, plain, 1)) == [""]
    with pytest.raises(DataError, match="domain 'code': the validation split has"):
        validation_sets(data, DataConfig(**{**vars(cfg), "seq_len": 10**6}), 1)
