"""`scaletrain launch local`'s worker supervision with stand-in workers (plain Python processes,
no torch): the first failing worker's exit code, the restart rule (2 and 3 never restarted) and
signal forwarding (SIGTERM/SIGUSR1 wait for the workers' save; SIGINT 130)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow  # starts and restarts worker processes: ~10 s on 2 cores

STAND_IN = """
import os, signal, sys, time
from pathlib import Path
rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
log = Path(sys.argv[1])
with log.open("a") as f:
    f.write(f"start rank={rank} attempt={attempt}\\n")
codes = sys.argv[2].split(",")  # per attempt "rank0code/rank1code"; "kill" = SIGKILL itself
def stop(signum, frame):
    time.sleep(0.5 * rank)  # the later rank is still saving when the first one exits
    with log.open("a") as f:
        f.write(f"saved rank={rank} signal={signum}\\n")
    sys.exit(130 if signum == signal.SIGINT else 5)
for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(s, stop)
(log.parent / f"ready-{rank}-{attempt}").touch()
code = codes[min(attempt, len(codes) - 1)].split("/")[rank]
if code == "wait":
    time.sleep(60)
    sys.exit(0)
if code == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(0.2 * rank)  # rank 0 fails first
sys.exit(int(code))
"""


def launch_stand_in(tmp_path, codes: str, max_restarts: int = 0, signal_to_send=None) -> tuple[int, list[str]]:
    import signal
    import sys
    import threading
    import time

    from scaletrain.launch.local import LocalLaunch, run_workers

    script, log = tmp_path / "worker.py", tmp_path / "log"
    script.write_text(STAND_IN)
    log.write_text("")
    if signal_to_send is not None:
        def send_when_ready():
            while not all((tmp_path / f"ready-{r}-0").exists() for r in (0, 1)):
                time.sleep(0.02)
            os.kill(os.getpid(), signal_to_send)  # to this process: the launcher

        threading.Thread(target=send_when_ready, daemon=True).start()
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    code = run_workers(LocalLaunch(2, max_restarts=max_restarts, monitor_interval_s=0.05),
                       [sys.executable, str(script), str(log), codes])
    assert {s: signal.getsignal(s) for s in before} == before  # the launcher's handlers are gone
    return code, log.read_text().splitlines()


def test_wrapper_exit_codes_and_restart_rule(tmp_path, capsys):
    """The first failing worker's code comes back; 2 and 3 are never restarted, 1, 4 and a
    worker killed by a signal are, up to max_restarts."""
    cases = [  # (codes per attempt, max_restarts, expected code, expected attempts)
        ("0/0", 2, 0, 1),
        ("2/2", 3, 2, 1),  # user error: would repeat
        ("3/0", 3, 3, 1),  # numerics abort: would repeat
        ("1/0,0/0", 3, 0, 2),  # a crash, then success on the restart
        ("0/4", 2, 4, 3),  # a hang every time: restarts exhausted, the hang code stays
        ("kill/wait", 1, 137, 2),  # SIGKILL (OOM killer): 128 + 9
    ]
    for i, (codes, restarts, expected, attempts) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        code, log = launch_stand_in(folder, codes, restarts)
        assert code == expected, (codes, log)
        assert sum(line.startswith("start rank=0") for line in log) == attempts, (codes, log)
    err = capsys.readouterr().err
    assert "rank 0 exited 1 (crashed); restarting the workers (1 of 3)" in err
    assert "rank 0 was killed by SIGKILL (no restarts left)" in err
    assert "Traceback" not in err and "SIGTERM" not in err


def test_wrapper_forwards_signals_and_waits_for_the_save(tmp_path):
    """SIGUSR1/SIGTERM to the launcher reach every worker, which saves and exits 5; the worker
    still saving is not killed when the first exits, and nothing is restarted. SIGINT: 130."""
    import signal

    for i, (sig, expected) in enumerate([(signal.SIGUSR1, 5), (signal.SIGTERM, 5), (signal.SIGINT, 130)]):
        folder = tmp_path / str(i)
        folder.mkdir()
        code, log = launch_stand_in(folder, "wait/wait", max_restarts=2, signal_to_send=sig)
        assert code == expected, log
        assert sorted(line for line in log if line.startswith("saved")) == [
            f"saved rank=0 signal={int(sig)}", f"saved rank=1 signal={int(sig)}"], log
        assert sum(line.startswith("start") for line in log) == 2  # one attempt, two ranks
