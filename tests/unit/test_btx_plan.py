"""`scaletrain btx --plan`: every stage of configs/btx_gpu.toml priced with the planner's search,
and the arithmetic of independent branches (k jobs on N/k GPUs each, at the same time) against
the same tokens as one synchronous job on all N GPUs."""

from __future__ import annotations

import pytest

from conftest import ROOT, main_exit, main_run
from scaletrain.config import load_config
from scaletrain.plan.hardware import get_hardware
from scaletrain.recipes.btx_plan import best_step, format_plan, price_btx
from scaletrain.recipes.mix import moe_config

GPU_CONFIG = str(ROOT / "configs" / "btx_gpu.toml")


@pytest.fixture(scope="module")
def priced():
    cfg = load_config(GPU_CONFIG)
    hw = get_hardware("h100_sxm")
    return cfg, hw, price_btx(cfg, 8, hw)


def test_branches_are_priced_as_independent_jobs_against_one_synchronous_job(priced):
    cfg, hw, rows = priced
    b, k = cfg.btx, len(cfg.data.domains)
    by_name = {r.name.strip(): r for r in rows}
    assert k == 4 and [r.name.split(":")[0].strip() for r in rows] == [
        "seed", "branches", "the same tokens as one synchronous job", "mix", "finetune (MoE, 5 experts, top-2)",
        "baseline dense (compute-matched)", "baseline upcycle (MoE)"]
    global_batch = cfg.data.batch_size * cfg.train.grad_accum * 8  # the config as written on 8 GPUs
    on_8, _ = best_step(cfg.model, cfg.data.seq_len, global_batch, 8, hw, "bf16", False)
    on_2, layout = best_step(cfg.model, cfg.data.seq_len, global_batch, 2, hw, "bf16", False)
    branches, sync = rows[1], rows[2]
    assert (branches.jobs, branches.gpus, branches.steps) == (4, 2, b.branch_steps)
    assert branches.seconds == b.branch_steps * on_2 and branches.layout == layout
    assert (sync.jobs, sync.gpus, sync.steps) == (1, 8, 4 * b.branch_steps)
    assert sync.seconds == 4 * b.branch_steps * on_8
    assert branches.gpu_hours == pytest.approx(b.branch_steps * on_2 * 8 / 3600)  # 4 jobs x 2 GPUs
    assert by_name["seed"].seconds == b.seed_steps * on_8
    dense = by_name["baseline dense (compute-matched)"]
    assert dense.steps == 4 * b.branch_steps + b.finetune_steps and dense.seconds == dense.steps * on_8
    finetune, upcycle = rows[4], rows[6]
    assert (finetune.steps, upcycle.steps) == (b.finetune_steps, dense.steps)
    # the MoE stages priced like the others, with the mixed model
    moe, _ = best_step(moe_config(cfg.model, 5), cfg.data.seq_len, global_batch, 8, hw, "bf16", False)
    assert moe > on_8 and finetune.seconds == b.finetune_steps * moe and upcycle.seconds == dense.steps * moe
    text = format_plan(cfg, rows, 8, hw.name, global_batch * cfg.data.seq_len)
    saved = 1 - branches.seconds / sync.seconds
    assert f"{saved:+.1%} wall-clock saved" in text and "4 x 2" in text


def test_btx_plan_cli(capsys):
    code, out, _ = main_run(capsys, "btx", "--config", GPU_CONFIG, "--plan", "--gpus", "8", "--global-batch-tokens",
                            "512k")
    assert code == 0 and "524,288 tokens per step" in out and "branch stage:" in out
    for args, needle in ((["--plan", "--gpus", "6"], "must split evenly among the 4 branches"),
                         (["--plan"], "btx --plan needs --config"),
                         (["--plan", "--gpus", "8", "--global-batch-tokens", "1000"], "not a multiple of data.seq_len")):
        code, err = main_exit(capsys, "btx", "--config", GPU_CONFIG, *args)
        assert code == 2 and needle in err, (args, err)
