"""Validation loss per domain, and where an MoE routes each domain's tokens, for any recipe
checkpoint: the numbers of the BTX report (docs/btx.md).

Every model is measured the same way: each domain's fixed validation batches as the trainer
of this invocation sees them (`data.validation_sets`: `train.eval_batches` global batches of
data.batch_size x the data-parallel degree sequences), the trainer's loss function and
precision, and the trainer's arithmetic: one loss per data-parallel rank's rows, summed over
the batches, averaged over the ranks, divided by the batches. So a number here equals the
`val_loss_<domain>` a training run of the same config logs for the same weights: bit for bit in
one process (tests/e2e/test_btx.py checks this), to float32 reduction order under torchrun.

Routing is recorded by a read-only forward hook on each MoE layer's router (removed
afterwards; nothing in the model changes): for each domain and MoE layer, over that domain's
validation tokens, `slots` counts the top-k assignments per expert (they sum to tokens x
top_k) and `first` the tokens whose highest-weighted choice is the expert (they sum to tokens).
`first` still separates the domains when top_k equals the number of experts, where every token
is assigned to every expert.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scaletrain.config.schema import Config, ModelConfig
from scaletrain.model import build_model
from scaletrain.model.loss import cross_entropy_loss
from scaletrain.model.moe import MoE
from scaletrain.parallel.dims import barrier, read_env, resolve_precision
from scaletrain.parallel.layout import resolve_dims
from scaletrain.recipes.mix import load_weights


@dataclass
class Evaluation:
    """One model's validation: loss (nats/token) per domain, their unweighted mean (as the
    trainer's val_loss) and, for an MoE, slots routed per [domain][layer][expert]."""

    losses: dict[str, float]
    routing: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)  # domain -> slots|first -> [layer][expert]

    @property
    def mean(self) -> float:
        return sum(self.losses.values()) / len(self.losses)


class Evaluator:
    """Holds the validation batches of `cfg` (prepared once) and evaluates checkpoints with
    them on the device `train.device` picks. Every rank of a process group computes the same
    (checkpoint reads are collective); rank 0 prepares the data first."""

    def __init__(self, cfg: Config, rank: int = 0):
        from scaletrain.data import prepare_data, validation_sets

        self.cfg = cfg
        env = read_env(cfg.train.device)
        self.device = env.device
        self.dp = resolve_dims(cfg.parallel, env.world_size).dp  # the trainer's data-parallel degree
        if rank != 0:
            barrier()
        data = prepare_data(cfg.data, cfg.tokenizer)
        if rank == 0:
            barrier()
        whole = dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size * self.dp)  # every rank's rows
        self.val_sets = validation_sets(data, whole, cfg.train.eval_batches)
        precision = resolve_precision(cfg.train.precision, self.device.type)
        self.bf16 = precision in ("bf16", "fp8")  # fp8 trains float8 linears; evaluation runs them in bf16

    @torch.no_grad()
    def __call__(self, model_cfg: ModelConfig, ckpt: Path) -> Evaluation:
        """Evaluate checkpoint `ckpt` of a model of `model_cfg`."""
        model = build_model(model_cfg, device="cpu", seed=self.cfg.train.seed)
        model.load_state_dict(load_weights(ckpt, model_cfg))
        model.to(self.device).eval()
        routers = [m.router for m in model.modules() if isinstance(m, MoE)]
        counts: dict[str, list[torch.Tensor]] = {}

        def record(i: int):
            def hook(router, args, out) -> None:  # out = (ids [T, k] sorted by score, weights, probs)
                n = router.gate.weight.shape[0]
                counts["slots"][i] += torch.bincount(out[0].flatten(), minlength=n).cpu()
                counts["first"][i] += torch.bincount(out[0][:, 0], minlength=n).cpu()
            return hook

        handles = [r.register_forward_hook(record(i)) for i, r in enumerate(routers)]
        out = Evaluation({})
        try:
            for name, batches in self.val_sets.items():
                counts.update({k: [torch.zeros(r.gate.weight.shape[0], dtype=torch.long) for r in routers]
                               for k in ("slots", "first")})
                # one total per data-parallel rank's rows, summed on the device, as Trainer._val_loss
                totals = [torch.zeros((), device=self.device) for _ in range(self.dp)]
                for batch in batches:
                    rows = self.cfg.data.batch_size
                    for r, (inputs, targets) in enumerate(zip(*(x.split(rows) for x in batch))):
                        inputs, targets = inputs.to(self.device), targets.to(self.device)
                        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                            logits = model(inputs)  # [rows, seq, vocab]
                        totals[r] += cross_entropy_loss(logits, targets)
                out.losses[name] = float(sum(totals) / self.dp) / len(batches)  # global_mean, then per batch
                if routers:
                    out.routing[name] = {k: [c.tolist() for c in v] for k, v in counts.items()}
        finally:
            for h in handles:
                h.remove()
        return out
