"""MFU arithmetic, memory, JSONL + TensorBoard writing, reading, plot, log line."""

import json
import math

import numpy as np
import pytest
import torch

from scaletrain.config.schema import MetricsConfig
from scaletrain.errors import CheckpointError
from scaletrain.train.metrics import (
    MetricsWriter, format_log_line, mfu, peak_memory_bytes, peak_reserved_bytes,
    plot_loss, read_metrics, reset_peak_memory,
)


def test_mfu_by_hand():
    # 8 H100 SXM at 989.4e12 FLOP/s; 6 * 1e9 FLOPs/token; 500k tokens/s over all 8 GPUs
    # -> achieved 3.0e15 FLOP/s / 7.9152e15 = 0.37902...
    assert mfu(500_000, 6e9, 989.4e12, n_devices=8) == pytest.approx(3.0e15 / 7.9152e15)
    assert mfu(1000, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(1000, 1e9, None) is None


def test_cpu_peak_memory_is_rss():
    block = torch.ones(256 * 2**20 // 4)  # 256 MiB, every page touched
    block.add_(1)
    peak = peak_memory_bytes(torch.device("cpu"))
    # Peak RSS covers the resident block (a KiB/bytes unit mix-up would miss by 1024x) ...
    assert 256 * 2**20 <= peak < 64 * 2**30
    del block
    assert peak_reserved_bytes("cpu") >= peak
    reset_peak_memory("cpu")  # documented no-op on CPU: the kernel keeps the peak
    assert peak_memory_bytes("cpu") >= peak  # ... and is a peak, not the current RSS


def _cfg(tb=False):
    return MetricsConfig(log_interval=1, tensorboard=tb, plot=True, progress="none")


def test_jsonl_round_trip_with_resume_duplicates(tmp_path):
    with MetricsWriter(tmp_path, _cfg(), rank=0) as w:
        for step in range(1, 6):
            w.log_step({"step": step, "loss": torch.tensor(1.0 / step, dtype=torch.float64),
                        "lr": np.float32(0.5), "tokens": np.int64(step * 10), "mfu": None})
        w.log_eval(4, np.float64(2.25))
    # A resumed run restarts from step 3 and rewrites steps 3..4 with new values.
    with MetricsWriter(tmp_path, _cfg(), rank=0) as w:
        w.log_step({"step": 3, "loss": 0.1 + 0.2})
        w.log_step({"step": 4, "loss": 7.0})
        w.log_eval(4, 1.5)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 9  # appended, never truncated
    assert json.loads(lines[0]) == {"step": 1, "kind": "train", "loss": 1.0, "lr": 0.5,
                                    "tokens": 10, "mfu": None}
    train, evals = read_metrics(tmp_path)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert train[2]["loss"] == 0.1 + 0.2  # full float precision survives (0.30000000000000004)
    assert train[3]["loss"] == 7.0
    assert train[4]["loss"] == 0.2 and train[4]["tokens"] == 50
    assert isinstance(train[4]["tokens"], int)
    assert evals == [{"step": 4, "kind": "eval", "val_loss": 1.5}]
    assert read_metrics(tmp_path / "metrics.jsonl") == (train, evals)


def test_read_metrics_skips_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kind": "train", "loss": 2.0}\n{"step": 2, "kind": "tr')
    train, evals = read_metrics(path)
    assert [r["step"] for r in train] == [1] and evals == []
    path.write_text('{"step": 1, "lo\n{"step": 2, "kind": "train", "loss": 2.0}\n')
    with pytest.raises(CheckpointError, match="metrics.jsonl:1"):
        read_metrics(path)
    with pytest.raises(CheckpointError, match="no metrics file"):
        read_metrics(tmp_path / "missing")


def test_nonzero_rank_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "run", _cfg(tb=True), rank=1)
    w.log_step({"step": 1, "loss": 1.0})
    w.log_eval(1, 1.0)
    w.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_scalars_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path, _cfg(tb=True), rank=0) as w:
        for step, loss in [(1, 4.0), (2, 3.5), (3, 3.25)]:
            w.log_step({"step": step, "loss": loss, "lr": 1e-3, "note": "text is skipped"})
        w.log_eval(3, 3.75)
    event_files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(event_files) == 1 and event_files[0].stat().st_size > 0
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "eval/val_loss"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 4.0), (2, 3.5), (3, 3.25)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/val_loss")] == [(3, 3.75)]


def test_plot_loss_writes_png(tmp_path):
    with MetricsWriter(tmp_path, _cfg(), rank=0) as w:
        for step in range(1, 21):
            w.log_step({"step": step, "loss": 5.0 / math.sqrt(step)})
        w.log_step({"step": 21, "loss": float("nan")})  # non-finite points are left out
        w.log_eval(10, 2.0)
        w.log_eval(20, 1.5)
    out = plot_loss(tmp_path)
    assert out == tmp_path / "loss.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not (tmp_path / "loss.png.tmp").exists()


def test_format_log_line():
    record = {"step": 12, "loss": 3.45213, "lr": 3e-4, "tokens_per_s": 12345.4,
              "tflops": 1.234, "mfu": None, "mem_bytes": 1.2 * 2**30}
    assert format_log_line(record, total_steps=100) == (
        "step 12/100 | loss 3.4521 | lr 3.00e-04 | 12,345 tok/s | 1.23 TFLOP/s | mfu n/a"
        " | mem 1.20 GiB")
    record["mfu"] = 0.4123
    assert "| mfu 41.2% |" in format_log_line(record)
    assert format_log_line({"step": 3, "loss": 1.0}) == "step 3 | loss 1.0000 | mfu n/a"
    assert format_log_line({"step": 3, "total_steps": 9}) == "step 3/9 | mfu n/a"
