"""Pipeline parallelism: split the model's layers into stages, one or more per pp rank, and
run them with PyTorch's own schedules (`torch.distributed.pipelining`).

Schedules (`parallel.pp_schedule`), for pp ranks and m micro-batches (`parallel.pp_microbatches`,
0 = pp):

- "gpipe": all m forwards, then all m backwards. Simple; every rank keeps the activations of
  all m micro-batches alive at the peak.
- "1f1b": after a warm-up of (pp - 1 - rank) forwards each rank alternates one forward and one
  backward, so at most pp micro-batches are in flight per rank (activation memory ~ pp/m of
  GPipe's) with the same bubble. torch requires m >= pp.
- "interleaved_1f1b": v = parallel.pp_virtual_stages (0 = 2) stages per rank in a looping layout
  (rank r holds stages r, r + pp, ...) that send each micro-batch around the ring v times; each
  stage is 1/v as long, so the bubble shrinks by v at the cost of v times the point-to-point
  messages.

Which layouts are legal (layers, micro-batches, schedules, tied embeddings) is decided once, before
any process group starts, by parallel/layout.py's check_layout.

Bubble fraction (idle time / step time, equal stage times, no overlap): (pp - 1) / m for
gpipe and 1f1b, (pp - 1) / (v * m) for interleaved 1F1B. Raise m to shrink it; each micro-batch
is then smaller (batch_size / m sequences), which lowers per-kernel efficiency.

Memory: every rank holds only its stages' parameters, gradients and optimizer state (about
1 / pp of the model). The trainer splits a model built on the meta device (the deep copies
cost nothing) and allocates only its stages afterwards (`parallel/init.py`'s `materialize`,
which reproduces the single-device initial values). The first stage
additionally holds the embedding and the last one the norm + output projection and the
[mb, seq, vocab] logits, so the first/last ranks are the heaviest.

Gradient scaling: torch computes `loss_fn` (a *mean* cross-entropy) per micro-batch, runs
backward on each, and with `scale_grads=True` divides the accumulated gradients by m once
after the last backward. With equal-size micro-batches that equals the gradient of the mean
loss over the whole local batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def stage_ids(pp_rank: int, pp_size: int, n_virtual: int) -> list[int]:
    """Global stage indices held by `pp_rank`: r, r + pp, ... (the looping layout)."""
    return [pp_rank + k * pp_size for k in range(n_virtual)]


def pipeline_split(model: nn.Module, pp_rank: int, pp_size: int, n_virtual: int) -> list[nn.Module]:
    """Deep-copied stage modules of `model` for `pp_rank`, in stage order.

    `model` is either on the meta device (the trainer: materialise the stages afterwards) or
    materialised identically on every rank (build_model with one seed; the whole model is then
    briefly in memory). Each stage is a deep copy that drops what it does not own. Stage s keeps
    layers [s * L, (s + 1) * L) with L = n_layers / (pp_size * n_virtual), under their original
    keys, so stage state_dict keys are the model's; stage 0 keeps tok_embeddings, the last
    stage norm + output, and the others have them set to None.
    """
    n_stages = pp_size * n_virtual
    per_stage = len(model.layers) // n_stages  # check_layout: n_layers divides into the stages
    stages = []
    for s in stage_ids(pp_rank, pp_size, n_virtual):
        stage = copy.deepcopy(model)
        keep = {str(i) for i in range(s * per_stage, (s + 1) * per_stage)}
        for key in [k for k in stage.layers if k not in keep]:
            del stage.layers[key]
        if s != 0:
            stage.tok_embeddings = None
        if s != n_stages - 1:
            stage.norm = None
            stage.output = None
        stages.append(stage)
    return stages


@dataclass
class Pipeline:
    """The local stages of a pipeline and the torch schedule that drives them.

    The schedule object is reused across steps (torch clears its per-step state in step()).
    """

    stages: list[nn.Module]
    schedule: object
    is_first: bool  # this rank feeds the token ids (holds stage 0)
    is_last: bool  # this rank computes the loss (holds the last stage)
    loss_scale: float = 1.0  # loss_fn's outputs times this are the unscaled mean losses

    def _run(self, run: Callable, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        args = (inputs,) if self.is_first else ()
        losses: list[torch.Tensor] = []
        # return_outputs=False: do not keep and concatenate the full-batch logits.
        run(*args, target=targets if self.is_last else None, losses=losses, return_outputs=False)
        if not self.is_last:
            return None
        return torch.stack([loss.detach() for loss in losses]).mean() * self.loss_scale

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Forward + backward of one local batch (inputs, targets: int64 [batch, seq]).

        Gradients are *added* to .grad and then the whole .grad is divided by the micro-batch
        count, so zero the gradients before every step (no accumulation across steps). Returns
        the mean loss over micro-batches (a 0-dim fp32 tensor) on the last stage, None elsewhere.
        Ranks that do not need `inputs` / `targets` ignore them (pass anything of that shape).
        """
        return self._run(self.schedule.step, inputs, targets)

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Forward-only mean loss of one local batch (last stage; None elsewhere). No gradients."""
        return self._run(self.schedule.eval, inputs, targets)


def build_pipeline(stages: list[nn.Module], pp_group_or_mesh, device: torch.device, n_microbatches: int,
                   schedule_name: str, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   grad_accum: int = 1) -> Pipeline:
    """Wrap this rank's `stages` (from :func:`pipeline_split`) in PipelineStages and a schedule.

    `pp_group_or_mesh`: the pp ProcessGroup, or a 1-D DeviceMesh (e.g. mesh["pp"]).
    `loss_fn(logits [mb, seq, vocab], targets [mb, seq]) -> scalar mean` over the micro-batch.
    Every rank of the group must call this together (the first step also exchanges shapes).
    `grad_accum` > 1: `step()` is called that many times before each optimizer step; torch's
    own scaling (divide all of .grad by m after each step) would shrink earlier steps' gradients
    again, so the loss is instead scaled by 1 / (m * grad_accum) before each backward.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    group = pp_group_or_mesh.get_group() if isinstance(pp_group_or_mesh, DeviceMesh) else pp_group_or_mesh
    pp_rank, pp_size = dist.get_rank(group), dist.get_world_size(group)
    n_virtual = len(stages)  # parallel.pp_virtual_stages, as pipeline_split cut them
    if (schedule_name == "interleaved_1f1b") != (n_virtual > 1):
        raise ValueError(f"pp_schedule={schedule_name!r} with {n_virtual} stage(s) per rank (a caller bug: "
                         "parallel/layout.py checks the config)")
    n_stages = pp_size * n_virtual
    ids = stage_ids(pp_rank, pp_size, n_virtual)
    # Shapes are inferred from the first micro-batch at the first step (dynamic mode).
    pipe_stages = [PipelineStage(m, s, n_stages, device, group=group) for m, s in zip(stages, ids)]
    # scale_grads=True: loss_fn is a per-micro-batch mean, so the summed grads are divided by m.
    scale = n_microbatches * grad_accum if grad_accum > 1 else 1
    run_loss = loss_fn if scale == 1 else (lambda logits, targets: loss_fn(logits, targets) / scale)
    if schedule_name == "interleaved_1f1b":
        schedule = ScheduleInterleaved1F1B(pipe_stages, n_microbatches, loss_fn=run_loss, scale_grads=scale == 1)
    else:
        cls = ScheduleGPipe if schedule_name == "gpipe" else Schedule1F1B
        schedule = cls(pipe_stages[0], n_microbatches, loss_fn=run_loss, scale_grads=scale == 1)
    return Pipeline(stages, schedule, is_first=0 in ids, is_last=n_stages - 1 in ids, loss_scale=float(scale))
