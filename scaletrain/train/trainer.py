"""The training loop; one step fits on a screen. `Trainer.__init__` runs the named setup steps
of train/setup.py; the non-finite policy lives in train/faults.py.

Data flows one way: config -> data + model (+ parallelism) -> optimizer -> loop -> metrics and
checkpoints. Only rank 0 prints or writes run files; every rank takes part in checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scaletrain.config.load import config_to_dict, write_config
from scaletrain.config.schema import Config
from scaletrain.errors import CheckpointError, ScaletrainError
from scaletrain.model.flops import flops_per_token
from scaletrain.model.loss import cross_entropy_loss
from scaletrain.parallel.dims import barrier
from scaletrain.parallel.layout import microbatch_count
from scaletrain.parallel.fp8 import precompute_scales
from scaletrain.train import checkpoint as ckpt_lib
from scaletrain.train.checkpoint import Checkpointer
from scaletrain.train.safe_dcp import read_metadata
from scaletrain.train import metrics as metrics_lib
from scaletrain.train.metrics import MetricsWriter, NullPhases, Phases, peak_memory_bytes, plot_loss, reset_peak_memory
from scaletrain.train.moe_stats import METRIC_KEYS as MOE_METRIC_KEYS, ExpertStats
from scaletrain.train.optim import LRSchedule, PartsOptimizer
from scaletrain.train.peaks import device_peak_flops
from scaletrain.train.lock import RunLock
from scaletrain.train.preempt import StopSignals
from scaletrain.train.faults import Injector, NonFiniteSteps, Watchdog, host_values
from scaletrain.train.progress import Progress
from scaletrain.train.reduce import clip_grad_norm, global_mean, global_mean_and_any
from scaletrain.train.rundir import check_writable, clear_run_dir, resolve_resume
from scaletrain.train.runinfo import run_info_header, write_run_info
from scaletrain.train.setup import MemoryCheck, build_data, build_parts, check_launch, start_process, step_functions


def _mean(losses: dict[str, float]) -> float:
    """The validation loss of a run: the unweighted mean over its domains (each counts once)."""
    return sum(losses.values()) / len(losses)


class Trainer:
    """Builds everything a run needs from `cfg`; `fit()` trains and returns a summary.

    Before anything is built, `memory_check(cfg, world_size, device)` predicts the per-rank
    peak in bytes and refuses a run predicted not to fit (ConfigError): the caller passes the
    planner's (plan/memcheck.py `preflight`), so the trainer never imports the planner.

    `init_from` (a checkpoint folder) starts a run that has nothing to resume from with that
    checkpoint's model weights at step 0 (fresh optimizer, schedule and data position): how a
    BTX branch starts from its seed. Ignored once the run has a checkpoint of its own."""

    def __init__(self, cfg: Config, run_dir: str | Path, *, memory_check: MemoryCheck, resume: str = "never",
                 overwrite: bool = False, init_from: str | Path | None = None):
        self.stop = StopSignals()  # SIGTERM/SIGUSR1 end the setup at once; in fit() they stop after a step
        self.cfg, self.run_dir = cfg, Path(run_dir)
        t, d = cfg.train, cfg.data
        # Checks first (train/setup.py): nothing below runs, and no file is written, for bad input.
        self.env, self.dims, self.predicted_peak_bytes = check_launch(cfg, memory_check)
        check_writable(self.run_dir)
        # One writer per run folder (train/lock.py): rank 0 locks an existing folder before it
        # reads it, a new one when it creates it (_open_run_folder).
        self.lock = RunLock(self.run_dir).acquire() if self.env.rank == 0 and self.run_dir.is_dir() else None
        resume_from = resolve_resume(self.run_dir, resume, overwrite, cfg.checkpoint)  # every rank checks alike
        self.meshes = start_process(self.env, self.dims, t)
        self.rank, self.device = self.env.rank, self.env.device
        dp_rank = self.meshes.dp_rank if self.meshes else 0
        self.data, self.loader, self.val_sets = build_data(cfg, self.rank, dp_rank, self.dims.dp,
                                                           self._data_note if self.rank == 0 else None)
        self.parts = build_parts(cfg, self.env, self.dims, self.meshes)  # this rank's model parts
        self.pipeline = self._build_pipeline() if self.dims.pp > 1 else None
        self.optimizer = PartsOptimizer(self.parts, cfg.optim, self.device)
        self.schedule = LRSchedule(self.optimizer, cfg.optim.lr, t.steps, cfg.schedule)
        # MoE: expert load metrics and the expert-bias update (None for a dense model). The aux
        # loss's gradient is divided as each micro-batch's task loss is before backward.
        loss_scale = self.pipeline.loss_scale if self.pipeline is not None else t.grad_accum
        micro = microbatch_count(cfg.parallel, self.dims.pp) if self.pipeline is not None else 1
        self.moe = ExpertStats.for_model(self.parts, cfg.model, loss_scale, passes=t.grad_accum * micro)
        self.moe_metrics: dict[str, float] = {}
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint, self.rank)
        self.step = 0
        self.nonfinite = NonFiniteSteps(t.nan_policy, self.rank)  # train/faults.py
        self.injector = Injector(self.rank)
        self.phases: Phases = NullPhases()  # `scaletrain bench` swaps in a PhaseTimer (bench/phases.py)
        self.watchdog = Watchdog(0, self.rank, self.run_dir)  # armed in fit()
        self.resumed_from = resume_from
        if resume_from is not None:
            self._load(resume_from)
        elif init_from is not None:
            self._load(Path(init_from), weights_only=True)
        self.precision, self.autocast, self._loss = step_functions(t, self.device)
        self.tokens_per_step = d.batch_size * d.seq_len * t.grad_accum * self.dims.dp
        self.flops_per_token = flops_per_token(cfg.model, d.seq_len)
        self.peak_flops = device_peak_flops(self.device, self.precision)
        if self.rank == 0:  # every check passed: only now touch the run folder
            self._open_run_folder(resume, overwrite and resume_from is None)
        barrier()
        self.metrics = MetricsWriter(self.run_dir, cfg.metrics, self.rank)

    @property
    def unsplit_model(self) -> nn.Module:
        """The model when it is not split into pipeline stages: this rank's only part (possibly
        sharded or wrapped). Under pipeline parallelism there is no such module: use `parts`."""
        if self.dims.pp > 1:
            raise RuntimeError(f"the model is split into pipeline stages (parallel.pp = {self.dims.pp}); use parts")
        return self.parts[0]

    def _open_run_folder(self, resume: str, clear: bool) -> None:
        """Rank 0, after every check: lock and create (or `clear`) the run folder and write the
        config, tokenizer and run info. With --resume auto, checkpoints newer than the one
        chosen are damaged and set aside."""
        if self.lock is None:
            self.lock = RunLock(self.run_dir).acquire(new=True)
        if clear:
            clear_run_dir(self.run_dir)
        elif resume == "auto":
            self.checkpointer.set_aside_newer(self.step)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpointer.check_writable()  # refused now, not at the first save
        write_config(self.cfg, self.run_dir / "config.toml")
        self._save_tokenizer()
        self.run_info = write_run_info(self.run_dir, {"world_size": self.env.world_size,
                                                      "layout": dataclasses.asdict(self.dims)})

    # ----------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        """Model and optimizer keyed by the full model's parameter names (optimizer flattened
        per parameter), so a checkpoint reshards onto any layout; DCP fills in what each rank
        holds. The rest of the train state is JSON in the marker (`_train_state`), except each
        rank's RNG state (uint8 tensors)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model_sd: dict[str, Any] = {}
        optim_sd: dict[str, Any] = {}
        for part, opt in zip(self.parts, self.optimizer.optimizers):
            model_sd.update(get_model_state_dict(part))
            optim_sd.update(get_optimizer_state_dict(part, opt, options=ckpt_lib.FLAT))
        return {"model": model_sd, "optim": optim_sd,
                "train": {f"rng_rank{self.rank}": ckpt_lib.capture_rng(self.device)}}

    def _train_state(self) -> dict[str, Any]:
        """Step, schedule, loader position and skipped batches: plain JSON, the same on every rank."""
        return {"step": self.step, "schedule": self.schedule.state_dict(), "loader": self.loader.state_dict(),
                "skip_positions": self.nonfinite.state_dict()}

    def _set_state(self, model_sd: dict[str, Any], optim_sd: dict[str, Any] | None) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

        for part, opt in zip(self.parts, self.optimizer.optimizers):
            own = part.state_dict().keys()  # this stage's names (the full model's, unprefixed)
            mine = {k: v for k, v in model_sd.items() if k in own}
            set_model_state_dict(part, mine, options=StateDictOptions(strict=False))
            if optim_sd is not None:
                set_optimizer_state_dict(part, opt, optim_sd, options=ckpt_lib.FLAT)
        if self.cfg.train.precision == "fp8":  # float8 scales must describe the loaded weights
            precompute_scales(self.parts)

    def _metadata(self) -> dict[str, Any]:
        return {"model": config_to_dict(self.cfg)["model"], "tokenizer": self.data.tokenizer.fingerprint(),
                "world_size": self.env.world_size, "tokens_seen": self.step * self.tokens_per_step,
                "train_state": self._train_state()}

    def _load(self, path: Path, weights_only: bool = False) -> None:
        self.checkpointer.wait()  # a pending async save is committed (or its error raised) first
        meta = ckpt_lib.read_marker(path)
        mine = config_to_dict(self.cfg)["model"]
        diff = {k: (v, mine.get(k)) for k, v in meta.get("model", {}).items() if mine.get(k) != v and k != "flavor"}
        if diff:
            parts = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
            raise CheckpointError(f"checkpoint {path} was trained with a different model shape ({parts}). "
                                  "Resume with the run's own config or start a new --run-dir.")
        if meta.get("tokenizer") not in (None, self.data.tokenizer.fingerprint()):
            raise CheckpointError(f"checkpoint {path} was trained with a different tokenizer; use the run's tokenizer settings.")
        state = self._state()
        if weights_only or meta.get("contents") == "model":  # imported/initial weights: train from step 0
            state = {"model": state["model"]}
            self.checkpointer.load(path, state)
            self._set_state(state["model"], None)
            return
        rng_key, stored = f"rng_rank{self.rank}", read_metadata(path).state_dict_metadata
        # RNG states this rank saved (none when the checkpoint had fewer ranks: keep this rank's seed)
        rng = {k: v for k, v in state["train"][rng_key].items() if f"train.{rng_key}.{k}" in stored}
        state["train"] = {rng_key: rng} if rng else {}
        train = meta.get("train_state")
        if train is None:  # written before the train state moved into the marker: see _legacy_train_state
            state["train"].update(self._legacy_train_state(stored))
        self.checkpointer.load(path, state)
        configured = self.optimizer.settings()
        self._set_state(state["model"], state["optim"])
        changed = self.optimizer.apply_settings(configured)
        if changed and self.rank == 0:
            print(f"resuming from {path} with changed optimizer settings (checkpoint -> config, used from now on): "
                  + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()), file=sys.stderr, flush=True)
        if train is None:
            train = dict(state["train"], skip_positions=json.loads(state["train"].get("skip_positions", "[]")))
        self.step = int(train["step"])
        self.schedule.load_state_dict(train["schedule"])
        self.loader.load_state_dict(train["loader"])
        if rng_key in state["train"]:
            ckpt_lib.restore_rng(state["train"][rng_key], self.device)
        self.nonfinite.load_state_dict(train["skip_positions"])

    def _legacy_train_state(self, stored: dict[str, Any]) -> dict[str, Any]:
        """Templates of the train state as checkpoints before the marker held it stored it: DCP
        values (ints, dicts, a JSON string), which the checkpointer reads with
        torch.load(weights_only=True), so loading them runs no code either."""
        legacy = {"step": 0, "schedule": self.schedule.state_dict(), "loader": self.loader.state_dict()}
        if "train.skip_positions" in stored:
            legacy["skip_positions"] = "[]"
        return legacy

    def _save_tokenizer(self) -> None:
        self.data.tokenizer.save(str(self.run_dir / "tokenizer"))  # atomic per file, tokenizer.json last

    def save_checkpoint(self) -> Path:
        self.watchdog.beat("checkpoint save (DCP collectives)")
        return self.checkpointer.save(self.step, self._state(), self._metadata())

    def _save_and_note(self, progress: Progress, wait: bool = False) -> None:
        """Save a checkpoint of this step and say so (step, folder, seconds). With
        checkpoint.async_save the seconds are the staging copy and the files are written in
        the background, unless `wait` (the final save), which includes the commit."""
        t0 = time.perf_counter()
        path = self.save_checkpoint()
        if wait:
            self.checkpointer.wait()
        seconds = time.perf_counter() - t0
        if self.cfg.checkpoint.async_save and not wait:
            progress.note(f"checkpoint step {self.step}: state staged in {seconds:.1f} s, "
                          f"writing {path} in the background")
        else:
            progress.note(f"saved checkpoint step {self.step} to {path} in {seconds:.1f} s")

    def _data_note(self, msg: str) -> None:
        """Rank 0's data-preparation progress (tokenizer training, sharding) on stdout, before
        the run's progress display starts; silent with metrics.progress = "none"."""
        if self.cfg.metrics.progress != "none":
            print(f"data: {msg}", flush=True)

    # ------------------------------------------------------------------ loop
    def _batch(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of a (inputs, targets) batch on the device: its context-parallel
        sequence chunks when cp > 1."""
        inputs, targets = (x.to(self.device, non_blocking=True) for x in batch)
        if self.dims.cp > 1:
            from scaletrain.parallel.cp import shard_sequence

            inputs, targets = (shard_sequence(x, self.dims.cp, self.meshes.cp_rank) for x in (inputs, targets))
        return inputs, targets

    def _forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.unsplit_model(inputs)  # [batch, seq, vocab]
        return self._loss(logits, targets)

    def _build_pipeline(self):
        from scaletrain.parallel.pp import build_pipeline

        p = self.cfg.parallel
        return build_pipeline(self.parts, self.meshes.pp, self.device, microbatch_count(p, self.dims.pp),
                              p.pp_schedule, cross_entropy_loss, grad_accum=self.cfg.train.grad_accum)

    @property
    def _reports_loss(self) -> bool:
        return self.pipeline is None or self.pipeline.is_last

    def _next_batch(self, positions: list[tuple[int, int]], sample_ids: list[int]):
        """The loader's next batch, passing over batches a rollback marked as offending."""
        while True:
            batch = self.loader.next_batch()
            position = (self.loader.epoch, self.loader.global_position)
            if not self.nonfinite.skips(position):
                positions.append(position)
                sample_ids.extend(int(i) for i in self.loader.last_sample_ids)
                return batch

    def train_step(self) -> tuple[float, float] | None:
        """One optimizer step over `grad_accum` micro-batches; returns (mean loss over the
        global batch, global grad norm) as host floats, or None when the step was rolled back.
        The optimizer's kernels may still be running on the device when it returns."""
        for part in self.parts:
            part.train()
        self.loader_at_step_start = self.loader.state_dict()  # what "abort" saves (plain ints)
        self.schedule.set_for_step(self.step + 1)
        self.watchdog.beat("forward/backward", self.step + 1)
        accum = self.cfg.train.grad_accum
        if self.moe is not None:
            self.moe.start_step()
        loss_sum = torch.zeros((), device=self.device)
        positions: list[tuple[int, int]] = []
        sample_ids: list[int] = []
        mark = self.phases.mark
        for _ in range(accum):
            inputs, targets = self._batch(self._next_batch(positions, sample_ids))
            mark("data")
            if self.pipeline is not None:
                with self.autocast():
                    loss = self.pipeline.step(inputs, targets)  # None except on the last stage
                if loss is not None:
                    loss_sum += loss
                mark("pipeline forward+backward")
                continue
            loss = self._forward_loss(inputs, targets)
            mark("forward")
            (loss / accum).backward()
            loss_sum += loss.detach()
            mark("backward")
        self.injector.after_backward(self.step + 1, self.parts, sample_ids)
        self.watchdog.beat("all-reduce of the gradient norm (clipping)")
        grad_norm = clip_grad_norm(self.parts, self.cfg.optim.grad_clip,
                                   self.meshes.pp.get_group() if self.pipeline is not None else None)
        mark("grad norm + clip")
        self.watchdog.beat("all-reduce of the loss")
        # Any rank's stop request (train/preempt.py) rides along in the loss all-reduce.
        loss, stops = global_mean_and_any(loss_sum / accum, self._reports_loss, self.stop.requested)
        moe = ()
        if self.moe is not None:
            self.watchdog.beat("all-reduce of the expert counts (MoE)")
            moe = self.moe.reduce(self.device).unbind()
        # The step's only host sync, before the update (a bad step never touches the weights);
        # none after it, so the host prepares the next step while the optimizer runs.
        values = host_values(loss, grad_norm, stops, *moe)
        self.stop.agreed = values[2] > 0
        self.moe_metrics = dict(zip(MOE_METRIC_KEYS, values[3:]))
        values = values[:2]
        if not all(math.isfinite(v) for v in values):
            return self._nonfinite(values[0], values[1], positions, sample_ids)
        mark("loss all-reduce + finite check")
        self.watchdog.beat("optimizer step")
        self.optimizer.step()
        if self.moe is not None:
            self.moe.update_bias()  # after the step, from this step's global expert counts
        if self.precision == "fp8":  # float8 scales of the FSDP-sharded weights, in one all-reduce
            precompute_scales(self.parts)
        self.optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
        self.step += 1
        return values

    def _nonfinite(self, loss: float, grad_norm: float, positions: list[tuple[int, int]],
                   sample_ids: list[int]) -> tuple[float, float] | None:
        """Apply train.nan_policy (train/faults.py) to a step whose loss or global gradient norm
        (host floats, from the step's one sync) is NaN/Inf; returns what train_step returns."""
        guard, step = self.nonfinite, self.step + 1
        guard.count += 1
        self.optimizer.zero_grad(set_to_none=True)  # the bad update is never applied
        if guard.policy == "skip":
            self.step += 1
            return loss, grad_norm
        report = guard.report(step, loss, grad_norm, self.parts, sample_ids)
        if guard.policy == "rollback":
            self.watchdog.beat("checkpoint wait (rollback)")
            self.checkpointer.wait()
            guard.rollback(step, positions, self.checkpointer.latest(), report, self._reload)
            return None
        self.loader.load_state_dict(self.loader_at_step_start)  # "abort": nor are its batches consumed
        saved, error = None, None
        try:
            saved = self._save_now()
        except ScaletrainError as e:
            error = e
        raise guard.abort(report, self.step, saved, error)

    def _reload(self, path: Path) -> int:
        """Load checkpoint `path` (a rollback); returns the step it holds."""
        self._load(path)
        return self.step

    def evaluate(self) -> float:
        """Mean validation loss (nats/token): over the fixed validation batches, or with
        [[data.domains]] the unweighted mean of the domains' losses."""
        return _mean(self.evaluate_domains())

    @torch.no_grad()
    def evaluate_domains(self) -> dict[str, float]:
        """Validation loss (nats/token) per domain name ("" without [[data.domains]]), each the
        mean over that domain's fixed validation batches."""
        for part in self.parts:
            part.eval()
        return {name: self._val_loss(batches) for name, batches in self.val_sets.items()}

    def _val_loss(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        total = torch.zeros((), device=self.device)
        for batch in batches:
            inputs, targets = self._batch(batch)
            if self.pipeline is not None:
                with self.autocast():
                    loss = self.pipeline.eval_loss(inputs, targets)
                total += loss if loss is not None else 0.0
            else:
                total += self._forward_loss(inputs, targets)
        return float(global_mean(total, self._reports_loss)) / len(batches)

    def fit(self) -> dict[str, Any]:
        """Train to train.steps (with the hang watchdog armed when configured); returns a summary."""
        self.watchdog = Watchdog(self.cfg.train.hang_timeout_s, self.rank, self.run_dir)
        self.stop.defer()  # a stop signal now finishes the step in flight and saves it (train/preempt.py)
        try:
            return self._fit()
        finally:
            self.stop.restore()
            self.watchdog.stop()
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> dict[str, Any]:
        t, c = self.cfg.train, self.cfg.checkpoint
        summary: dict[str, Any] = {"start_step": self.step, "run_dir": str(self.run_dir)}
        reset_peak_memory(self.device)
        with Progress(t.steps, self.cfg.metrics.progress, self.rank, start_step=self.step,
                      log_interval=self.cfg.metrics.log_interval) as progress:
            progress.note(run_info_header(self.run_info) if self.rank == 0 else "")
            if self.step:
                progress.note(f"resumed at step {self.step} from {self.resumed_from}")
            if self.step == 0 and t.eval_interval:
                summary["initial_val_loss"] = self._eval_and_log(progress)
            while self.step < t.steps:
                t0 = time.perf_counter()
                result = self.train_step()
                if result is None:
                    progress.note(f"non-finite step: rolled back to step {self.step} from the newest checkpoint "
                                  "(a batch that fails twice is skipped)")
                    if self.stop.agreed:
                        self._stop_on_signal()
                    continue
                loss, grad_norm = result
                loss_value = float(loss)  # a host float already (train_step's one sync)
                dt = time.perf_counter() - t0
                record = self._record(loss_value, float(grad_norm), dt)
                record["nonfinite_steps"] = self.nonfinite.count
                self.metrics.log_step(record)
                progress.update(self.step, record)
                if self.stop.agreed:
                    self._stop_on_signal()
                if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.steps:
                    self._eval_and_log(progress)
                if c.interval and self.step % c.interval == 0 and self.step < t.steps:
                    self._save_and_note(progress)
            summary["final_val_loss"] = self._eval_and_log(progress)
            self.watchdog.beat("checkpoint wait")
            self.checkpointer.wait()
            # A good checkpoint of this step may exist (a resume at the final step); a damaged
            # one does not count: the save moves it aside and commits a verified one.
            if c.save_final and not self.checkpointer.has_good(self.step):
                self._save_and_note(progress, wait=True)
            self.checkpointer.wait()  # the final checkpoint is committed before the summary
        summary.update(nonfinite_steps=self.nonfinite.count, rollbacks=self.nonfinite.rollbacks, final_step=self.step, final_loss=loss_value if summary["start_step"] < t.steps else None,
                       predicted_peak_bytes=self.predicted_peak_bytes,
                       measured_peak_bytes=peak_memory_bytes(self.device), device=self.device.type)
        self._finish(summary)
        return summary

    def _save_now(self) -> Path | None:
        """Commit a checkpoint of the current step unless a good one exists (or no step has
        run: None); returns its folder. A damaged one is replaced (the save moves it aside).
        Collective."""
        self.watchdog.beat("checkpoint wait")
        self.checkpointer.wait()
        folder = self.checkpointer.root / ckpt_lib.step_dir_name(self.step)
        if self.step == 0:
            return None
        if not self.checkpointer.has_good(self.step):
            self.save_checkpoint()
            self.checkpointer.wait()
        return folder

    def _stop_on_signal(self) -> None:
        """Some rank got SIGTERM/SIGUSR1/SIGINT and every rank finished the same step: save it
        and end the process (train/preempt.py); steps lost: none."""
        folder = self._save_now()
        self.metrics.close()
        raise self.stop.stopped(self.step, folder)

    def _record(self, loss: float, grad_norm: float, dt: float) -> dict[str, Any]:
        tokens_per_s = self.tokens_per_step / dt
        tflops = tokens_per_s * self.flops_per_token / 1e12
        mfu = metrics_lib.mfu(tokens_per_s, self.flops_per_token, self.peak_flops, self.env.world_size)
        return {"step": self.step, "total_steps": self.cfg.train.steps, "loss": loss,
                "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                "tflops": tflops, "mfu": mfu, "mem_bytes": peak_memory_bytes(self.device), "step_time_s": dt,
                "tokens_seen": self.step * self.tokens_per_step, **self.moe_metrics}

    def _eval_and_log(self, progress: Progress) -> float:
        self.watchdog.beat("evaluation (all-reduce of the validation loss)")
        losses = self.evaluate_domains()
        val_loss = _mean(losses)
        per_domain = {f"val_loss_{name}": v for name, v in losses.items() if name}
        self.metrics.log_eval(self.step, val_loss, per_domain)
        progress.note(f"step {self.step}: val_loss {val_loss:.4f}" + "".join(
            f" | {name} {v:.4f}" for name, v in losses.items() if name))
        return val_loss

    def _finish(self, summary: dict[str, Any]) -> None:
        self.metrics.close()
        if self.rank != 0:
            return
        if self.cfg.metrics.plot:
            summary["plot"] = str(plot_loss(self.run_dir))
        t = self.cfg.train
        if t.sample_tokens > 0 and self.env.world_size > 1:
            # The parallelised model needs every rank to run forward; sample from the saved run.
            summary["sample"] = f"(sample skipped in a multi-process run: scaletrain generate --run {self.run_dir})"
        elif t.sample_tokens > 0:
            from scaletrain.model.generate import generate

            tok = self.data.tokenizer
            ids = generate(self.unsplit_model, tok.encode(t.sample_prompt), t.sample_tokens, seed=t.seed,
                           eos_id=tok.eos_id)
            summary["sample"] = t.sample_prompt + tok.decode(ids)
