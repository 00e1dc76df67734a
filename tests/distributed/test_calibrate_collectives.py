"""`plan calibrate` under torchrun: the all-reduce measurement issues the same number of
collectives on every rank (a time budget per rank once left one rank waiting in a collective
the other never joined) and every rank reports the slowest rank's time."""

from __future__ import annotations

import json
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, init: str, out: str) -> None:
    import torch

    from scaletrain.plan import calibrate

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    calls = {"n": 0}
    real = dist.all_reduce

    def counting(t, *a, **k):
        calls["n"] += 1
        if rank == 1:
            time.sleep(0.02)  # a slower rank: a time budget would let rank 0 issue more calls
        return real(t, *a, **k)

    dist.all_reduce = counting
    try:
        res = calibrate._collectives(torch.device("cpu"), iters=4, warmup=1)
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"res": res, "calls": calls["n"]}, f)


def test_all_reduce_bandwidth_is_measured_in_lockstep(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    out = str(tmp_path / "res")
    mp.start_processes(_rank, args=(2, init, out), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"res.{r}").read_text()) for r in (0, 1))
    # 1 warm-up + 4 timed + 1 max-reduction of the elapsed time, on both ranks
    assert r0["calls"] == r1["calls"] == 6
    assert r0["res"] == r1["res"]  # both report the slowest rank's time
    bus = r0["res"]["intra_bw"]
    # rank 1 sleeps 20 ms per call, so the 32 MiB all-reduce takes >= 20 ms: bus bandwidth below
    # 2 (n-1)/n x 32 MiB / 20 ms = 1.68 GB/s, and above zero
    assert 0 < bus < 2 * 0.5 * 32 * 2**20 / 0.02
