"""`scaletrain launch slurm`: the script's torchrun line, layout checks against nodes x GPUs,
and bad input (exit 2, nothing written)."""

from __future__ import annotations

from conftest import ROOT, main_exit, run_cli

ANCHOR = str(ROOT / "configs" / "anchor_1b.toml")


def test_slurm_script_has_rendezvous_and_overrides(tmp_path):
    out = tmp_path / "job.sbatch"
    proc = run_cli("launch", "slurm", "--config", ANCHOR, "--run-dir", str(tmp_path / "run"), "--nodes", "4",
                   "--gpus-per-node", "8", "--partition", "gpu", "--out", str(out), "--parallel.tp", "2")
    assert "wrote" in proc.stdout
    text = out.read_text()
    assert "#SBATCH --nodes=4" in text and "#SBATCH --partition=gpu" in text
    assert "--nnodes 4 --nproc-per-node 8" in text
    assert '--rdzv-backend c10d --rdzv-endpoint "$HEAD:29500"' in text
    assert text.rstrip().endswith("--resume auto --parallel.tp 2")


def test_slurm_rejects_bad_layout_and_keys(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    base = ("launch", "slurm", "--config", ANCHOR, "--run-dir", str(tmp_path / "run"), "--out", str(out))
    cases = [
        (("--nodes", "2", "--parallel.dp_shard", "3"), "parallel degrees multiply to 3"),
        (("--nodes", "2", "--gpus-per-node", "4", "--parallel.tp", "8", "--parallel.dp_shard", "1"), "spans more than one node"),
        (("--nodes", "1", "--gpus-per-node", "6", "--parallel.tp", "3"), "not divisible by parallel.tp = 3"),
        (("--nodes", "1", "--parallel.dp_shrd", "8"), "Did you mean '--parallel.dp_shard'?"),
        (("--nodes", "0",), "must be >= 1"),
    ]
    proc = run_cli(*base, *cases[0][0], check=False)  # one through a fresh process: no traceback
    assert proc.returncode == 2 and cases[0][1] in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    for extra, message in cases[1:]:  # the rest through the same main(), in this process
        code, err = main_exit(capsys, *base, *extra)
        assert code == 2, err
        assert message in err
        assert not out.exists()
