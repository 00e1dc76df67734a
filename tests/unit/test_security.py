"""Untrusted files are never unpickled freely: every torch.load passes weights_only=True, and the
HF import accepts pickled weights only with --allow-pickle (and then still weights_only)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_main
from scaletrain.errors import CheckpointError
from scaletrain.export import export_hf, import_hf
from scaletrain.export.runio import import_run
from scaletrain.model import build_model, model_config_for
from scaletrain.train.checkpoint import Checkpointer


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in sorted((ROOT / "scaletrain").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", kw.get("weights_only")))
    assert calls, "the scan found no torch.load call at all (hf.py's --allow-pickle path has one)"
    assert [c for c in calls if c[1] != "True"] == []


def test_every_checkpoint_read_goes_through_the_safe_reader():
    """DCP's own reader unpickles `.metadata` freely and its planner reads stored values with
    weights_only=False: the package reads checkpoints only with SafeReader + SafePlanner."""
    loads, readers = [], []
    for path in sorted((ROOT / "scaletrain").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            name, where = ast.unparse(node.func), f"{path.relative_to(ROOT)}:{node.lineno}"
            if (name.split(".")[-1] in ("load", "load_state_dict") and "dcp" in name) or "checkpoint.load" in name:
                loads.append((where, sorted(k.arg for k in node.keywords if k.arg in ("storage_reader", "planner"))))
            if name.split(".")[-1] in ("FileSystemReader", "_load_state_dict_from_keys"):
                readers.append(where)
    assert loads, "the scan found no dcp.load at all (Checkpointer.load has one)"
    assert [w for w, kw in loads if kw != ["planner", "storage_reader"]] == [] and readers == []


def _pickled_hf_folder(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """An HF Llama folder whose weights are only a pickled pytorch_model.bin (+ tokenizer.json)."""
    cfg = model_config_for("debug")
    sd = build_model(cfg, seed=2).state_dict()
    src = export_hf(sd, cfg, tmp_path / "hf", tokenizer_files={"tokenizer.json": "{}"})
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    return src, sd


def test_pickled_weights_are_refused_unless_allowed(tmp_path):
    src, sd = _pickled_hf_folder(tmp_path)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*only safetensors weights are accepted.*--allow-pickle"):
        import_hf(src)
    cfg, got = import_hf(src, allow_pickle=True)
    assert cfg == model_config_for("debug") and got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_allow_pickle_still_refuses_code(tmp_path):
    src, _ = _pickled_hf_folder(tmp_path)
    marker = tmp_path / "pwned"
    # A pickle whose loading would call Path.touch(marker): weights_only refuses the global.
    torch.save({"model.norm.weight": torch.ones(1), "evil": _Evil(marker)}, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        import_hf(src, allow_pickle=True)
    assert not marker.exists()


class _Evil:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_cli_import_rejects_pickles_and_allow_pickle_imports(tmp_path):
    src, sd = _pickled_hf_folder(tmp_path)
    proc = run_main("import", "--from", "hf", "--src", str(src), "--run-dir", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "only safetensors weights are accepted" in proc.stderr and "--allow-pickle" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()

    ckpt = import_run(src, tmp_path / "run", allow_pickle=True)  # what --allow-pickle calls
    state = {"model": {k: torch.zeros_like(v) for k, v in sd.items()}}
    meta = Checkpointer.load(ckpt, state)
    assert meta["contents"] == "model" and json.loads((tmp_path / "run" / "imported_from.json").read_text())
    assert all(torch.equal(state["model"][k], sd[k]) for k in sd)
