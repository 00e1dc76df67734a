"""Optimizer groups and the learning-rate schedules, against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from scaletrain.config.schema import OptimConfig, ScheduleConfig
from scaletrain.train.optim import LRSchedule, build_optimizer, lr_factor, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4, bias=True)
        self.norm = nn.LayerNorm(4)


def test_weight_decay_groups_exclude_embeddings_norms_biases():
    m = Tiny()
    decay, no_decay = param_groups(m, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_tied_weights_counted_once():
    m = Tiny()
    m.out = nn.Linear(4, 10, bias=False)
    m.out.weight = m.emb.weight
    groups = param_groups(m, 0.1)
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(m.parameters()))  # nn.Module.parameters() already dedups


def test_warmup_cosine_values():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(1, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(10, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, 110, cfg) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays():
    cfg = ScheduleConfig(kind="wsd", warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_factor(50, 100, cfg) == 1.0 and lr_factor(80, 100, cfg) == 1.0
    assert lr_factor(90, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.0)


def test_schedule_sets_lr_and_round_trips():
    opt = build_optimizer(Tiny(), OptimConfig(lr=1e-3), torch.device("cpu"))
    s = LRSchedule(opt, 1e-3, 20, ScheduleConfig(kind="linear", warmup_steps=0, min_lr_ratio=0.0))
    assert s.set_for_step(10) == pytest.approx(5e-4)
    assert all(g["lr"] == pytest.approx(5e-4) for g in opt.param_groups)
    s2 = LRSchedule(opt, 1e-3, 20, s.cfg)
    s2.load_state_dict(s.state_dict())
    assert s2.last_step == 10
