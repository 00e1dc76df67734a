"""Resumable, data-parallel batches of token windows from a flat token stream.

Sample i is the window ``tokens[i*seq_len : i*seq_len + seq_len + 1]`` (non-overlapping,
stride seq_len, the last token shared with the next window as its first target), so a stream
of N tokens has ``(N - 1) // seq_len`` samples. Each epoch visits them in the order
``np.random.default_rng((seed, epoch)).permutation(num_samples)``.

That global order is consumed in global batches of ``batch_size * dp_size`` samples; rank r
takes the contiguous slice ``[r*batch_size, (r+1)*batch_size)`` of each. The position in the
global order is the whole state, so a run can resume under a different dp_size from the same
global position. The incomplete tail global batch of an epoch is dropped.
"""

from __future__ import annotations

import numpy as np
import torch

from scaletrain.errors import DataError


def _num_samples(num_tokens: int, seq_len: int) -> int:
    return max(0, (num_tokens - 1) // seq_len)


def _gather(tokens: np.ndarray, sample_ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 [len(sample_ids), seq_len] for the given sample ids."""
    offsets = sample_ids[:, None] * seq_len + np.arange(seq_len + 1)  # [batch, seq_len + 1]
    windows = torch.from_numpy(np.asarray(tokens[offsets], dtype=np.int64))
    return windows[:, :-1], windows[:, 1:]  # both [batch, seq_len]


class TokenLoader:
    """Shuffled training batches for one data-parallel rank; see the module docstring.

    ``next_batch()`` (or iterating) returns ``(inputs, targets)`` int64 tensors of shape
    [batch_size, seq_len] on the CPU; ``last_sample_ids`` holds the global sample ids of that
    batch. Epochs roll over forever.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        self.tokens = tokens
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_samples = _num_samples(len(tokens), seq_len)
        self.global_batch = batch_size * dp_size  # samples consumed per step over all ranks
        self.batches_per_epoch = self.num_samples // self.global_batch
        if self.batches_per_epoch == 0:
            need = self.global_batch * seq_len + 1
            raise DataError(f"the training split has {len(tokens)} tokens; one global batch of "
                            f"{batch_size} x {dp_size} ranks x {seq_len} tokens needs {need}. Use more "
                            "data, or lower data.batch_size / data.seq_len / the data-parallel degree.")
        self.epoch = 0
        self.global_position = 0  # samples of this epoch's order already consumed (all ranks)
        self.last_sample_ids = np.zeros(0, dtype=np.int64)
        self._order_epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_samples)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) of this rank, advancing the global position by one
        global batch (rolling over to the next epoch when the tail is incomplete)."""
        if self.global_position + self.global_batch > self.num_samples:
            self.epoch += 1
            self.global_position = 0
        start = self.global_position + self.dp_rank * self.batch_size
        self.last_sample_ids = self._epoch_order()[start : start + self.batch_size].astype(np.int64)
        self.global_position += self.global_batch
        return _gather(self.tokens, self.last_sample_ids, self.seq_len)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Plain-int, JSON-able position: the same on every rank."""
        return {"epoch": int(self.epoch), "global_position": int(self.global_position), "seed": int(self.seed),
                "seq_len": int(self.seq_len), "num_samples": int(self.num_samples)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (saved under any dp_size). DataError when it was saved for
        another seq_len or token stream (num_samples), which would make the position meaningless."""
        for key in ("seq_len", "num_samples"):
            if int(state[key]) != getattr(self, key):
                raise DataError(f"data loader state has {key} = {state[key]} but this run has "
                                f"{getattr(self, key)}: the checkpoint was made with another data.seq_len "
                                "or another corpus/tokenizer. Resume with the same data settings.")
        self.epoch = int(state["epoch"])
        self.global_position = int(state["global_position"])
        self.seed = int(state["seed"])
        self._order_epoch = -1


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``n_batches`` fixed (inputs, targets) batches, [batch_size, seq_len] int64, from
    consecutive windows at the start of ``tokens`` (no shuffle): the same on every call and
    rank. Fewer batches come back when the split is short; DataError when not even one fits."""
    available = _num_samples(len(tokens), seq_len) // batch_size
    if available == 0:
        raise DataError(f"the validation split has {len(tokens)} tokens; one batch of {batch_size} x "
                        f"{seq_len} tokens needs {batch_size * seq_len + 1}. Raise data.val_fraction, "
                        "use more data, or lower data.batch_size / data.seq_len.")
    ids = np.arange(min(n_batches, available) * batch_size, dtype=np.int64).reshape(-1, batch_size)
    return [_gather(tokens, row, seq_len) for row in ids]
