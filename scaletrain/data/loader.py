"""Resumable, data-parallel batches of token windows from a flat token stream.

Sample i is the window ``tokens[i*seq_len : i*seq_len + seq_len + 1]`` (non-overlapping,
stride seq_len, the last token shared with the next window as its first target), so a stream
of N tokens has ``(N - 1) // seq_len`` samples. Each epoch visits them in the order
``np.random.default_rng((seed, epoch)).permutation(num_samples)``.

That global order is consumed in global batches of ``batch_size * dp_size`` samples; rank r
takes the contiguous slice ``[r*batch_size, (r+1)*batch_size)`` of each. The position in the
global order is the whole state, so a run can resume under a different dp_size from the same
global position. The incomplete tail global batch of an epoch is dropped.

``MixedLoader`` draws from several streams (the domains of ``[[data.domains]]``) instead; its
docstring defines the mixture.
"""

from __future__ import annotations

import zlib

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
        if "domains" in state:
            raise DataError("the checkpoint's data loader mixed [[data.domains]] but this config has none; "
                            "resume with the run's own data settings.")
        for key in ("seq_len", "num_samples"):
            if int(state[key]) != getattr(self, key):
                raise DataError(f"data loader state has {key} = {state[key]} but this run has "
                                f"{getattr(self, key)}: the checkpoint was made with another data.seq_len "
                                "or another corpus/tokenizer. Resume with the same data settings.")
        self.epoch = int(state["epoch"])
        self.global_position = int(state["global_position"])
        self.seed = int(state["seed"])
        self._order_epoch = -1


class MixedLoader:
    """Training batches drawn from several token streams (domains), mixed by weight.

    The global order is a sequence of slots; slot s (0-based) goes to the domain d that
    maximises ``p_d * (s + 1) - c_d`` (ties: the first domain), with p_d = weight_d / sum of
    weights and c_d the slots domain d already has: a deterministic weighted round robin whose
    counts never stray a whole sample from ``p_d * s``, so every batch holds the mixture in
    proportion (weights 1:1 alternate domains). Domain d's k-th slot takes sample ``k % n_d`` of
    the permutation ``default_rng((seed, crc32(name), k // n_d)).permutation(n_d)``: a fresh
    shuffle per pass over that domain. Samples are windows as in ``TokenLoader``.

    A global batch is ``batch_size * dp_size`` consecutive slots; rank r takes the contiguous
    ``[r*batch_size, (r+1)*batch_size)`` slice. The state is the slot count of every domain,
    which does not depend on dp_size, so a run resumes exactly under another dp_size. A domain of
    weight 0 is never drawn (it is only validated). ``last_sample_ids`` numbers samples over the
    concatenated domains (domain d's ids start after those of the domains before it).
    """

    def __init__(self, streams: list[np.ndarray], names: list[str], weights: list[float], seq_len: int,
                 batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        if not (len(streams) == len(names) == len(weights)) or not streams:
            raise ValueError("streams, names and weights must be non-empty and of one length")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        total = float(sum(weights))
        if total <= 0 or min(weights) < 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
        self.streams, self.names = streams, list(names)
        self.weights = [float(w) for w in weights]
        self.shares = [w / total for w in self.weights]
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch = batch_size * dp_size
        self.num_samples = [_num_samples(len(t), seq_len) for t in streams]
        for name, n, w in zip(names, self.num_samples, self.weights):
            if w > 0 and n == 0:
                raise DataError(f"domain '{name}': its training split has too few tokens for one sequence of "
                                f"{seq_len} tokens. Use more data, lower data.seq_len, or give it weight 0.")
        self.offsets = np.cumsum([0] + self.num_samples[:-1]).tolist()
        self.seeds = [zlib.crc32(name.encode("utf-8")) for name in names]
        self.counts = [0] * len(streams)  # slots drawn from each domain, all ranks together
        self.epoch = 0  # the trainer keys skipped batches by (epoch, global_position); one "epoch" here
        self.last_sample_ids = np.zeros(0, dtype=np.int64)
        self._orders: dict[tuple[int, int], np.ndarray] = {}  # (domain, pass) -> permutation

    @property
    def global_position(self) -> int:
        """Slots drawn so far over all ranks."""
        return sum(self.counts)

    def _order(self, d: int, epoch: int) -> np.ndarray:
        if (d, epoch) not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != d}  # one pass per domain cached
            self._orders[(d, epoch)] = np.random.default_rng((self.seed, self.seeds[d], epoch)).permutation(
                self.num_samples[d])
        return self._orders[(d, epoch)]

    def _next_slots(self) -> list[tuple[int, int]]:
        """(domain, sample id within it) of the next global batch's slots; advances the counts."""
        slots = []
        for _ in range(self.global_batch):
            s = self.global_position + 1
            d = max(range(len(self.counts)), key=lambda i: (self.shares[i] * s - self.counts[i], -i))
            k = self.counts[d]
            slots.append((d, int(self._order(d, k // self.num_samples[d])[k % self.num_samples[d]])))
            self.counts[d] += 1
        return slots

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets) [batch_size, seq_len] of the next global batch."""
        mine = self._next_slots()[self.dp_rank * self.batch_size : (self.dp_rank + 1) * self.batch_size]
        parts = [_gather(self.streams[d], np.array([i], dtype=np.int64), self.seq_len) for d, i in mine]
        self.last_sample_ids = np.array([self.offsets[d] + i for d, i in mine], dtype=np.int64)
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Plain, JSON-able and the same on every rank: the slot count of every domain."""
        return {"domains": list(self.names), "counts": [int(c) for c in self.counts], "weights": list(self.weights),
                "num_samples": [int(n) for n in self.num_samples], "seed": int(self.seed), "seq_len": int(self.seq_len)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (saved under any dp_size). DataError when it was saved for other
        domains, weights, seq_len or token streams: the counts would then mean another mixture."""
        if "domains" not in state:
            raise DataError("the checkpoint's data loader read one corpus but this config mixes [[data.domains]]; "
                            "resume with the run's own data settings.")
        for key in ("domains", "weights", "seq_len", "num_samples"):
            mine = getattr(self, "names" if key == "domains" else key)
            if state[key] != mine:
                raise DataError(f"data loader state has {key} = {state[key]} but this run has {mine}: the checkpoint "
                                "was made with other [[data.domains]] / data.domain / data.seq_len settings or another "
                                "corpus or tokenizer. Resume with the same data settings.")
        self.counts = [int(c) for c in state["counts"]]
        self.seed = int(state["seed"])
        self._orders = {}


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
