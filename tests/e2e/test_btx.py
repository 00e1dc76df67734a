"""`scaletrain btx`, the whole recipe on a tiny two-domain config (seed, branches, mix,
finetune, the dense / BTM / upcycling baselines, report): the stage folders, per-domain
validation, the mixed checkpoint loading like any run, skipping complete stages, continuing a
stage killed mid-way, `--seed RUN`, the compute accounting against hand-counted tokens, the
report against the runs' own evaluations, and the user errors (exit 2)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env, main_exit, main_run, run_torchrun
from scaletrain.train.metrics import read_metrics

SEQ, BATCH, SEED_STEPS, BRANCH_STEPS, FINETUNE_STEPS = 32, 2, 2, 5, 3
TOKENS_PER_STEP = SEQ * BATCH  # one rank, grad_accum 1
MATCHED_STEPS = 2 * BRANCH_STEPS + FINETUNE_STEPS  # the dense and upcycling baselines


def tiny_config(tmp_path, data_cache, domains=("code", "prose")) -> str:
    tables = "".join(f'[[data.domains]]\nname = "{d}"\nsource = "builtin_{d}"\n' for d in domains)
    path = tmp_path / "btx.toml"
    path.write_text(f'''
[model]
flavor = "debug"
qk_norm = true
[data]
seq_len = {SEQ}
batch_size = {BATCH}
max_documents = 30
val_fraction = 0.2
cache_dir = "{data_cache}"
{tables}
[optim]
lr = 5e-3
[schedule]
warmup_steps = 1
[train]
eval_interval = 100
eval_batches = 1
[checkpoint]
interval = 2
[metrics]
progress = "none"
tensorboard = false
plot = false
[btx]
seed_steps = {SEED_STEPS}
branch_steps = {BRANCH_STEPS}
finetune_steps = {FINETUNE_STEPS}
''')
    return str(path)


def run(capsys, *args: str) -> tuple[int, str]:
    """Exit code and output (stdout + stderr) of `scaletrain ARGS` run in this process."""
    code, out, err = main_run(capsys, *args)
    return code, out + err


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, data_cache):
    """A recipe folder after one uninterrupted `btx`: every stage and the report."""
    from scaletrain.cli import main

    tmp = tmp_path_factory.mktemp("btx")
    config = tiny_config(tmp, data_cache)
    with pytest.raises(SystemExit) as e:
        main(["btx", "--config", config, "--run-dir", str(tmp / "dir")])
    assert e.value.code == 0
    return tmp, config


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)[0]]


def copy_stages(src, dst, *names: str) -> None:
    """Copy DIR/btx_config.toml and the stage folders `names` of recipe folder `src` to `dst`."""
    dst.mkdir(parents=True)
    shutil.copy(src / "btx_config.toml", dst / "btx_config.toml")
    for name in names:
        shutil.copytree(src / name, dst / name)


def test_seed_and_branches_are_ordinary_runs_with_per_domain_validation(recipe):
    tmp, _ = recipe
    out = tmp / "dir"
    for run_dir, steps, domain in ((out / "seed", SEED_STEPS, ""), (out / "branches" / "code", BRANCH_STEPS, "code"),
                                   (out / "branches" / "prose", BRANCH_STEPS, "prose")):
        assert (run_dir / "checkpoints" / f"step-{steps:08d}" / "COMPLETE").is_file()
        assert f'domain = "{domain}"' in (run_dir / "config.toml").read_text()
        train, evals = read_metrics(run_dir)
        assert [r["step"] for r in train] == list(range(1, steps + 1))
        for e in evals:  # val_loss is the unweighted mean of the domains' losses
            assert e["val_loss"] == (e["val_loss_code"] + e["val_loss_prose"]) / 2
    seed_final = read_metrics(out / "seed")[1][-1]
    for name in ("code", "prose"):
        first = read_metrics(out / "branches" / name)[1][0]
        assert first["step"] == 0 and first == {**seed_final, "step": 0}  # a branch starts from the seed's weights
    code_final, prose_final = (read_metrics(out / "branches" / n)[1][-1] for n in ("code", "prose"))
    assert code_final["val_loss_code"] < prose_final["val_loss_code"]  # each branch learned its own domain
    assert prose_final["val_loss_prose"] < code_final["val_loss_prose"]


def test_the_mix_is_an_moe_run_folder_and_the_finetune_trains_it(recipe):
    from scaletrain.config.load import config_from_dict, read_toml
    from scaletrain.train.checkpoint import verify_checkpoint

    out = recipe[0] / "dir"
    cfg = config_from_dict(read_toml(out / "mix" / "config.toml"))
    m = cfg.model
    assert (m.moe_experts, m.moe_ffn_dim, m.moe_top_k, m.moe_dense_layers, m.moe_balance) == (2, 192, 2, 0, "aux_loss")
    assert cfg.train.steps == FINETUNE_STEPS and cfg.data.domain == ""
    marker = verify_checkpoint(out / "mix" / "checkpoints" / "step-00000000", checksums=True)
    assert marker["contents"] == "model" and marker["model"]["moe_experts"] == 2
    sources = json.loads((out / "mix" / "sources.json").read_text())
    assert [s["path"].split("/")[-3] for s in sources["inputs"]] == ["code", "prose"]
    assert (sources["router_init"], sources["experts"]) == ("normal", 2)
    train, evals = read_metrics(out / "finetune")
    assert [r["step"] for r in train] == list(range(1, FINETUNE_STEPS + 1))
    assert all(r["aux_loss"] > 0 and r["expert_imbalance"] >= 1 for r in train)  # balanced by the aux loss
    assert json.loads((out / "finetune" / "stage.json").read_text())["init_from"]["path"].endswith(
        "mix/checkpoints/step-00000000")
    report = json.loads((out / "report.json").read_text())
    assert evals[0]["step"] == 0 and evals[0]["val_loss_code"] == report["models"]["mix"]["losses"]["code"]


def test_the_mixed_checkpoint_loads_like_any_run(recipe, tmp_path, capsys):
    out = recipe[0] / "dir"
    code, text = run(capsys, "generate", "--run", str(out / "mix"), "--prompt", "def ", "--max-new-tokens", "5")
    assert code == 0 and text.startswith("def ")
    code, text = run(capsys, "export", "--run", str(out / "finetune"), "--out", str(tmp_path / "hf"))
    assert code == 0 and json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen3_moe"
    shutil.copytree(out / "mix", tmp_path / "mix")  # `train --resume auto` on the mix is the finetune
    code, text = run(capsys, "train", "--run-dir", str(tmp_path / "mix"), "--resume", "auto")
    assert code == 0 and losses(tmp_path / "mix") == losses(out / "finetune")


def test_accounting_matches_hand_counted_tokens(recipe):
    from scaletrain.config.load import config_from_dict, read_toml
    from scaletrain.model.flops import flops_per_token

    out = recipe[0] / "dir"
    state = json.loads((out / "btx_state.json").read_text())
    stages = state["stages"]
    assert list(stages) == ["seed", "branch/code", "branch/prose", "mix", "finetune", "dense", "btm", "upcycle_mix",
                            "upcycle"] and state["seed_from"] is None
    steps = {"seed": SEED_STEPS, "branch/code": BRANCH_STEPS, "branch/prose": BRANCH_STEPS, "mix": 0,
             "finetune": FINETUNE_STEPS, "dense": MATCHED_STEPS, "btm": 0, "upcycle_mix": 0, "upcycle": MATCHED_STEPS}
    for name, s in stages.items():
        assert s["complete"] and s["attempts"] == 1 and s["steps"] == steps[name]
        assert s["tokens"] == steps[name] * TOKENS_PER_STEP
        assert 0 <= s["train_seconds"] <= s["wall_seconds"]
    dense_cfg = config_from_dict(read_toml(out / "seed" / "config.toml")).model
    moe_cfg = config_from_dict(read_toml(out / "finetune" / "config.toml")).model
    assert stages["branch/code"]["flops"] == BRANCH_STEPS * TOKENS_PER_STEP * flops_per_token(dense_cfg, SEQ)
    assert stages["upcycle"]["flops"] == MATCHED_STEPS * TOKENS_PER_STEP * flops_per_token(moe_cfg, SEQ)
    m = state["methods"]
    assert m["btx"]["tokens"] == (SEED_STEPS + 2 * BRANCH_STEPS + FINETUNE_STEPS) * TOKENS_PER_STEP == 960
    for name in ("btx", "dense", "upcycle"):  # compute-matched after the seed
        assert m[name]["tokens_after_seed"] == MATCHED_STEPS * TOKENS_PER_STEP == 832
    assert m["btm"]["tokens"] == (SEED_STEPS + 2 * BRANCH_STEPS) * TOKENS_PER_STEP
    walls = [stages[s]["wall_seconds"] for s in ("seed", "branch/code", "branch/prose", "mix", "finetune")]
    assert m["btx"]["wall_seconds"] == pytest.approx(sum(walls), abs=0.01)
    assert m["btx"]["wall_parallel_seconds"] == pytest.approx(sum(walls) - min(walls[1:3]), abs=0.01)
    report = (out / "report.md").read_text()
    assert "| btx | " in report and "| 960 | 832 |" in report and "| dense | " in report


def test_the_report_evaluates_every_model_as_its_run_did(recipe):
    out = recipe[0] / "dir"
    report = json.loads((out / "report.json").read_text())
    models = report["models"]
    assert list(models) == ["seed", "branch/code", "branch/prose", "btm", "mix", "btx", "upcycle", "dense"]
    for name, run_dir in (("seed", "seed"), ("branch/code", "branches/code"), ("btx", "finetune"),
                          ("dense", "baselines/dense"), ("upcycle", "baselines/upcycle")):
        final = read_metrics(out / run_dir)[1][-1]  # the trainer's evaluation of the same weights
        assert models[name]["losses"] == {"code": final["val_loss_code"], "prose": final["val_loss_prose"]}, name
    routing = models["btx"]["routing"]
    for domain in ("code", "prose"):  # 1 batch x 2 x 32 validation tokens, 2 layers, top-2 of 2 experts
        assert [sum(layer) for layer in routing[domain]["first"]] == [64, 64]
        assert routing[domain]["slots"] == [[64, 64], [64, 64]]
    assert models["dense"]["routing"] is None and report["experts"] == ["code", "prose"]
    assert set(report["claims"]["btx_near_branch"]) == {"code", "prose"}
    assert (out / "btx.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "## The paper's claim on this run" in text and "first: code" in text


def test_a_second_run_skips_complete_stages(recipe, capsys):
    tmp, config = recipe
    before = (tmp / "dir" / "branches" / "code" / "metrics.jsonl").read_text()
    code, out = run(capsys, "btx", "--config", config, "--run-dir", str(tmp / "dir"), "--stage", "branch")
    assert code == 0 and out.count("skipped") == 2 and "training" not in out
    code, out = run(capsys, "btx", "--run-dir", str(tmp / "dir"))  # the saved config, no --config
    assert code == 0 and out.count("skipped") == 9 and "training" not in out and "building" not in out
    assert (tmp / "dir" / "branches" / "code" / "metrics.jsonl").read_text() == before


def test_a_branch_killed_mid_way_continues_exactly(recipe, tmp_path, capsys):
    _, config = recipe
    out = tmp_path / "dir"
    env = {**cli_env(), "OMP_NUM_THREADS": "1", "SCALETRAIN_FAULT_KILL": f"0:4:{tmp_path / 'killed'}"}
    proc = subprocess.run([sys.executable, "-m", "scaletrain", "btx", "--config", config, "--run-dir", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]  # killed in branch/code's step 4
    assert (out / "seed" / "checkpoints" / "step-00000002").is_dir()
    assert [r["step"] for r in read_metrics(out / "branches" / "code")[0]][-1] == 3
    assert not (out / "branches" / "prose").exists()
    code, text = run(capsys, "btx", "--config", config, "--run-dir", str(out), "--stage", "branch")
    assert code == 0 and "stage branch/prose: training" in text
    assert losses(out / "branches" / "code") == losses(recipe[0] / "dir" / "branches" / "code")  # bit-identical
    assert losses(out / "branches" / "prose") == losses(recipe[0] / "dir" / "branches" / "prose")
    stage = json.loads((out / "branches" / "code" / "stage.json").read_text())
    assert [a["outcome"] for a in stage["attempts"]] == ["killed", "complete"]
    assert [a["start_step"] for a in stage["attempts"]] == [0, 2]  # resumed from the step-2 checkpoint
    acct = json.loads((out / "btx_state.json").read_text())["stages"]["branch/code"]
    assert acct["tokens"] == BRANCH_STEPS * TOKENS_PER_STEP and acct["attempts"] == 2  # repeated steps count once


def test_a_finetune_killed_mid_way_continues_exactly(recipe, tmp_path, capsys):
    src, out = recipe[0] / "dir", tmp_path / "dir"
    copy_stages(src, out, "seed", "branches", "mix")  # a recipe folder moved elsewhere keeps its stages
    env = {**cli_env(), "OMP_NUM_THREADS": "1", "SCALETRAIN_FAULT_KILL": f"0:3:{tmp_path / 'killed'}"}
    proc = subprocess.run([sys.executable, "-m", "scaletrain", "btx", "--run-dir", str(out)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]  # in the finetune's step 3
    assert "stage mix: complete" in proc.stdout and [r["step"] for r in read_metrics(out / "finetune")[0]] == [1, 2]
    code, text = run(capsys, "btx", "--run-dir", str(out))
    assert code == 0 and "stage finetune: training" in text and "report:" in text
    assert losses(out / "finetune") == losses(src / "finetune")  # bit-identical
    stage = json.loads((out / "finetune" / "stage.json").read_text())
    assert [a["outcome"] for a in stage["attempts"]] == ["killed", "complete"]
    assert [a["start_step"] for a in stage["attempts"]] == [0, 2]
    state = json.loads((out / "btx_state.json").read_text())
    assert state["stages"]["finetune"]["tokens"] == FINETUNE_STEPS * TOKENS_PER_STEP
    assert state["methods"]["btx"]["tokens"] == json.loads((src / "btx_state.json").read_text())["methods"]["btx"]["tokens"]
    report = json.loads((out / "report.json").read_text())["models"]
    assert report["btx"]["losses"] == json.loads((src / "report.json").read_text())["models"]["btx"]["losses"]


def test_seed_from_an_existing_run(recipe, tmp_path, capsys):
    tmp, config = recipe
    code, text = run(capsys, "btx", "--config", config, "--run-dir", str(tmp_path / "other"), "--seed",
                     str(tmp / "dir" / "seed"), "--stage", "branch", "--branch", "prose")
    assert code == 0 and "training" in text and not (tmp_path / "other" / "seed").exists()
    assert losses(tmp_path / "other" / "branches" / "prose") == losses(tmp / "dir" / "branches" / "prose")
    state = json.loads((tmp_path / "other" / "btx_state.json").read_text())
    assert state["seed_from"]["step"] == SEED_STEPS and state["stages"]["seed"]["external"] is True
    assert state["totals"]["tokens"] == BRANCH_STEPS * TOKENS_PER_STEP  # the external seed is not ours
    code, text = run(capsys, "btx", "--run-dir", str(tmp_path / "other"), "--stage", "branch", "--branch", "prose")
    assert code == 0 and "skipped" in text  # --seed is remembered
    code, text = run(capsys, "btx", "--run-dir", str(tmp_path / "other"), "--stage", "upcycle")
    assert code == 0 and "stage upcycle: training" in text  # built from the external seed's run folder


def test_user_errors_exit_2_with_the_fix(recipe, tmp_path, data_cache, capsys):
    tmp, config = recipe
    dir_ = str(tmp / "dir")
    cases = [
        (["--run-dir", str(tmp_path / "new")], "btx needs --config"),
        (["--config", config], "btx needs --run-dir"),
        (["--config", tiny_config(tmp_path, data_cache, ("code",)), "--run-dir", str(tmp_path / "one")],
         "at least two [[data.domains]]"),
        (["--config", config, "--run-dir", str(tmp_path / "fresh"), "--stage", "branch"],
         "starts from the seed's final checkpoint (step 2"),
        (["--config", config, "--run-dir", str(tmp_path / "fresh"), "--stage", "finetune"],
         "stage finetune starts from the mix's final checkpoint (step 0"),
        (["--config", config, "--run-dir", dir_, "--branch", "code"], "--branch NAME needs --stage branch"),
        (["--config", config, "--run-dir", dir_, "--stage", "branch", "--branch", "cod"], "Did you mean 'code'?"),
        (["--config", config, "--run-dir", dir_, "--data.seq_len", "16"], "changed: data.seq_len: 32 -> 16"),
        (["--config", config, "--run-dir", dir_, "--btx.branch_steps", "3"], "checkpoint at step 5, beyond the 3 steps"),
        (["--config", config, "--run-dir", dir_, "--seed", str(tmp / "dir" / "seed")], "holds a seed trained by this"),
        (["--config", config, "--run-dir", dir_, "--data.domain", "code"], "btx chooses the domain of each stage"),
        (["--config", config, "--run-dir", str(tmp_path / "s"), "--seed", str(tmp_path)], "holds no complete checkpoint"),
        (["--config", config, "--run-dir", str(tmp_path / "k"), "--model.moe_top_k", "3"],
         "not a valid MoE: model.moe_top_k = 3"),
        (["--config", config, "--run-dir", str(tmp_path / "r"), "--btx.router_init", "uniform"],
         "btx.router_init = 'uniform' is not one of 'normal', 'zero'"),
        (["--config", config, "--run-dir", dir_, "--stage", "mix", "--btx.seed_expert", "true"],
         "was built from other checkpoints or settings"),
        (["--config", config, "--run-dir", dir_, "--stage", "dense", "--btx.baselines", "false"],
         "--stage dense is a baseline, and btx.baselines = false"),
    ]
    for args, needle in cases:
        code, err = main_exit(capsys, "btx", *args)
        assert code == 2 and needle in err and "Traceback" not in err, (args, err)
    assert not any((tmp_path / d).exists() for d in ("one", "new", "fresh", "s", "k", "r"))  # refused before writing


@pytest.mark.slow
def test_a_branch_runs_alone_under_torchrun_with_another_layout(recipe, tmp_path):
    """`--stage branch --branch code` on 2 gloo ranks (FSDP, the same global batch) from a seed
    trained on one process: the branch's losses equal the single-process branch's to fp32
    reduction order (rel 1e-5, as in tests/distributed/test_reshard.py)."""
    tmp, config = recipe
    out = tmp_path / "dir"
    shutil.copytree(tmp / "dir" / "seed", out / "seed")  # e.g. rsynced from the machine that trained it
    proc = run_torchrun(2, "btx", "--config", config, "--run-dir", str(out), "--stage", "branch", "--branch", "code",
                        "--data.batch_size", str(BATCH // 2), "--parallel.dp_shard", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("btx: stage branch/code: training") == 1  # rank 0 speaks
    assert losses(out / "branches" / "code") == pytest.approx(losses(tmp / "dir" / "branches" / "code"), rel=1e-5)
    state = json.loads((out / "btx_state.json").read_text())
    assert state["stages"]["branch/code"]["tokens"] == BRANCH_STEPS * TOKENS_PER_STEP  # 2 ranks x 1 sequence


@pytest.mark.slow
def test_mix_finetune_and_report_under_torchrun(recipe, tmp_path):
    """The stages after the branches on 2 gloo ranks: the mix is built collectively (every rank
    computes the same weights, DCP writes each tensor once) and equals the single-process mix
    bit for bit; the finetune resumes the mixed checkpoint under FSDP (dp_shard 2, the same
    global batch, expert parallelism 2: one expert per rank) with the single-process losses to fp32 reduction order (rel 1e-5); the report is
    written once."""
    from scaletrain.config.load import config_from_dict, read_toml
    from scaletrain.recipes.mix import load_weights

    src, out = recipe[0] / "dir", tmp_path / "dir"
    copy_stages(src, out, "seed", "branches")
    proc = run_torchrun(2, "btx", "--run-dir", str(out), "--btx.baselines", "false", "--data.batch_size",
                        str(BATCH // 2), "--parallel.dp_shard", "2", "--parallel.ep", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    moe = config_from_dict(read_toml(src / "mix" / "config.toml")).model
    mine, ref = (load_weights(d / "mix" / "checkpoints" / "step-00000000", moe) for d in (out, src))
    assert mine.keys() == ref.keys() and all(mine[k].equal(ref[k]) for k in ref)
    assert losses(out / "finetune") == pytest.approx(losses(src / "finetune"), rel=1e-5)
    assert proc.stdout.count("report.md") == 1 and (out / "report.md").is_file()  # rank 0 speaks and writes
    models = json.loads((out / "report.json").read_text())["models"]
    assert list(models) == ["seed", "branch/code", "branch/prose", "mix", "btx"]
    single = json.loads((src / "report.json").read_text())["models"]["mix"]["losses"]  # 1 rank x 2 rows
    assert models["mix"]["losses"] == pytest.approx(single, rel=1e-5)  # 2 ranks x 1 row: the same sequences
