"""Per-step expert statistics and the auxiliary-loss-free expert bias of MoE models.

The model's MoE layers (model/moe.py) record what they routed; here, once per optimizer step,
those records are summed over micro-batches and ranks in ONE all-reduce, turned into the
metrics `aux_loss`, `expert_imbalance` and `dropped_frac`, and (moe_balance = "bias") used to
move every layer's expert bias by rate * sign(mean load - load) (arXiv 2408.15664, Alg. 1),
after the optimizer step, identically on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from scaletrain.config.schema import ModelConfig
from scaletrain.model.flops import moe_layer_count
from scaletrain.model.moe import MoE

METRIC_KEYS = ("aux_loss", "expert_imbalance", "dropped_frac")


class ExpertStats:
    """The MoE layers of this rank's model parts and their per-step bookkeeping.

    Rows of the reduced table are the model's MoE layers by global index (a pipeline stage
    leaves the rows of layers it does not hold at zero), so one all-reduce over the world group
    gives every rank every layer's global counts, and each stage updates the biases of its own
    layers. Ranks that hold copies of the same tokens (tensor parallelism) multiply all counts
    by the same factor, which leaves every metric and the sign of the bias update unchanged;
    context-parallel ranks route disjoint tokens, and their aux losses (each over its own
    tokens with the whole sequences' counts) average to the sequences' loss. Expert
    parallelism moves tokens after routing, so the counts are the router's, as on one device.
    """

    def __init__(self, parts: list[nn.Module], cfg: ModelConfig, loss_scale: float, passes: int):
        self.cfg, self.passes = cfg, passes
        self.layers = [m for part in parts for m in part.modules() if isinstance(m, MoE)]
        for layer in self.layers:
            # Each micro-batch's loss is divided by `loss_scale` before backward (grad_accum, or
            # the pipeline's micro-batches x grad_accum): so is its aux loss.
            layer.aux_grad_scale = 1.0 / loss_scale
        self.counts: torch.Tensor | None = None  # [moe layers, E] global slots routed this step

    @classmethod
    def for_model(cls, parts: list[nn.Module], cfg: ModelConfig, loss_scale: float,
                  passes: int) -> ExpertStats | None:
        """The bookkeeping of an MoE model; None for a dense one. `loss_scale`: what the trainer
        divides each micro-batch's loss by before its backward; `passes`: the forward passes of
        each layer in one training step (its micro-batches), the records a step keeps (a
        pipeline's shape inference, on the first step after a train/eval switch, runs one more
        first: on uninitialised inputs for all but the first stage)."""
        return cls(parts, cfg, loss_scale, passes) if cfg.moe_experts > 0 else None

    def start_step(self) -> None:
        """Forget what the layers recorded outside training steps (evaluation, sampling)."""
        for layer in self.layers:
            layer.pop_stats()

    def reduce(self, device: torch.device) -> torch.Tensor:
        """Sum this step's records over ranks (one all-reduce) and return the step's metrics
        as a device tensor [3] in METRIC_KEYS order (no host sync):

          aux_loss          mean over MoE layers, micro-batches and ranks of the sequence-wise
                            Switch loss (1.0 = perfectly balanced; see moe.sequence_aux_loss)
          expert_imbalance  sum over layers of the busiest expert's slots / sum over layers of
                            the mean slots per expert: the factor by which the step's expert
                            work exceeds a balanced one when each layer waits for its busiest
                            expert (1.0 = balanced)
          dropped_frac      slots dropped by the capacity factor / slots routed
        """
        e = self.cfg.moe_experts
        first = self.cfg.moe_dense_layers
        table = torch.zeros(moe_layer_count(self.cfg), e + 3, device=device)
        for layer in self.layers:
            stats = layer.pop_stats(self.passes)
            if stats is not None:
                table[layer.layer_id - first] += stats
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(table)
        counts, dropped, aux, passes = table[:, :e], table[:, e], table[:, e + 1], table[:, e + 2]
        self.counts = counts
        imbalance = counts.max(1).values.sum() / counts.mean(1).sum().clamp(min=1e-12)
        return torch.stack([aux.sum() / passes.sum().clamp(min=1), imbalance,
                            dropped.sum() / counts.sum().clamp(min=1)])

    @torch.no_grad()
    def update_bias(self) -> None:
        """moe_balance = "bias": b_e += rate * sign(mean_e' c_e' - c_e) per layer, from the
        counts of the last `reduce` (call after the optimizer step). A no-op otherwise."""
        if self.cfg.moe_balance != "bias" or self.counts is None:
            return
        first = self.cfg.moe_dense_layers
        for layer in self.layers:
            c = self.counts[layer.layer_id - first]
            layer.router.expert_bias += self.cfg.moe_bias_rate * torch.sign(c.mean() - c)
