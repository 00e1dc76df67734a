"""Tensor parallelism with sequence parallelism (Megatron-LM style) via
`torch.distributed.tensor.parallel`, applied to the unmodified model by parameter name.

Per block: wq/wk/wv and w1/w3 are column-parallel (each rank owns n_heads/tp query heads,
n_kv_heads/tp kv heads, ffn_dim/tp hidden units); wo and w2 are row-parallel and
reduce-scatter their output along the sequence. Between them the residual stream and the
RMSNorms are sequence-parallel: each rank holds seq/tp positions of [batch, seq, dim], so
norm activations are not replicated. The embedding is row-parallel over the vocabulary and
emits sequence shards; the output head is column-parallel over the vocabulary and returns
replicated logits [batch, seq, vocab] so the loss is computed as on one device.

The 2:4-sparse Squared-ReLU FFN (model/sparsity.py) never calls its w1 / w2 modules: it
multiplies by their weights inside one autograd function. Its weights are sharded as for the
dense FFN, and `sparse_ffn_tp` replaces the layer's `sparse_ffn` from outside: each rank runs
the unchanged 2:4 function on its H / tp hidden units and the partial sums are reduce-scattered
over the sequence, the layout RowwiseParallel(output_layouts=Shard(1)) gives a dense w2.

Communication per block and micro-batch, forward: 2 all-gathers + 2 reduce-scatters of
batch*seq*dim activations over the tp group (the same again in backward).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from scaletrain.model.sparsity import sparse_squared_relu_ffn


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard `model` (a Transformer, possibly a pipeline stage with some parts None) over the
    1-D `tp_mesh` in place."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    root_plan = {}
    if model.tok_embeddings is not None:
        root_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        root_plan["norm"] = SequenceParallel()
    if model.output is not None:
        root_plan["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan)
    if model.tok_embeddings is None and len(model.layers):
        # A later pipeline stage receives full-sequence hidden states: cut them into this
        # rank's sequence shard, the layout the blocks expect.
        first = next(iter(model.layers.values()))
        parallelize_module(first, tp_mesh, PrepareModuleInput(
            input_layouts=(Replicate(), None, None), desired_input_layouts=(Shard(1), None, None),
            use_local_output=True))
    if model.output is None and model.norm is None and len(model.layers):
        # ...and a stage without the head hands on full-sequence hidden states.
        _gather_sequence_at_exit(next(reversed(model.layers.values())), tp_mesh)

    for block in model.layers.values():
        plan = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        }
        if hasattr(block.attention, "q_norm"):
            # q/k norms act per head on this rank's heads [b, s, heads / tp, hd]: a shared
            # weight over inputs sharded on dim 2, whose gradient sums over the tp ranks.
            plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if hasattr(block.feed_forward, "w1"):  # a dense FFN; an MoE FFN has its own plan (parallel/ep.py)
            plan["feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            plan["feed_forward.w1"] = ColwiseParallel()
            plan["feed_forward.w2"] = RowwiseParallel(output_layouts=Shard(1))
            if hasattr(block.feed_forward, "w3"):
                plan["feed_forward.w3"] = ColwiseParallel()
            if block.feed_forward.sparse_2to4:
                block.feed_forward.sparse_ffn = sparse_ffn_tp
        parallelize_module(block, tp_mesh, plan)
    return model


def sparse_ffn_tp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The 2:4 FFN under this file's plan: x [batch, seq, D] a replicated DTensor, w1 sharded
    over H (Shard(0)), w2 over H (Shard(1)). Each rank runs its H / tp hidden units (a partial
    sum of y) and the sum is reduce-scattered over the sequence: returns this rank's local
    [batch, seq / tp, D], what the block's residual add expects."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    mesh = w1.device_mesh
    # The gradient w.r.t. the replicated input is this rank's partial sum over its hidden units.
    y = sparse_squared_relu_ffn(x.to_local(grad_placements=(Partial(),)), w1.to_local(), w2.to_local())
    return DTensor.from_local(y, mesh, (Partial(),)).redistribute(mesh, (Shard(1),)).to_local()


def _gather_sequence_at_exit(block: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Make `block` return the full sequence (all-gather of its local shard, with autograd)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def hook(_module, _inputs, output):
        return DTensor.from_local(output, tp_mesh, (Shard(1),)).redistribute(
            tp_mesh, (Replicate(),)).to_local()

    block.register_forward_hook(hook)
