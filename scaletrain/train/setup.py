"""The Trainer's setup steps, in the order `Trainer.__init__` runs them (train/trainer.py):

1. `check_launch`: every check that needs neither a process group nor a file written (device,
   attention kernel, layout against the world size, the memory pre-flight the caller passed);
2. `start_process`: the process group, the device meshes, threads and determinism;
3. `build_data`: tokenizer and shards (rank 0 first, the others read its cache), the
   vocabulary check, the training loader and the validation sets of this data-parallel rank;
4. `build_parts`: the model built on the meta device, parallelised from outside into this
   rank's parts, then allocated and initialised shard by shard;
5. `step_functions`: the precision, the autocast context and the (compiled) loss of a step.

Each takes only what it needs and returns what it built; the trainer then adds the optimizer,
the schedule and the run folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from scaletrain.config.schema import Config, TrainConfig
from scaletrain.errors import ConfigError
from scaletrain.model import Transformer, build_model
from scaletrain.model.loss import cross_entropy_loss
from scaletrain.model.transformer import MLA_NOT_BUILT
from scaletrain.model.sdpa import check_sdpa_backend, sdpa_context
from scaletrain.parallel import parallelize
from scaletrain.parallel.dims import DistEnv, Meshes, ParallelDims, barrier, build_meshes, init_distributed, read_env
from scaletrain.parallel.dims import resolve_precision
from scaletrain.parallel.init import materialize
from scaletrain.parallel.layout import check_layout, resolve_dims

# (config, world size, device) -> predicted peak bytes per rank; raises ConfigError for a run
# predicted not to fit. plan/memcheck.py `preflight` is the planner's.
MemoryCheck = Callable[[Config, int, torch.device], float]


def check_launch(cfg: Config, memory_check: MemoryCheck) -> tuple[DistEnv, ParallelDims, float]:
    """(this process's environment, the resolved degrees, the predicted peak bytes per rank);
    raises a ScaletrainError before any process-group work, naming layouts that would fit."""
    t, d = cfg.train, cfg.data
    if cfg.model.attention != "gqa":  # a planner-only architecture: say so before any other check
        raise ConfigError(MLA_NOT_BUILT)
    env = read_env(t.device)
    check_sdpa_backend(t.sdpa_backend, env.device)
    dims = resolve_dims(cfg.parallel, env.world_size, cfg.model, d.seq_len, d.batch_size)
    check_layout(dims, cfg.parallel, cfg.model, d.seq_len, d.batch_size, t.precision)
    return env, dims, memory_check(cfg, env.world_size, env.device)


def start_process(env: DistEnv, dims: ParallelDims, t: TrainConfig) -> Meshes | None:
    """Join the process group (world size > 1) and build the meshes; set threads and
    deterministic algorithms (bit-exact resume on CPU)."""
    init_distributed(env)
    meshes = build_meshes(dims, env.device.type) if env.distributed else None
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        if env.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return meshes


def build_data(cfg: Config, rank: int, dp_rank: int, dp: int,
               note: Callable[[str], None] | None) -> tuple[Any, Any, Any]:
    """(prepared data, training loader, validation sets) of data-parallel rank `dp_rank` of `dp`.
    Rank 0 builds shards and tokenizer first (progress through `note`), the others then read
    the cache. ConfigError when the tokenizer's vocabulary does not fit model.vocab_size."""
    from scaletrain.data import build_loader, prepare_data, validation_sets

    if rank != 0:
        barrier()
    data = prepare_data(cfg.data, cfg.tokenizer, note=note)
    if rank == 0:
        barrier()
    vocab = data.tokenizer.vocab_size
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({vocab} tokens); set --model.vocab_size {vocab} or lower tokenizer.vocab_size.")
    loader = build_loader(data, cfg.data, dp_rank, dp)
    # The same validation sequences under every layout, per domain with [[data.domains]].
    val_sets = validation_sets(data, cfg.data, cfg.train.eval_batches, dp_rank, dp)
    return data, loader, val_sets


def build_parts(cfg: Config, env: DistEnv, dims: ParallelDims, meshes: Meshes | None) -> list[nn.Module]:
    """This rank's model parts (one module, or its pipeline stages), parallelised and
    initialised to the single-device model's values. Built on the meta device and allocated
    only after sharding, so no rank ever holds the whole model; tied embeddings under several
    ranks are tied before sharding instead (materialised whole first)."""
    t = cfg.train
    meta_init = not (cfg.model.tie_embeddings and env.distributed)
    if meta_init:
        with torch.device("meta"):
            model = Transformer(cfg.model)
    else:
        model = build_model(cfg.model, device=env.device, seed=t.seed)
    parts = parallelize(model, dims, meshes, cfg.parallel, compile_blocks=t.compile, seq_len=cfg.data.seq_len,
                        precision=t.precision, fp8_recipe=t.fp8_recipe, device=env.device, compile_mode=t.compile_mode)
    if meta_init:
        materialize(parts, env.device, t.seed)
    return parts


def _stacked(*contexts: contextlib.AbstractContextManager) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for ctx in contexts:
        stack.enter_context(ctx)
    return stack


def step_functions(t: TrainConfig, device: torch.device) -> tuple[str, Callable[[], Any], Callable]:
    """(precision with "auto" resolved, a factory of the forward's autocast context, the loss
    function, compiled with train.compile)."""
    precision = resolve_precision(t.precision, device.type)
    amp = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16))
           if precision in ("bf16", "fp8") else contextlib.nullcontext)  # fp8: float8 linears, the rest bf16
    autocast = amp if t.sdpa_backend == "auto" else (lambda: _stacked(amp(), sdpa_context(t.sdpa_backend)))
    loss = (torch.compile(cross_entropy_loss, mode=None if t.compile_mode == "default" else t.compile_mode)
            if t.compile else cross_entropy_loss)
    return precision, autocast, loss
