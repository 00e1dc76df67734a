"""What only a fresh `python -m scaletrain` process shows, for the sub-commands whose tests
otherwise run the CLI in the test process (tests/unit): the real interpreter's exit code 2,
one line on stderr and no traceback. (train and bench have theirs in test_bad_input.py and
test_bench_cli.py.)"""

from __future__ import annotations

from conftest import ROOT, run_cli


def _one_clean_line(r, needle: str) -> None:
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_plan_bad_gpu():
    r = run_cli("plan", "--model", "debug", "--gpus", "8", "--gpu", "h100_sxn", check=False, timeout=120)
    _one_clean_line(r, "unknown GPU 'h100_sxn'")
    assert "h100_sxm" in r.stderr


def test_launch_slurm_bad_layout(tmp_path):
    out = tmp_path / "job.sbatch"
    r = run_cli("launch", "slurm", "--config", str(ROOT / "configs" / "anchor_1b.toml"), "--run-dir",
                str(tmp_path / "run"), "--out", str(out), "--nodes", "2", "--gpus-per-node", "8",
                "--parallel.dp_shard", "3", check=False, timeout=120)
    _one_clean_line(r, "parallel degrees multiply to 3")
    assert not out.exists() and not (tmp_path / "run").exists()


def test_import_missing_folder(tmp_path):
    r = run_cli("import", "--from", "hf", "--src", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "run"),
                check=False, timeout=120)
    _one_clean_line(r, str(tmp_path / "nope"))
    assert not (tmp_path / "run").exists()
