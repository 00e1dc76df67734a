"""Fault injection (train/faults.py `Injector`): faults planned for the same step all fire."""

from __future__ import annotations

import torch
from torch import nn

from scaletrain.train.faults import Injector


def test_nan_fault_does_not_swallow_a_hang_planned_for_the_same_step(tmp_path, monkeypatch):
    marker = tmp_path / "hung"
    monkeypatch.setenv("SCALETRAIN_FAULT_NAN_STEPS", "3")
    monkeypatch.setenv("SCALETRAIN_FAULT_SLEEP", f"0:3:0.01:{marker}")
    part = nn.Linear(2, 2)
    part(torch.ones(1, 2)).sum().backward()
    Injector(rank=0).after_backward(3, [part], sample_ids=[])
    assert torch.isnan(part.weight.grad).all()  # the NaN fault fired ...
    assert marker.read_text() == "rank 0 hung at step 3\n"  # ... and so did the hang
