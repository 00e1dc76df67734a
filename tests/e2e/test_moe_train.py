"""MoE end to end: `scaletrain train --config configs/cpu_debug.toml --model.flavor moe_debug`
trains and logs the expert metrics; the run exports to Hugging Face Qwen3-MoE and imports back;
a resumed MoE run (expert bias and capacity drops on) continues bit for bit; the
auxiliary-loss-free bias balances the experts over 200 steps."""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import pytest
import torch

from conftest import DEBUG_CONFIG, debug_train_args, main_exit, run_main
from scaletrain.train.metrics import read_metrics

STEPS = 40


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, data_cache):
    run = tmp_path_factory.mktemp("moe") / "run"
    run_main(*debug_train_args(run, data_cache, STEPS, "--model.flavor", "moe_debug"))
    return run


def test_moe_debug_trains_and_logs_expert_metrics(moe_run):
    train, _ = read_metrics(moe_run)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        assert r["aux_loss"] >= 1.0 - 1e-6  # the Switch loss is >= 1, equal when balanced
        assert 1.0 <= r["expert_imbalance"] <= 4.0  # top-2 of 8: an expert gets at most 4x the mean
        assert r["dropped_frac"] == 0.0  # dropless by default
    first, last = train[0]["loss"], statistics.mean(r["loss"] for r in train[-5:])
    assert last < first - 1.0, (first, last)


def test_moe_run_exports_to_qwen3_moe_and_imports_back(moe_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="the [dev] extra installs transformers")
    from scaletrain.export.runio import load_run_model

    out, back = tmp_path / "hf", tmp_path / "imported"
    assert main_exit(capsys, "export", "--run", str(moe_run), "--to", "hf", "--out", str(out))[0] == 0
    assert main_exit(capsys, "import", "--from", "hf", "--src", str(out), "--run-dir", str(back))[0] == 0
    ours, tok, cfg = load_run_model(moe_run)
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.tensor([tok.encode("def main(argv):\n    return 0\n")])
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4  # fp32 both sides
    imported, _, cfg2 = load_run_model(back)
    assert cfg2.model == cfg.model
    for (k, a), (k2, b) in zip(ours.state_dict().items(), imported.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def _trainer(run: Path, data_cache: Path, steps: int, resume: str, *extra: str):
    from scaletrain.config import load_config
    from scaletrain.plan.memcheck import preflight
    from scaletrain.train.trainer import Trainer

    cfg = load_config(DEBUG_CONFIG, ["--model.flavor", "moe_debug", "--train.steps", str(steps),
                                     "--data.cache_dir", str(data_cache), "--metrics.progress", "none",
                                     "--metrics.tensorboard", "false", "--metrics.plot", "false",
                                     "--train.eval_interval", "0", *extra])
    return Trainer(cfg, run, memory_check=preflight(), resume=resume)


def test_moe_resume_is_exact(tmp_path, data_cache):
    extra = ("--checkpoint.interval", "3", "--model.moe_balance", "bias", "--model.moe_bias_rate", "0.01",
             "--model.moe_capacity_factor", "1.0")
    run = tmp_path / "run"
    trainer = _trainer(run, data_cache, 6, "never", *extra)
    trainer.fit()
    straight = read_metrics(run)[0]
    bias = trainer.unsplit_model.layers["2"].feed_forward.router.expert_bias.clone()
    assert bias.abs().sum() > 0 and any(r["dropped_frac"] > 0 for r in straight)
    shutil.rmtree(run / "checkpoints" / "step-00000006")  # as if killed after step 3's checkpoint
    resumed = _trainer(run, data_cache, 6, "auto", *extra)
    assert resumed.step == 3
    resumed.fit()
    again = read_metrics(run)[0]
    keys = ("loss", "grad_norm", "aux_loss", "expert_imbalance", "dropped_frac")
    assert [[r[k] for k in keys] for r in again[3:]] == [[r[k] for k in keys] for r in straight[3:]]
    assert torch.equal(resumed.unsplit_model.layers["2"].feed_forward.router.expert_bias, bias)


@pytest.mark.slow
def test_expert_bias_balances_moe_debug_over_200_steps(tmp_path, data_cache):
    """docs/moe.md records the curve: mean imbalance 3.5 over steps 1-25, 1.6 over 176-200
    (moe_balance "none": 3.4 -> 3.6)."""
    run = tmp_path / "run"
    _trainer(run, data_cache, 200, "never", "--model.moe_balance", "bias", "--checkpoint.interval", "0",
             "--checkpoint.save_final", "false").fit()
    imbalance = [r["expert_imbalance"] for r in read_metrics(run)[0]]
    first, last = statistics.mean(imbalance[:25]), statistics.mean(imbalance[-25:])
    assert last < 0.6 * first, (first, last)
