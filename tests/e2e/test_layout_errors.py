"""Impossible layouts fail before any process-group work, with the offending keys and a valid
alternative, exit code 2 and nothing written. The world size comes from torchrun's WORLD_SIZE
variable; no processes need to be launched because the checks run before rendezvous."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, cli_env, debug_train_args

CASES = {
    "product": (4, ("--parallel.dp_shard", "3"), ["parallel degrees multiply to 3", "world size is 4",
                                                  "--parallel.dp_shard -1"]),
    "tp_heads": (3, ("--parallel.tp", "3", "--parallel.dp_shard", "1"),
                 ["model.n_heads = 4 is not divisible by parallel.tp = 3", "Use tp in {1, 2}"]),
    "pp_layers": (3, ("--parallel.pp", "3", "--parallel.dp_shard", "1"),
                  ["model.n_layers=2 is not divisible by parallel.pp=3", "parallel.pp in"]),
    "cp_seq": (2, ("--parallel.cp", "2", "--parallel.dp_shard", "1", "--data.seq_len", "66"),
               ["data.seq_len = 66 is not divisible by 2*parallel.cp = 4", "use data.seq_len 64"]),
    "pp_microbatches": (2, ("--parallel.pp", "2", "--parallel.dp_shard", "1", "--parallel.pp_microbatches", "1"),
                        ["needs parallel.pp_microbatches >= parallel.pp", "pp_schedule='gpipe'"]),
    "pp_tied": (2, ("--parallel.pp", "2", "--parallel.dp_shard", "1", "--model.tie_embeddings", "true"),
                ["model.tie_embeddings=true cannot be used with parallel.pp=2"]),
    "tp_tied": (2, ("--parallel.tp", "2", "--parallel.dp_shard", "1", "--model.tie_embeddings", "true"),
                ["model.tie_embeddings = true cannot be used with parallel.tp = 2"]),
    "negative": (2, ("--parallel.tp", "0"), ["parallel.tp must be >= 1, got 0"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_impossible_layout(name, tmp_path, data_cache):
    world, layout, messages = CASES[name]
    env = cli_env()
    env.update(WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "scaletrain", *debug_train_args(run, data_cache, 2, *layout)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    for message in messages:
        assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run.exists()


def test_predicted_oom_is_refused_unless_forced(tmp_path, data_cache):
    """The planner's memory check runs before anything is built: with room for almost nothing
    (the CPU capacity is RAM / LOCAL_WORLD_SIZE) the run is refused with the breakdown and a
    fix; --force runs it anyway."""
    env = cli_env()
    env["LOCAL_WORLD_SIZE"] = str(10**9)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "scaletrain", *debug_train_args(run, data_cache, 2)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    for part in ("predicted not to fit", "weights", "activations", "Pass --force to run anyway"):
        assert part in proc.stderr
    assert not run.exists()
    forced = subprocess.run([*args, "--force"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert forced.returncode == 0, forced.stderr
    assert "planner predicted" in forced.stdout and (run / "metrics.jsonl").exists()
