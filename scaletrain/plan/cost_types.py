"""The cost model's inputs and outputs: the global parameter set, the software switches (Stack),
the workload, the layout, and the predicted memory and step time (docs/planner.md). plan/cost.py
(time) and plan/cost_memory.py (memory) price a Workload on a Layout with them; cost.py
re-exports every name here."""

from __future__ import annotations

from dataclasses import dataclass, field

from scaletrain.plan.hardware import Hardware


@dataclass(frozen=True)
class Params:
    """The cost model's global constants: one set for every row and run, never per row or per
    source. The names in FITTED are re-derived from training rows by plan/fit.py (the shipped
    values are its fit on the whole development set); the others are datasheet facts,
    derivations from how the kernels work, or stated assumptions (docs/planner.md)."""

    # -- fitted (plan/fit.py) --
    mamf_scale: float = 0.80  # GEMM efficiency in training / the device's best-shape MAMF (catalog)
    matmul_half_dim: float = 150.0  # GEMM efficiency halves when min(m, n, k) is this small
    attn_eff_scale: float = 0.55  # end-to-end attention rate / kernel-benchmark rate (masking, layout copies)
    elementwise_passes_eager: float = 4.0  # HBM passes over the layer's activations, fwd+bwd
    elementwise_passes_fused: float = 2.5  # with torch.compile / fused kernels
    overlap_interference: float = 0.25  # compute slowdown per second of communication hidden behind it
    # Host time an MoE layer exposes per micro-batch / its launch-count prior
    # (cost_moe.moe_host_prior_s): the dispatch needs the token counts on the host (a
    # device-to-host sync per MoE layer), which drains the GPU queue, so the layer's kernels are
    # launched with the GPU waiting. The prior prices the counted launches at host_overhead_s
    # each; this factor, fitted on the MoE rows only, is how much more a framework really spends
    # (1 = the prior alone: what a fit without MoE rows keeps; docs/planner.md).
    moe_host_scale: float = 6.0
    # -- not fitted --
    mamf_default: float = 0.80  # devices the MAMF table does not list: its median (A100 .87 .. MI300X .51)
    attn_eff: float = 0.45  # flash-attention fraction of peak when the device gives none
    attn_bwd_ratio: float = 2.5  # flash backward / forward FLOPs (5 GEMMs vs 2; Dao 2023)
    comm_eff: float = 0.80  # NCCL bus bandwidth / link bandwidth
    ops_per_layer_eager: float = 110.0  # kernels launched per layer per micro-batch, fwd+bwd
    ops_per_layer_fused: float = 40.0
    optimizer_bytes_per_param: float = 32.0  # AdamW + grad clip HBM traffic (fp32 states)
    step_overhead_s: float = 0.02  # loader, zero_grad, loss/grad-norm sync, logging
    fragmentation: float = 0.10  # caching-allocator reserve over allocated bytes
    dp_overlap: float = 0.8  # fraction of the last backward that hides the replica all-reduce


FITTED = ("mamf_scale", "matmul_half_dim", "attn_eff_scale", "elementwise_passes_eager", "elementwise_passes_fused",
          "overlap_interference", "moe_host_scale")

# HBM bytes moved per element of every fp8 GEMM operand (activation, weight, output gradient) to
# quantise it, (separate kernels, fused into the producing kernel by torch.compile or Transformer
# Engine). Derived from what the kernels read and write, not fitted: an amax pass reads the bf16
# tensor (2 B); a cast reads it (2 B) and writes fp8 (1 B); the backward GEMMs need the other
# layout (Hopper fp8 GEMMs are "TN" only), a transposed fp8 copy (1 B read + 1 B write) or a second
# cast along the other axis; a fused cast reads once and writes both layouts.
FP8_CAST_BYTES = {
    "tensorwise": (7.0, 6.0),  # current per-tensor scale: amax 2 + cast 3 + transpose 2 | amax 2 + cast to both 4
    "delayed": (5.0, 4.0),  # Transformer Engine amax history: no amax pass
    "rowwise": (10.0, 6.0),  # per-row scales along each GEMM's reduction axis: two (amax + cast) | 2 + 4
    "blockwise": (6.0, 4.0),  # 1x128 / 128x128 block scales, block amax inside the cast: two casts | 4
    "mxfp8": (6.0, 4.0),  # 32-element block scales (+1/32 B of scales): as blockwise
}


PARAMS = Params()


@dataclass(frozen=True)
class Stack:
    """Software settings that change cost without changing the model (documented switches)."""

    fused: bool = False  # torch.compile or hand-fused kernels (fewer launches, less HBM traffic)
    tp_overlap: bool = False  # async TP / TP comm overlap hides TP collectives behind GEMMs
    reshard_after_forward: bool | None = None  # FSDP: None = True unless pp > 1
    fsdp: bool = True  # shard weights/grads/optimizer over dp_shard*cp (False: Megatron-style DDP)
    # Loss: a vocabulary-parallel cross-entropy under TP (torchtitan loss_parallel, Megatron) or
    # one on replicated logits (scaletrain's parallel/tp.py); compiled with the model or eager.
    loss_parallel: bool = True
    compiled_loss: bool = False  # scaletrain with train.compile (torchtitan compiles blocks only)
    fused_attention: bool = False  # cuDNN / FlashAttention-3 class kernels (Transformer Engine), not SDPA's FA2
    # Megatron-Core MoE parallel folding with expert tensor parallelism 1: the expert-parallel group
    # is drawn from the tp x cp x dp ranks (consecutive global ranks, tp fastest) instead of the
    # data x context ranks, and each rank routes its own sequence-parallel shard (T / tp tokens)
    # to whole experts. A published layout whose ep does not divide dp x cp can only run this way.
    moe_folding: bool = False
    # CUDA graphs (Megatron --cuda-graph-impl, TE make_graphed_callables, torch.compile's
    # "reduce-overhead"): the layers' kernels are replayed from a captured graph, so no host
    # launch time is exposed, in a dense layer or in an MoE layer's dispatch (docs/planner.md).
    cuda_graphs: bool = False
    grad_reduce_fp32: bool = True  # gradients reduced in fp32 (False: in the compute dtype, e.g. FSDP "PURE")
    fp8_all_gather: bool = False  # FSDP gathers fp8 weights (torchao tensorwise + enable_fsdp_float8_all_gather)
    cp_comm: str = "allgather"  # "allgather" (parallel/cp.py) | "allgather_overlap" (torchtitan) | "ring" (TE)


@dataclass(frozen=True)
class Workload:
    """What is trained: model shape, tokens per sequence, sequences per optimizer step."""

    model: ModelConfig
    seq_len: int
    global_batch: int  # sequences per optimizer step
    precision: str = "bf16"  # "bf16" | "fp16" | "fp8" (linears) | "fp32"
    fp8_recipe: str = "tensorwise"  # with fp8: a key of FP8_CAST_BYTES
    # MoE: tokens of the busiest expert-parallel rank / the mean (1 = balanced routing; the
    # trainer's metrics.jsonl reports the expert-level `expert_imbalance`, an upper bound of it)
    expert_imbalance: float = 1.0


@dataclass(frozen=True)
class Layout:
    """One parallel layout. `micro_batch` is sequences per forward per rank."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved_1f1b only)
    micro_batch: int = 1
    ac: str = "none"
    ep: int = 1  # expert parallel: MoE experts split over ep of the dp x cp ranks (not a factor of the world)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def short(self) -> str:
        """e.g. "dp 8x32 tp1 pp4 1f1b cp2 ep8 mb1 ac=full": data parallel as replicas x FSDP
        shards, the tensor/pipeline (schedule, virtual stages)/context degrees, expert parallel
        (when > 1), micro-batch sequences, AC."""
        s = f"dp {self.dp_replicate}x{self.dp_shard} tp{self.tp} pp{self.pp}"
        if self.pp > 1:
            s += f" {self.pp_schedule}" + (f"x{self.virtual_stages}" if self.virtual_stages > 1 else "")
        return s + f" cp{self.cp}" + (f" ep{self.ep}" if self.ep > 1 else "") + f" mb{self.micro_batch} ac={self.ac}"


@dataclass
class Memory:
    """Predicted peak bytes per GPU (the worst pipeline stage)."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    buffers: float = 0.0
    fragmentation: float = 0.0
    phase: str = ""  # where the peak is: "loss" (start of backward), "layer backward" or "optimizer step"

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.buffers + self.fragmentation

    @property
    def allocated(self) -> float:
        """Live tensor bytes at the peak (CUDA max_memory_allocated, memtrace on the CPU):
        the total without the caching allocator's fragmentation allowance."""
        return self.total - self.fragmentation

    def parts(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("weights", "grads", "optimizer", "activations", "buffers", "fragmentation")}


@dataclass
class StepTime:
    """Seconds per optimizer step by cause; `exposed` holds communication not hidden by compute."""

    compute: float = 0.0
    exposed: dict[str, float] = field(default_factory=dict)
    bubble: float = 0.0
    overhead: float = 0.0  # host/framework time not hidden behind GPU work + fixed per-step cost
    optimizer: float = 0.0
    recompute: float = 0.0  # part of `compute`: activation checkpointing's re-run forward work
    fp8_cast: float = 0.0  # fp8 quantisation (amax, cast, transpose) of GEMM operands
    interference: float = 0.0  # compute slowed by the communication kernels running beside it

    @property
    def total(self) -> float:
        return (self.compute + self.fp8_cast + self.interference + sum(self.exposed.values()) + self.bubble
                + self.overhead + self.optimizer)


@dataclass
class Estimate:
    layout: Layout
    memory: Memory
    time: StepTime
    tokens_per_s_per_gpu: float
    mfu: float | None
    fits: bool
    microbatches: int  # micro-batches per rank per step


def cpu_model(hw: Hardware) -> dict | None:
    """The measured CPU execution model of a calibrated CPU profile, else None (every GPU and
    catalog entry: their predictions never touch the CPU terms)."""
    return hw.cpu if hw.calibrated and hw.cpu else None


def is_cpu(hw: Hardware) -> bool:
    """The device runs PyTorch's CPU kernels: memcheck's "cpu" device or a calibrated CPU profile."""
    return hw.name == "cpu" or hw.name.startswith("calibrated:cpu") or bool(cpu_model(hw))
