"""Run info: git revision in and outside a checkout, versions, hardware, file and header."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from scaletrain.train.runinfo import collect_run_info, git_info, run_info_header, typed_command, write_run_info

REPO = Path(__file__).resolve().parents[2]


def test_revision_of_this_checkout():
    info = git_info()  # default: the scaletrain package's own tree
    expected = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", info["revision"])
    assert info["revision"] == expected
    assert isinstance(info["dirty"], bool)


def test_non_git_dir_is_unknown(tmp_path):
    # tmp_path lives under the system temp dir, outside any checkout.
    assert git_info(tmp_path) == {"revision": "unknown", "dirty": None}
    assert git_info(tmp_path / "does-not-exist") == {"revision": "unknown", "dirty": None}
    info = collect_run_info(tmp_path)
    assert info["git"]["revision"] == "unknown"


def test_git_missing_is_unknown(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no git executable to be found
    assert git_info() == {"revision": "unknown", "dirty": None}


def test_collect_fields():
    info = collect_run_info()
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["python"].count(".") == 2
    assert "definitely-not-a-package" not in info["versions"]
    hw = info["hardware"]
    assert hw["cpu_count"] >= 1 and hw["ram_bytes"] > 2**28
    assert hw["cuda"]["available"] == torch.cuda.is_available()
    assert info["time_utc"].endswith("+00:00")
    assert isinstance(info["argv"], list) and info["hostname"] and isinstance(info["command"], str)
    json.dumps(info)  # JSON-ready as collected


def test_write_run_info_and_header(tmp_path):
    info = write_run_info(tmp_path / "run", extra={"world_size": 1, "config": "cpu_debug.toml"})
    on_disk = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert on_disk == info
    assert on_disk["world_size"] == 1 and on_disk["git"]["revision"] == git_info()["revision"]
    header = run_info_header(info)
    lines = header.splitlines()
    assert len(lines) == 5 and lines[3] == "world 1"
    assert lines[0].startswith(f"scaletrain rev {info['git']['revision']}")
    assert ("(dirty)" in lines[0]) == info["git"]["dirty"]
    assert f"torch {info['versions']['torch']}" in lines[1]
    if not torch.cuda.is_available():
        assert lines[2].startswith("device cpu")
    assert lines[4] == f"cmd {info['command']}"


def test_header_with_cuda_devices():
    info = {"git": {"revision": "a" * 40, "dirty": False}, "hostname": "node1",
            "time_utc": "2025-01-01T00:00:00+00:00", "argv": ["scaletrain", "train"],
            "versions": {"python": "3.11.2", "torch": "2.13.0"},
            "hardware": {"cpu_model": "EPYC", "cpu_usable": 16, "ram_bytes": 2**37,
                         "cuda": {"available": True, "cuda_version": "12.8",
                                  "cudnn_version": 91000, "nccl_version": "2.27.3",
                                  "device_count": 8,
                                  "devices": [{"name": "NVIDIA H100 80GB HBM3",
                                               "capability": "9.0"}] * 8}}}
    lines = run_info_header(info).splitlines()
    assert lines[0] == f"scaletrain rev {'a' * 40} (clean) | host node1 | 2025-01-01T00:00:00+00:00"
    assert lines[1] == "python 3.11.2 | torch 2.13.0 | cuda 12.8 | cudnn 91000 | nccl 2.27.3"
    assert lines[2] == "device 8 x NVIDIA H100 80GB HBM3 (sm 9.0) | cpu EPYC x 16 | ram 128.0 GiB"
    assert lines[3] == "cmd scaletrain train"
    info.update(world_size=8, layout={"dp_replicate": 1, "dp_shard": 4, "tp": 2, "pp": 1, "cp": 1},
                command="torchrun --nproc-per-node 8 -m scaletrain train")
    lines = run_info_header(info).splitlines()
    assert lines[3:] == ["world 8: dp_replicate 1 x dp_shard 4 x tp 2 x pp 1 x cp 1",
                         "cmd torchrun --nproc-per-node 8 -m scaletrain train"]


@pytest.mark.parametrize("orig_argv,environ,parent,expected", [
    # python -m scaletrain: this process's own command line
    (["/v/bin/python", "-m", "scaletrain", "train", "--run-dir", "my runs/a"], {}, None,
     "/v/bin/python -m scaletrain train --run-dir 'my runs/a'"),
    # the `scaletrain` entry point, which the kernel runs as `python SCRIPT`
    (["/v/bin/python3.11", "/v/bin/scaletrain", "train"], {}, ["bash"], "scaletrain train"),
    # a torchrun worker: the agent's command, as typed (script or module form)
    (["/v/bin/python", "-u", "-m", "scaletrain", "train"], {"TORCHELASTIC_RUN_ID": "x"},
     ["/v/bin/python", "/v/bin/torchrun", "--standalone", "--nproc-per-node", "2", "-m", "scaletrain", "train"],
     "torchrun --standalone --nproc-per-node 2 -m scaletrain train"),
    (["/v/bin/python", "-u", "-m", "scaletrain", "train"], {"TORCHELASTIC_RUN_ID": "x"},
     ["python", "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "scaletrain", "train"],
     "python -m torch.distributed.run --nproc-per-node 2 -m scaletrain train"),
    # the agent's command cannot be read: rebuilt from the environment
    (["/v/bin/python", "-u", "-m", "scaletrain", "train", "--resume", "auto"],
     {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, None,
     "torchrun --nnodes 2 --nproc-per-node 8 -m scaletrain train --resume auto"),
])
def test_typed_command(orig_argv, environ, parent, expected):
    assert typed_command(orig_argv, environ, parent) == expected
