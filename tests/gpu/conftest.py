"""tests/gpu need a CUDA device. Where there is none (CI, the CPU machine) every test here is
skipped with that reason; with SCALETRAIN_REQUIRE_GPU=1 (set it on the GPU machine) a missing
device fails them instead, so a GPU run can never pass by skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get("SCALETRAIN_REQUIRE_GPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `SCALETRAIN_REQUIRE_GPU=1 pytest -m gpu tests/gpu` on the H100)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
