"""Mixture-of-experts layers under parallelism, applied from outside the plain model/moe.py:
expert parallelism (EP), and the MoE FFN under tensor and context parallelism.

Expert parallelism (`apply_ep`). The ep ranks of one group hold different tokens (they are
ep of the dp_shard x cp ranks) and split every MoE layer's E experts: rank r of the group holds
experts [r * E/ep, (r + 1) * E/ep) (the weights become DTensors sharded on dim 0 over the `ep`
mesh, so checkpoints keep the full [E, ...] names and shapes and reshard onto any ep). The layer
itself is unchanged: hooks around `experts.forward(x, counts)`, where x [N, dim] holds this
rank's token slots grouped by global expert, exchange the tokens:

  dispatch  all-to-all of the [E] counts (so each rank knows what it will receive), then an
            all-to-all of the rows: rank j sends rank r the rows of r's experts. The received
            rows arrive grouped by source rank; a stable sort regroups them by local expert
            (source order kept within an expert), and the experts run on counts [E/ep].
  combine   the inverse permutation, then the reverse all-to-all: every row returns to the rank
            and the position it came from, and the layer's combine weights it as on one device.

Both all-to-alls are autograd-aware (`all_to_all_single_autograd`): backward runs them in
reverse, so each expert's weight gradient sums the contributions of every token of the group
that was routed to it, and each token's gradient flows back to its own rank. The split sizes
must be on the host: one device-to-host sync per MoE layer and forward (as torchtitan's).

Gradient scale. Each rank's loss is the mean over its own tokens, and data-parallel averaging
divides by the dp x cp data ranks. A rank's expert gradient already sums over its ep group's
tokens, and FSDP then reduces it over the other data ranks (efsdp x dp_replicate), so it is
divided by dp x cp, not by FSDP's mesh size (`parallel/fsdp.py`).

Communication per MoE layer and micro-batch: `model.flops.moe_dispatch_bytes`.

Tensor parallelism (`apply_moe_tp`): the MoE FFN (router, experts, shared experts) is replicated
over tp and runs on the whole (all-gathered) sequence of the tp group, exactly as the dense FFN's
input is gathered; its output is cut back to this rank's sequence shard. The tp ranks compute
the same routing and the same expert work (tp-fold redundant compute; docs/moe.md), so their
weight gradients are equal and need no tp reduction, and under EP each tp rank exchanges
tokens with the ep ranks of its own tp coordinate.

Context parallelism (`apply_moe_cp`): routing is per token, so the layer runs unchanged on the
local tokens; only the sequence-wise auxiliary loss needs each sequence's expert counts summed
over the cp ranks holding its other chunks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from scaletrain.model.moe import MoE, GroupedExperts


def _wait(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(t) if isinstance(t, funcol.AsyncCollectiveTensor) else t


class TokenExchange:
    """The all-to-all dispatch (forward pre-hook) and combine (forward hook) around one
    GroupedExperts module; what combine needs from dispatch is kept between the two calls."""

    def __init__(self, group, ep: int):
        self.group, self.ep = group, ep
        self.send: list[int] = []  # rows sent to each ep rank
        self.recv: list[int] = []  # rows received from each ep rank
        self.order: torch.Tensor | None = None  # received rows -> local-expert order

    def dispatch(self, _module: nn.Module, args: tuple[torch.Tensor, torch.Tensor]):
        """(x [N, dim] grouped by global expert, counts [E]) -> (x [M, dim] grouped by local
        expert, counts [E / ep]), M = the rows this rank's experts receive from the group."""
        from torch.distributed import _functional_collectives as funcol

        x, counts = args
        if torch.is_autocast_enabled(x.device.type):  # the experts compute in it: send that, not fp32
            x = x.to(torch.get_autocast_dtype(x.device.type))
        local = counts.numel() // self.ep
        with torch.no_grad():
            # received[j, e]: rows rank j sends to this rank's local expert e
            received = _wait(funcol.all_to_all_single(counts, None, None, self.group)).view(self.ep, local)
            # The host sync of EP: the all-to-all of the rows needs its split sizes on the host.
            splits = torch.cat([counts.view(self.ep, local).sum(1), received.sum(1)]).tolist()
            self.send, self.recv = splits[:self.ep], splits[self.ep:]
            # Received rows come in (source rank, local expert) blocks; sort them by
            # (local expert, source rank), stably so each block keeps its row order.
            block_key = torch.arange(local, device=x.device).repeat(self.ep) * self.ep + torch.arange(
                self.ep, device=x.device).repeat_interleave(local)  # [ep * local], source-major
            row_key = torch.repeat_interleave(block_key, received.reshape(-1), output_size=sum(self.recv))
            self.order = torch.argsort(row_key, stable=True)  # [M]
        rows = _wait(funcol.all_to_all_single_autograd(x.contiguous(), self.recv, self.send, self.group))
        return rows[self.order], received.sum(0)

    def combine(self, _module: nn.Module, _args, out: torch.Tensor) -> torch.Tensor:
        """Expert outputs [M, dim] in local-expert order -> [N, dim] in this rank's dispatch order."""
        from torch.distributed import _functional_collectives as funcol

        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(self.order.numel(), device=self.order.device)
        back = out[inverse].contiguous()  # source-major again: the blocks each rank sent
        self.order = None
        return _wait(funcol.all_to_all_single_autograd(back, self.send, self.recv, self.group))


def _local_experts(weight: torch.Tensor) -> torch.Tensor:
    """This rank's experts of a weight sharded over ep (under FSDP: once it is gathered). Its
    gradient stays the local experts' (to_local's backward keeps the Shard(0) placement)."""
    return weight.to_local()


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> nn.Module:
    """Shard the experts of every MoE layer of `model` (a model part, on the meta device or
    materialised alike on every rank) over the 1-D `ep_mesh` (dim 0 of w1/w2/w3) and wrap
    their forward in the all-to-all dispatch/combine. Names and shapes in state_dict stay the
    full model's."""
    from torch.distributed.tensor import Shard, distribute_tensor

    ep = ep_mesh.size()
    for experts in [m for m in model.modules() if isinstance(m, GroupedExperts)]:
        for name, param in list(experts.named_parameters(recurse=False)):
            # src_data_rank=None: every rank holds the same tensor (or meta); keep the local rows.
            shard = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
            experts.register_parameter(name, nn.Parameter(shard, requires_grad=param.requires_grad))
        experts.local_weight = _local_experts
        exchange = TokenExchange(ep_mesh.get_group(), ep)
        experts.register_forward_pre_hook(exchange.dispatch)
        experts.register_forward_hook(exchange.combine)
    return model


def apply_moe_tp(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Run every MoE FFN of `model` replicated over `tp_mesh`: its input (the sequence-parallel
    norm output, sharded on the sequence) is all-gathered, its output cut back to this rank's
    sequence shard. In backward the output gradient is all-gathered and the input gradient (the
    same on every tp rank) sliced, so the FFN's weights get the same full gradient on every tp
    rank. Call after `apply_tp` (which leaves FFNs without `w1` alone)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInputOutput, parallelize_module

    for block in model.layers.values():
        if isinstance(block.feed_forward, MoE):
            parallelize_module(block.feed_forward, tp_mesh, PrepareModuleInputOutput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True))
    return model


def apply_moe_cp(model: nn.Module, cp_mesh: DeviceMesh) -> nn.Module:
    """Give every MoE layer of `model` the sum of its per-sequence expert counts [B, E] over
    `cp_mesh` (an all-reduce of B * E floats per layer and forward), so its sequence-wise
    auxiliary loss sees whole sequences (model/moe.py `sequence_aux_loss`)."""
    from torch.distributed import _functional_collectives as funcol

    group = cp_mesh.get_group()

    def sum_counts(counts: torch.Tensor) -> torch.Tensor:
        return _wait(funcol.all_reduce(counts, "sum", group))

    for layer in [m for m in model.modules() if isinstance(m, MoE)]:
        layer.sum_sequence_counts = sum_counts
    return model
