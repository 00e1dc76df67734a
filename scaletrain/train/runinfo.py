"""Where and with what a run ran: source revision, library versions, hardware.

Written to `run_dir/run_info.json` and summarised in a header at the top of every run log,
so any loss curve can be traced to the code, the libraries and the machine that made it.
Collection never fails: anything that cannot be found is "unknown" or None.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from scaletrain.ranks import env_ranks

RUN_INFO_FILE = "run_info.json"
PACKAGES = ("torch", "numpy", "tokenizers", "safetensors", "transformers", "datasets",
            "pyarrow", "rich", "matplotlib", "tensorboard", "triton", "scaletrain")


def _git(args: list[str], cwd: Path) -> str | None:
    """stdout of `git <args>` in `cwd`, or None when git is missing, fails or hangs."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
            # No index refresh lock: other processes may be using the same checkout.
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_info(source_dir: Path | None = None) -> dict[str, Any]:
    """`{"revision": 40-hex sha or "unknown", "dirty": bool or None}` for the git checkout
    holding `source_dir` (default: the scaletrain package's own source tree). Dirty means
    `git status --porcelain` lists anything, untracked files included."""
    if source_dir is None:
        source_dir = Path(__file__).resolve().parent.parent
    if not Path(source_dir).is_dir():
        return {"revision": "unknown", "dirty": None}
    rev = _git(["rev-parse", "HEAD"], source_dir)
    if rev is None or len(rev.strip()) != 40:
        return {"revision": "unknown", "dirty": None}
    status = _git(["status", "--porcelain"], source_dir)
    return {"revision": rev.strip(), "dirty": None if status is None else bool(status.strip())}


def package_versions() -> dict[str, str | None]:
    """Installed version of each package in PACKAGES (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _total_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _cuda_info() -> dict[str, Any]:
    """Accelerator description; calling this initialises CUDA when it is present."""
    info: dict[str, Any] = {"available": torch.cuda.is_available(),
                            "cuda_version": torch.version.cuda,
                            "hip_version": getattr(torch.version, "hip", None)}
    if not info["available"]:
        return info
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                        "memory_bytes": int(props.total_memory)})
    info["device_count"] = len(devices)
    info["devices"] = devices
    info["cudnn_version"] = torch.backends.cudnn.version()
    try:
        nccl = torch.cuda.nccl.version()
        info["nccl_version"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception:  # NCCL absent (ROCm builds ship RCCL, Windows none): not an error
        info["nccl_version"] = None
    return info


def hardware_info() -> dict[str, Any]:
    """Platform, CPU model and counts, total RAM (bytes) and CUDA devices."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "ram_bytes": _total_ram_bytes(),
        "cuda": _cuda_info(),
    }


def _proc_cmdline(pid: int) -> list[str] | None:
    """The argv of process `pid` from /proc (Linux), or None where it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] or None


def _as_typed(cmdline: list[str]) -> list[str]:
    """`cmdline` as a user types it: an entry-point script the interpreter runs (the kernel
    turns `scaletrain ...` into `/venv/bin/python /venv/bin/scaletrain ...`) becomes its name."""
    if (len(cmdline) > 1 and Path(cmdline[0]).name.startswith("python")
            and Path(cmdline[1]).name in ("scaletrain", "torchrun")):
        return [Path(cmdline[1]).name, *cmdline[2:]]
    return cmdline


def typed_command(orig_argv: list[str], environ: dict[str, str], parent_cmdline: list[str] | None) -> str:
    """The command line the user typed to start this run, as one shell-quoted string
    (`typed_argv`'s arguments)."""
    return shlex.join(typed_argv(orig_argv, environ, parent_cmdline))


def typed_argv(orig_argv: list[str] | None = None, environ: dict[str, str] | None = None,
               parent_cmdline: list[str] | None = None) -> list[str]:
    """The command line the user typed to start this run, as a list of arguments; with no
    arguments, this process's (the one reader of /proc for it: the run header and the resume
    command of a stopped run both use it).

    `orig_argv` is this process's own (`sys.orig_argv`: interpreter, `-m scaletrain` or the
    `scaletrain` script, arguments). A torchrun worker (TORCHELASTIC_RUN_ID is set) was started
    by the torchrun agent, whose command (`parent_cmdline`, from /proc) is what the user typed.
    Where that cannot be read, the command is rebuilt from the environment as
    `torchrun --nnodes N --nproc-per-node G -m scaletrain ARGS` (rendezvous options unknown)."""
    if orig_argv is None:
        orig_argv = list(getattr(sys, "orig_argv", sys.argv))
        environ = dict(os.environ)
        parent_cmdline = _proc_cmdline(os.getppid()) if "TORCHELASTIC_RUN_ID" in environ else None
    if "TORCHELASTIC_RUN_ID" not in environ:
        return _as_typed(orig_argv)
    if parent_cmdline and ("torch.distributed.run" in parent_cmdline
                           or Path(_as_typed(parent_cmdline)[0]).name == "torchrun"):
        return _as_typed(parent_cmdline)
    args = orig_argv[orig_argv.index("scaletrain") + 1:] if "scaletrain" in orig_argv else orig_argv[1:]
    ranks = env_ranks(environ)
    per_node = ranks.local_world_size or 1
    return ["torchrun", "--nnodes", str(ranks.world_size // per_node), "--nproc-per-node", str(per_node),
            "-m", "scaletrain", *args]


def collect_run_info(source_dir: Path | None = None) -> dict[str, Any]:
    """Everything that identifies a run's environment, as a JSON-ready dict:
    `git` (revision, dirty), `versions`, `hardware`, `hostname`, `command` (as the user typed
    it, see `typed_command`), `argv` (this process's sys.argv), `time_utc`."""
    return {
        "git": git_info(source_dir),
        "versions": package_versions(),
        "hardware": hardware_info(),
        "hostname": socket.gethostname(),
        "command": shlex.join(typed_argv()),
        "argv": list(sys.argv),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_run_info(run_dir: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Collect the run info, add the keys of `extra` (e.g. world size, config path) at the
    top level, write `run_dir/run_info.json` (temp file + rename) and return the dict.
    Call it on rank 0 only."""
    info = collect_run_info()
    info.update(extra or {})
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RUN_INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / RUN_INFO_FILE)
    return info


def run_info_header(info: dict[str, Any]) -> str:
    """Lines for the top of a run log: revision, libraries, devices, the world size and layout
    (parallel degrees) when recorded, and the command."""
    git = info.get("git", {})
    dirty = {True: " (dirty)", False: " (clean)"}.get(git.get("dirty"), "")
    v = info.get("versions", {})
    hw = info.get("hardware", {})
    cuda = hw.get("cuda", {})
    libs = f"python {v.get('python')} | torch {v.get('torch')}"
    if cuda.get("available"):
        libs += (f" | cuda {cuda.get('cuda_version') or cuda.get('hip_version')}"
                 f" | cudnn {cuda.get('cudnn_version')} | nccl {cuda.get('nccl_version')}")
        names = sorted({d["name"] for d in cuda.get("devices", [])})
        caps = sorted({d["capability"] for d in cuda.get("devices", [])})
        device = f"{cuda.get('device_count')} x {', '.join(names)} (sm {', '.join(caps)})"
    else:
        device = "cpu"
    ram = hw.get("ram_bytes")
    ram_text = f"{ram / 2**30:.1f} GiB" if ram else "unknown"
    lines = [
        f"scaletrain rev {git.get('revision', 'unknown')}{dirty} | host {info.get('hostname')}"
        f" | {info.get('time_utc')}",
        libs,
        f"device {device} | cpu {hw.get('cpu_model')} x {hw.get('cpu_usable')} | ram {ram_text}",
    ]
    if "world_size" in info:
        layout = info.get("layout") or {}
        degrees = " x ".join(f"{name} {degree}" for name, degree in layout.items() if name != "ep")
        if layout.get("ep", 1) > 1:  # expert parallelism re-uses data-parallel ranks: not a factor
            degrees += f", experts over ep {layout['ep']}"
        lines.append(f"world {info['world_size']}" + (f": {degrees}" if degrees else ""))
    lines.append(f"cmd {info.get('command') or ' '.join(info.get('argv', []))}")
    return "\n".join(lines)
