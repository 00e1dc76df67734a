"""Weights of a new model made from dense checkpoints: the mix of Branch-Train-MiX and the
baselines built the same way (docs/btx.md).

  btx mix       experts = the branches' FFNs (optionally + the seed's), the rest = the mean of the branches
  btm           every tensor = the mean of the branches (a dense model: Branch-Train-Merge)
  upcycle mix   experts = copies of the seed's FFN, the rest = the seed's (sparse upcycling)

One function does all three (`combine`): every tensor is the exact mean of the `average`
checkpoints, and with `experts` each layer's dense FFN `layers.{i}.feed_forward.w1/w3/w2.weight`
([f, dim], [f, dim], [dim, f]) becomes the stacked experts of an MoE layer,
`experts.w1/w3` [E, f, dim] and `experts.w2` [E, dim, f], expert e taken from `experts[e]`.
The routers are new (`add_routers`).

Exact means: the sum runs in float64 in checkpoint order and is divided once, then rounded to
the weights' dtype. A float32 value has 24 significant bits and float64 53, so the sum of up to
2**29 float32 tensors is exact in float64 and the result is the correctly rounded mean; in
particular the mean of identical tensors is that tensor, bit for bit.

Memory (host, per process): the output model (for the mix: E FFNs per layer + one copy of the
rest), a float64 accumulator of the averaged tensors (twice their float32 bytes) and one input
checkpoint at a time; see `peak_bytes`. Under torchrun every rank computes the same weights
(reading and writing checkpoints is collective there), so a node needs that once per rank; run
these stages in one process to need it once.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from scaletrain.config.load import config_to_dict, write_config
from scaletrain.config.schema import CheckpointConfig, Config, ModelConfig
from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.parallel.dims import barrier
from scaletrain.train.checkpoint import Checkpointer, read_marker

MODEL_ONLY = "model"  # marker "contents" of a checkpoint holding model weights only (as `scaletrain import`)
_FFN = {"w1": "experts.w1", "w3": "experts.w3", "w2": "experts.w2"}  # dense FFN weight -> stacked expert tensor


def moe_config(dense: ModelConfig, n_experts: int) -> ModelConfig:
    """The MoE model of a mix: `dense` with every FFN an MoE layer of `n_experts` experts of the
    dense FFN's width (no dense layers, no shared experts). moe_top_k, moe_router, moe_balance
    and the other moe_* keys come from `dense` (the recipe's [model])."""
    return dataclasses.replace(dense, moe_experts=n_experts, moe_ffn_dim=dense.ffn_dim, moe_dense_layers=0,
                               moe_shared_experts=0)


def check_mixable(dense: ModelConfig, n_experts: int) -> None:
    """ConfigError unless the recipe's model is dense and its MoE of `n_experts` experts is a model."""
    from scaletrain.config.validate import validate_model_config

    if dense.moe_experts:
        raise ConfigError(f"btx branches are dense models, but model.moe_experts = {dense.moe_experts}; set it to 0 "
                          "(the mix makes the MoE: its other moe_* keys, e.g. moe_top_k, apply to it).")
    try:
        validate_model_config(moe_config(dense, n_experts))
    except ConfigError as e:
        raise ConfigError(f"the mixed model of {n_experts} experts is not a valid MoE: {e}") from None


def _empty_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Empty CPU tensors named and shaped as the state dict of the model of `cfg` (no init)."""
    from scaletrain.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}


def load_weights(ckpt: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model weights of checkpoint `ckpt` (of a model of `cfg`) as CPU tensors, read with
    the checkpointer's own loader (verified, resharded from whatever layout saved it)."""
    state = {"model": _empty_state(cfg)}
    Checkpointer.load(ckpt, state)
    return state["model"]


def _ffn_parts(key: str) -> tuple[str, str] | None:
    """'layers.3.feed_forward.w1.weight' -> ('layers.3.feed_forward.', 'w1'); None for other keys."""
    head, sep, tail = key.partition("feed_forward.")
    name = tail.removesuffix(".weight")
    return (head + sep, name) if sep and name in _FFN and tail == name + ".weight" else None


def combine(average: list[Path], experts: list[Path] | None, dense: ModelConfig) -> dict[str, torch.Tensor]:
    """Weights from the dense checkpoints `average` and `experts` (paths; a path listed several
    times is read once): every tensor the exact mean over `average`, except, with `experts`,
    the FFNs, which become stacked experts (expert e = experts[e]'s FFN). No router tensors."""
    order = list(dict.fromkeys([*average, *(experts or [])]))  # each checkpoint read once, in order
    sums: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    stacked: dict[str, torch.Tensor] = {}
    for path in order:
        weights = load_weights(path, dense)
        for key, value in weights.items():
            ffn = _ffn_parts(key)
            if experts is not None and ffn is not None:
                prefix, name = ffn
                out = stacked.setdefault(prefix + _FFN[name], torch.empty(len(experts), *value.shape, dtype=value.dtype))
                for e, src in enumerate(experts):
                    if src == path:
                        out[e].copy_(value)  # [f, dim] or [dim, f] into [E, ...]
            elif path in average:
                dtypes[key] = value.dtype
                acc = value.to(torch.float64)
                sums[key] = acc if key not in sums else sums[key].add_(acc)
        del weights
    state = {k: (v / len(average)).to(dtypes[k]) for k, v in sums.items()}
    return {**state, **stacked}


def add_routers(state: dict[str, torch.Tensor], cfg: ModelConfig, init: str, seed: int) -> dict[str, torch.Tensor]:
    """`state` plus every MoE layer's new router: `router.gate.weight` [E, dim] drawn from
    N(0, cfg.init_std) (init "normal": as any new MoE router, with a generator seeded by `seed`,
    layer by layer) or zero (init "zero": uniform probabilities, so top-k takes the first k
    experts at an equal weight until the router learns), and `router.expert_bias` [E] = 0."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for i in range(cfg.n_layers):
        p = f"layers.{i}.feed_forward.router."
        gate = torch.zeros(cfg.moe_experts, cfg.dim)
        if init == "normal":
            gate.normal_(0.0, cfg.init_std, generator=gen)
        out[p + "gate.weight"] = gate
        out[p + "expert_bias"] = torch.zeros(cfg.moe_experts)
    return out


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """CheckpointError unless `state` names and shapes exactly the state dict of the model of
    `cfg` (guards the key contract with model/moe.py)."""
    want = {k: tuple(v.shape) for k, v in _empty_state(cfg).items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        shapes = [f"{k}: {have[k]} vs {want[k]}" for k in sorted(set(want) & set(have)) if want[k] != have[k]]
        raise CheckpointError(f"the combined weights do not match the model (missing {missing[:4]}, unexpected "
                              f"{extra[:4]}, shapes {shapes[:4]}): model/moe.py's names changed?")


def peak_bytes(dense: ModelConfig, n_experts: int) -> int:
    """Host bytes `combine` + `add_routers` hold at their peak for float32 weights of the model
    `dense`: the output (an MoE of `n_experts` experts; 0 = a dense mean, BTM), the float64
    accumulator of the averaged tensors and one input checkpoint."""
    from scaletrain.model.flops import param_counts

    counts = param_counts(dense)
    out = param_counts(moe_config(dense, n_experts))["total"] if n_experts else counts["total"]
    averaged = counts["total"] - (counts["ffn_per_layer"] * dense.n_layers if n_experts else 0)
    return 4 * (out + counts["total"]) + 8 * averaged


def write_model_run(run_dir: Path, cfg: Config, state: dict[str, torch.Tensor], tokenizer_from: Path,
                    sources: dict, rank: int = 0) -> Path:
    """Write `run_dir` as a run folder holding model weights only, atomically: config.toml
    (`cfg`), tokenizer/ (copied from the run folder `tokenizer_from`), `sources.json` (what it
    was made from) and a verified model-only DCP checkpoint at step 0 with the usual COMPLETE
    marker, which `generate`, `export`, `train --resume auto` and a Trainer's `init_from` read
    like any checkpoint. Everything is written into `.<name>.tmp` beside it and renamed into
    place last, so `run_dir` never exists half-written. Returns the checkpoint folder.

    Collective in a process group: every rank passes the same `state` (DCP writes each tensor
    once) and rank `rank` == 0 writes the rest."""
    check_state(state, cfg.model)
    run_dir = Path(run_dir)
    tmp = run_dir.with_name(f".{run_dir.name}.tmp")
    if run_dir.exists():  # every rank refuses alike (a shared folder)
        raise CheckpointError(f"{run_dir} exists but holds no complete model checkpoint of this recipe; delete it "
                              "to build it again.")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copytree(Path(tokenizer_from) / "tokenizer", tmp / "tokenizer")
        write_config(cfg, tmp / "config.toml")
        (tmp / "sources.json").write_text(json.dumps({**sources, "time": time.time()}, indent=1) + "\n")
    marker = read_marker(sources["inputs"][0]["path"])
    meta = {"contents": MODEL_ONLY, "model": config_to_dict(cfg)["model"], "tokenizer": marker.get("tokenizer"),
            "world_size": 1, "tokens_seen": 0}
    # Checkpointer.save starts with a barrier, so no rank writes before rank 0 made `tmp`.
    Checkpointer(tmp, CheckpointConfig(keep=0), rank).save(0, {"model": {k: v.contiguous() for k, v in state.items()}},
                                                           meta)
    if rank == 0:
        tmp.replace(run_dir)
    barrier()
    return run_dir / "checkpoints" / "step-00000000"
