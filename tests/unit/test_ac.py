"""Activation checkpointing modes recompute exactly: same loss and gradients as no AC, the
expected modules wrapped, and parameter names unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from scaletrain.model import build_model
from scaletrain.config.flavors import model_config_for
from scaletrain.parallel.ac import apply_ac


def _loss_and_grads(mode: str, every: int = 1):
    model = apply_ac(build_model(model_config_for("debug", n_layers=4), seed=0), mode, every)
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    # Named without the wrapper's "_checkpoint_wrapped_module." infix, as in state_dict.
    return model, loss.item(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad
                                for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode,every,wrapped", [("full", 1, 4), ("full", 2, 2), ("full", 3, 2), ("selective", 1, 4)])
def test_ac_matches_no_ac(mode, every, wrapped):
    ref_model, ref_loss, ref_grads = _loss_and_grads("none")
    model, loss, grads = _loss_and_grads(mode, every)
    assert sum(isinstance(m, CheckpointWrapper) for m in model.modules()) == wrapped
    assert loss == ref_loss
    assert model.state_dict().keys() == ref_model.state_dict().keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7)


def test_bad_mode_and_every():
    model = build_model(model_config_for("debug"), seed=0)
    with pytest.raises(ValueError, match="unknown activation checkpointing mode"):
        apply_ac(model, "some")
    with pytest.raises(ValueError, match="k >= 1"):
        apply_ac(model, "full", 0)
