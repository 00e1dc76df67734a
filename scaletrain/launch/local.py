"""`scaletrain launch local`: torchrun's agent with scaletrain's exit-code contract.

Plain `torchrun` exits 1 whenever a worker fails (the workers' own codes appear only in its
ChildFailedError report, after a traceback), restarts the workers after any failure
(`--max-restarts`), and dies on SIGUSR1 without telling its workers. This runs the same agent
(torch.distributed.elastic's LocalElasticAgent, the same c10d rendezvous and environment) in this
process and changes three things:

- the exit code is the first failing worker's own: 2 user error, 3 numerics, 4 hang, 5 stopped
  by SIGTERM/SIGUSR1 after saving, 130 Ctrl-C, 128+N for a worker killed by signal N; 0 when
  every worker succeeded. Nothing but the workers' output reaches stderr, plus one line per
  restart or crash.
- restarts: a failure that would repeat (2, 3) and a deliberate stop (5, 130, or anything after
  a forwarded signal) is never restarted; crashes (1), hangs (4) and workers killed by a signal
  are, up to `max_restarts` times, with the command unchanged (`--resume auto` in it continues
  from the newest checkpoint).
- signals: SIGTERM, SIGUSR1 and SIGINT sent to this process go to every worker, which finishes
  its step, saves and exits 5 (130 for SIGINT); the workers that exit first do not get the
  rest killed for `STOP_GRACE_S`, so every rank ends its save and its last line. A signal that
  arrives before any worker runs stops the launch (exit 5, or 130 for SIGINT: nothing to save).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass

from torch.distributed.elastic.agent.server.api import RunResult, WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousParameters
from torch.distributed.elastic.rendezvous import registry as rdzv_registry

from scaletrain.errors import EXIT_HANG, EXIT_INTERRUPTED, EXIT_NUMERICS, EXIT_PREEMPTED, EXIT_USER_ERROR

NO_RESTART = frozenset({EXIT_USER_ERROR, EXIT_NUMERICS, EXIT_PREEMPTED, EXIT_INTERRUPTED})
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOP_GRACE_S = 120.0  # after a forwarded signal: how long the first exited worker waits for the others
_MEANING = {1: "crashed", 2: "user error", 3: "non-finite training (nan_policy abort)", 4: "hang watchdog",
            5: "stopped after saving", 130: "interrupted"}


@dataclass
class LocalLaunch:
    """What torchrun's flags of the same names say; `rdzv_endpoint` "" = one node, standalone."""

    nproc_per_node: int
    nnodes: int = 1
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str = ""
    rdzv_id: str = ""
    max_restarts: int = 0
    monitor_interval_s: float = 0.1  # seconds between polls of the workers' state


def exit_code(elastic_exitcode: int) -> int:
    """A process exit code as a shell reports it: torch's -N (killed by signal N) -> 128 + N."""
    return 128 - elastic_exitcode if elastic_exitcode < 0 else elastic_exitcode


def describe(code: int) -> str:
    if code > 128 and code - 128 in signal.Signals._value2member_map_:
        return f"was killed by {signal.Signals(code - 128).name}"
    return f"exited {code}" + (f" ({_MEANING[code]})" if code in _MEANING else "")


def _note(text: str) -> None:
    print(f"scaletrain launch: {text}", file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
    """Whether child `pid` still runs. WNOWAIT leaves an exited child for torch to reap."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


class _Agent(LocalElasticAgent):
    """torchrun's local agent with the restart rule and signal forwarding of the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_signal: int | None = None  # the first signal forwarded to the workers
        self.first_exit: float | None = None  # monotonic time a worker first exited after it
        self.failure: tuple[int, int] | None = None  # (global rank, exit code) of the first failure

    def _worker_pids(self) -> list[int]:
        return [w.id for w in self.get_worker_group().workers if isinstance(w.id, int)]

    def forward(self, signum: int, frame=None) -> None:
        """Signal handler: pass the signal on to the running workers (they save and exit). A
        second SIGTERM/SIGUSR1 (Slurm's preemption reaches both the batch shell, which forwards
        it, and this process) asks for the same stop and is not passed on again; SIGINT is."""
        if signum != signal.SIGINT and self.stop_signal in (signal.SIGTERM, signal.SIGUSR1):
            return
        self.stop_signal = self.stop_signal or signum
        running = [pid for pid in self._worker_pids() if _alive(pid)]
        if not running:
            if self.get_worker_group().state == WorkerState.SUCCEEDED:
                return  # finishing already (exit barrier): nothing to stop
            raise SignalException(f"{signal.Signals(signum).name} before the workers started",
                                  sigval=signal.Signals(signum))
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _monitor_workers(self, worker_group) -> RunResult:
        if self.stop_signal is not None and self._others_still_saving():
            return RunResult(state=WorkerState.HEALTHY)
        result = super()._monitor_workers(worker_group)
        if result.state == WorkerState.FAILED and result.failures:
            rank, failure = next(iter(result.failures.items()))  # torch lists the first seen first
            code = exit_code(failure.exitcode)
            self.failure = (rank, code)
            if self.stop_signal is not None or code in NO_RESTART:
                self._remaining_restarts = 0  # torch's restart budget: none for what would repeat
            elif self._remaining_restarts > 0:
                spec = worker_group.spec
                _note(f"rank {rank} {describe(code)}; restarting the workers "
                      f"({spec.max_restarts - self._remaining_restarts + 1} of {spec.max_restarts})")
        return result

    def _others_still_saving(self) -> bool:
        """After a forwarded signal, some workers have exited and others still run: give them
        STOP_GRACE_S to finish their save (torch would SIGTERM them at once)."""
        pids = self._worker_pids()
        running = sum(_alive(pid) for pid in pids)
        if running in (0, len(pids)):
            return False
        self.first_exit = self.first_exit or time.monotonic()
        return time.monotonic() - self.first_exit < STOP_GRACE_S


@contextlib.contextmanager
def _launch_environment(agent: _Agent, nproc: int):
    """Install the forwarding handlers, keep torch's agent from claiming SIGTERM/SIGINT, silence
    its log (SIGTERM notices, each failed worker; this launcher reports those) unless LOGLEVEL
    is set, and
    give each worker one OpenMP thread unless OMP_NUM_THREADS is set (as torchrun does).
    Everything is restored afterwards."""
    env = {"TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGHUP,SIGQUIT"}
    if "OMP_NUM_THREADS" not in os.environ and nproc > 1:
        env["OMP_NUM_THREADS"] = "1"
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    saved_handlers = {s: signal.getsignal(s) for s in (*FORWARDED, signal.SIGHUP, signal.SIGQUIT)}
    for s in FORWARDED:
        signal.signal(s, agent.forward)
    elastic, mute = logging.getLogger("torch.distributed.elastic"), logging.NullHandler()
    propagate = elastic.propagate
    if "LOGLEVEL" not in os.environ:  # torch's own switch (LOGLEVEL=INFO) shows its log again
        elastic.propagate = False
        elastic.addHandler(mute)  # a handler, so logging's last resort does not print either
    try:
        yield
    finally:
        elastic.propagate = propagate
        elastic.removeHandler(mute)
        for s, handler in saved_handlers.items():
            signal.signal(s, handler)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_workers(launch: LocalLaunch, argv: list[str]) -> int:
    """Run `argv` (a program and its arguments) as `launch.nproc_per_node` workers of a
    torchrun-style job and return the launch's exit code (module docstring)."""
    standalone = not launch.rdzv_endpoint
    params = RendezvousParameters(
        backend="c10d" if standalone else launch.rdzv_backend,
        endpoint="localhost:0" if standalone else launch.rdzv_endpoint,  # port 0: a free one
        run_id=launch.rdzv_id or str(uuid.uuid4()), min_nodes=launch.nnodes, max_nodes=launch.nnodes)
    spec = WorkerSpec(role="default", local_world_size=launch.nproc_per_node, entrypoint=argv[0],
                      args=tuple(argv[1:]), rdzv_handler=rdzv_registry.get_rendezvous_handler(params),
                      max_restarts=launch.max_restarts, monitor_interval=launch.monitor_interval_s)
    agent = _Agent(spec=spec, logs_specs=DefaultLogsSpecs(), start_method="spawn")
    close_rendezvous = True
    with _launch_environment(agent, launch.nproc_per_node):
        try:
            result = agent.run()
        except SignalException as e:  # before any worker ran (forward()), or SIGHUP/SIGQUIT
            close_rendezvous = False  # as torchrun: other nodes may still rejoin it
            if e.sigval == signal.SIGINT:
                return EXIT_INTERRUPTED
            return EXIT_PREEMPTED if e.sigval in FORWARDED else 128 + e.sigval
        except RendezvousError as e:
            _note(f"rendezvous failed ({type(e).__name__}: {e}); check --rdzv-endpoint and that every "
                  "node started")
            return 1
        finally:
            if close_rendezvous:
                spec.rdzv_handler.shutdown()
    if not result.is_failed():
        return 0
    rank, code = agent.failure or (-1, 1)
    if code not in (EXIT_USER_ERROR, EXIT_NUMERICS, EXIT_HANG, EXIT_PREEMPTED, EXIT_INTERRUPTED):
        _note(f"rank {rank} {describe(code)}" + (" (no restarts left)" if launch.max_restarts else ""))
    return code
