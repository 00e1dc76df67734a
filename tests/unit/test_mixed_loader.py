"""MixedLoader: the weighted round robin over domains, per-domain shuffles, exact resume and
resharding over data-parallel sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scaletrain.data.loader import MixedLoader, TokenLoader
from scaletrain.errors import DataError

SEQ = 4


def streams(*num_samples: int) -> list[np.ndarray]:
    """Domain d's sample i starts with token 1000*d + i*SEQ, so a window names its domain."""
    return [(1000 * d + np.arange(n * SEQ + 1)).astype(np.uint16) for d, n in enumerate(num_samples)]


def make(weights=(1.0, 1.0), sizes=(10, 7), batch=4, seed=0, rank=0, dp=1) -> MixedLoader:
    names = ["code", "prose", "math"][: len(weights)]
    return MixedLoader(streams(*sizes), names, list(weights), SEQ, batch, seed, rank, dp)


def take(loader, n):
    out = []
    for _ in range(n):
        x, y = loader.next_batch()
        out.append((x.clone(), y.clone(), loader.last_sample_ids.copy()))
    return out


def test_slots_follow_the_weights_exactly_and_windows_come_from_their_domain():
    loader = make(weights=(1.0, 3.0), sizes=(50, 50), batch=4)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, SEQ) and torch.equal(y[:, :-1], x[:, 1:])
    assert (x[:, 0] // 1000).tolist() == [1, 0, 1, 1]  # p = (1/4, 3/4): deficit order prose, code, prose, prose
    for _ in range(24):
        loader.next_batch()
        s = loader.global_position
        assert all(abs(c - p * s) < 1 for c, p in zip(loader.counts, loader.shares))
    assert loader.counts == [25, 75]
    # ids number samples over the concatenated domains (prose's start at 50); the window starts where its id says
    x, _ = loader.next_batch()
    domain, within = loader.last_sample_ids // 50, loader.last_sample_ids % 50
    assert x[:, 0].tolist() == (1000 * domain + within * SEQ).tolist()
    alternating = make(batch=6)
    alternating.next_batch()
    assert (alternating.last_sample_ids >= 10).tolist() == [False, True] * 3  # equal weights alternate


def test_each_domain_is_shuffled_per_pass_and_a_zero_weight_domain_is_never_drawn():
    loader = make(weights=(1.0, 0.0, 1.0), sizes=(6, 3, 5), batch=2)
    batches = take(loader, 11)  # 22 slots: 11 per trained domain, more than one pass of each
    ids = np.concatenate([b[2] for b in batches])
    code = ids[ids < 6]
    math = ids[ids >= 9] - 9
    assert not np.any((ids >= 6) & (ids < 9))  # prose has weight 0: validated only
    assert sorted(code[:6]) == list(range(6)) and sorted(math[:5]) == list(range(5))  # a permutation per pass
    assert loader.counts == [11, 0, 11]
    other_seed = take(make(weights=(1.0, 0.0, 1.0), sizes=(6, 3, 5), batch=2, seed=1), 11)
    assert not all(np.array_equal(a[2], b[2]) for a, b in zip(batches, other_seed))


def test_resume_from_a_json_state_yields_exactly_the_remaining_batches():
    full = take(make(weights=(2.0, 1.0), batch=3), 20)  # crosses several passes of each domain
    for k in (0, 3, 11):
        loader = make(weights=(2.0, 1.0), batch=3)
        take(loader, k)
        state = json.loads(json.dumps(loader.state_dict()))
        resumed = make(weights=(2.0, 1.0), batch=3, seed=99)
        resumed.load_state_dict(state)
        for (x, y, ids), (fx, fy, fids) in zip(take(resumed, 20 - k), full[k:]):
            assert torch.equal(x, fx) and torch.equal(y, fy) and np.array_equal(ids, fids)


def test_ranks_slice_the_global_batch_and_reshard_dp2_to_dp1():
    single = make(batch=6)
    ranks = [make(batch=3, rank=r, dp=2) for r in range(2)]
    for _ in range(5):
        single.next_batch()
        for r in ranks:
            r.next_batch()
        assert np.array_equal(np.concatenate([r.last_sample_ids for r in ranks]), single.last_sample_ids)
        assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    # resume the dp=2 position on one rank with the same global batch: the same sequences follow
    one = make(batch=6, seed=7)
    one.load_state_dict(ranks[0].state_dict())
    for _ in range(4):
        single.next_batch()
        one.next_batch()
        assert np.array_equal(one.last_sample_ids, single.last_sample_ids)


def test_state_from_another_mixture_or_loader_is_rejected():
    loader = make()
    state = loader.state_dict()
    with pytest.raises(DataError, match="weights = \\[1.0, 2.0\\] but this run has \\[1.0, 1.0\\]"):
        loader.load_state_dict({**state, "weights": [1.0, 2.0]})
    with pytest.raises(DataError, match="domains = \\['prose', 'code'\\]"):
        loader.load_state_dict({**state, "domains": ["prose", "code"]})
    with pytest.raises(DataError, match="read one corpus but this config mixes"):
        loader.load_state_dict(TokenLoader(streams(10)[0], SEQ, 2, 0).state_dict())
    with pytest.raises(DataError, match="mixed \\[\\[data.domains\\]\\] but this config has none"):
        TokenLoader(streams(10)[0], SEQ, 2, 0).load_state_dict(state)
    with pytest.raises(DataError, match="domain 'prose': its training split has too few tokens"):
        MixedLoader(streams(5, 0), ["code", "prose"], [1.0, 1.0], SEQ, 2, 0)
    MixedLoader(streams(5, 0), ["code", "prose"], [1.0, 0.0], SEQ, 2, 0)  # an empty domain may be validation-only
