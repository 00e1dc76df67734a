"""A checkpoint saved under one layout resumes under others and training continues with the
same losses: saved at dp_shard=4 (4 ranks), resumed at dp_shard=2 x tp=2, at dp_shard=2 x
pp=2, and on a single process. The global batch (8 sequences) and the loader position are the
same in every layout, so the continued losses agree to fp32 reduction order (rel 1e-5, see
test_layouts.py).

The save and both 4-rank resumes run in turn in one group of 4 spawned ranks
(conftest.spawn_cases); the single-process resume runs in this process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import debug_train_args, run_main, spawn_cases
from scaletrain.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # train, save and resume under other layouts: ~14 s on 2 cores

STEPS = 6
COMMON = ("--metrics.tensorboard", "false", "--metrics.plot", "false", "--train.eval_interval", "0",
          "--checkpoint.interval", "3", "--checkpoint.keep", "3", "--data.seq_len", "64")
# name -> (ranks, per-rank batch, layout); "fsdp4" is the saved run, the others resume it.
LAYOUTS = {
    "fsdp4": (4, 2, ("--parallel.dp_shard", "4")),
    "fsdp2_tp2": (4, 4, ("--parallel.dp_shard", "2", "--parallel.tp", "2")),
    "fsdp2_pp2": (4, 4, ("--parallel.dp_shard", "2", "--parallel.pp", "2")),
    "single": (1, 8, ()),
}


def _resume_copy(saved, dest):
    """The saved run as it was after step 3: newer checkpoints and all metrics removed."""
    shutil.copytree(saved, dest)
    shutil.rmtree(dest / "checkpoints" / "step-00000006")
    (dest / "metrics.jsonl").unlink()
    return dest


def _args(run: Path, data_cache, name: str, *extra: str) -> list[str]:
    _ranks, batch, layout = LAYOUTS[name]
    return debug_train_args(run, data_cache, STEPS, "--data.batch_size", str(batch), *COMMON, *layout, *extra)


def _run_layout(name: str, rank: int, world: int, root: str, data_cache: str) -> None:
    """The save (`fsdp4`) or a resume of it, on this spawned rank."""
    import torch.distributed as dist

    from scaletrain.cli import run

    root = Path(root)
    if name == "fsdp4":
        assert run(_args(root / name, data_cache, name)) == 0
        return
    if rank == 0:
        _resume_copy(root / "fsdp4", root / name)
    dist.barrier()  # the group the save formed: the copy is in place for every rank
    assert run(_args(root / name, data_cache, name, "--resume", "auto")) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("reshard")
    names = [name for name, (ranks, _, _) in LAYOUTS.items() if ranks == 4]
    errors = spawn_cases(4, names, _run_layout, root / "spawn", str(root), str(data_cache))
    assert "fsdp4" not in errors, errors["fsdp4"][-4000:]
    # The single-process resume, in this process; both tests below read it.
    run_main(*_args(_resume_copy(root / "fsdp4", root / "single"), data_cache, "single", "--resume", "auto"))
    return root, errors


@pytest.mark.parametrize("name", ["fsdp2_tp2", "fsdp2_pp2", "single"])
def test_resume_under_another_layout(name, runs):
    root, errors = runs
    assert name not in errors, f"{name} failed:\n{errors.get(name, '')[-4000:]}"
    saved, run = root / "fsdp4", root / name
    expected = [r["loss"] for r in read_metrics(saved / "metrics.jsonl")[0] if r["step"] > 3]
    got = read_metrics(run / "metrics.jsonl")[0]
    assert [r["step"] for r in got] == [4, 5, 6]
    assert [r["loss"] for r in got] == pytest.approx(expected, rel=1e-5)


def test_validation_loss_is_layout_independent(runs):
    """The final validation loss of the dp=4 run equals the single-process one at the same
    weights: every layout evaluates the same sequences (global batches, split by dp rank)."""
    saved, run = runs[0] / "fsdp4", runs[0] / "single"
    evals = read_metrics(run / "metrics.jsonl")[1]
    ref = [e for e in read_metrics(saved / "metrics.jsonl")[1] if e["step"] == STEPS]
    assert evals[-1]["step"] == STEPS and len(ref) == 1
    assert evals[-1]["val_loss"] == pytest.approx(ref[0]["val_loss"], rel=1e-5)
