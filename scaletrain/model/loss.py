"""The training objective of the model: next-token cross entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (nats/token) of logits [batch, seq, vocab] against targets
    [batch, seq], in fp32. The trainer compiles it with the model when train.compile: the fp32
    upcast, log-softmax and gather fuse."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
