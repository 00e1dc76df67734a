"""train/faults.py in-process: injected faults planned for the same step all fire, and the
non-finite policy's rollback state (retry once, then skip; give up after 4 failures)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from scaletrain.errors import NumericsError
from scaletrain.train.faults import Injector, NonFiniteSteps


def test_nan_fault_does_not_swallow_a_hang_planned_for_the_same_step(tmp_path, monkeypatch):
    marker = tmp_path / "hung"
    monkeypatch.setenv("SCALETRAIN_FAULT_NAN_STEPS", "3")
    monkeypatch.setenv("SCALETRAIN_FAULT_SLEEP", f"0:3:0.01:{marker}")
    part = nn.Linear(2, 2)
    part(torch.ones(1, 2)).sum().backward()
    Injector(rank=0).after_backward(3, [part], sample_ids=[])
    assert torch.isnan(part.weight.grad).all()  # the NaN fault fired ...
    assert marker.read_text() == "rank 0 hung at step 3\n"  # ... and so did the hang


def test_rollback_retries_a_batch_once_then_skips_it_and_gives_up_after_four_failures():
    guard = NonFiniteSteps("rollback", rank=0)
    checkpoint_positions = [[0, 8]]  # what the checkpoint's train state holds

    def reload(path: Path) -> int:
        guard.load_state_dict(checkpoint_positions)
        return 4

    with pytest.raises(NumericsError, match="no checkpoint yet"):
        guard.rollback(5, [(0, 40)], None, "report", reload)
    guard.rollback(5, [(0, 40), (0, 48)], Path("ckpt"), "report", reload)  # first failure: retried
    assert not guard.skips((0, 40)) and guard.skips((0, 8))
    guard.rollback(5, [(0, 40), (0, 48)], Path("ckpt"), "report", reload)  # again: skipped from now on
    assert guard.skips((0, 40)) and guard.skips((0, 48)) and guard.skips((0, 8))
    assert guard.state_dict() == [[0, 8], [0, 40], [0, 48]]
    assert guard.rollbacks[1] == {"step": 5, "to": 4, "skipped": [[0, 40], [0, 48]]}
    guard.rollback(5, [(0, 56)], Path("ckpt"), "report", reload)
    guard.rollback(5, [(0, 64)], Path("ckpt"), "report", reload)
    with pytest.raises(NumericsError, match="Step 5 failed 4 times"):
        guard.rollback(5, [(0, 72)], Path("ckpt"), "report", reload)
