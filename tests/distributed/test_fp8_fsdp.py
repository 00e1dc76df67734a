"""fp8 under FSDP: 2 gloo ranks train with precision = "fp8" (tensorwise, float8 all-gather,
the block weights are torchao wrapper tensors), and the DCP checkpoint they write loads into a
single-device plain model in a fresh process where torchao cannot be imported."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, debug_train_args, spawn_ranks


def _train(rank: int, world: int, run: str, data_cache: str) -> None:
    from scaletrain.cli import run as cli_run

    assert cli_run(debug_train_args(Path(run), data_cache, 4, "--train.precision", "fp8", "--parallel.dp_shard", "2",
                                    "--metrics.tensorboard", "false", "--metrics.plot", "false",
                                    "--train.eval_interval", "0")) == 0


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                    reason="torchao is not installed (pip install -e '.[fp8]')")
@pytest.mark.slow
def test_fsdp_fp8_checkpoint_loads_without_torchao(tmp_path, data_cache):
    run = tmp_path / "fsdp_fp8"
    spawn_ranks(2, _train, str(run), str(data_cache))
    code = ("import sys; sys.modules['torchao'] = None\n"
            "from scaletrain.export.runio import load_run_model\n"
            f"model = load_run_model({str(run)!r})[0]\n"
            "print(float(model.layers['0'].attention.wq.weight.norm()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) > 0
