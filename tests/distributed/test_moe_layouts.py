"""An MoE model (`moe_debug`, dropless, fp32) under every parallel layout reproduces one device,
against single-process runs of the same global batch of 8 sequences (10 steps):

- 2 gloo ranks, ONE process group (one spawn) for all of: FSDP (dp_shard=2, auxiliary loss),
  DDP-style replication (dp_replicate=2, expert bias), expert parallelism dp_shard=2 ep=2,
  context parallelism with experts over the cp ranks (cp=2 ep=2: the sequence-wise aux loss
  sums each sequence's counts over its cp ranks), and pipelining with gradient accumulation
  (pp=2, 2 x 4 sequences: the aux loss's gradient is scaled like the pipeline's loss);
- 4 gloo ranks, one more spawn: dp_shard=4 ep=4, dp_shard=4 ep=2 (experts also FSDP-sharded
  over the 2 efsdp ranks), dp_shard=2 tp=2 ep=2 (q/k norms and the MoE FFN under TP) and
  dp_shard=2 pp=2 ep=2, and HSDP dp_replicate=2 dp_shard=2 ep=2 (expert bias: experts
  all-reduced over dp_replicate); then the ep=4 run's step-5 checkpoint resumes at ep=4
  (bit-identical steps 6-10) and at dp_shard=2 tp=2 ep=2, and, after the spawn, on one process;
- gradient accumulation (4 x 2) on one process.

Tolerance: relative 1e-5 on losses, grad norms and the expert metrics, 2e-5 absolute on the
final parameters and expert biases (the argument of tests/distributed/test_layouts.py). Routing
is per token and the auxiliary loss is a mean over sequences, so splitting the batch changes
only the order of fp32 reductions; expert parallelism moves token rows between ranks without
changing them and sums each expert's gradient in another order. The expert counts are integers
summed exactly, so the bias updates agree exactly unless a near-tie flips a routing decision
(none does here). The mistakes these layouts guard against are far outside the tolerance
(measured on 3 steps): experts' gradients divided by twice the data ranks move the first grad
norm by 9e-4, the cp aux loss without whole-sequence counts moves the aux_loss metric by 3e-3,
the pipeline's aux gradient scaled by 1/grad_accum only moves the first grad norm by 3e-4.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import DEBUG_CONFIG
from scaletrain.export.runio import load_run_model
from scaletrain.train.checkpoint import step_dir_name
from scaletrain.train.metrics import read_metrics

STEPS, GLOBAL_BATCH, SAVED_STEP = 10, 8, 5
BALANCE = {"aux_loss": ("--model.moe_balance", "aux_loss"),
           "bias": ("--model.moe_balance", "bias", "--model.moe_bias_rate", "0.01")}
EP = ("--parallel.ep",)
# name -> (ranks, balancing, batch split = data-parallel degree x grad_accum, extra overrides)
LAYOUTS = {
    "fsdp": (2, "aux_loss", 2, ("--parallel.dp_shard", "2")),
    "ddp": (2, "bias", 2, ("--parallel.dp_replicate", "2", "--parallel.dp_shard", "1")),
    "ep2": (2, "aux_loss", 2, ("--parallel.dp_shard", "2", *EP, "2")),
    "cp_ep2": (2, "aux_loss", 1, ("--parallel.dp_shard", "1", "--parallel.cp", "2", *EP, "2")),
    "pp2_accum2": (2, "aux_loss", 2, ("--parallel.dp_shard", "1", "--parallel.pp", "2", "--train.grad_accum", "2")),
    "ep4": (4, "aux_loss", 4, ("--parallel.dp_shard", "4", *EP, "4", "--checkpoint.interval", str(SAVED_STEP))),
    "fsdp4_ep2": (4, "aux_loss", 4, ("--parallel.dp_shard", "4", *EP, "2")),
    "tp_ep2": (4, "aux_loss", 2, ("--parallel.dp_shard", "2", "--parallel.tp", "2", *EP, "2")),
    "pp_ep2": (4, "aux_loss", 2, ("--parallel.dp_shard", "2", "--parallel.pp", "2", *EP, "2")),
    "hsdp_ep2": (4, "bias", 4, ("--parallel.dp_replicate", "2", "--parallel.dp_shard", "2", *EP, "2")),
}
# Resumed from ep4's step-5 checkpoint: name -> (ranks, data-parallel degree, layout)
RESUMED = {"ep4_resumed": (4, 4, LAYOUTS["ep4"][3][:4]),
           "tp_ep2_resumed": (4, 2, LAYOUTS["tp_ep2"][3]),
           "one_process_resumed": (1, 1, ())}
KEYS = ("loss", "grad_norm", "aux_loss", "expert_imbalance", "dropped_frac")
# Rows per expert (4 experts over 2 ranks) that each rank dispatches: rank 1 sends rank 0 nothing
# for expert 0 in the uneven case; the balanced case is the formula's model/flops.py assumes.
EXCHANGES = {"uneven": [2, 1, 0, 3], "balanced": [2, 2, 2, 2]}


def _train(run: Path, data_cache: str, batch: int, *extra: str, resume: str = "never") -> None:
    from scaletrain.config import load_config
    from scaletrain.plan.memcheck import preflight
    from scaletrain.train.trainer import Trainer

    cfg = load_config(DEBUG_CONFIG, ["--model.flavor", "moe_debug", "--train.steps", str(STEPS),
                                     "--data.cache_dir", data_cache, "--data.seq_len", "64",
                                     "--data.batch_size", str(batch), "--metrics.progress", "none",
                                     "--metrics.tensorboard", "false", "--metrics.plot", "false",
                                     "--train.eval_interval", "0", "--checkpoint.interval", "0", *extra])
    Trainer(cfg, run, memory_check=preflight(), resume=resume).fit()


def _resume(root: Path, data_cache: str, name: str) -> None:
    _ranks, dp, layout = RESUMED[name]
    saved = root / "ep4" / "checkpoints" / step_dir_name(SAVED_STEP)
    _train(root / name, data_cache, GLOBAL_BATCH // dp, *BALANCE["aux_loss"], *layout, resume=str(saved))


def _exchange(rank: int, counts: list[int]) -> dict:
    """One TokenExchange (parallel/ep.py) over the 2 ranks, 4 experts (2 per rank), on rows
    that name their rank and slot: what the experts receive, what comes back, the gradient, and
    the rows sent to the other rank."""
    import torch.distributed as dist

    from scaletrain.parallel.ep import TokenExchange

    exchange = TokenExchange(dist.group.WORLD, 2)
    x = (1000.0 * rank + torch.arange(sum(counts), dtype=torch.float32)).unsqueeze(1).requires_grad_()  # [N, 1]
    rows, local_counts = exchange.dispatch(None, (x, torch.tensor(counts)))
    back = exchange.combine(None, None, 2 * rows)
    back.sum().backward()
    return {"rows": rows.squeeze(1).tolist(), "counts": local_counts.tolist(), "back": back.squeeze(1).tolist(),
            "x": x.squeeze(1).tolist(), "grad": x.grad.squeeze(1).tolist(), "sent_away": exchange.send[1 - rank]}


def _worker(rank: int, world: int, port: int, root: str, data_cache: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for name, (ranks, balance, split, layout) in LAYOUTS.items():  # one process group for every layout
        if ranks == world:
            _train(Path(root) / name, data_cache, GLOBAL_BATCH // split, *BALANCE[balance], *layout)
    for name, (ranks, _dp, _layout) in RESUMED.items():
        if ranks == world:
            _resume(Path(root), data_cache, name)
    if world == 2:  # the trainers left the process group up
        result = {name: _exchange(rank, counts) for name, counts in EXCHANGES.items()}
        (Path(root) / f"exchange_rank{rank}.json").write_text(json.dumps(result))
        _bench(Path(root), data_cache, rank)


def _bench(root: Path, data_cache: str, rank: int) -> None:
    """`scaletrain bench`'s measurement of an EP config (smoke: 1 + 3 steps, one phase step)."""
    from scaletrain.bench.runner import BenchOptions, run_bench
    from scaletrain.config import load_config

    cfg = load_config(DEBUG_CONFIG, ["--model.flavor", "moe_debug", "--data.cache_dir", data_cache, "--data.seq_len",
                                     "64", "--data.batch_size", "4", *LAYOUTS["ep2"][3]])
    result = run_bench(cfg, BenchOptions(warmup=1, steps=3, phase_steps=1, smoke=True), root / "bench_ep2")
    if rank == 0:
        (root / "bench_ep2.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("moe_layouts")
    for balance, extra in BALANCE.items():
        _train(root / f"ref_{balance}", str(data_cache), GLOBAL_BATCH, *extra)
    _train(root / "accum", str(data_cache), GLOBAL_BATCH // 2, *BALANCE["aux_loss"], "--train.grad_accum", "2")
    for world in (2, 4):
        mp.spawn(_worker, args=(world, _free_port(), str(root), str(data_cache)), nprocs=world, join=True)
    _resume(root, str(data_cache), "one_process_resumed")
    return root


def _steps(run: Path) -> list[dict]:
    return read_metrics(run)[0]


def _assert_metrics_close(got: list[dict], ref: list[dict]) -> None:
    for key in KEYS:
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-5, abs=1e-12), key


@pytest.mark.slow  # 70 s on 2 cores at load 5, 115 s at load 9: 4 one-process runs, a 2- and a 4-rank spawn
@pytest.mark.parametrize("name", ["accum", *LAYOUTS])
def test_moe_layout_matches_single_device(runs, name):
    balance = LAYOUTS[name][1] if name in LAYOUTS else "aux_loss"
    ref, got = _steps(runs / f"ref_{balance}"), _steps(runs / name)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    _assert_metrics_close(got, ref)
    ref_state, got_state = load_run_model(runs / f"ref_{balance}")[0].state_dict(), load_run_model(runs / name)[0].state_dict()
    assert ref_state.keys() == got_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(got_state[key], value, rtol=0, atol=2e-5, msg=f"{name}: {key}")
    if balance == "bias":
        assert ref_state["layers.1.feed_forward.router.expert_bias"].abs().sum() > 0  # the bias did move


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESUMED))
def test_ep_checkpoint_resumes_under_other_layouts(runs, name):
    """The ep=4 checkpoint of step 5 (experts sharded 2 per rank, keys the full model's) loads
    at ep=4, at dp_shard=2 tp=2 ep=2 and on one process; the next 5 steps continue the run."""
    saved_run = _steps(runs / "ep4")[SAVED_STEP:]
    got = _steps(runs / name)
    assert [r["step"] for r in got] == list(range(SAVED_STEP + 1, STEPS + 1))
    if name == "ep4_resumed":  # same layout: the resumed run is the original, bit for bit
        assert [[r[k] for k in KEYS] for r in got] == [[r[k] for k in KEYS] for r in saved_run]
    _assert_metrics_close(got, saved_run)
    _assert_metrics_close(got, _steps(runs / "ref_aux_loss")[SAVED_STEP:])


@pytest.mark.slow
def test_token_exchange_groups_rows_by_local_expert_and_returns_them(runs):
    """Rank r sends rank j the rows of j's experts (rank 0 holds experts 0-1, rank 1 experts
    2-3); each rank's experts see their rows grouped by expert, source rank order within one;
    the combine returns every row to its place, and the gradient flows back through both
    all-to-alls. The rows a rank sends away at balanced routing are the dispatch bytes of
    model/flops.py."""
    from scaletrain.model import model_config_for
    from scaletrain.model.flops import moe_dispatch_bytes

    got = [json.loads((runs / f"exchange_rank{r}.json").read_text()) for r in range(2)]
    for name, counts in EXCHANGES.items():
        offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]

        def rows_of(src: int, expert: int) -> list[float]:  # the rows rank src routed to `expert`
            return [1000.0 * src + i for i in range(offsets[expert], offsets[expert + 1])]

        for rank in range(2):
            mine = got[rank][name]
            experts = (2 * rank, 2 * rank + 1)
            assert mine["rows"] == [v for e in experts for src in range(2) for v in rows_of(src, e)], name
            assert mine["counts"] == [2 * counts[e] for e in experts]  # both ranks routed alike
            assert mine["back"] == [2 * v for v in mine["x"]] and mine["grad"] == [2.0] * len(mine["x"])
    cfg = model_config_for("moe_debug", dim=1, moe_experts=4, moe_top_k=2)
    sent = moe_dispatch_bytes(cfg, batch=1, seq_len=4, ep=2, dtype_bytes=4)  # 4 tokens = 8 slots
    assert [got[r]["balanced"]["sent_away"] * 1 * 4 for r in range(2)] == [sent["dispatch"]] * 2


@pytest.mark.slow
def test_bench_and_plan_check_take_an_ep_run(runs, capsys):
    """`scaletrain bench` measures an EP config (run inside the 2-rank group) and `scaletrain plan
    check` reads an EP run's folder (the planner prices it as its dp layout for now)."""
    from conftest import main_run

    bench = json.loads((runs / "bench_ep2.json").read_text())
    assert bench["config"]["layout"] == "dp_shard=2 ep=2" and bench["config"]["world_size"] == 2
    assert bench["tokens_per_s"] > 0 and bench["phases_s"] and torch.isfinite(torch.tensor(bench["loss_last"]))
    code, out, err = main_run(capsys, "plan", "check", "--run", str(runs / "ep2"), "--profile", "h100_sxm")
    assert code == 0 and "step time (median)" in out and "2 rank(s)" in out, err
