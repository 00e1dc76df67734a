"""Branch-Train-MiX (Sukhbaatar et al., "Branch-Train-MiX", arXiv 2403.07816) as a recipe of
ordinary runs. `scaletrain btx --config C --run-dir DIR` runs these stages in order
(docs/btx.md):

  seed      DIR/seed                a dense run on the mixture of [[data.domains]]
                                    (btx.seed_steps), or `--seed RUN`: that run's checkpoint
  branch    DIR/branches/<domain>   one dense run per domain (btx.branch_steps, data.domain = it)
                                    from the seed's final weights, fresh optimizer and schedule
  mix       DIR/mix                 an MoE checkpoint: experts = the branches' FFNs (+ the seed's
                                    with btx.seed_expert), the rest = the branches' mean, new routers
  finetune  DIR/finetune            MoE training on the mixture from the mix (btx.finetune_steps)
  dense     DIR/baselines/dense     baseline: the seed continued densely on the mixture for the
                                    same tokens as branches + finetune
  btm       DIR/baselines/btm       baseline: Branch-Train-Merge, the branches' mean as a dense model
  upcycle   DIR/baselines/upcycle_mix, DIR/baselines/upcycle
                                    baseline: sparse upcycling, an MoE of seed-FFN copies trained
                                    like the finetune for the same tokens as branches + finetune
  report    DIR/report.md, DIR/btx.png, DIR/report.json

Trained stages are ordinary run folders of the recipe's config with train.steps and data.domain
set for them (`stage_config`), skipped when complete and resumed (`--resume auto`) when not
(recipes/stages.py); built stages (mix, btm, upcycle_mix) are run folders holding one
model-only checkpoint at step 0, written atomically (recipes/mix.py). `--stage NAME` runs one
stage; `--stage branch --branch NAME` one branch, under torchrun with any layout, so branches
can run on different machines at once.

DIR also holds `btx_config.toml`, the config of the first invocation: later invocations use it
when --config is omitted and refuse a config that changes what the stages must share (the
sections in `PINNED`), and `btx_state.json`: where the seed came from and every stage's
accounting (tokens, seconds, FLOPs, last validation), rewritten after every stage.
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
from scaletrain.recipes import mix
from scaletrain.ranks import env_ranks
from scaletrain.recipes.stages import (
    STAGE_FILE, begin_attempt, checkpoint_identity, end_attempt, final_checkpoint, read_json, same_checkpoint,
    stage_accounting, write_json)
from scaletrain.train.checkpoint import MARKER, verify_checkpoint

STAGES = ("seed", "branch", "mix", "finetune", "dense", "btm", "upcycle", "report")
BASELINES = ("dense", "btm", "upcycle")
CONFIG_FILE = "btx_config.toml"
STATE_FILE = "btx_state.json"
MATCHED_KEY = "btx.branch_steps x branches + btx.finetune_steps (compute-matched)"
# Config sections every stage must agree on: the model's shape, its tokenizer and the domains
# (data.cache_dir, a local folder, and data.batch_size, per rank, may change). The rest may
# differ between invocations: another layout or device for a branch on another machine, other
# [btx] steps (a stage then trains on to its new final step), other optimizer or schedule
# settings; each stage's own config.toml records what it ran with.
PINNED = ("model", "tokenizer", "data")


@dataclass
class Stage:
    """One stage: an ordinary run of `cfg` in `run_dir`, complete at its final step (trained
    stages: train.steps; built ones: a model-only checkpoint at step 0)."""

    kind: str  # one of STAGES
    name: str  # "seed" | "branch/<domain>" | "mix" | "finetune" | "dense" | "btm" | "upcycle_mix" | "upcycle"
    run_dir: Path
    cfg: Config
    steps_key: str  # what sets its steps (named in errors)
    inputs: tuple[str, ...] = ()  # names of the stages whose final checkpoints it starts from
    built: bool = False  # made from other checkpoints (recipes/mix.py), not trained

    @property
    def steps(self) -> int:
        return 0 if self.built else self.cfg.train.steps


def stage_config(cfg: Config, steps: int, domain: str = "", n_experts: int = 0) -> Config:
    """The run config of one stage: `cfg` with train.steps = `steps`, data.domain = `domain`
    ("" = the mixture), a final checkpoint (which marks the stage complete) and, with
    `n_experts`, the mixed MoE model (recipes/mix.py `moe_config`)."""
    out = copy.deepcopy(cfg)
    out.train.steps = steps
    out.data.domain = domain
    out.checkpoint.save_final = True
    if n_experts:
        out.model = mix.moe_config(cfg.model, n_experts)
    return out


def n_experts(cfg: Config) -> int:
    """Experts per MoE layer of the mix (and of the upcycling baseline)."""
    return len(cfg.data.domains) + int(cfg.btx.seed_expert)


def matched_steps(cfg: Config) -> int:
    """Steps of the compute-matched baselines: the branches' and the finetune's together, so
    a baseline trains on as many tokens after the seed as BTX (at the same global batch)."""
    return len(cfg.data.domains) * cfg.btx.branch_steps + cfg.btx.finetune_steps


def recipe_stages(cfg: Config, out: Path) -> list[Stage]:
    """Every stage of the recipe in run order (the baselines with btx.baselines)."""
    b, e, names = cfg.btx, n_experts(cfg), [f"branch/{d.name}" for d in cfg.data.domains]
    stages = [Stage("seed", "seed", out / "seed", stage_config(cfg, b.seed_steps), "btx.seed_steps")]
    stages += [Stage("branch", f"branch/{d.name}", out / "branches" / d.name,
                     stage_config(cfg, b.branch_steps, d.name), "btx.branch_steps", ("seed",))
               for d in cfg.data.domains]
    moe_run = stage_config(cfg, b.finetune_steps, n_experts=e)  # `train --resume auto` on the mix = the finetune
    stages += [Stage("mix", "mix", out / "mix", moe_run, "", (*names, *(["seed"] if b.seed_expert else [])), True),
               Stage("finetune", "finetune", out / "finetune", moe_run, "btx.finetune_steps", ("mix",))]
    if b.baselines:
        base, steps = out / "baselines", matched_steps(cfg)
        stages += [Stage("dense", "dense", base / "dense", stage_config(cfg, steps), MATCHED_KEY, ("seed",)),
                   Stage("btm", "btm", base / "btm", stage_config(cfg, b.finetune_steps), "", tuple(names), True),
                   Stage("upcycle", "upcycle_mix", base / "upcycle_mix", stage_config(cfg, steps, n_experts=e), "",
                         ("seed",), True),
                   Stage("upcycle", "upcycle", base / "upcycle", stage_config(cfg, steps, n_experts=e), MATCHED_KEY,
                         ("upcycle_mix",))]
    return stages


def check_recipe_config(cfg: Config, out: Path | None) -> None:
    """ConfigError unless `cfg` can run BTX: >= 2 domains, no data.domain (the recipe sets it
    per stage), a dense model whose mix is a valid MoE, and the pinned sections equal to
    `out`/btx_config.toml when it exists (`out` None: no recipe folder yet)."""
    names = [d.name for d in cfg.data.domains]
    if len(names) < 2:
        raise ConfigError("btx needs at least two [[data.domains]] tables (one branch per domain), "
                          f"the config has {len(names)}; see configs/cpu_btx.toml.")
    if cfg.data.domain:
        raise ConfigError(f"data.domain = {cfg.data.domain!r} is set, but btx chooses the domain of each stage; "
                          "drop it (use --stage branch --branch NAME to run one branch).")
    mix.check_mixable(cfg.model, n_experts(cfg))
    saved = out / CONFIG_FILE if out is not None else None
    if saved is None or not saved.is_file():
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
        self.stages = recipe_stages(cfg, self.out)
        self.by_name = {s.name: s for s in self.stages}
        self.state = read_json(self.out / STATE_FILE) or {"recipe": "btx", "version": 1, "seed_from": None}
        if seed is not None:
            ident = checkpoint_identity(resolve_checkpoint(seed))
            known = self.state.get("seed_from")
            if known and not same_checkpoint(known, ident):
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
        """Run every stage in order (`stage` None) or one kind of stage; returns the recipe state."""
        names = [d.name for d in self.cfg.data.domains]
        if branch is not None and stage != "branch":
            raise ConfigError("--branch NAME needs --stage branch (it selects which branch to run).")
        if branch is not None and branch not in names:
            raise ConfigError(f"--branch {branch!r} is not one of the domains ({', '.join(names)})."
                              f"{did_you_mean(branch, names)}")
        if stage in BASELINES and not self.cfg.btx.baselines:
            raise ConfigError(f"--stage {stage} is a baseline, and btx.baselines = false; set --btx.baselines true.")
        todo = [s for s in self.stages if stage in (None, s.kind) and branch in (None, s.name.partition("/")[2])]
        if todo and todo[0].inputs:
            self._inputs(todo[0])  # what the first stage starts from must exist before anything is written
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if not (self.out / CONFIG_FILE).is_file():
                write_config(self.cfg, self.out / CONFIG_FILE)
            self._write_state()
        for s in todo:
            if s.name == "seed" and self.state.get("seed_from"):
                known = self.state["seed_from"]
                self.say(f"stage seed: using {known['path']} (step {known['step']}) given with --seed")
            elif s.built:
                self._build(s)
            else:
                self._run_training(s, self._inputs(s)[0] if s.inputs else None)
        if stage in (None, "report"):
            self._report()
        return self.state

    def _final(self, name: str, needed_by: Stage) -> Path:
        """The final checkpoint of stage `name` (or --seed's), which `needed_by` starts from;
        ConfigError saying which stage to run first when it does not exist yet."""
        known = self.state.get("seed_from")
        if name == "seed" and known:
            return Path(known["path"])
        s = self.by_name[name]
        ckpt = final_checkpoint(s.run_dir, s.steps, s.steps_key or f"stage {name}")
        if ckpt is None:
            first = s.kind if s.kind != "branch" else f"branch --branch {name.partition('/')[2]}"
            extra = ", or pass --seed RUN" if name == "seed" else ""
            raise ConfigError(f"stage {needed_by.kind} starts from the {name}'s final checkpoint (step {s.steps} in "
                              f"{s.run_dir}), which does not exist yet: run that stage first (scaletrain btx "
                              f"--run-dir {self.out} --stage {first}, or no --stage){extra}.")
        return ckpt

    def _run_folder(self, name: str) -> Path:
        """The run folder of stage `name` (--seed's run folder for an external seed)."""
        known = self.state.get("seed_from")
        return Path(known["path"]).parent.parent if name == "seed" and known else self.by_name[name].run_dir

    def _inputs(self, stage: Stage) -> list[Path]:
        return [self._final(name, stage) for name in stage.inputs]

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
        model = f"MoE of {stage.cfg.model.moe_experts} experts, top-{stage.cfg.model.moe_top_k}, " \
            if stage.cfg.model.moe_experts else ""
        self.say(f"stage {stage.name}: training {stage.run_dir} ({model}{stage.steps} steps on {what}"
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
        """A partly trained stage continues only from the checkpoint it started from."""
        recorded = (read_json(stage.run_dir / STAGE_FILE) or {}).get("init_from")
        if recorded and init_from and not same_checkpoint(recorded, init_from):
            raise ConfigError(f"{stage.run_dir} was started from the checkpoint {recorded['path']} committed at "
                              f"{recorded['time']}, but that stage's checkpoint is now {init_from['path']} committed "
                              f"at {init_from['time']}. Delete {stage.run_dir} to train this stage from the new one.")

    def _build(self, stage: Stage) -> None:
        """Make the model-only checkpoint of a built stage from its inputs' final checkpoints,
        unless it exists from the same inputs and settings (recipes/mix.py)."""
        from scaletrain.parallel.dims import init_distributed, read_env

        inputs = self._inputs(stage)
        e = stage.cfg.model.moe_experts
        settings = {"experts": e, "router_init": self.cfg.btx.router_init} if e else {}  # BTM has neither
        recipe = {"inputs": [checkpoint_identity(p) for p in inputs], **settings}
        done = final_checkpoint(stage.run_dir, 0, f"stage {stage.name} (a model-only checkpoint at step 0)")
        if done is not None:
            recorded = read_json(stage.run_dir / "sources.json") or {}
            same = len(recorded.get("inputs", [])) == len(recipe["inputs"]) and all(
                same_checkpoint(a, b) for a, b in zip(recorded["inputs"], recipe["inputs"]))
            if not same or any(recorded.get(k) != v for k, v in settings.items()):
                raise ConfigError(f"{stage.run_dir} was built from other checkpoints or settings than the recipe now "
                                  f"has (see its sources.json: a stage before it was trained again, or btx.seed_expert"
                                  f" / btx.router_init changed). Delete {stage.run_dir} (and the stages trained from "
                                  "it) to build it again.")
            self.say(f"stage {stage.name}: complete ({done}), skipped")
            return
        init_distributed(read_env(self.cfg.train.device))  # under torchrun the checkpoint reads are collective
        self.say(f"stage {stage.name}: building {stage.run_dir} from {', '.join(stage.inputs)} (host memory "
                 f"~{mix.peak_bytes(self.cfg.model, e) / 2**30:.2f} GiB per process)")
        start = time.time()
        if stage.name == "btm":
            state = mix.combine(inputs, None, self.cfg.model)
        else:
            experts = inputs if stage.name == "mix" else inputs * e  # the branches (+ seed) | seed copies
            average = inputs[:len(self.cfg.data.domains)] if stage.name == "mix" else inputs
            state = mix.add_routers(mix.combine(average, experts, self.cfg.model), stage.cfg.model,
                                    self.cfg.btx.router_init, self.cfg.train.seed)
        ckpt = mix.write_model_run(stage.run_dir, stage.cfg, state, self._run_folder(stage.inputs[0]), recipe,
                                   self.rank)
        if self.rank == 0:
            begin_attempt(stage.run_dir, {"stage": stage.kind, "name": stage.name, "expected_step": 0,
                                          "init_from": None}, start, 0)
            end_attempt(stage.run_dir, "complete", 0)
            self._write_state()
        self.say(f"stage {stage.name}: wrote {ckpt} in {time.time() - start:.1f} s")

    def _report(self) -> None:
        from scaletrain.recipes.report import write_report

        if self.rank == 0:
            self._write_state()
        paths = write_report(self.cfg, self.out, self._complete_models(), self.state, self.rank, self.say)
        self.say(f"report: {', '.join(str(p) for p in paths)}")

    def _complete_models(self) -> dict[str, tuple[Any, Path]]:
        """Report name -> (model config, final checkpoint) of every model whose stage is complete."""
        out = {}
        known = self.state.get("seed_from")
        for name in ["seed", *[f"branch/{d.name}" for d in self.cfg.data.domains], "btm", "mix", "btx", "upcycle",
                     "dense"]:
            stage = self.by_name.get("finetune" if name == "btx" else name)  # the others: named as their stage
            if name == "seed" and known:
                out[name] = (self.cfg.model, Path(known["path"]))
            elif stage is not None:
                ckpt = final_checkpoint(stage.run_dir, stage.steps, stage.steps_key or stage.name)
                if ckpt is not None:
                    out[name] = (stage.cfg.model, ckpt)
        return out

    # ------------------------------------------------------------------ accounting
    def _write_state(self) -> None:
        """Rewrite DIR/btx_state.json from every stage folder present (rank 0)."""
        from scaletrain.model.flops import flops_per_token
        from scaletrain.recipes.report import method_totals

        stages: dict[str, Any] = {}
        known = self.state.get("seed_from")
        if known:
            stages["seed"] = {"stage": "seed", "external": True, "complete": True, "checkpoint": known,
                              "tokens": known.get("tokens_seen")}
        for s in self.stages:
            if s.name in stages or not (s.run_dir / STAGE_FILE).is_file():
                continue
            acct = stage_accounting(s.run_dir)
            stages[s.name] = {"run_dir": str(s.run_dir), **acct, "complete": final_checkpoint(
                s.run_dir, s.steps, s.steps_key or s.name) is not None,
                "flops": acct["tokens"] * flops_per_token(s.cfg.model, s.cfg.data.seq_len)}
        own = [v for v in stages.values() if not v.get("external")]
        self.state.update(stages=stages, updated=time.time(), totals={
            key: round(sum(v[key] for v in own), 3) for key in ("tokens", "train_seconds", "wall_seconds")},
            methods=method_totals(stages, [d.name for d in self.cfg.data.domains]))
        write_json(self.out / STATE_FILE, self.state)


def run_btx(cfg: Config, out: str | Path, stage: str | None = None, branch: str | None = None,
            seed: str | None = None, force: bool = False) -> dict[str, Any]:
    """Run the BTX recipe (or one `stage`, one `branch`) in folder `out`; returns btx_state.json's content."""
    return Btx(cfg, out, seed=seed, force=force).run(stage, branch)
