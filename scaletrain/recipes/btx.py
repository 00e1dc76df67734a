"""Branch-Train-MiX (Sukhbaatar et al., "Branch-Train-MiX", arXiv 2403.07816) as a recipe of
ordinary runs. `scaletrain btx --config C --run-dir DIR` runs these stages in order
(docs/btx.md):

  seed      DIR/seed                a dense run on the mixture of [[data.domains]]
                                    (btx.seed_steps), or `--seed RUN`: that run's checkpoint
  branch    DIR/branches/<domain>   one dense run per domain (btx.branch_steps, data.domain = it)
                                    from the seed's final weights, fresh optimizer and schedule
  mix       not available yet       branch FFNs -> experts of an MoE, the rest averaged
  finetune  not available yet       MoE training on the mixture (btx.finetune_steps)
  report    not available yet       DIR/report.md, compute-matched baselines

Each stage is an ordinary run folder of the recipe's config with train.steps and data.domain set
for it (`stage_config`), skipped when complete and resumed (`--resume auto`) when not
(recipes/stages.py). `--stage NAME` runs one stage; `--stage branch --branch NAME` one branch,
under torchrun with any layout, so branches can run on different machines at once.

DIR also holds `btx_config.toml`, the config of the first invocation: later invocations use it
when --config is omitted and refuse a config that changes what the stages must share (the
sections in `PINNED`), and `btx_state.json`: where the seed came from and every stage's
accounting (tokens, seconds, last validation), rewritten after every stage.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaletrain.config.load import config_from_dict, config_to_dict, read_toml, write_config
from scaletrain.config.schema import Config
from scaletrain.config.validate import did_you_mean
from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.ranks import env_ranks
from scaletrain.recipes.stages import (
    STAGE_FILE, begin_attempt, checkpoint_identity, end_attempt, final_checkpoint, read_json, stage_accounting,
    write_json)
from scaletrain.train.checkpoint import MARKER, verify_checkpoint

STAGES = ("seed", "branch", "mix", "finetune", "report")
IMPLEMENTED = ("seed", "branch")
CONFIG_FILE = "btx_config.toml"
STATE_FILE = "btx_state.json"
# Config sections every stage must agree on: the model's shape, its tokenizer and the domains
# (data.cache_dir, a local folder, and data.batch_size, per rank, may change). The rest may
# differ between invocations: another layout or device for a branch on another machine, other
# [btx] steps (a stage then trains on to its new final step), other optimizer or schedule
# settings; each stage's own config.toml records what it ran with.
PINNED = ("model", "tokenizer", "data")


@dataclass
class Stage:
    """One training stage: an ordinary run of `cfg` in `run_dir`, complete at step `steps`."""

    kind: str  # one of STAGES
    name: str  # "seed" | "branch/<domain>"
    run_dir: Path
    cfg: Config
    steps_key: str  # the [btx] key that sets its steps (named in errors)

    @property
    def steps(self) -> int:
        return self.cfg.train.steps


def stage_config(cfg: Config, steps: int, domain: str = "") -> Config:
    """The run config of one training stage: `cfg` with train.steps = `steps`, data.domain =
    `domain` ("" = the mixture) and a final checkpoint (which marks the stage complete)."""
    out = copy.deepcopy(cfg)
    out.train.steps = steps
    out.data.domain = domain
    out.checkpoint.save_final = True
    return out


def training_stages(cfg: Config, out: Path) -> list[Stage]:
    """The seed and one branch per domain, in table order."""
    stages = [Stage("seed", "seed", out / "seed", stage_config(cfg, cfg.btx.seed_steps), "btx.seed_steps")]
    for d in cfg.data.domains:
        stages.append(Stage("branch", f"branch/{d.name}", out / "branches" / d.name,
                            stage_config(cfg, cfg.btx.branch_steps, d.name), "btx.branch_steps"))
    return stages


def _not_available(kind: str, out: Path) -> ConfigError:
    return ConfigError(f"btx stage '{kind}' is not available yet in this scaletrain: stages seed and branch are "
                       f"implemented (their run folders are in {out}); mix, finetune and report are not.")


def check_recipe_config(cfg: Config, out: Path) -> None:
    """ConfigError unless `cfg` can run BTX: >= 2 domains, no data.domain (the recipe sets it
    per stage), and the pinned sections equal to DIR/btx_config.toml when it exists."""
    names = [d.name for d in cfg.data.domains]
    if len(names) < 2:
        raise ConfigError("btx needs at least two [[data.domains]] tables (one branch per domain), "
                          f"the config has {len(names)}; see configs/cpu_btx.toml.")
    if cfg.data.domain:
        raise ConfigError(f"data.domain = {cfg.data.domain!r} is set, but btx chooses the domain of each stage; "
                          "drop it (use --stage branch --branch NAME to run one branch).")
    saved = out / CONFIG_FILE
    if not saved.is_file():
        return
    old, new = config_to_dict(config_from_dict(read_toml(saved))), config_to_dict(cfg)
    for d in (old, new):  # a folder of this machine; the per-rank batch (another dp degree keeps the global one)
        d["data"].pop("cache_dir")
        d["data"].pop("batch_size")
    diffs = [f"{s}.{k}: {old[s][k]!r} -> {new[s][k]!r}" for s in PINNED for k in new[s] if old[s].get(k) != new[s][k]]
    if diffs:
        raise ConfigError(f"{out} was started with another config ({saved}); changed: {'; '.join(diffs[:6])}"
                          f"{' ...' if len(diffs) > 6 else ''}. The stages must share [{'], ['.join(PINNED)}]: "
                          "keep them as they were (omit --config to use the saved one) or use a new --run-dir.")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the newest complete checkpoint of a run folder."""
    from scaletrain.train.rundir import latest_checkpoint

    p = Path(path)
    if (p / MARKER).is_file():
        verify_checkpoint(p)
        return p
    if not p.is_dir():
        raise CheckpointError(f"--seed {path}: no such run or checkpoint folder.")
    return latest_checkpoint(p)


class Btx:
    """One invocation of the recipe on folder `out` (see the module docstring)."""

    def __init__(self, cfg: Config, out: str | Path, seed: str | None = None, force: bool = False):
        self.cfg, self.out, self.force = cfg, Path(out), force
        self.rank = env_ranks().rank
        check_recipe_config(cfg, self.out)
        self.stages = training_stages(cfg, self.out)
        self.state = read_json(self.out / STATE_FILE) or {"recipe": "btx", "version": 1, "seed_from": None}
        if seed is not None:
            ident = checkpoint_identity(resolve_checkpoint(seed))
            known = self.state.get("seed_from")
            if known and (known["path"], known["time"]) != (ident["path"], ident["time"]):
                raise ConfigError(f"{self.out} was started with --seed {known['path']}; it cannot switch to {seed}. "
                                  "Use a new --run-dir.")
            if (self.out / "seed").is_dir():
                raise ConfigError(f"{self.out / 'seed'} holds a seed trained by this recipe; drop --seed, or use a "
                                  "new --run-dir to branch from another run.")
            self.state["seed_from"] = ident

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(f"btx: {msg}", flush=True)

    # ------------------------------------------------------------------ stages
    def run(self, stage: str | None = None, branch: str | None = None) -> dict[str, Any]:
        """Run every stage in order (`stage` None) or one; returns the recipe state. A stage
        that is not implemented yet raises ConfigError once the stages before it are done."""
        names = [d.name for d in self.cfg.data.domains]
        if branch is not None and stage != "branch":
            raise ConfigError("--branch NAME needs --stage branch (it selects which branch to run).")
        if branch is not None and branch not in names:
            raise ConfigError(f"--branch {branch!r} is not one of the domains ({', '.join(names)})."
                              f"{did_you_mean(branch, names)}")
        if stage is not None and stage not in IMPLEMENTED:
            raise _not_available(stage, self.out)
        if stage == "branch":
            self._seed_checkpoint()  # the seed must exist before anything is written
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if not (self.out / CONFIG_FILE).is_file():
                write_config(self.cfg, self.out / CONFIG_FILE)
            self._write_state()
        for kind in [stage] if stage else STAGES:
            if kind == "seed":
                self._seed()
            elif kind == "branch":
                for s in self.stages[1:]:
                    if branch is None or s.name == f"branch/{branch}":
                        self._run_training(s, self._seed_checkpoint())
            else:
                raise _not_available(kind, self.out)
        return self.state

    def _seed(self) -> None:
        known = self.state.get("seed_from")
        if known:
            self.say(f"stage seed: using {known['path']} (step {known['step']}) given with --seed")
            return
        self._run_training(self.stages[0], None)

    def _seed_checkpoint(self) -> Path:
        """The checkpoint every branch starts from: --seed's, or the seed stage's final one."""
        known = self.state.get("seed_from")
        if known:
            return Path(known["path"])
        seed = self.stages[0]
        ckpt = final_checkpoint(seed.run_dir, seed.steps, seed.steps_key)
        if ckpt is None:
            raise ConfigError(f"stage branch starts from the seed's final checkpoint (step {seed.steps} in "
                              f"{seed.run_dir}), which does not exist yet: run the seed first (scaletrain btx "
                              f"--run-dir {self.out} --stage seed, or no --stage), or pass --seed RUN.")
        return ckpt

    def _run_training(self, stage: Stage, init_from: Path | None) -> None:
        """Train `stage` to its final step unless that checkpoint exists, recording the attempt."""
        from scaletrain.plan.memcheck import preflight
        from scaletrain.train.trainer import Trainer

        done = final_checkpoint(stage.run_dir, stage.steps, stage.steps_key)
        if done is not None:
            self.say(f"stage {stage.name}: complete ({done}), skipped")
            return
        info: dict[str, Any] = {"stage": stage.kind, "name": stage.name, "expected_step": stage.steps,
                                "init_from": checkpoint_identity(init_from) if init_from else None}
        self._check_same_start(stage, info["init_from"])
        what = f"domain {stage.cfg.data.domain}" if stage.cfg.data.domain else "the mixture"
        self.say(f"stage {stage.name}: training {stage.run_dir} ({stage.steps} steps on {what}"
                 + (f", from {init_from})" if init_from else ")"))
        start = time.time()
        trainer = Trainer(stage.cfg, stage.run_dir, memory_check=preflight(self.force), resume="auto",
                          init_from=init_from)
        if self.rank == 0:
            begin_attempt(stage.run_dir, info, start, trainer.step)
        try:
            trainer.fit()
        except BaseException as e:  # record how the attempt ended (Ctrl-C and preemption too), then re-raise
            if self.rank == 0:
                end_attempt(stage.run_dir, type(e).__name__, trainer.step)
            raise
        if self.rank == 0:
            end_attempt(stage.run_dir, "complete", trainer.step)
            self._write_state()
            acct = self.state["stages"][stage.name]
            self.say(f"stage {stage.name}: done, {acct['tokens']:,} tokens, {acct['train_seconds']:.1f} s training, "
                     f"{acct['wall_seconds']:.1f} s wall")

    def _check_same_start(self, stage: Stage, init_from: dict[str, Any] | None) -> None:
        """A partly trained branch continues only from the seed it started from."""
        recorded = (read_json(stage.run_dir / STAGE_FILE) or {}).get("init_from")
        if recorded and init_from and (recorded["path"], recorded["time"]) != (init_from["path"], init_from["time"]):
            raise ConfigError(f"{stage.run_dir} was started from the seed checkpoint {recorded['path']} committed at "
                              f"{recorded['time']}, but the seed is now {init_from['path']} committed at "
                              f"{init_from['time']}. Delete {stage.run_dir} to train this branch from the new seed.")

    # ------------------------------------------------------------------ accounting
    def _write_state(self) -> None:
        """Rewrite DIR/btx_state.json from every stage folder present (rank 0)."""
        stages: dict[str, Any] = {}
        known = self.state.get("seed_from")
        if known:
            stages["seed"] = {"stage": "seed", "external": True, "complete": True, "checkpoint": known,
                              "tokens": known.get("tokens_seen")}
        for s in self.stages:
            if s.name in stages or not (s.run_dir / STAGE_FILE).is_file():
                continue
            stages[s.name] = {"run_dir": str(s.run_dir), **stage_accounting(s.run_dir),
                              "complete": final_checkpoint(s.run_dir, s.steps, s.steps_key) is not None}
        own = [v for v in stages.values() if not v.get("external")]
        self.state.update(stages=stages, updated=time.time(), totals={
            key: round(sum(v[key] for v in own), 3) for key in ("tokens", "train_seconds", "wall_seconds")})
        write_json(self.out / STATE_FILE, self.state)


def run_btx(cfg: Config, out: str | Path, stage: str | None = None, branch: str | None = None,
            seed: str | None = None, force: bool = False) -> dict[str, Any]:
    """Run the BTX recipe (or one `stage`, one `branch`) in folder `out`; returns btx_state.json's content."""
    return Btx(cfg, out, seed=seed, force=force).run(stage, branch)
