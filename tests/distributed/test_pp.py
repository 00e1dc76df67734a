"""Pipeline parallelism on 2 gloo ranks reproduces the single-device model: one step's loss and
every parameter gradient, then the losses of 3 AdamW steps and a forward-only eval loss, for
each schedule and micro-batch count (the layout rules are tested in tests/unit/test_parallel_layout.py).

All cases run in one 2-process spawn (module fixture) to pay the process start-up once; each
rank compares its own stage parameters with the same-named ones of a reference model and sends
its findings back. A failing rank makes mp.spawn raise, so every test here errors loudly.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port
from scaletrain.config.schema import ParallelConfig
from scaletrain.model import build_model
from scaletrain.config.flavors import model_config_for
from scaletrain.parallel.layout import virtual_stages
from scaletrain.parallel.pp import build_pipeline, pipeline_split

PP = 2
BATCH, SEQ = 8, 32
TRAIN_STEPS = 3
# (schedule, micro-batches, model layers, parallel.pp_virtual_stages): interleaved needs pp * v
# virtual stages of layers (0 = the default 2; 3 checks that pp.py honours the config's count).
CASES = [(s, m, 4 if s == "interleaved_1f1b" else 2, 0) for s in ("gpipe", "1f1b", "interleaved_1f1b") for m in (2, 4)]
CASES.append(("interleaved_1f1b", 4, 6, 3))
IDS = [f"{s}-m{m}" + (f"-v{v}" if v else "") for s, m, _, v in CASES]
# fp32 throughout; the pipeline only changes the order of reductions (per-micro-batch means
# averaged, gradients summed over micro-batches then divided by m), i.e. float32 rounding
# (~1e-7 relative), amplified a little by the Adam steps. 1e-5 leaves 100x headroom.
TOL = dict(rtol=1e-5, atol=1e-5)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [b, s, vocab] against targets [b, s]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def _batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)  # [b, s + 1]
    return tokens[:, :-1], tokens[:, 1:]


def _close(a: torch.Tensor, b: torch.Tensor) -> str | None:
    try:
        torch.testing.assert_close(a, b, **TOL)
    except AssertionError as e:
        return str(e)
    return None


def _run_case(rank: int, schedule: str, m: int, n_layers: int, v: int) -> dict:
    cfg = model_config_for("debug", n_layers=n_layers)
    ref = build_model(cfg, seed=0)
    # Split before the reference backward: deepcopy would copy .grad too.
    stages = pipeline_split(ref, rank, PP, virtual_stages(ParallelConfig(pp=PP, pp_schedule=schedule,
                                                                         pp_virtual_stages=v)))
    pipe = build_pipeline(stages, dist.group.WORLD, torch.device("cpu"), m, schedule, loss_fn)
    ref_params = dict(ref.named_parameters())
    stage_params = [(n, p) for st in stages for n, p in st.named_parameters()]
    out = {"is_last": pipe.is_last, "is_first": pipe.is_first, "names": [n for n, _ in stage_params],
           "grad_errors": {}, "losses": [], "ref_losses": []}

    inputs, targets = _batch(0, cfg.vocab_size)
    ref_loss = loss_fn(ref(inputs), targets)
    ref_loss.backward()
    loss = pipe.step(inputs, targets)
    for name, p in stage_params:
        err = _close(p.grad, ref_params[name].grad) if p.grad is not None else "no gradient"
        if err:
            out["grad_errors"][name] = err
    if pipe.is_last:
        out["losses"].append(loss.item())
    out["ref_losses"].append(ref_loss.item())

    # A few optimizer steps on both; the schedule object is reused across steps.
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt_pp = torch.optim.AdamW([p for _, p in stage_params], lr=1e-2)
    for step in range(1, TRAIN_STEPS + 1):
        opt_ref.step()
        opt_pp.step()
        opt_ref.zero_grad(set_to_none=True)
        opt_pp.zero_grad(set_to_none=True)  # required: the schedule divides all of .grad by m
        inputs, targets = _batch(step, cfg.vocab_size)
        ref_loss = loss_fn(ref(inputs), targets)
        ref_loss.backward()
        loss = pipe.step(inputs, targets)
        out["ref_losses"].append(ref_loss.item())
        if pipe.is_last:
            out["losses"].append(loss.item())

    # Forward-only loss through the pipeline (validation), on a new batch.
    inputs, targets = _batch(99, cfg.vocab_size)
    with torch.no_grad():
        out["ref_eval"] = loss_fn(ref(inputs), targets).item()
    eval_loss = pipe.eval_loss(inputs, targets)
    out["eval"] = eval_loss.item() if eval_loss is not None else None
    out["all_names"] = sorted(ref_params)
    return out


def _worker(rank: int, port: int, result_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A short timeout turns a hung send/recv into an error instead of a stuck test.
    dist.init_process_group("gloo", rank=rank, world_size=PP, timeout=datetime.timedelta(seconds=60))
    try:
        results = {case_id: _run_case(rank, *case) for case_id, case in zip(IDS, CASES)}
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def pp_results(tmp_path_factory) -> list[dict]:
    result_dir = tmp_path_factory.mktemp("pp")
    mp.spawn(_worker, args=(free_port(), str(result_dir)), nprocs=PP, join=True)
    return [torch.load(result_dir / f"rank{r}.pt", weights_only=True) for r in range(PP)]


@pytest.mark.parametrize("case_id", IDS)
def test_pipeline_matches_single_device(pp_results, case_id):
    per_rank = [r[case_id] for r in pp_results]
    # Each parameter lives on exactly one rank, and together the ranks hold the whole model.
    names = [n for r in per_rank for n in r["names"]]
    assert sorted(names) == per_rank[0]["all_names"]
    assert [r["is_first"] for r in per_rank] == [True, False]
    assert [r["is_last"] for r in per_rank] == [False, True]
    for rank, r in enumerate(per_rank):
        assert not r["grad_errors"], f"rank {rank} gradients differ: {r['grad_errors']}"
    last = per_rank[-1]
    assert len(last["losses"]) == TRAIN_STEPS + 1
    assert last["losses"] == pytest.approx(last["ref_losses"], **{"rel": TOL["rtol"], "abs": TOL["atol"]})
    # The model is learning: the losses move (a pipeline that dropped updates would be flat).
    assert last["ref_losses"][-1] != last["ref_losses"][0]
    assert last["eval"] == pytest.approx(last["ref_eval"], rel=TOL["rtol"], abs=TOL["atol"])
    assert per_rank[0]["eval"] is None
