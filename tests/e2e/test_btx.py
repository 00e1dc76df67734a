"""`scaletrain btx` stages 1-2 on a tiny two-domain config: the stage folders, per-domain
validation, skipping complete stages, continuing a branch killed mid-way, `--seed RUN`, the
compute accounting against hand-counted tokens, and the user errors (exit 2)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env, main_exit, run_torchrun
from scaletrain.train.metrics import read_metrics

SEQ, BATCH, SEED_STEPS, BRANCH_STEPS = 32, 2, 2, 5
TOKENS_PER_STEP = SEQ * BATCH  # one rank, grad_accum 1


def tiny_config(tmp_path, data_cache, domains=("code", "prose")) -> str:
    tables = "".join(f'[[data.domains]]\nname = "{d}"\nsource = "builtin_{d}"\n' for d in domains)
    path = tmp_path / "btx.toml"
    path.write_text(f'''
[model]
flavor = "debug"
[data]
seq_len = {SEQ}
batch_size = {BATCH}
max_documents = 30
val_fraction = 0.2
cache_dir = "{data_cache}"
{tables}
[optim]
lr = 3e-3
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
''')
    return str(path)


def run(capsys, *args: str) -> tuple[int, str]:
    """Exit code and output (stdout + stderr) of `scaletrain btx ARGS` run in this process."""
    from scaletrain.cli import main

    with pytest.raises(SystemExit) as e:
        main(["btx", *args])
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, data_cache):
    """A recipe folder after one uninterrupted `btx` (seed + both branches, then stop at mix)."""
    from scaletrain.cli import main

    tmp = tmp_path_factory.mktemp("btx")
    config = tiny_config(tmp, data_cache)
    with pytest.raises(SystemExit) as e:
        main(["btx", "--config", config, "--run-dir", str(tmp / "dir")])
    assert e.value.code == 2  # stage mix is not available yet
    return tmp, config


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)[0]]


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


def test_accounting_matches_hand_counted_tokens(recipe):
    tmp, _ = recipe
    state = json.loads((tmp / "dir" / "btx_state.json").read_text())
    stages = state["stages"]
    assert set(stages) == {"seed", "branch/code", "branch/prose"} and state["seed_from"] is None
    assert stages["seed"]["tokens"] == SEED_STEPS * TOKENS_PER_STEP == 128
    assert stages["branch/code"]["tokens"] == stages["branch/prose"]["tokens"] == BRANCH_STEPS * TOKENS_PER_STEP == 320
    assert state["totals"]["tokens"] == 128 + 2 * 320
    for s in stages.values():
        assert s["complete"] and s["attempts"] == 1 and 0 < s["train_seconds"] <= s["wall_seconds"]
    assert stages["branch/code"]["init_from"]["path"].endswith("seed/checkpoints/step-00000002")


def test_a_second_run_skips_complete_stages(recipe, capsys):
    tmp, config = recipe
    before = (tmp / "dir" / "branches" / "code" / "metrics.jsonl").read_text()
    code, out = run(capsys, "--config", config, "--run-dir", str(tmp / "dir"), "--stage", "branch")
    assert code == 0 and out.count("skipped") == 2 and "training" not in out
    code, out = run(capsys, "--run-dir", str(tmp / "dir"), "--stage", "seed")  # the saved config, no --config
    assert code == 0 and "stage seed: complete" in out
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
    code, text = run(capsys, "--config", config, "--run-dir", str(out))
    assert code == 2 and "stage seed: complete" in text and "'mix' is not available yet" in text
    assert losses(out / "branches" / "code") == losses(recipe[0] / "dir" / "branches" / "code")  # bit-identical
    assert losses(out / "branches" / "prose") == losses(recipe[0] / "dir" / "branches" / "prose")
    stage = json.loads((out / "branches" / "code" / "stage.json").read_text())
    assert [a["outcome"] for a in stage["attempts"]] == ["killed", "complete"]
    assert [a["start_step"] for a in stage["attempts"]] == [0, 2]  # resumed from the step-2 checkpoint
    acct = json.loads((out / "btx_state.json").read_text())["stages"]["branch/code"]
    assert acct["tokens"] == BRANCH_STEPS * TOKENS_PER_STEP and acct["attempts"] == 2  # repeated steps count once


def test_seed_from_an_existing_run(recipe, tmp_path, capsys):
    tmp, config = recipe
    code, text = run(capsys, "--config", config, "--run-dir", str(tmp_path / "other"), "--seed", str(tmp / "dir" / "seed"),
                     "--stage", "branch", "--branch", "prose")
    assert code == 0 and "training" in text and not (tmp_path / "other" / "seed").exists()
    assert losses(tmp_path / "other" / "branches" / "prose") == losses(tmp / "dir" / "branches" / "prose")
    state = json.loads((tmp_path / "other" / "btx_state.json").read_text())
    assert state["seed_from"]["step"] == SEED_STEPS and state["stages"]["seed"]["external"] is True
    assert state["totals"]["tokens"] == BRANCH_STEPS * TOKENS_PER_STEP  # the external seed is not ours
    code, text = run(capsys, "--run-dir", str(tmp_path / "other"), "--stage", "branch", "--branch", "prose")
    assert code == 0 and "skipped" in text  # --seed is remembered


def test_user_errors_exit_2_with_the_fix(recipe, tmp_path, data_cache, capsys):
    tmp, config = recipe
    dir_ = str(tmp / "dir")
    cases = [
        (["--run-dir", str(tmp_path / "new")], "btx needs --config"),
        (["--config", tiny_config(tmp_path, data_cache, ("code",)), "--run-dir", str(tmp_path / "one")],
         "at least two [[data.domains]]"),
        (["--config", config, "--run-dir", str(tmp_path / "fresh"), "--stage", "branch"],
         "starts from the seed's final checkpoint (step 2"),
        (["--config", config, "--run-dir", dir_, "--branch", "code"], "--branch NAME needs --stage branch"),
        (["--config", config, "--run-dir", dir_, "--stage", "branch", "--branch", "cod"], "Did you mean 'code'?"),
        (["--config", config, "--run-dir", dir_, "--stage", "mix"], "btx stage 'mix' is not available yet"),
        (["--config", config, "--run-dir", dir_, "--data.seq_len", "16"], "changed: data.seq_len: 32 -> 16"),
        (["--config", config, "--run-dir", dir_, "--btx.branch_steps", "3"], "checkpoint at step 5, beyond the 3 steps"),
        (["--config", config, "--run-dir", dir_, "--seed", str(tmp / "dir" / "seed")], "holds a seed trained by this"),
        (["--config", config, "--run-dir", dir_, "--data.domain", "code"], "btx chooses the domain of each stage"),
        (["--config", config, "--run-dir", str(tmp_path / "s"), "--seed", str(tmp_path)], "holds no complete checkpoint"),
    ]
    for args, needle in cases:
        code, err = main_exit(capsys, "btx", *args)
        assert code == 2 and needle in err and "Traceback" not in err, (args, err)
    assert not any((tmp_path / d).exists() for d in ("one", "new", "fresh", "s"))  # refused before writing


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
