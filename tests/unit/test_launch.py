"""`scaletrain launch slurm`: the script's torchrun line, layout checks against nodes x GPUs,
and bad input (exit 2, nothing written)."""

from __future__ import annotations

import os

from conftest import ROOT, main_exit, run_main

ANCHOR = str(ROOT / "configs" / "anchor_1b.toml")


def slurm(capsys, tmp_path, *extra: str) -> str:
    """The script `scaletrain launch slurm` prints (in-process)."""
    from scaletrain.cli import run

    assert run(["launch", "slurm", "--config", ANCHOR, "--run-dir", str(tmp_path / "run"), *extra]) == 0
    return capsys.readouterr().out


def test_slurm_gpu_script(tmp_path, capsys):
    """The preemption flow, logs in the run folder, the head node's IP, the wrapper per node, the
    watchdog on, scaletrain's overrides last; no --time line (the partition's default limit)."""
    proc = run_main("launch", "slurm", "--config", ANCHOR, "--run-dir", str(tmp_path / "run"), "--nodes", "4",
                    "--gpus-per-node", "8", "--partition", "gpu", "--out", str(tmp_path / "job.sbatch"),
                    "--parallel.tp", "2")
    assert "wrote" in proc.stdout
    text = (tmp_path / "job.sbatch").read_text()
    run = tmp_path / "run"
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append", f"#SBATCH --output={run}/slurm/%x-%j.out",
                 f"#SBATCH --error={run}/slurm/%x-%j.err", "trap 'forward USR1' USR1", "trap 'forward TERM' TERM",
                 'HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD" hostname --ip-address', "export PYTHONFAULTHANDLER=1",
                 'scontrol requeue "$SLURM_JOB_ID"', 'exit "$rc"'):
        assert line in text, line
    assert "#SBATCH --time" not in text and "--cpus-per-task" not in text
    assert "python3 -m scaletrain launch local --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d" in text
    assert '--rdzv-endpoint "$HEAD_IP:29500" --rdzv-id "$SLURM_JOB_ID"' in text and "--max-restarts 3" in text
    assert "--resume auto --parallel.tp 2 --train.hang_timeout_s 1800 &" in text
    assert (run / "slurm").is_dir()  # Slurm does not create the log folder itself

    # Options: a time limit, signal lead, NCCL interface, debug settings, extra variables.
    text = slurm(capsys, tmp_path, "--gpus-per-node", "8", "--time", "4:00:00", "--signal-lead-s", "600",
                 "--nccl-socket-ifname", "ib0", "--debug", "--env", "NCCL_IB_HCA=mlx5", "--hang-timeout-s", "0")
    for line in ("#SBATCH --time=4:00:00", "#SBATCH --signal=B:USR1@600",
                 "export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0", "NCCL_DEBUG=INFO",
                 "TORCH_DISTRIBUTED_DEBUG=DETAIL", "export NCCL_IB_HCA=mlx5"):
        assert line in text, line
    assert "hang_timeout_s" not in text


def test_slurm_cpu_job_and_process_count_from_the_layout(tmp_path, capsys):
    """--gpus-per-node 0: a gloo job without a gres line, CPUs per task, OpenMP threads from the
    allocation. The process count comes from the config's degrees when they fix the world size."""
    text = slurm(capsys, tmp_path, "--gpus-per-node", "0", "--nproc-per-node", "2", "--cpus-per-task", "8")
    assert "gpus" not in text and "--exclusive" not in text and "#SBATCH --cpus-per-task=8" in text
    assert "export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-2} / 2 ))" in text
    assert 'srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK"' in text
    assert "--nnodes 1 --nproc-per-node 2" in text
    text = slurm(capsys, tmp_path, "--nodes", "2", "--parallel.dp_shard", "4", "--parallel.tp", "2")
    assert "#SBATCH --gpus-per-node=4" in text and "--nnodes 2 --nproc-per-node 4" in text
    text = slurm(capsys, tmp_path, "--nodes", "2", "--gpus-per-node", "0", "--parallel.dp_shard", "6")
    assert "#SBATCH --cpus-per-task=3" in text and "--nnodes 2 --nproc-per-node 3" in text  # one CPU each


def test_slurm_rejects_bad_layout_and_keys(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    base = ("launch", "slurm", "--config", ANCHOR, "--run-dir", str(tmp_path / "run"), "--out", str(out))
    cases = [
        (("--nodes", "2", "--gpus-per-node", "8", "--parallel.dp_shard", "3"), "parallel degrees multiply to 3"),
        (("--nodes", "2", "--gpus-per-node", "4", "--parallel.tp", "8", "--parallel.dp_shard", "1"), "spans more than one node"),
        (("--nodes", "1", "--gpus-per-node", "6", "--parallel.tp", "3"), "not divisible by parallel.tp = 3"),
        (("--nodes", "1", "--parallel.dp_shrd", "8"), "Did you mean '--parallel.dp_shard'?"),
        (("--nodes", "0",), "must be >= 1"),
        (("--nodes", "2",), "how many processes per node?"),
        (("--nodes", "3", "--parallel.dp_shard", "4"), "3 nodes cannot share"),
        (("--gpus-per-node", "4", "--nproc-per-node", "2"), "one process per GPU"),
        (("--gpus-per-node", "8", "--env", "NOT A PAIR"), "is not KEY=VALUE"),
    ]
    for extra, message in cases:  # in this process; tests/e2e/test_cli_process.py runs the first in a fresh one
        code, err = main_exit(capsys, *base, *extra)
        assert code == 2, err
        assert message in err
        assert not out.exists() and not (tmp_path / "run").exists()


def test_slurm_submit_retries_and_reruns(tmp_path, capsys, monkeypatch):
    """--submit retries a failing sbatch (showing each error), and rerunning the same command
    after sbatch gave up submits the script it wrote (the same text) instead of refusing."""
    from scaletrain.launch import slurm as slurm_mod

    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"""#!/bin/bash
echo "$@" >> {calls}
n=$(wc -l < {calls})
if [ "$n" -le "${{FAIL_TIMES:-0}}" ]; then echo "sbatch: error: Socket timed out on send/recv operation" >&2; exit 1; fi
echo "Submitted batch job 4242"
""")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm_mod, "SUBMIT_BACKOFF_S", (0.0,))
    out = tmp_path / "job.sbatch"
    args = ("launch", "slurm", "--config", ANCHOR, "--run-dir", str(tmp_path / "run"), "--gpus-per-node", "8",
            "--out", str(out), "--submit")
    monkeypatch.setenv("FAIL_TIMES", "5")
    code, err = main_exit(capsys, *args)
    assert code == 2 and err.count("Socket timed out") == 4, err  # 3 attempts shown + the final error
    assert "sbatch failed (attempt 3 of 3)" in err and f"sbatch {out}" in err
    monkeypatch.setenv("FAIL_TIMES", "4")  # the 4th call fails, the 5th succeeds
    from scaletrain.cli import run

    assert run(list(args)) == 0
    captured = capsys.readouterr()
    assert "attempt 1 of 3" in captured.err and "Submitted batch job 4242" in captured.out
    assert calls.read_text().splitlines() == [str(out)] * 5


# ---------------------------------------------------------------- launch local (the wrapper)
# The launcher runs in this process; its workers are stand-in Python scripts (no torch import),
# each told its behaviour by its rank and restart count (torch's TORCHELASTIC_RESTART_COUNT).
