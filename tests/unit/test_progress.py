"""Progress output per mode, rank gating and the ETA from recent step times."""

import io

import pytest

from scaletrain.train.progress import Progress, auto_log_interval, format_eta


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _record(loss):
    return {"loss": loss, "lr": 1e-3, "tokens_per_s": 2048.0, "tflops": 0.5, "mfu": None}


def test_plain_prints_every_log_interval_with_eta(capsys):
    clock = FakeClock()
    with Progress(total_steps=10, mode="plain", rank=0, log_interval=4, clock=clock) as p:
        clock.t += 30.0  # first step: warm-up, excluded from the ETA
        p.update(1, _record(5.0))
        for step in range(2, 11):
            clock.t += 2.0
            p.update(step, _record(5.0 - step * 0.1))
        p.note("eval: val_loss 4.0000")
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "step 4/10 | loss 4.6000 | lr 1.00e-03 | 2,048 tok/s | 0.50 TFLOP/s | mfu n/a"
        " | eta 0:00:12",
        "step 8/10 | loss 4.2000 | lr 1.00e-03 | 2,048 tok/s | 0.50 TFLOP/s | mfu n/a"
        " | eta 0:00:04",
        "step 10/10 | loss 4.0000 | lr 1.00e-03 | 2,048 tok/s | 0.50 TFLOP/s | mfu n/a"
        " | eta 0:00:00",
        "eval: val_loss 4.0000",
    ]


def test_auto_log_interval_scales_with_the_run(capsys):
    """log_interval 0 (the default): about 50 lines, every 1/2/5 x 10^k steps, plus the last."""
    assert [auto_log_interval(n) for n in (8, 100, 200, 3000, 10_000, 1_234_567)] == [1, 2, 5, 50, 200, 20_000]
    with Progress(total_steps=3000, mode="plain", rank=0, log_interval=0) as p:
        for step in range(1, 3001):
            p.update(step, _record(1.0))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 60 and lines[0].startswith("step 50/3000") and lines[-1].startswith("step 3000/3000")


def test_eta_uses_recent_window_and_skipped_steps():
    clock = FakeClock()
    p = Progress(total_steps=100, mode="none", rank=0, start_step=50, window=2, clock=clock)
    with p:
        clock.t += 100.0
        p.update(51, {})
        assert p.eta_seconds(51) is None  # only the warm-up interval so far
        clock.t += 10.0
        p.update(52, {})  # 10 s/step
        clock.t += 6.0
        p.update(55, {})  # updates every 3 steps: 2 s/step
        assert p.eta_seconds(55) == pytest.approx(45 * (10 + 2) / 2)
        clock.t += 2.0
        p.update(56, {})  # window of 2 drops the 10 s/step interval
        assert p.eta_seconds(56) == pytest.approx(44 * 2.0)


def test_nonzero_rank_and_none_mode_print_nothing(capsys):
    for kwargs in ({"mode": "plain", "rank": 1}, {"mode": "rich", "rank": 3},
                   {"mode": "none", "rank": 0}):
        with Progress(total_steps=3, **kwargs) as p:
            for step in range(1, 4):
                p.update(step, _record(1.0))
            p.note("hello")
    assert capsys.readouterr().out == ""


def test_auto_is_plain_without_a_tty(capsys):
    p = Progress(total_steps=5, mode="auto", rank=0)  # pytest captures stdout: not a TTY
    assert p.mode == "plain"
    with pytest.raises(ValueError, match="progress mode"):
        Progress(total_steps=5, mode="fancy", rank=0)


def test_rich_bar_shows_fields(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    clock = FakeClock()
    with Progress(total_steps=4, mode="rich", rank=0, clock=clock) as p:
        for step in range(1, 5):
            clock.t += 1.0
            p.update(step, {**_record(2.5), "mfu": 0.25})
        p.note("checkpoint saved")
    text = out.getvalue()
    assert "4/4" in text and "loss 2.5000" in text and "2,048 tok/s" in text
    assert "mfu 25.0%" in text and "eta 0:00:00" in text and "checkpoint saved" in text


def test_format_eta():
    assert format_eta(None) == "--:--"
    assert format_eta(3725.4) == "1:02:05"
