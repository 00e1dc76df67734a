"""`scaletrain plan ...` through the CLI entry point, in this process (CLI contract: sub-commands
with their own options, exit codes, one-line errors, written files)."""

import json
import re

import pytest

from conftest import main_exit
from scaletrain.config.load import load_config


def _run(*args):
    from scaletrain.cli import run

    return run(["plan", *args])


def test_search_prints_ranked_table_and_writes_a_loadable_config(tmp_path, capsys):
    out = tmp_path / "sub" / "best.toml"
    assert _run("search", "--model", "llama3_8b", "--gpus", "64", "--gpu", "h100_sxm", "--seq-len", "4096",
                "--global-batch-tokens", "2M", "--write-config", str(out)) == 0
    text = capsys.readouterr().out
    for needle in ("tokens/s", "Why #1", "bottleneck", "exposed communication (not hidden by compute)",
                   "memory per GPU", "replicas", "activation"):
        assert needle in text, needle
    assert "repl " not in text and "mbs#" not in text and "shown up to" not in text and "0.0% slower" not in text
    cfg = load_config(out)
    p = cfg.parallel
    assert p.dp_replicate * p.dp_shard * p.tp * p.pp * p.cp == 64
    assert cfg.data.seq_len == 4096 and cfg.model.flavor == "llama3_8b" and cfg.model.dim == 4096
    dp = p.dp_replicate * p.dp_shard
    assert cfg.data.batch_size * cfg.train.grad_accum * dp * 4096 == 2 * 2**20
    # the tokenizer fits the model's vocabulary, and the file records the plan that wrote it
    assert cfg.tokenizer.kind == "bpe" and cfg.tokenizer.vocab_size == cfg.model.vocab_size
    head = out.read_text().split("[model]")[0]
    assert all(s in head for s in ("llama3_8b on 64 x h100_sxm", "tokens/s per GPU", "GiB per GPU", "s per step"))
    assert all(line.startswith("#") for line in head.strip().splitlines())


def test_plan_without_sub_command_is_search(capsys):
    args = ("--model", "debug", "--gpus", "2", "--seq-len", "128", "--global-batch-tokens", "4k")
    assert _run(*args) == 0
    plain = capsys.readouterr().out
    assert _run("search", *args) == 0
    assert capsys.readouterr().out == plain
    assert "defaults used: --gpu h100_sxm" in plain


def test_fp8_plan_is_written_as_an_fp8_config(tmp_path, capsys):
    out = tmp_path / "fp8.toml"
    assert _run("--model", "llama3_8b", "--gpus", "8", "--seq-len", "4096", "--global-batch-tokens", "1M",
                "--precision", "fp8", "--fp8-recipe", "rowwise", "--write-config", str(out)) == 0
    cfg = load_config(out)
    assert cfg.train.precision == "fp8" and cfg.train.fp8_recipe == "rowwise" and cfg.parallel.tp == 1


@pytest.mark.parametrize("action, own, foreign", [
    ("search", ["--gpus", "--write-config", "--sweep-gpus"], ["--published", "--measure-tensors", "--out"]),
    ("validate", ["--published", "--cv", "--json"], ["--gpus", "--measure-tensors", "--write-config"]),
    ("check", ["--run", "--measure-tensors", "--profile"], ["--gpus", "--published", "--sweep-gpus"]),
    ("calibrate", ["--out", "--compile", "--model"], ["--gpus", "--published", "--measure-tensors"]),
])
def test_each_sub_command_help_shows_only_its_own_options(action, own, foreign, capsys):
    with pytest.raises(SystemExit) as e:
        _run(action, "--help")
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(o in text for o in own) and not any(f in text for f in foreign)


def test_bare_plan_exits_2_naming_the_required_options(capsys):
    code, err = main_exit(capsys, "plan")
    assert code == 2 and "--model" in err and "--gpus" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, needle", [
    (["--model", "debug", "--gpus", "8", "--global-batch-tokens", "lots"], "--global-batch-tokens"),
    (["--model", "llama3_8c", "--gpus", "8"], "llama3_8b"),
    (["--model", "debug", "--gpus", "8", "--seq-len", "1000", "--global-batch-tokens", "4k"], "not a multiple of --seq-len"),
    (["--sweep-gpus", "8,...", "--model", "debug"], "needs a value on each side"),
    (["--model", "debug", "--gpus", "8", "--top", "0"], "--top must be >= 1"),
    (["check"], "--run"),
    (["validate", "--published", "/nonexistent/rows.csv"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(args, needle, capsys):
    code, err = main_exit(capsys, "plan", *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_unknown_sub_command_is_an_argparse_error(capsys):
    code, err = main_exit(capsys, "plan", "serch")
    assert code == 2 and "invalid choice: 'serch'" in err


def test_sweep_shows_sizes_that_do_not_fit_and_a_bounded_efficiency(tmp_path, capsys):
    png = tmp_path / "sweep.png"
    assert _run("--model", "llama3_70b", "--seq-len", "8192", "--global-batch-tokens", "1M", "--sweep-gpus",
                "8,16,...,64", "--plot", str(png)) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\s*(\d+)\s+(.*)$", out, re.M)}
    assert set(rows) == {8, 16, 32, 64}
    assert "does not fit" in rows[8]
    effs = [float(x) for x in re.findall(r"(\d+\.\d)%\s+\d+\.\d%", out)]
    assert effs and max(effs) == 100.0 and all(e <= 100.0 for e in effs)
    assert "per-GPU efficiency = tokens/s per GPU / the best" in out


@pytest.mark.slow  # times the real block per AC mode: ~15 s on 2 cores
def test_calibrate_then_plan_with_the_profile(tmp_path, capsys):
    prof = tmp_path / "cpu.json"
    assert _run("calibrate", "--model", "debug", "--out", str(prof)) == 0
    data = json.loads(prof.read_text())
    assert data["calibrated"] and data["hbm_bw"] > 0 and data["peak_flops"]["fp32"] > 0
    # the measured real block per AC mode at seq 128 / 256 (debug: max_seq_len 256) x 1024 / 4096
    # tokens, and the head + loss; compiled ones only with --compile
    cpu = data["cpu"]
    assert set(cpu["blocks"]) == {"none", "full", "selective"} and "head_compiled" not in cpu
    for points in cpu["blocks"].values():
        assert sorted((t, s) for t, s, _ in points) == [(1024, 128), (1024, 256), (4096, 128), (4096, 256)]
        assert all(sec > 0 for _, _, sec in points)
    assert [t for t, _ in cpu["head"]] == [1024, 4096]
    assert 0 < cpu["head_ops"] <= cpu["ops"]["fixed"]  # the ops outside the layers include the head
    capsys.readouterr()
    assert _run("--model", "debug", "--gpus", "1", "--gpu", str(prof), "--seq-len", "256",
                "--global-batch-tokens", "4k", "--precision", "fp32") == 0
    assert "Why #1" in capsys.readouterr().out
