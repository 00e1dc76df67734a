"""`scaletrain plan check --run DIR`: what a finished run measured vs what the planner predicts.

Reads the run's resolved config (DIR/config.toml), its step records (DIR/metrics.jsonl) and
DIR/run_info.json (world size, device), predicts the step time and the per-rank peak memory of
exactly that layout with the cost model (plan/cost.py), and reports both side by side with
relative errors ((predicted - measured) / measured).

Measured step time: the median `step_time_s` over the steady-state steps -- the first
`warmup` steps of the run (allocator, thread pools, torch.compile) and every step that follows
an eval or a checkpoint save are skipped. Measured peak memory: the largest `mem_bytes` of any
step (rank 0's; metrics.jsonl is written by rank 0 only): CUDA max allocated bytes, or on the
CPU the process peak RSS.

Hardware: a calibrated profile (`--profile`, from `scaletrain plan calibrate`) or, for a CUDA
run, the catalog entry matching the run's GPU name. A CPU run needs a profile (there is no
catalog entry for a CPU). On the CPU the peak RSS also counts the interpreter, torch's
libraries and the first training step's lazily loaded kernels, which the planner's memory
model (tensors only) does not describe: the profile's `framework_baseline_bytes` (measured by
`plan calibrate` in a fresh process, see calibrate.framework_baseline_bytes) is added to the CPU
memory prediction and shown as its own line.

`--measure-tensors` (`measure_tensor_peaks`) also measures what the memory model actually
describes, on the CPU: it rebuilds the run's model, data and optimizer from DIR/config.toml
with the trainer (in a temporary run folder), runs `warmup` + `steps` training steps and
measures the peak live tensor bytes of the measured steps with plan/memtrace.py (the CPU
analogue of `torch.cuda.max_memory_allocated`). Under torchrun every rank measures its own
peak and rank 0 gathers and prints all ranks. That number is compared with the model's
tensor prediction *without* the fragmentation allowance (allocated, not reserved, bytes).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scaletrain.config.schema import Config
from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.ranks import env_ranks
from scaletrain.plan.cost import Estimate, estimate
from scaletrain.plan.hardware import CATALOG, GiB, Hardware, get_hardware
from scaletrain.plan.memcheck import preflight, run_stack, workload_for_config

WARMUP_STEPS = 3


@dataclass
class CheckResult:
    """Measured vs predicted for one run. Times in seconds, sizes in bytes; errors are
    (predicted - measured) / measured, None when the measured value is missing."""

    run_dir: str
    hardware: str
    device: str
    world_size: int
    layout: str
    precision: str
    compile: bool
    steps_used: list[int]
    measured_step_s: float | None
    predicted_step_s: float
    step_error: float | None
    measured_peak_bytes: float | None
    predicted_peak_bytes: float  # model + framework baseline (CPU)
    model_peak_bytes: float  # the cost model's tensors-only prediction
    framework_baseline_bytes: float
    memory_error: float | None
    breakdown: dict[str, float] = field(default_factory=dict)
    time_breakdown: dict[str, float] = field(default_factory=dict)
    # --measure-tensors: peak live tensor bytes per rank vs the tensors-only prediction
    predicted_tensor_bytes: float | None = None  # the model's total without the fragmentation allowance
    measured_tensor_bytes: float | None = None  # max over ranks
    tensor_error: float | None = None
    tensor_ranks: list[dict[str, Any]] = field(default_factory=list)  # per rank: memtrace.TensorPeak fields
    memory_phase: str = ""  # the moment of the step the model puts the peak at

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rel(pred: float, meas: float | None) -> float | None:
    if meas is None or not meas or not math.isfinite(meas):
        return None
    return (pred - meas) / meas


def _read_run(run_dir: Path) -> tuple[Config, list[dict], list[dict], dict]:
    from scaletrain.train.metrics import read_metrics
    from scaletrain.train.rundir import load_run_config

    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist; pass the --run-dir of a `scaletrain train` run.")
    try:
        cfg = load_run_config(run_dir)
        train, evals = read_metrics(run_dir)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if not train:
        raise ConfigError(f"{run_dir}/metrics.jsonl holds no training steps; train the run for a few steps first.")
    info_path = run_dir / "run_info.json"
    try:
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        info = {}
    return cfg, train, evals, info


def _device(cfg: Config, info: dict) -> tuple[str, str | None]:
    """('cuda' | 'cpu', GPU name or None) the run trained on."""
    cuda = (info.get("hardware") or {}).get("cuda") or {}
    available = bool(cuda.get("available"))
    kind = cfg.train.device if cfg.train.device in ("cpu", "cuda") else ("cuda" if available else "cpu")
    name = None
    if kind == "cuda" and cuda.get("devices"):
        name = cuda["devices"][0].get("name")
    return kind, name


def catalog_for_gpu(name: str, memory_bytes: float | None = None) -> Hardware:
    """The catalog entry of a `torch.cuda.get_device_name()` string (peaks table match, then
    the entry of that device whose memory is closest to the device's)."""
    from scaletrain.train.peaks import match_device

    entry = match_device(name)
    cands = [hw for hw in CATALOG.values() if entry is not None and hw.device_key == entry.key]
    if not cands:
        raise ConfigError(f"no planner catalog entry for GPU {name!r}; calibrate it (`scaletrain plan calibrate "
                          f"--out gpu.json` on that machine) and pass --profile gpu.json.")
    if memory_bytes:
        cands.sort(key=lambda hw: abs(hw.hbm_bytes - memory_bytes))
    return cands[0]


def steady_steps(cfg: Config, train: list[dict], evals: list[dict], warmup: int = WARMUP_STEPS) -> list[dict]:
    """Train records after warm-up, without the steps right after an eval or a checkpoint save."""
    if not train:
        return []
    first = train[0]["step"]
    disturbed = {e["step"] + 1 for e in evals}
    for r in train:
        s = r["step"]
        if cfg.checkpoint.interval and s % cfg.checkpoint.interval == 0:
            disturbed.add(s + 1)
        if cfg.train.eval_interval and s % cfg.train.eval_interval == 0:
            disturbed.add(s + 1)
    kept = [r for r in train if r["step"] >= first + warmup and r["step"] not in disturbed
            and isinstance(r.get("step_time_s"), (int, float))]
    if not kept:  # too short a run: keep what there is after the first step
        kept = [r for r in train[1:] or train if isinstance(r.get("step_time_s"), (int, float))]
    return kept


def _profile_baseline(profile: str | None) -> float | None:
    if not profile:
        return None
    try:
        raw = json.loads(Path(profile).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # get_hardware already raised a clear error for a bad file
    v = raw.get("framework_baseline_bytes")
    return float(v) if isinstance(v, (int, float)) else None


def _measure_config(cfg: Config, steps: int) -> Config:
    """The run's config for an in-process re-run: no eval, checkpoints, plots, TensorBoard,
    progress bar, sample or watchdog; enough steps for the schedule."""
    from scaletrain.train.rundir import steps_only_config

    cfg = steps_only_config(cfg, max(cfg.train.steps, steps))
    cfg.train.device = "cpu"  # the live-tensor measurement is the CPU analogue of max_memory_allocated
    return cfg


def measure_tensor_peaks(run_dir: str | Path, steps: int = 2, warmup: int = 1,
                         world_size: int | None = None) -> list[dict[str, Any]]:
    """Rebuild the run in `run_dir` with the trainer (temporary run folder, same config, this
    process's ranks), train `warmup` steps (optimizer state, compilation), then measure the
    peak live tensor bytes of `steps` more (memtrace.TensorMemoryTracker). Returns one dict per
    rank (rank order; TensorPeak fields + "rank"); under torchrun every rank must call this.

    `world_size` (the run's) must equal this launch's world size: a multi-rank run is measured
    under `torchrun --nproc-per-node N`, never squeezed into one process."""
    import gc
    import shutil
    import tempfile

    from scaletrain.plan.memtrace import TensorMemoryTracker
    from scaletrain.train.rundir import load_run_config

    launched = env_ranks().world_size
    if world_size is not None and world_size != launched:
        raise ConfigError(f"the run in {run_dir} trained on {world_size} rank(s) but this process group has "
                          f"{launched}; "
                          f"measure it under the same launch: torchrun --standalone --nproc-per-node {world_size} "
                          f"-m scaletrain plan check --run-dir {run_dir} --measure-tensors ...")
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--measure-steps must be >= 1 and --measure-warmup >= 0, got {steps} and {warmup}.")
    try:
        cfg = _measure_config(load_run_config(run_dir), warmup + steps)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    from scaletrain.train.trainer import Trainer

    tmp = tempfile.mkdtemp(prefix="scaletrain-measure-")
    trainer = None
    try:
        trainer = Trainer(cfg, Path(tmp) / "run", memory_check=preflight(force=True))
        for _ in range(warmup):
            trainer.train_step()
        gc.collect()
        tracker = TensorMemoryTracker(trainer.parts, [trainer.optimizer])
        with tracker:
            for _ in range(steps):
                with tracker.step():
                    trainer.train_step()
        mine = {"rank": trainer.rank, **tracker.result.to_dict()}
        if trainer.env.distributed:
            import torch.distributed as dist

            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        return ranks
    finally:
        if trainer is not None:
            trainer.metrics.close()
            if trainer.env.distributed:
                from scaletrain.parallel.dims import shutdown_distributed

                shutdown_distributed()
        shutil.rmtree(tmp, ignore_errors=True)


def check_run(run_dir: str | Path, profile: str | None = None, warmup: int = WARMUP_STEPS,
              measure_tensors: bool = False, measure_steps: int = 2, measure_warmup: int = 1) -> CheckResult:
    """Measured vs predicted step time and per-rank peak memory of the run in `run_dir`
    (with `measure_tensors`, also the peak live tensor bytes of a re-run, per rank)."""
    run_dir = Path(run_dir)
    cfg, train, evals, info = _read_run(run_dir)
    device, gpu_name = _device(cfg, info)
    world_size = int(info.get("world_size") or 1)
    if profile:
        hw = get_hardware(profile)
    elif device == "cuda" and gpu_name:
        devs = ((info.get("hardware") or {}).get("cuda") or {}).get("devices") or [{}]
        hw = catalog_for_gpu(gpu_name, devs[0].get("memory_bytes"))
    elif device == "cuda":
        raise ConfigError(f"{run_dir}/run_info.json does not name the GPU; pass --profile (a catalog name such as "
                          "h100_sxm or a profile JSON from `scaletrain plan calibrate`).")
    else:
        raise ConfigError("this run trained on the CPU, which has no catalog entry: a calibrated profile is required. "
                          "Run `scaletrain plan calibrate --out cpu.json` on this machine (with the run's "
                          "OMP_NUM_THREADS) and pass --profile cpu.json.")
    w, layout = workload_for_config(cfg, world_size, device)
    est: Estimate = estimate(w, layout, hw, run_stack(cfg))

    baseline = 0.0
    if device == "cpu":
        baseline = _profile_baseline(profile)
        if baseline is None:  # an older profile: measure it now
            from scaletrain.plan.calibrate import framework_baseline_bytes

            baseline = float(framework_baseline_bytes())
    kept = steady_steps(cfg, train, evals, warmup)
    times = [float(r["step_time_s"]) for r in kept]
    measured_step = statistics.median(times) if times else None
    mems = [float(r["mem_bytes"]) for r in train if isinstance(r.get("mem_bytes"), (int, float))]
    measured_mem = max(mems) if mems else None
    # CUDA mem_bytes is max_memory_allocated: live tensors, so the model without its
    # fragmentation allowance; CPU mem_bytes is peak RSS: the model's total + the framework.
    pred_mem = est.memory.total + baseline if device == "cpu" else est.memory.allocated
    t = est.time
    tensor_ranks: list[dict[str, Any]] = []
    if measure_tensors and device != "cpu":
        raise ConfigError("--measure-tensors re-runs a CPU run to measure its live tensor bytes; this run trained on "
                          "CUDA, whose mem_bytes already is torch.cuda.max_memory_allocated (drop --measure-tensors).")
    if measure_tensors:
        tensor_ranks = measure_tensor_peaks(run_dir, measure_steps, measure_warmup, world_size)
    measured_tensors = max(float(r["peak_bytes"]) for r in tensor_ranks) if tensor_ranks else None
    pred_tensors = est.memory.allocated
    return CheckResult(
        run_dir=str(run_dir), hardware=hw.name, device=device if not gpu_name else f"cuda ({gpu_name})",
        world_size=world_size, layout=layout.short(), precision=w.precision, compile=bool(cfg.train.compile),
        steps_used=[int(r["step"]) for r in kept], measured_step_s=measured_step, predicted_step_s=t.total,
        step_error=_rel(t.total, measured_step), measured_peak_bytes=measured_mem, predicted_peak_bytes=pred_mem,
        model_peak_bytes=est.memory.total, framework_baseline_bytes=baseline, memory_error=_rel(pred_mem, measured_mem),
        breakdown=est.memory.parts(),
        time_breakdown={"compute": t.compute, **{f"exposed_{k}": v for k, v in t.exposed.items()},
                        "bubble": t.bubble, "overhead": t.overhead, "optimizer": t.optimizer},
        predicted_tensor_bytes=pred_tensors if measure_tensors else None, measured_tensor_bytes=measured_tensors,
        tensor_error=_rel(pred_tensors, measured_tensors), tensor_ranks=tensor_ranks, memory_phase=est.memory.phase)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def format_check(r: CheckResult) -> str:
    """Human-readable measured vs predicted table."""
    ms = lambda v: "n/a" if v is None else f"{1e3 * v:.1f} ms"  # noqa: E731
    gib = lambda v: "n/a" if v is None else f"{v / GiB:.3f} GiB" if v >= GiB else f"{v / 2**20:.1f} MiB"  # noqa: E731
    steps = r.steps_used
    span = f"{len(steps)} steps ({steps[0]}-{steps[-1]})" if steps else "no steps"
    lines = [
        f"run {r.run_dir}: {r.world_size} rank(s) on {r.device}, {r.layout}, {r.precision}"
        f"{', compiled' if r.compile else ''}; hardware {r.hardware}",
        f"{'':<22}{'measured':>14}{'predicted':>14}{'error':>10}",
        f"{'step time (median)':<22}{ms(r.measured_step_s):>14}{ms(r.predicted_step_s):>14}{_pct(r.step_error):>10}",
    ]
    if r.tensor_ranks:
        for tr in r.tensor_ranks:
            label = "peak live tensors" + (f" r{tr['rank']}" if len(r.tensor_ranks) > 1 else "")
            lines.append(f"{label:<22}{gib(tr['peak_bytes']):>14}{gib(r.predicted_tensor_bytes):>14}"
                         f"{_pct(_rel(r.predicted_tensor_bytes, tr['peak_bytes'])):>10}")
    rss = "peak RSS (rank 0)" if r.device == "cpu" else "peak memory per rank"
    lines += [
        f"{rss:<22}{gib(r.measured_peak_bytes):>14}{gib(r.predicted_peak_bytes):>14}"
        f"{_pct(r.memory_error):>10}",
        f"step time over {span}, skipping the first {WARMUP_STEPS} and those after eval/checkpoint",
        "predicted time: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in r.time_breakdown.items() if v),
        "predicted memory: " + ", ".join(f"{k} {v / GiB:.3f}" for k, v in r.breakdown.items() if v) + " GiB"
        + (f" + framework baseline {r.framework_baseline_bytes / GiB:.3f} GiB (CPU peak RSS counts the interpreter "
           f"and torch libraries)" if r.framework_baseline_bytes else ""),
    ]
    if r.tensor_ranks:
        lines.append(f"live tensors are compared with the model without its fragmentation allowance "
                     f"({gib(r.predicted_tensor_bytes)}, peak predicted at the {r.memory_phase}); "
                     "measured at the peak:")
        for tr in r.tensor_ranks:
            parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in tr["at_peak"].items() if v)
            steps = ", ".join(f"{v / 2**20:.1f}" for v in tr["step_peaks"])
            lines.append(f"  rank {tr['rank']}: {parts} MiB (peak reached by a {tr['phase']} allocation; "
                         f"per measured step {steps} MiB)")
    return "\n".join(lines)
