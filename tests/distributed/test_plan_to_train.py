"""`scaletrain plan --write-config` produces a config that `scaletrain train` runs as written
(the layout it chose, under torchrun with the planned number of ranks; its BPE tokenizer is
trained offline up to the model's vocabulary). Every layout the search can emit is checked
against the trainer's checks and pre-flight in process by tests/unit/test_plan_roundtrip.py."""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest

from conftest import run_main, run_torchrun
from scaletrain.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # a planned layout trained under torchrun: ~14 s on 2 cores


def test_written_plan_trains(tmp_path, data_cache):
    best = tmp_path / "best.toml"
    run_main("plan", "search", "--model", "debug", "--gpus", "2", "--gpu", "h100_sxm", "--seq-len", "128",
             "--global-batch-tokens", "4096", "--write-config", str(best))
    text = best.read_text()
    assert text.startswith("# Written by `scaletrain plan`: debug on 2 x h100_sxm")
    written = tomllib.loads(text)
    assert written["tokenizer"] == {**written["tokenizer"], "kind": "bpe", "vocab_size": written["model"]["vocab_size"]}
    planned = written["parallel"]
    degrees = [planned[k] for k in ("dp_replicate", "dp_shard", "tp", "pp", "cp")]
    assert degrees[0] * degrees[1] * degrees[2] * degrees[3] * degrees[4] == 2
    run = tmp_path / "run"
    proc = run_torchrun(2, "train", "--config", str(best), "--run-dir", str(run), "--train.steps", "3",
                        "--data.cache_dir", str(data_cache), "--metrics.progress", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")[0]] == [1, 2, 3]
