"""Bad input: a clear message on stderr, no traceback, exit code 2, and existing files intact.

The CLI runs in this process (conftest.run_main), except once in a fresh one (a missing
config) for the real interpreter's exit code; the cases that need an existing run folder use
conftest's shared `trained_run` and must leave it as it was."""

from __future__ import annotations

import hashlib

import pytest

from conftest import debug_train_args, run_cli, run_main


def _tree_digest(folder):
    """Digest of every file's name and bytes, except RUN/.lock: a refused run may have held
    the writer lock (it records the last holder's pid), which is not run data."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != ".lock":
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _fails(*args, needle: str, fresh: bool = False):
    proc = (run_cli if fresh else run_main)(*args, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def small_run(trained_run):
    return trained_run[0]


def test_existing_run_folder_is_refused_and_untouched(small_run, data_cache):
    before = _tree_digest(small_run)
    _fails(*debug_train_args(small_run, data_cache, 8), needle="already exists")
    assert _tree_digest(small_run) == before


def test_resume_with_different_model_shape(small_run, data_cache):
    before = _tree_digest(small_run)
    _fails(*debug_train_args(small_run, data_cache, 8, "--model.dim", "128", "--model.ffn_dim", "256"),
           "--resume", "auto", needle="different model shape")
    assert _tree_digest(small_run) == before


def test_vocab_smaller_than_tokenizer(tmp_path, data_cache):
    _fails(*debug_train_args(tmp_path / "r", data_cache, 4, "--model.vocab_size", "200"),
           needle="model.vocab_size = 200 is smaller than the tokenizer")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--train.stepz", "3"], "Did you mean '--train.steps'?"),
    (["--optim.lr", "-1"], "optim.lr must be > 0"),
    (["--data.seq_len", "4096"], "exceeds model.max_seq_len"),
])
def test_config_errors(tmp_path, data_cache, extra, needle):
    _fails(*debug_train_args(tmp_path / "r", data_cache, 4, *extra), needle=needle)
    assert not (tmp_path / "r").exists()


def test_missing_config_and_bad_toml(tmp_path):
    _fails("train", "--config", str(tmp_path / "nope.toml"), "--run-dir", str(tmp_path / "r"), needle="does not exist",
           fresh=True)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = = 3\n")
    _fails("train", "--config", str(bad), "--run-dir", str(tmp_path / "r"), needle="not valid TOML")


def test_missing_corpus(tmp_path, data_cache):
    _fails(*debug_train_args(tmp_path / "r", data_cache, 4, "--data.source", "text",
                             "--data.path", str(tmp_path / "missing")), needle=str(tmp_path / "missing"))


def test_empty_corpus_and_binary_files(tmp_path, data_cache):
    """A text corpus of only empty and binary files is an error that counts what was skipped."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_text("")
    (corpus / "blob.bin").write_bytes(b"\x00\x01binary")
    _fails(*debug_train_args(tmp_path / "r", tmp_path / "cache", 4, "--data.source", "text", "--data.path",
                             str(corpus)), needle="2 files read, 1 skipped as binary/non-UTF-8, 1 empty")
    assert not (tmp_path / "r").exists()


def test_unwritable_run_folder(tmp_path, data_cache):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    _fails(*debug_train_args(afile / "run", data_cache, 4), needle="is a file, not a folder")
    assert afile.read_text() == "keep me"


def test_checkpoint_tokenizer_mismatch(small_run, tmp_path, data_cache):
    """Resuming a byte-tokenizer run with a BPE tokenizer is refused; the checkpoints stay."""
    before = sorted(p.name for p in (small_run / "checkpoints").iterdir())
    _fails(*debug_train_args(small_run, data_cache, 8, "--resume", "auto", "--tokenizer.kind", "bpe",
                             "--tokenizer.vocab_size", "300", "--data.max_documents", "50"),
           needle="different tokenizer")
    assert sorted(p.name for p in (small_run / "checkpoints").iterdir()) == before


def test_generate_and_export_errors(small_run, tmp_path):
    _fails("generate", "--run", str(tmp_path), "--prompt", "x", needle="not a scaletrain run folder")
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _fails("export", "--run", str(small_run), "--to", "hf", "--out", str(out), needle=str(out))
    assert (out / "keep.txt").read_text() == "precious"
