"""Every parallel layout, on 2-4 gloo CPU ranks, trains the `debug` flavor (4 layers) for 10
fp32 steps through `scaletrain train` and reproduces the single-process run with the same global
batch of 8 sequences: the same per-step loss, the same global gradient norm and the same final
parameters (read back from each run's DCP checkpoint into one process, which also proves the
checkpoint reshards onto a single device).

The layouts of each world size run one after another in ONE group of spawned ranks (2 ranks,
then 4), each as the CLI's `train` in those processes (conftest.spawn_cases): two process
start-ups instead of a torchrun launch per layout. Each layout still passes or fails on its own.

Tolerance: relative 1e-5 on losses and grad norms, 2e-5 absolute on parameters (weights are
O(0.02-1)). Layouts only change the order of fp32 reductions (sharded gradient sums,
micro-batch means, split matmuls, per-chunk attention), which perturbs the last bits; ten Adam
steps amplify that to ~1e-6 at most, so 1e-5 catches any real error (a wrong gradient scale or
missing reduction shows up at the 1e-2 level on the first step).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import debug_train_args, run_main, spawn_cases
from scaletrain.export.runio import load_run_model
from scaletrain.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # every layout in one process group per world size: ~70 s on 2 cores

STEPS = 10
GLOBAL_BATCH = 8
COMMON = ("--model.n_layers", "4", "--metrics.tensorboard", "false", "--metrics.plot", "false",
          "--train.eval_interval", "0", "--checkpoint.interval", "0", "--data.seq_len", "64")

# name -> (ranks, data-parallel degree, parallel overrides)
LAYOUTS = {
    "ddp": (2, 2, ("--parallel.dp_replicate", "2", "--parallel.dp_shard", "1")),
    "fsdp": (2, 2, ("--parallel.dp_shard", "2")),
    "hsdp": (4, 4, ("--parallel.dp_replicate", "2", "--parallel.dp_shard", "2")),
    "tp": (2, 1, ("--parallel.tp", "2", "--parallel.dp_shard", "1")),
    "pp_gpipe": (2, 1, ("--parallel.pp", "2", "--parallel.dp_shard", "1", "--parallel.pp_schedule", "gpipe")),
    "pp_1f1b": (2, 1, ("--parallel.pp", "2", "--parallel.dp_shard", "1", "--parallel.pp_schedule", "1f1b",
                       "--parallel.pp_microbatches", "4")),
    "pp_interleaved": (2, 1, ("--parallel.pp", "2", "--parallel.dp_shard", "1",
                              "--parallel.pp_schedule", "interleaved_1f1b", "--parallel.pp_microbatches", "4")),
    "cp": (2, 1, ("--parallel.cp", "2", "--parallel.dp_shard", "1")),
    "fsdp_tp": (4, 2, ("--parallel.dp_shard", "2", "--parallel.tp", "2")),
    "fsdp_pp": (4, 2, ("--parallel.dp_shard", "2", "--parallel.pp", "2")),
    "tp_pp": (4, 1, ("--parallel.tp", "2", "--parallel.pp", "2", "--parallel.dp_shard", "1")),
    "fsdp_cp": (4, 2, ("--parallel.dp_shard", "2", "--parallel.cp", "2")),
    "tp_cp": (4, 1, ("--parallel.tp", "2", "--parallel.cp", "2", "--parallel.dp_shard", "1")),
    "pp_cp_ac": (4, 1, ("--parallel.pp", "2", "--parallel.cp", "2", "--parallel.dp_shard", "1",
                        "--parallel.ac", "selective")),
    "fsdp_tp_ac": (4, 2, ("--parallel.dp_shard", "2", "--parallel.tp", "2", "--parallel.ac", "full")),
}


def _train_layout(name: str, rank: int, world: int, root: str, data_cache: str) -> None:
    """One layout on this spawned rank: `scaletrain train` in-process (the group stays up)."""
    from scaletrain.cli import run

    _ranks, dp, layout = LAYOUTS[name]
    assert run(debug_train_args(Path(root) / name, data_cache, STEPS, "--data.batch_size", str(GLOBAL_BATCH // dp),
                                *COMMON, *layout)) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """The reference run (in this process) and `errors(world)`: runs every layout of that world
    size on first use (one spawn) and returns {layout: traceback} of those that failed."""
    root = tmp_path_factory.mktemp("layouts")
    run_main(*debug_train_args(root / "ref", data_cache, STEPS, "--data.batch_size", str(GLOBAL_BATCH), *COMMON))
    done: dict[int, dict[str, str]] = {}

    def errors(world: int) -> dict[str, str]:
        if world not in done:
            names = [name for name, (ranks, _, _) in LAYOUTS.items() if ranks == world]
            done[world] = spawn_cases(world, names, _train_layout, root / f"spawn{world}", str(root), str(data_cache))
        return done[world]

    return root, errors


def _steps(run) -> list[dict]:
    return read_metrics(run / "metrics.jsonl")[0]


# Measured on 2 busy cores: the 2-rank layouts (each technique alone) ~20 s together, the
# 4-rank compositions (4 ranks on 2 cores) ~55 s: those are `slow`.
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if ranks == 4 else name
                                  for name, (ranks, _, _) in LAYOUTS.items()])
def test_layout_matches_single_device(name, runs):
    root, errors = runs
    failed = errors(LAYOUTS[name][0])
    assert name not in failed, f"{name} failed:\n{failed.get(name, '')[-4000:]}"
    reference, run = root / "ref", root / name
    ref, got = _steps(reference), _steps(run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    # Clipping uses the global norm over every shard and stage: the single-device value.
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-5)
    ref_params = load_run_model(reference)[0].state_dict()
    got_params = load_run_model(run)[0].state_dict()
    assert ref_params.keys() == got_params.keys()
    for key, value in ref_params.items():
        torch.testing.assert_close(got_params[key], value, rtol=0, atol=2e-5, msg=f"{name}: {key}")
