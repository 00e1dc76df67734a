"""TokenLoader windows, determinism, epochs, exact resume, dp resharding and val batches; MixedLoader:
the weighted round robin over domains, per-domain shuffles, exact resume and resharding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scaletrain.data.loader import MixedLoader, TokenLoader, val_batches
from scaletrain.errors import DataError

SEQ = 8


def stream(num_samples: int) -> np.ndarray:
    """Tokens 0..N-1 (as uint16 on disk would be): sample i starts at token i*SEQ."""
    return np.arange(num_samples * SEQ + 1, dtype=np.uint16)


def take(loader: TokenLoader | MixedLoader, n: int):
    out = []
    for _ in range(n):
        x, y = loader.next_batch()
        out.append((x.clone(), y.clone(), loader.last_sample_ids.copy()))
    return out


def test_batches_are_shifted_windows_of_the_sampled_ids():
    loader = TokenLoader(stream(20), SEQ, batch_size=4, seed=0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
    ids = loader.last_sample_ids
    assert torch.equal(x[:, 0], torch.from_numpy(ids * SEQ))  # window i starts at token i*seq_len
    assert torch.equal(y, x + 1)  # targets are inputs shifted by one token
    assert loader.state_dict() == {"epoch": 0, "global_position": 4, "seed": 0, "seq_len": SEQ, "num_samples": 20}


def test_same_seed_same_batches_and_each_epoch_is_a_permutation():
    a, b = TokenLoader(stream(23), SEQ, 5, seed=7), TokenLoader(stream(23), SEQ, 5, seed=7)
    batches = take(a, 8)  # 4 batches per epoch (the 3-sample tail is dropped): two epochs
    assert all(torch.equal(p[0], q[0]) and np.array_equal(p[2], q[2]) for p, q in zip(batches, take(b, 8)))
    for epoch in range(2):
        ids = np.concatenate([s for _, _, s in batches[4 * epoch : 4 * epoch + 4]])
        assert len(ids) == len(set(ids)) == 20 and ids.max() < 23
    first, second = (np.concatenate([s for _, _, s in batches[e * 4 : e * 4 + 4]]) for e in range(2))
    assert not np.array_equal(first, second)  # a fresh permutation per epoch
    assert a.state_dict()["epoch"] == 1
    other = take(TokenLoader(stream(23), SEQ, 5, seed=8), 4)
    assert not all(np.array_equal(p[2], q[2]) for p, q in zip(batches, other))


def test_resume_yields_exactly_the_remaining_batches():
    full = take(TokenLoader(stream(50), SEQ, 4, seed=3), 30)  # crosses two epoch boundaries
    for k in (0, 5, 12, 24):
        loader = TokenLoader(stream(50), SEQ, 4, seed=3)
        take(loader, k)
        state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON round trip
        resumed = TokenLoader(stream(50), SEQ, 4, seed=999)
        resumed.load_state_dict(state)
        for (x, y, ids), (fx, fy, fids) in zip(take(resumed, 30 - k), full[k:]):
            assert torch.equal(x, fx) and torch.equal(y, fy) and np.array_equal(ids, fids)


def assert_ranks_slice_the_single_batch(single, ranks, steps: int) -> None:
    """Over `steps` steps the ranks' batches concatenate to the single loader's; states agree."""
    for _ in range(steps):
        single.next_batch()
        for r in ranks:
            r.next_batch()
        assert np.array_equal(np.concatenate([r.last_sample_ids for r in ranks]), single.last_sample_ids)
        assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_ranks_take_contiguous_slices_of_the_global_batch():
    single = TokenLoader(stream(48), SEQ, batch_size=6, seed=1)
    ranks = [TokenLoader(stream(48), SEQ, batch_size=3, seed=1, dp_rank=r, dp_size=2) for r in range(2)]
    assert_ranks_slice_the_single_batch(single, ranks, 10)


def test_resharding_dp2_to_dp4_mid_epoch_covers_each_sample_once():
    tokens, bs = stream(48), 2
    dp2 = [TokenLoader(tokens, SEQ, bs, seed=5, dp_rank=r, dp_size=2) for r in range(2)]
    seen = []
    for _ in range(4):  # 4 steps x 2 ranks x 2 = 16 of 48 samples
        for r in dp2:
            r.next_batch()
            seen.extend(r.last_sample_ids.tolist())
    state = dp2[0].state_dict()
    assert state["global_position"] == 16
    dp4 = [TokenLoader(tokens, SEQ, bs, seed=0, dp_rank=r, dp_size=4) for r in range(4)]
    for r in dp4:
        r.load_state_dict(state)
    for _ in range(4):  # 4 steps x 4 ranks x 2 = the other 32 samples
        for r in dp4:
            r.next_batch()
            seen.extend(r.last_sample_ids.tolist())
    assert sorted(seen) == list(range(48))
    assert all(r.state_dict() == {**state, "global_position": 48} for r in dp4)
    for r in dp4:  # the next step starts epoch 1
        r.next_batch()
    assert dp4[0].state_dict()["epoch"] == 1


def test_state_from_other_data_is_rejected():
    loader = TokenLoader(stream(30), SEQ, 2, seed=0)
    with pytest.raises(DataError, match="seq_len = 16 but this run has 8"):
        loader.load_state_dict({**loader.state_dict(), "seq_len": 16})
    with pytest.raises(DataError, match="num_samples = 31 but this run has 30.*same data settings"):
        loader.load_state_dict({**loader.state_dict(), "num_samples": 31})


def test_too_few_tokens_says_how_many_are_needed():
    with pytest.raises(DataError, match=r"has 25 tokens; one global batch of 2 x 2 ranks x 8 tokens needs 33"):
        TokenLoader(np.arange(25), SEQ, 2, seed=0, dp_rank=1, dp_size=2)
    TokenLoader(np.arange(33), SEQ, 2, seed=0, dp_rank=1, dp_size=2)  # exactly enough


def test_works_on_a_read_only_memmap(tmp_path):
    path = tmp_path / "t.bin"
    stream(16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = TokenLoader(tokens, SEQ, 4, seed=0).next_batch()
    assert torch.equal(y, x + 1)


def test_val_batches_are_fixed_sequential_and_capped():
    tokens = stream(10)
    batches = val_batches(tokens, SEQ, batch_size=3, n_batches=5)
    assert len(batches) == 3  # 10 samples -> 3 full batches of 3
    assert [b[0][:, 0].tolist() for b in batches] == [[0, 8, 16], [24, 32, 40], [48, 56, 64]]
    again = val_batches(tokens, SEQ, batch_size=3, n_batches=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, batches))
    assert torch.equal(batches[0][1], batches[0][0] + 1)
    with pytest.raises(DataError, match=r"validation split has 20 tokens; one batch of 3 x 8 tokens needs 25"):
        val_batches(np.arange(20), SEQ, batch_size=3, n_batches=1)


# --------------------------------------------------------------------------- MixedLoader

def streams(*num_samples: int) -> list[np.ndarray]:
    """Domain d's sample i starts with token 1000*d + i*SEQ, so a window names its domain."""
    return [(1000 * d + np.arange(n * SEQ + 1)).astype(np.uint16) for d, n in enumerate(num_samples)]


def make(weights=(1.0, 1.0), sizes=(10, 7), batch=4, seed=0, rank=0, dp=1) -> MixedLoader:
    names = ["code", "prose", "math"][: len(weights)]
    return MixedLoader(streams(*sizes), names, list(weights), SEQ, batch, seed, rank, dp)


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
    assert_ranks_slice_the_single_batch(single, ranks, 5)
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
