"""Memory and step time of one parallel layout: the planner's cost model.

Everything model-shaped (parameter counts, FLOPs, activation bytes) comes from
model/flops.py; this file only adds the hardware side: achieved matmul efficiency as a
function of shape, alpha-beta collectives placed on the mesh, overlap, pipeline bubbles and
per-op host overhead. All times are seconds, sizes bytes, rates FLOP/s or bytes/s.
docs/planner.md derives every formula; the constants in `Params` are the ONE global set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scaletrain.config.schema import ModelConfig
from scaletrain.model.flops import _dims as attention_dims  # (head_dim, q_dim, kv_dim): flops' one definition
from scaletrain.model.flops import (activation_bytes_per_layer, backward_transient_bytes, flops_per_token,
                                    forward_flops_per_layer, head_activation_bytes, loss_activation_bytes,
                                    param_counts, recompute_bytes, saved_activation_bytes)
from scaletrain.parallel.dims import MESH_DIMS
from scaletrain.plan.cpu_measured import block_seconds, head_seconds, measured_block_key
from scaletrain.plan.hardware import Hardware
from scaletrain.train.metrics import mfu as metrics_mfu


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
          "overlap_interference")

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

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def short(self) -> str:
        """e.g. "dp 8x32 tp1 pp4 1f1b cp2 mb1 ac=full": data parallel as replicas x FSDP shards,
        the tensor/pipeline (schedule, virtual stages)/context degrees, micro-batch sequences, AC."""
        s = f"dp {self.dp_replicate}x{self.dp_shard} tp{self.tp} pp{self.pp}"
        if self.pp > 1:
            s += f" {self.pp_schedule}" + (f"x{self.virtual_stages}" if self.virtual_stages > 1 else "")
        return s + f" cp{self.cp} mb{self.micro_batch} ac={self.ac}"


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


def collective_time(kind: str, nbytes: float, n: int, bw: float, alpha: float, p: Params = PARAMS) -> float:
    """Alpha-beta time of one collective over `n` ranks; `nbytes` is the full (unsharded)
    buffer for all_gather / reduce_scatter / all_reduce / all_to_all, the message for send.
    Ring: (n-1) steps of nbytes/n; all-reduce = reduce-scatter + all-gather, or a double
    binary tree (2 log2 n latency steps) when that is faster (small messages)."""
    if n <= 1 and kind != "send":
        return 0.0
    beta = 1.0 / (bw * p.comm_eff)
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) * alpha + (n - 1) / n * nbytes * beta
    if kind == "all_reduce":
        ring = 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes * beta
        tree = 2 * math.ceil(math.log2(n)) * alpha + 2 * nbytes * beta
        return min(ring, tree)
    if kind == "send":
        return alpha + nbytes * beta
    raise ValueError(f"unknown collective {kind!r}")


def axis_link(layout: Layout, axes: tuple[str, ...], hw: Hardware) -> tuple[float, float]:
    """(bandwidth, latency) of the group spanning mesh `axes` (adjacent in MESH_DIMS): intra-node
    when the group's extent (its size times the product of inner degrees) fits in one node."""
    inner = 1
    for name in reversed(MESH_DIMS):
        if name in axes:
            break
        inner *= getattr(layout, name)
    size = math.prod(getattr(layout, a) for a in axes)
    if inner * size <= hw.gpus_per_node:
        return hw.intra_bw, hw.intra_latency
    # Across nodes NCCL runs one ring per NIC: with k group members on a node, k rings share
    # the node's k NICs in parallel (NVLink forwards inside the node), so the group sees k
    # times the per-GPU network bandwidth, capped by the node fabric.
    k = max(1, min(size, hw.gpus_per_node // inner))
    return min(hw.intra_bw, k * hw.inter_bw), hw.inter_latency


def cpu_model(hw: Hardware) -> dict | None:
    """The measured CPU execution model of a calibrated CPU profile, else None (every GPU and
    catalog entry: their predictions never touch the CPU terms)."""
    return hw.cpu if hw.calibrated and hw.cpu else None


def _nearest_rate(points: list, key: tuple[float, ...]) -> float:
    """Rate of the measured point nearest to `key` in log space (points: [*key, rate])."""
    def dist(pt):
        return sum(math.log(max(a, 1.0) / max(b, 1.0)) ** 2 for a, b in zip(pt[:-1], key))
    return float(min(points, key=dist)[-1])


def _log_interp(points: list, x: float) -> float:
    """Piecewise-linear in log x through measured [x, rate] points, flat outside them."""
    pts = sorted(points)
    if x <= pts[0][0]:
        return float(pts[0][1])
    for (x0, r0), (x1, r1) in zip(pts, pts[1:]):
        if x <= x1:
            f = math.log(x / x0) / math.log(x1 / x0) if x1 > x0 else 1.0
            return float(r0 + f * (r1 - r0))
    return float(pts[-1][1])


def gemm_eff_max(hw: Hardware, precision: str, p: Params = PARAMS) -> float:
    """Best GEMM efficiency (fraction of peak) in training: a calibrated profile's measured value,
    else the device's best-shape MAMF for that precision (catalog; Params.mamf_default when it
    has none) times the fitted in-training factor `mamf_scale`."""
    if hw.matmul_eff_max is not None:
        return hw.matmul_eff_max
    key = "fp8" if precision == "fp8" else "bf16"
    return (hw.mamf.get(key) or p.mamf_default) * p.mamf_scale


def gemm_time(m: float, n: float, k: float, peak: float, hw: Hardware, p: Params = PARAMS,
              precision: str = "bf16") -> float:
    """One [m,k]x[k,n] GEMM: 2mnk / (peak * eff), eff = eff_max * x / (x + half_dim) with
    x = min(m, n, k) (tile/wave under-utilisation of thin GEMMs), floored by the HBM roofline.
    A calibrated CPU profile instead uses the rate measured at the nearest (m, n, k) (forward +
    both backward GEMMs of that linear, so 3 x this time is the measured fwd+bwd time)."""
    cpu = cpu_model(hw)
    if cpu and cpu.get("gemm"):
        return 2 * m * n * k / _nearest_rate(cpu["gemm"], (m, n, k))
    x = min(m, n, k)
    eff = gemm_eff_max(hw, precision, p) * x / (x + p.matmul_half_dim)
    t = 2 * m * n * k / (peak * eff)
    operand_bytes = 1 if precision == "fp8" else 2
    return max(t, operand_bytes * (m * k + k * n + m * n) / hw.hbm_bw)


def _peaks(hw: Hardware, precision: str) -> tuple[float, float]:
    """(peak for the blocks' linear GEMMs, peak for attention, head and everything else), FLOP/s.
    fp8 runs the linears at the fp8 tensor-core rate (MXFP8 too: Blackwell's block-scaled MMA
    runs at the FP8 rate); attention and the output head stay in bf16."""
    base = "bf16" if precision == "fp8" else precision
    peak = hw.peak_flops.get(base) or 0.0
    if peak <= 0:
        from scaletrain.errors import ConfigError

        raise ConfigError(f"{hw.name} has no {base} peak; pick another precision or GPU.")
    if precision == "fp8":
        if not hw.peak_flops.get("fp8"):
            from scaletrain.errors import ConfigError

            raise ConfigError(f"{hw.name} has no fp8 tensor cores; use --precision bf16.")
        return hw.peak_flops["fp8"], peak
    return peak, peak


def fp8_cast_seconds(w: Workload, T: float, tp: int, fused: bool, hw: Hardware) -> float:
    """Seconds to quantise one layer's fp8 GEMM operands for one micro-batch (forward + backward):
    the inputs of qkv, wo, w1/w3 (one cast) and w2, the four output gradients and the weights,
    each moving FP8_CAST_BYTES[recipe] bytes per element at HBM bandwidth (memory-bound kernels)."""
    m = w.model
    _, q, kv = attention_dims(m)
    f = m.ffn_dim
    n_ffn = 3 if m.ffn == "swiglu" else 2
    inputs = T * (2 * m.dim + q + f) / tp  # column-parallel inputs are cast before the sequence gather
    grads = T * ((q + 2 * kv) + m.dim + (n_ffn - 1) * f + m.dim) / tp
    c = param_counts(m)
    weights = (c["attention_per_layer"] + c["ffn_per_layer"]) / tp
    per_element = FP8_CAST_BYTES[w.fp8_recipe][1 if fused else 0]
    return per_element * (inputs + grads + weights) / hw.hbm_bw


def cp_seconds(layout: Layout, kv_local_bytes: float, attn: float, stack: Stack, hw: Hardware,
               p: Params = PARAMS) -> tuple[float, float]:
    """(exposed, total) context-parallel communication of one layer and micro-batch (fwd + bwd).
    `kv_local_bytes`: this rank's K (or V) chunk; `attn`: the layer's forward attention seconds.
    Stack.cp_comm: "allgather" -- scaletrain's parallel/cp.py all-gathers K and V before any
    attention and reduce-scatters dK, dV in backward, nothing overlapped; "allgather_overlap" --
    torchtitan's default rotate method, the gather hidden behind the local chunk's attention;
    "ring" -- Transformer Engine's p2p ring, cp-1 hops of K,V hidden behind the attention
    (backward: K,V and dK,dV)."""
    cp = layout.cp
    bw, lat = axis_link(layout, ("cp",), hw)
    if stack.cp_comm == "ring":
        fwd_c = (cp - 1) * collective_time("send", 2 * kv_local_bytes, 2, bw, lat, p)
        return max(0.0, fwd_c - attn) + max(0.0, 2 * fwd_c - p.attn_bwd_ratio * attn), 3 * fwd_c
    gather = collective_time("all_gather", 2 * kv_local_bytes * cp, cp, bw, lat, p)
    regather = 1 if layout.ac in ("full", "selective") else 0  # the recomputed attention gathers again
    total = (2 + regather) * gather
    if stack.cp_comm == "allgather_overlap":
        return max(0.0, (1 + regather) * gather - attn / cp) + max(0.0, gather - p.attn_bwd_ratio * attn / cp), total
    return total, total


def stage_params(m: ModelConfig, layout: Layout) -> tuple[float, float]:
    """(params of the heaviest pipeline stage, params of one layer), unsharded counts."""
    c = param_counts(m)
    layer = c["attention_per_layer"] + c["ffn_per_layer"] + c["norm_per_layer"]
    per_stage_layers = m.n_layers / layout.pp
    if layout.pp == 1:
        return float(c["total"]), float(layer)
    first = per_stage_layers * layer + c["embedding"]
    last = per_stage_layers * layer + (c["output"] or c["embedding"]) + c["final_norm"]
    return float(max(first, last)), float(layer)


def cp_gathered_kv_bytes(m: ModelConfig, mb: int, seq_len: int, B: int, layout: Layout, stack: Stack) -> float:
    """Bytes of keys and values from the other context-parallel ranks that one layer's attention
    holds (per micro-batch): parallel/cp.py gathers K, V of the whole sequence and repeats them to
    all query heads (GQA) before SDPA, which keeps them for its backward: 2 mb (S - S/cp) q B / tp
    beyond the local part flops.saved_activation_bytes counts. torchtitan's all-gather keeps the
    kv heads only; Transformer Engine's ring re-sends K, V in backward and keeps nothing extra."""
    if layout.cp == 1 or stack.cp_comm == "ring":
        return 0.0
    _, q, kv = attention_dims(m)
    width = q if stack.cp_comm == "allgather" else kv
    return 2 * mb * (seq_len - seq_len / layout.cp) * width * B / layout.tp


def is_cpu(hw: Hardware) -> bool:
    """The device runs PyTorch's CPU kernels: memcheck's "cpu" device or a calibrated CPU profile."""
    return hw.name == "cpu" or hw.name.startswith("calibrated:cpu") or bool(cpu_model(hw))


def estimate_memory(w: Workload, layout: Layout, hw: Hardware, stack: Stack = Stack(), p: Params | None = None) -> Memory:
    """Peak bytes per GPU (the worst pipeline stage). State: fp32 weights and Adam (m, v),
    FSDP-sharded over dp_shard*cp, split by TP/PP. On top of it the peak of the step is
    the largest of three moments (docs/planner.md "Memory per GPU"): the start of backward
    (all saved activations + the cross-entropy's tensors), one layer's backward (saved
    activations + what AC recomputes + the layer's gradient transients) and the optimizer step
    (all gradients + the optimizer's temporaries; activations freed). Saved tensors per layer
    from flops.saved_activation_bytes."""
    p = p or PARAMS
    m = w.model
    B = 4 if w.precision == "fp32" else 2
    tp, pp = layout.tp, layout.pp
    shard = layout.dp_shard * layout.cp if stack.fsdp else 1
    wrapped = stack.fsdp and layout.dp * layout.cp > 1  # FSDP2 units (replicate-only HSDP too)
    reshard = stack.reshard_after_forward if stack.reshard_after_forward is not None else pp == 1
    cpu = is_cpu(hw)
    decomposed = cpu and not stack.fused  # eager CPU RMSNorm saves the normalised x too
    mb, s_local = layout.micro_batch, w.seq_len // layout.cp
    n_micro = max(1, w.global_batch // (layout.dp * mb))
    accumulate = n_micro > 1 or pp > 1  # earlier micro-batches' gradients are alive all step
    c = param_counts(m)
    p_layer = float(c["attention_per_layer"] + c["ffn_per_layer"] + c["norm_per_layer"])
    L_s = m.n_layers / pp
    saved = saved_activation_bytes(m, mb, s_local, B, layout.ac, tp=tp, fused=stack.fused, decomposed_norm=decomposed)
    recompute = recompute_bytes(m, mb, s_local, B, layout.ac, tp=tp, decomposed_norm=decomposed)
    gathered_kv = cp_gathered_kv_bytes(m, mb, w.seq_len, B, layout, stack)
    if layout.ac in ("none", "op"):  # SDPA keeps the gathered keys and values for its backward
        saved += gathered_kv
    else:  # rebuilt with the recomputed attention
        recompute += gathered_kv
    transient = backward_transient_bytes(m, mb, s_local, B, tp=tp)
    head = head_activation_bytes(m, mb, s_local, B, tp=tp, decomposed_norm=cpu)  # the final norm is never compiled
    loss = loss_activation_bytes(m, mb, s_local, B, compiled=stack.compiled_loss,
                                 vocab_shards=tp if stack.loss_parallel else 1)
    boundary = 2 * mb * s_local * m.dim * B if pp > 1 else 0.0  # received activation + its gradient
    head_params = float((c["output"] or c["embedding"]) + c["final_norm"])
    # (layers, micro-batches in flight, holds the head, parameters, FSDP root-unit parameters)
    if pp == 1:
        stages = [(L_s, 1.0, True, float(c["total"]), float(c["embedding"] + c["output"] + c["final_norm"]))]
    else:
        if layout.pp_schedule == "gpipe":
            first = last = float(n_micro)
        else:  # 1f1b: pp micro-batches; interleaved: x (1 + (pp-1)/(pp*v)) (Narayanan et al. 2021)
            v = layout.virtual_stages
            first = pp * (1 + (pp - 1) / (pp * v)) if v > 1 else float(pp)
            first = min(first, float(n_micro))  # never more in flight than the step has
            last = 1.0
        stages = [(L_s, first, False, L_s * p_layer + c["embedding"], float(c["embedding"])),
                  (L_s, last, True, L_s * p_layer + head_params, head_params)]
    best = None
    for layers, in_flight, has_head, p_stage, p_root in stages:
        local = p_stage / tp
        weights, states, grads_all = 4 * local / shard, 8 * local / shard, 4 * local / shard
        if wrapped and pp > 1:  # torch.distributed.pipelining turns FSDP's gradient sync off until the
            # last micro-batch (stage.py backward_maybe_with_nosync): the stage's gradients accumulate
            # unsharded, in fp32 (the reduce dtype), until the step's one reduce-scatter
            grads_all = 4 * local
        # foreach AdamW (the trainer's choice on the CPU) holds one fp32 temporary per parameter
        # (sqrt of the second moment); the fused CUDA kernel none.
        opt_temp = 4 * local / shard if cpu else 0.0
        if wrapped:  # all-gathered copies: current + prefetched layer (all when not resharding) + the root unit
            gathered = B * ((2 * p_layer if reshard else layers * p_layer) + p_root) / tp
        elif B < 4:  # bf16 copies of every weight, saved for backward (autocast; Megatron's bf16 params)
            gathered = B * local
        else:
            gathered = 0.0
        acts = saved * layers * in_flight + boundary
        # the head's saved tensors are freed once its backward is done, before any layer's
        head_acts = head * in_flight if has_head else 0.0
        grads_layer = grads_all if accumulate else 4 * (p_layer + (head_params if has_head else 0.0)) / tp
        # full/op AC re-materialise the whole layer before its FFN backward runs: both at once;
        # selective recomputes the attention only after the FFN's backward has freed its part
        extra = max(recompute, transient) if layout.ac == "selective" else recompute + transient
        phases = [("layer backward", grads_layer, gathered, acts + extra),
                  ("optimizer step", grads_all, opt_temp, 0.0)]
        if has_head:
            phases.append(("loss", grads_all if accumulate else 0.0, gathered, acts + head_acts + loss))
        name, g, buf, a = max(phases, key=lambda ph: ph[1] + ph[2] + ph[3])
        mem = Memory(weights=weights, grads=g, optimizer=states, activations=a, buffers=buf, phase=name)
        if best is None or mem.total > best.total:
            best = mem
    best.fragmentation = p.fragmentation * best.total
    return best


def estimate(w: Workload, layout: Layout, hw: Hardware, stack: Stack = Stack(), p: Params | None = None) -> Estimate:
    """Memory and step time of `layout` for `w` on `hw` (see docs/planner.md for each term)."""
    p = p or PARAMS
    m = w.model
    act_bytes = 4 if w.precision == "fp32" else 2
    lin_peak, peak = _peaks(hw, w.precision)
    lp = w.precision  # the linears' precision (fp8: their own MAMF); attention and the head run at `peak`
    tp, cp, pp, v = layout.tp, layout.cp, layout.pp, layout.virtual_stages
    n_micro = max(1, w.global_batch // (layout.dp * layout.micro_batch))
    s_local = w.seq_len // cp
    T = layout.micro_batch * s_local  # tokens per micro-batch per rank
    _, q, kv = attention_dims(m)
    n_ffn = 3 if m.ffn == "swiglu" else 2
    reduce_bytes = 4 if stack.grad_reduce_fp32 else act_bytes

    # --- one layer, one micro-batch, forward (s) ---
    gemm_attn = gemm_time(T, (q + 2 * kv) / tp, m.dim, lin_peak, hw, p, lp) + gemm_time(T, m.dim, q / tp, lin_peak, hw, p, lp)
    gemm_ffn = (n_ffn - 1) * gemm_time(T, m.ffn_dim / tp, m.dim, lin_peak, hw, p, lp)
    gemm = gemm_attn + gemm_ffn + gemm_time(T, m.dim, m.ffn_dim / tp, lin_peak, hw, p, lp)
    f = forward_flops_per_layer(m, w.seq_len, causal=True)
    cpu = cpu_model(hw)
    kernel_eff = (hw.attn_eff_fused if stack.fused_attention else None) or hw.attn_eff or p.attn_eff
    attn_rate = peak * kernel_eff * (1.0 if hw.calibrated else p.attn_eff_scale)
    if cpu and cpu.get("attention"):  # measured fwd+bwd rate at this sequence length
        attn_rate = _log_interp(cpu["attention"], s_local)
    attn = layout.micro_batch * (f["attn_scores"] + f["attn_values"]) / (tp * cp) / attn_rate
    passes = p.elementwise_passes_fused if stack.fused else p.elementwise_passes_eager
    elem_bytes = passes * activation_bytes_per_layer(m, layout.micro_batch, s_local, act_bytes, "none") / tp
    elem_bw = hw.hbm_bw
    if cpu and cpu.get("elementwise"):  # measured layer elementwise chain, in these byte units
        elem_bw = _log_interp(cpu["elementwise"], elem_bytes)
    elem = elem_bytes / elem_bw
    fwd = gemm + attn + elem / 3
    bwd = 2 * gemm + p.attn_bwd_ratio * attn + 2 * elem / 3
    # selective = parallel/ac.py checkpoints each block's attention module (wq/wk/wv, SDPA, wo);
    # op = torchtitan's op-level SAC: every elementwise op and every second matmul (wk, wo, w3)
    op_sac = gemm_time(T, kv / tp, m.dim, lin_peak, hw, p, lp) + gemm_time(T, m.dim, q / tp, lin_peak, hw, p, lp) \
        + (gemm_time(T, m.ffn_dim / tp, m.dim, lin_peak, hw, p, lp) if n_ffn == 3 else 0.0) + elem / 3
    recompute = {"none": 0.0, "selective": gemm_attn + attn, "full": fwd, "op": op_sac}[layout.ac]
    layer_compute = fwd + bwd + recompute
    block_key = measured_block_key(cpu, layout.ac, stack.fused, tp, cp)
    if block_key:  # the real block, measured: recompute and dispatch included (cpu_measured.py)
        layer_compute = block_seconds(cpu["blocks"][block_key], T, s_local)

    # --- communication per layer per micro-batch ---
    exposed_layer: dict[str, float] = {}
    hidden_layer = 0.0  # communication overlapped with compute, per layer and micro-batch
    if tp > 1:  # sequence parallel: 2 all-gathers + 2 reduce-scatters forward, the same backward
        bw, lat = axis_link(layout, ("tp",), hw)
        one = collective_time("all_gather", T * m.dim * act_bytes, tp, bw, lat, p)
        n_coll = 8 + (2 if layout.ac in ("full", "op") else 0)  # the recompute re-gathers its inputs
        comm = n_coll * one
        exposed_layer["tp"] = max(0.0, comm - 3 * gemm) if stack.tp_overlap else comm
        hidden_layer += comm - exposed_layer["tp"]
    if cp > 1:
        exposed_layer["cp"], cp_total = cp_seconds(layout, T * kv * act_bytes / tp, attn, stack, hw, p)
        hidden_layer += cp_total - exposed_layer["cp"]
    shard = layout.dp_shard * cp if stack.fsdp else 1
    _, p_layer = stage_params(m, layout)
    if shard > 1:  # FSDP: all-gather weights (fwd, and bwd if resharded), reduce-scatter grads
        bw, lat = axis_link(layout, ("dp_shard", "cp"), hw)
        reshard = stack.reshard_after_forward if stack.reshard_after_forward is not None else pp == 1
        gather_bytes = 1 if w.precision == "fp8" and stack.fp8_all_gather else act_bytes
        ag = collective_time("all_gather", p_layer / tp * gather_bytes, shard, bw, lat, p)
        rs = collective_time("reduce_scatter", p_layer / tp * reduce_bytes, shard, bw, lat, p)
        fsdp_comm = ag * (2 if reshard else 1) + rs
        # prefetching hides layer i+1's gathers behind layer i's compute (and TP/CP comm)
        exposed_layer["dp_shard"] = max(0.0, fsdp_comm - layer_compute) + ag / max(1, m.n_layers)
        hidden_layer += min(fsdp_comm, layer_compute)

    layers_stage = m.n_layers / pp
    host = (p.ops_per_layer_fused if stack.fused else p.ops_per_layer_eager) * hw.host_overhead_s
    if layout.ac in ("full", "op"):  # the recomputed forward re-launches its ~1/3 of the layer's kernels
        host *= 1.3
    gpu_layer = layer_compute + sum(exposed_layer.values())
    host_exposed_layer = max(0.0, host - gpu_layer)  # the CPU cannot run ahead of a too-fast GPU
    if cpu and cpu.get("ops"):  # one core runs dispatch and compute in sequence: nothing hides
        ops = cpu["ops"]
        n_ops = ops["fwd_per_layer"] + ops["bwd_per_layer"]
        n_ops += {"none": 0.0, "selective": 0.5, "full": 1.0, "op": 1.0}[layout.ac] * ops["fwd_per_layer"]
        if stack.fused:  # not measured: the GPU ratio of fused to eager launches
            n_ops *= p.ops_per_layer_fused / p.ops_per_layer_eager
        host_exposed_layer = n_ops * cpu["op_s"]
    if block_key:  # the measured block already includes its dispatch
        host_exposed_layer = 0.0

    # --- output head + loss (last stage) per micro-batch ---
    head = 3 * gemm_time(T, m.vocab_size / tp, m.dim, peak, hw, p)
    head += 6 * T * m.vocab_size / tp * 4 / (elem_bw if cpu else hw.hbm_bw)  # fp32 softmax cross-entropy passes
    head_key = "head_compiled" if stack.compiled_loss else "head"
    head_measured = bool(cpu and tp == 1 and cpu.get(head_key))
    if head_measured:  # final norm + head + the trainer's loss, measured (cpu_measured.py)
        head = head_seconds(cpu[head_key], T)
    stage_time = layers_stage * gpu_layer + head  # per micro-batch, the slowest (last) stage
    # --- pipeline: m micro-batches + (pp-1)/v bubble ---
    t = StepTime()
    t.compute = n_micro * layers_stage * layer_compute + n_micro * head
    t.recompute = 0.0 if block_key else n_micro * layers_stage * recompute
    if w.precision == "fp8":
        t.fp8_cast = n_micro * layers_stage * fp8_cast_seconds(w, T, tp, stack.fused, hw)
    for k, val in exposed_layer.items():
        t.exposed[k] = n_micro * layers_stage * val
    if pp > 1:
        bubble_frac = (pp - 1) / (v * n_micro)
        t.bubble = bubble_frac * n_micro * stage_time
        bw, lat = axis_link(layout, ("pp",), hw)
        t.exposed["pp"] = 2 * (n_micro + pp - 1) * collective_time("send", T * m.dim * act_bytes / tp, 2, bw, lat, p)
    # --- data-parallel replicas: gradient all-reduce once per step, hidden behind the last backward ---
    p_stage, _ = stage_params(m, layout)
    local_params = p_stage / tp / shard
    if layout.dp_replicate > 1:
        bw, lat = axis_link(layout, ("dp_replicate",), hw)
        ar = collective_time("all_reduce", local_params * reduce_bytes, layout.dp_replicate, bw, lat, p)
        t.exposed["dp_replicate"] = max(0.0, ar - p.dp_overlap * layers_stage * bwd)
        t.interference += p.overlap_interference * (ar - t.exposed["dp_replicate"])
    if not cpu:  # NCCL kernels take SMs and HBM bandwidth from the compute they overlap (GPUs only)
        t.interference += p.overlap_interference * n_micro * layers_stage * hidden_layer
    t.overhead = n_micro * layers_stage * host_exposed_layer + p.step_overhead_s
    t.optimizer = local_params * p.optimizer_bytes_per_param / hw.hbm_bw
    if cpu and cpu.get("ops"):  # counted ops outside the layers x measured seconds per op
        fixed_ops = max(0, cpu["ops"]["fixed"] - (cpu.get("head_ops", 0) if head_measured else 0))
        t.overhead = n_micro * layers_stage * host_exposed_layer + n_micro * fixed_ops * cpu["op_s"]
    if cpu and "optimizer_s_per_param" in cpu:  # measured clip + foreach AdamW
        t.optimizer = cpu.get("optimizer_fixed_s", 0.0) + local_params * cpu["optimizer_s_per_param"]

    mem = estimate_memory(w, layout, hw, stack, p)
    tps = w.global_batch * w.seq_len / t.total / layout.world_size
    mfu = metrics_mfu(tps, flops_per_token(m, w.seq_len), hw.peak_flops.get(w.precision))
    return Estimate(layout, mem, t, tps, mfu, mem.total <= hw.hbm_bytes, n_micro)
