"""The batch script of `scaletrain launch slurm`, run by bash as Slurm would run it, with fake
`srun`/`scontrol`/`hostname` on PATH (shell stubs that record their arguments; srun runs its
command here, one node). Logs go where the script's own `#SBATCH --output/--error` lines say,
opened in append mode as `--open-mode=append` makes Slurm do.

The preemption test uses a stand-in worker (a Python script that saves on SIGUSR1 and exits 5,
as the trainer does); the trainer's own signal handling is tested with the trainer."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEBUG_CONFIG, cli_env, free_port, run_cli

pytestmark = pytest.mark.slow  # the generated Slurm script run with stand-in srun/scontrol: ~35 s on 2 cores

STUBS = {
    "srun": """#!/bin/bash
echo "srun $*" >> "$FAKE_SLURM_LOG"
while [ $# -gt 0 ]; do case "$1" in -w|-N|-n) shift 2;; -*) shift;; *) break;; esac; done
exec "$@"
""",
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
[ "$1" = show ] && echo fake-node0
exit 0
""",
    "hostname": """#!/bin/bash
echo "hostname $*" >> "$FAKE_SLURM_LOG"
echo 127.0.0.1
""",
    "python3": f"""#!/bin/bash
exec {sys.executable} "$@"
""",
}


def write_job(tmp_path: Path, *args: str) -> Path:
    script = tmp_path / "job.sbatch"
    run_cli("launch", "slurm", "--config", str(DEBUG_CONFIG), "--run-dir", str(tmp_path / "run"),
            "--gpus-per-node", "0", "--port", str(free_port()), "--out", str(script), *args)
    return script


def start_job(tmp_path: Path, script: Path, **env_extra: str) -> tuple[subprocess.Popen, Path]:
    """Start `bash script` as sbatch would on one node; returns the process and the fake log."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = cli_env()
    env.update(PATH=f"{stubs}{os.pathsep}{env['PATH']}", FAKE_SLURM_LOG=str(tmp_path / "slurm.log"),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="fake-node0", SLURM_CPUS_PER_TASK="2", **env_extra)
    header = script.read_text()
    name = re.search(r"--job-name=(\S+)", header).group(1)
    out, err = (re.search(rf"#SBATCH --{kind}=(\S+)", header).group(1).replace("%x", name).replace("%j", "4242")
                for kind in ("output", "error"))
    with open(out, "a") as stdout, open(err, "a") as stderr:  # --open-mode=append
        proc = subprocess.Popen(["bash", str(script)], stdout=stdout, stderr=stderr, env=env, cwd=tmp_path)
    return proc, Path(out)


@pytest.mark.slow
def test_cpu_job_trains_and_reports_the_workers_codes(tmp_path, data_cache):
    """A 2-process gloo job trains to the end (exit 0); the rendezvous uses the head node's
    address; a user error in the workers reaches the job's exit code (2) and is not requeued;
    both attempts' logs stay in the run folder."""
    common = ("--nproc-per-node", "2", "--data.cache_dir", str(data_cache), "--metrics.progress", "none")
    script = write_job(tmp_path, *common, "--train.steps", "4", "--checkpoint.interval", "2")
    proc, log = start_job(tmp_path, script)
    assert proc.wait(timeout=300) == 0, log.with_suffix(".err").read_text()
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-00000004" / "COMPLETE").is_file()
    calls = (tmp_path / "slurm.log").read_text()
    assert "srun --nodes=1 --ntasks=1 -w fake-node0 hostname --ip-address" in calls
    assert re.search(r"--rdzv-endpoint 127\.0\.0\.1:\d+ --rdzv-id 4242", calls)
    assert "--train.hang_timeout_s 1800" in calls and "requeue" not in calls

    script.unlink()
    script = write_job(tmp_path, *common, "--train.device", "cuda")  # no CUDA here: every rank exits 2
    proc, log = start_job(tmp_path, script)
    assert proc.wait(timeout=300) == 2
    assert "requeue" not in (tmp_path / "slurm.log").read_text()
    text = log.read_text()
    assert text.count("[scaletrain] job 4242 start") == 2 and "[scaletrain] exit 0" in text
    assert "[scaletrain] exit 2" in text
    assert log.with_suffix(".err").read_text().count("error: train.device = 'cuda'") == 1


STAND_IN = """
import os, signal, sys, time
from pathlib import Path
out = Path(os.environ["STAND_IN_DIR"])
def save(signum, frame):
    (out / f"saved-{os.environ['RANK']}").write_text(str(signum))
    sys.exit(5)
signal.signal(signal.SIGUSR1, save)
(out / f"ready-{os.environ['RANK']}").touch()
time.sleep(120)
sys.exit(0)
"""


def test_usr1_is_forwarded_saved_and_requeued(tmp_path):
    """Slurm's SIGUSR1 to the batch shell reaches both workers through srun and the launcher;
    they save and exit 5; the script requeues the job and exits 0."""
    (tmp_path / "worker.py").write_text(STAND_IN)
    worker = tmp_path / "worker"  # the launcher's worker interpreter (torchrun's PYTHON_EXEC)
    worker.write_text(f"#!/bin/bash\nexec {sys.executable} {tmp_path / 'worker.py'}\n")
    worker.chmod(0o755)
    script = write_job(tmp_path, "--nproc-per-node", "2")
    proc, log = start_job(tmp_path, script, PYTHON_EXEC=str(worker), STAND_IN_DIR=str(tmp_path))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, log.with_suffix(".err").read_text()
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@...` does
    assert proc.wait(timeout=120) == 0, log.with_suffix(".err").read_text()
    assert [(tmp_path / f"saved-{r}").read_text() for r in (0, 1)] == [str(int(signal.SIGUSR1))] * 2
    assert "scontrol requeue 4242" in (tmp_path / "slurm.log").read_text()
    text = log.read_text()
    assert "SIGUSR1" in text and "exit 5 after SIGUSR1: requeued" in text
    exits = list((tmp_path / "run" / "slurm" / "exit-4242").iterdir())
    assert len(exits) == 1 and exits[0].read_text().split()[1] == "5"
