"""Step time (and, through plan/cost_memory.py, memory) of one parallel layout: the planner's
cost model.

Everything model-shaped (parameter counts, FLOPs, activation bytes) comes from
model/flops.py; this file only adds the hardware side: achieved matmul efficiency as a
function of shape, alpha-beta collectives placed on the mesh, overlap, pipeline bubbles and
per-op host overhead; plan/cost_moe.py the mixture-of-experts side. All times are seconds,
sizes bytes, rates FLOP/s or bytes/s. docs/planner.md derives every formula; the constants in
`Params` (plan/cost_types.py) are the ONE global set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scaletrain.config.schema import ModelConfig
from scaletrain.model.flops import _dims as attention_dims  # (head_dim, q_dim, kv_dim): flops' one definition
from scaletrain.model.flops import (activation_bytes_per_layer, ffn_activation_bytes, flops_per_token,
                                    forward_flops_per_layer, is_mla, moe_dispatch_bytes, moe_layer_count, param_counts)
from scaletrain.model.flops_mla import mla_gathered_width, mla_kv_widths, mla_projections
from scaletrain.parallel.dims import MESH_DIMS
from scaletrain.plan import cost_moe
from scaletrain.plan.cost_memory import Stage, cp_gathered_kv_bytes, estimate_memory, stages
from scaletrain.plan.cost_moe import ParamSplit, group_link, local_params
from scaletrain.plan.cost_types import (FITTED, FP8_CAST_BYTES, PARAMS, Estimate, Layout, Memory, Params,
                                        Stack, StepTime, Workload, cpu_model, is_cpu)
from scaletrain.plan.cpu_measured import block_seconds, head_seconds, measured_block_key
from scaletrain.plan.hardware import Hardware
from scaletrain.train.metrics import mfu as metrics_mfu

__all__ = ["FITTED", "FP8_CAST_BYTES", "PARAMS", "Estimate", "Layout", "Memory", "Params", "Stack", "Stage",
           "StepTime", "Workload", "attention_gemms", "axis_link", "collective_time", "cp_gathered_kv_bytes",
           "cpu_model", "ep_seconds", "estimate", "estimate_memory", "gemm_time", "is_cpu", "stages"]


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
    return group_link(math.prod(getattr(layout, a) for a in axes), inner, hw)


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


def attention_gemms(m: ModelConfig, T: float, tp: int) -> list[tuple[str, float, float, float]]:
    """(name, m, n, k) of the attention's linear GEMMs one rank runs forward on a micro-batch of
    `T` tokens, in forward order. Grouped-query attention: the fused wq/wk/wv (column-parallel:
    the heads split over tp) and wo (row-parallel). Multi-head latent attention
    (flops_mla.mla_projections): wq_b, wkv_b split their heads over tp (column), wo its input
    (row); the replicated wq_a, wkv_a run on the rank's T / tp tokens of the sequence shard."""
    if not is_mla(m):
        _, q, kv = attention_dims(m)
        return [("wqkv", T, (q + 2 * kv) / tp, m.dim), ("wo", T, m.dim, q / tp)]
    return [(p.name, T / tp if p.split == "sequence" else T, p.d_out / tp if p.split == "column" else p.d_out,
             p.d_in / tp if p.split == "row" else p.d_in) for p in mla_projections(m)]


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


def fp8_cast_seconds(w: Workload, T: float, tp: int, fused: bool, hw: Hardware, moe: bool = False,
                     ep: int = 1, share: int = 1) -> float:
    """Seconds to quantise one layer's fp8 GEMM operands for one micro-batch (forward + backward):
    the inputs of qkv, wo, w1/w3 (one cast) and w2, the four output gradients and the weights,
    each moving FP8_CAST_BYTES[recipe] bytes per element at HBM bandwidth (memory-bound kernels).
    An MoE layer (`moe`) casts the expert GEMMs' operands instead of the dense FFN's
    (cost_moe.fp8_elements: T k slots, E/ep local experts; T / share tokens under MoE parallel
    folding, cost_moe.moe_token_share)."""
    m = w.model
    _, q, kv = attention_dims(m)
    c = param_counts(m)
    inputs = T * (m.dim + q) / tp  # qkv and wo inputs; column-parallel inputs are cast before the sequence gather
    grads = T * ((q + 2 * kv) + m.dim) / tp
    weights = c["attention_per_layer"] / tp
    if is_mla(m):  # every projection's own input (wq_a/wq and wkv_a share one), output gradient and weight
        projs = mla_projections(m)
        inputs = T * (m.dim + sum(p.d_in for p in projs if p.d_in != m.dim)) / tp
        grads = T * sum(p.d_out for p in projs) / tp
        weights = sum(p.params / (1 if p.split == "sequence" else tp) for p in projs)
    if moe:
        ei, eg, ew = cost_moe.fp8_elements(m, T / share, ep)
        inputs, grads, weights = inputs + ei, grads + eg, weights + ew
    else:
        f = m.ffn_dim
        n_ffn = 3 if m.ffn == "swiglu" else 2
        inputs += T * (m.dim + f) / tp
        grads += T * ((n_ffn - 1) * f + m.dim) / tp
        weights += c["ffn_per_layer"] / tp
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


@dataclass
class LayerTime:
    """Seconds of one layer (dense or MoE) for one micro-batch on one rank."""

    compute: float  # forward + backward + recompute (or the measured CPU block)
    bwd: float  # backward alone (what hides the replicas' all-reduce)
    recompute: float
    fp8_cast: float
    exposed: dict[str, float]  # communication not hidden by compute
    hidden: float  # communication overlapped with compute (it slows the compute: interference)
    host: float  # host launch time not hidden behind the GPU


def estimate(w: Workload, layout: Layout, hw: Hardware, stack: Stack = Stack(), p: Params | None = None) -> Estimate:
    """Memory and step time of `layout` for `w` on `hw` (see docs/planner.md for each term).
    An MoE model's dense and MoE layers are priced apart and weighted by their count."""
    p = p or PARAMS
    m = w.model
    act_bytes = 4 if w.precision == "fp32" else 2
    lin_peak, peak = _peaks(hw, w.precision)
    lp = w.precision  # the linears' precision (fp8: their own MAMF); attention and the head run at `peak`
    tp, cp, pp, v = layout.tp, layout.cp, layout.pp, layout.virtual_stages
    n_micro = max(1, w.global_batch // (layout.dp * layout.micro_batch))
    s_local = w.seq_len // cp
    mb = layout.micro_batch
    T = mb * s_local  # tokens per micro-batch per rank (an MoE FFN sees all of them: replicated over tp)
    _, q, kv = attention_dims(m)
    n_ffn = 3 if m.ffn == "swiglu" else 2
    reduce_bytes = 4 if stack.grad_reduce_fp32 else act_bytes
    cpu = cpu_model(hw)
    counts = param_counts(m)

    def gemm(mm: float, n: float, k: float) -> float:
        return gemm_time(mm, n, k, lin_peak, hw, p, lp)

    # --- attention, the same in every layer (forward seconds per micro-batch) ---
    attn_gemms = [gemm(mm, n, k) for _, mm, n, k in attention_gemms(m, T, tp)]
    gemm_attn = sum(attn_gemms)
    f = forward_flops_per_layer(m, w.seq_len, causal=True)
    kernel_eff = (hw.attn_eff_fused if stack.fused_attention else None) or hw.attn_eff or p.attn_eff
    attn_rate = peak * kernel_eff * (1.0 if hw.calibrated else p.attn_eff_scale)
    if cpu and cpu.get("attention"):  # measured fwd+bwd rate at this sequence length
        attn_rate = _log_interp(cpu["attention"], s_local)
    attn = mb * (f["attn_scores"] + f["attn_values"]) / (tp * cp) / attn_rate
    passes = p.elementwise_passes_fused if stack.fused else p.elementwise_passes_eager
    dense_act = activation_bytes_per_layer(m, mb, s_local, act_bytes, "none")
    dense_ffn_act = ffn_activation_bytes(m, mb, s_local, act_bytes)
    # measured CPU blocks are of the dense block only: an MoE model is composed from the terms
    block_key = None if m.moe_experts else measured_block_key(cpu, layout.ac, stack.fused, tp, cp)
    shard = layout.dp_shard * cp if stack.fsdp else 1
    reshard = stack.reshard_after_forward if stack.reshard_after_forward is not None else pp == 1
    gather_bytes = 1 if w.precision == "fp8" and stack.fp8_all_gather else act_bytes
    host_ops = p.ops_per_layer_fused if stack.fused else p.ops_per_layer_eager
    share = cost_moe.moe_token_share(layout, stack)  # ranks splitting a micro-batch's tokens in an MoE layer

    def layer_time(moe: bool) -> LayerTime:
        if moe:  # router (fp32, priced at the bf16 rate), E/ep local experts on T k ep / E rows each, shared
            g = {name: c * (gemm_time(mm, n, k, peak, hw, p) if name == "router" else gemm(mm, n, k))
                 for name, (c, mm, n, k) in cost_moe.expert_gemms(m, T / share, layout.ep,
                                                                  w.expert_imbalance).items()}
            ffn_gemm = sum(g.values())
            w3 = (g["w13"] + g.get("shared_w13", 0.0)) / 2
            # not split by tp (unless folded: each rank's own T / tp tokens)
            ffn_act = ffn_activation_bytes(m, mb, s_local, act_bytes, m.moe_dense_layers) / share
        else:
            ffn_gemm = (n_ffn - 1) * gemm(T, m.ffn_dim / tp, m.dim) + gemm(T, m.dim, m.ffn_dim / tp)
            w3 = gemm(T, m.ffn_dim / tp, m.dim) if n_ffn == 3 else 0.0
            ffn_act = dense_ffn_act / tp
        lin = gemm_attn + ffn_gemm
        elem_bytes = passes * ((dense_act - dense_ffn_act) / tp + ffn_act)
        elem_bw = _log_interp(cpu["elementwise"], elem_bytes) if cpu and cpu.get("elementwise") else hw.hbm_bw
        elem = elem_bytes / elem_bw
        fwd = lin + attn + elem / 3
        bwd = 2 * lin + p.attn_bwd_ratio * attn + 2 * elem / 3
        # selective = parallel/ac.py checkpoints each block's attention module (wq/wk/wv, SDPA, wo);
        # op = torchtitan's op-level SAC: every elementwise op and every second matmul (wk, wo, w3)
        op_sac = gemm(T, kv / tp, m.dim) + gemm(T, m.dim, q / tp) + w3 + elem / 3
        if is_mla(m):  # every second matmul of the block: the alternation runs on into the FFN
            ffn_rec = w3 if moe or len(attn_gemms) % 2 == 0 else (
                ffn_gemm - w3 if n_ffn == 3 else gemm(T, m.ffn_dim / tp, m.dim))
            op_sac = sum(attn_gemms[1::2]) + ffn_rec + elem / 3
        recompute = {"none": 0.0, "selective": gemm_attn + attn, "full": fwd, "op": op_sac}[layout.ac]
        compute = fwd + bwd + recompute
        if block_key:  # the real block, measured: recompute and dispatch included (cpu_measured.py)
            compute = block_seconds(cpu["blocks"][block_key], T, s_local)
        cast = fp8_cast_seconds(w, T, tp, stack.fused, hw, moe, layout.ep, share) if w.precision == "fp8" else 0.0

        # --- communication per layer per micro-batch ---
        exposed: dict[str, float] = {}
        hidden = 0.0
        if tp > 1:  # sequence parallel: 2 all-gathers + 2 reduce-scatters forward, the same backward
            bw, lat = axis_link(layout, ("tp",), hw)
            one = collective_time("all_gather", T * m.dim * act_bytes, tp, bw, lat, p)
            comm = (8 + (2 if layout.ac in ("full", "op") else 0)) * one  # the recompute re-gathers its inputs
            if is_mla(m):  # the attention gathers its latents, not its input (flops_mla.mla_gathered_width)
                latents = collective_time("all_gather", T * mla_gathered_width(m) * act_bytes, tp, bw, lat, p)
                comm += (2 + (1 if layout.ac in ("full", "op") else 0)) * (latents - one)
            exposed["tp"] = max(0.0, comm - 3 * lin) if stack.tp_overlap else comm
            hidden += comm - exposed["tp"]
        if cp > 1:
            kv_width = sum(mla_kv_widths(m)) / 2 if is_mla(m) else kv  # mean of the K and V widths
            exposed["cp"], cp_total = cp_seconds(layout, T * kv_width * act_bytes / tp, attn, stack, hw, p)
            hidden += cp_total - exposed["cp"]
        split = cost_moe.layer_split(counts, moe, m)
        groups = [(split.tp / tp + split.replicated, shard, axis_link(layout, ("dp_shard", "cp"), hw))]
        if moe and stack.fsdp:  # the local experts' own FSDP group (parallel/ep.py: efsdp)
            size, stride = cost_moe.ep_groups(layout, stack)["expert_shard"]
            groups.append((split.experts / layout.ep, size, group_link(size, stride, hw)))
        fsdp_comm = first_gather = 0.0
        for n_params, ranks, (bw, lat) in groups:  # FSDP: gather weights (fwd, and bwd if resharded), scatter grads
            if ranks > 1:
                ag = collective_time("all_gather", n_params * gather_bytes, ranks, bw, lat, p)
                fsdp_comm += ag * (2 if reshard else 1) + collective_time("reduce_scatter", n_params * reduce_bytes,
                                                                          ranks, bw, lat, p)
                first_gather += ag
        if fsdp_comm:  # prefetching hides layer i+1's gathers behind layer i's compute (and TP/CP comm)
            exposed["dp_shard"] = max(0.0, fsdp_comm - compute) + first_gather / max(1, m.n_layers)
            hidden += min(fsdp_comm, compute)
        if moe and layout.ep > 1:  # token dispatch and combine: the experts wait for their rows
            exposed["ep"] = ep_seconds(w, layout, hw, p, stack)
        host = host_ops * hw.host_overhead_s * (1.3 if layout.ac in ("full", "op") else 1.0)
        # the CPU cannot run ahead of a too-fast GPU (a recomputed forward re-launches ~1/3 of the kernels)
        host_exposed = max(0.0, host - compute - sum(exposed.values()))
        if cpu and cpu.get("ops"):  # one core runs dispatch and compute in sequence: nothing hides
            ops = cpu["ops"]
            n_ops = ops["fwd_per_layer"] + ops["bwd_per_layer"]
            n_ops += {"none": 0.0, "selective": 0.5, "full": 1.0, "op": 1.0}[layout.ac] * ops["fwd_per_layer"]
            if stack.fused:  # not measured: the GPU ratio of fused to eager launches
                n_ops *= p.ops_per_layer_fused / p.ops_per_layer_eager
            host_exposed = n_ops * cpu["op_s"]
        if block_key or (stack.cuda_graphs and not cpu):  # measured block: dispatch included; graphs: no launches
            host_exposed = 0.0
        elif moe and not cpu:  # the dispatch's host sync (again in a fully recomputed forward): the
            # layer's launches run with the GPU idle (a counted prior x the fitted moe_host_scale)
            host_exposed += p.moe_host_scale * cost_moe.moe_host_prior_s(host_ops, hw) * (
                2 if layout.ac == "full" else 1)
        return LayerTime(compute, bwd, 0.0 if block_key else recompute, cast, exposed, hidden, host_exposed)

    kinds = [(m.n_layers - moe_layer_count(m), layer_time(False))]
    if m.moe_experts:
        kinds.append((moe_layer_count(m), layer_time(True)))
    layers_stage = m.n_layers / pp

    def per_stage(get) -> float:
        """Seconds of one micro-batch through one stage's layers (their dense/MoE mix on average)."""
        return sum(n * get(lt) for n, lt in kinds) / m.n_layers * layers_stage

    # --- output head + loss (last stage) per micro-batch ---
    head = 3 * gemm_time(T, m.vocab_size / tp, m.dim, peak, hw, p)
    elem_bw = _log_interp(cpu["elementwise"], passes * dense_act / tp) if cpu and cpu.get("elementwise") else hw.hbm_bw
    head += 6 * T * m.vocab_size / tp * 4 / elem_bw  # fp32 softmax cross-entropy passes
    head_key = "head_compiled" if stack.compiled_loss else "head"
    head_measured = bool(cpu and tp == 1 and cpu.get(head_key))
    if head_measured:  # final norm + head + the trainer's loss, measured (cpu_measured.py)
        head = head_seconds(cpu[head_key], T)
    # the slowest (last) stage, per micro-batch
    stage_time = per_stage(lambda lt: lt.compute + sum(lt.exposed.values())) + head
    # --- pipeline: m micro-batches + (pp-1)/v bubble ---
    t = StepTime()
    t.compute = n_micro * (per_stage(lambda lt: lt.compute) + head)
    t.recompute = n_micro * per_stage(lambda lt: lt.recompute)
    if w.precision == "fp8":
        t.fp8_cast = n_micro * per_stage(lambda lt: lt.fp8_cast)
    for k in dict.fromkeys(k for _, lt in kinds for k in lt.exposed):
        t.exposed[k] = n_micro * per_stage(lambda lt: lt.exposed.get(k, 0.0))
    if pp > 1:
        t.bubble = (pp - 1) / (v * n_micro) * n_micro * stage_time
        bw, lat = axis_link(layout, ("pp",), hw)
        t.exposed["pp"] = 2 * (n_micro + pp - 1) * collective_time("send", T * m.dim * act_bytes / tp, 2, bw, lat, p)
    # --- data-parallel replicas: gradient all-reduce once per step, hidden behind the last backward ---
    heaviest = max(stages(m, layout, counts), key=lambda st: local_params(st.params, layout, stack))
    local = local_params(heaviest.params, layout, stack)
    ar = replica_all_reduce_seconds(heaviest.params, layout, stack, hw, reduce_bytes, p)
    if ar:
        t.exposed["dp_replicate"] = max(0.0, ar - p.dp_overlap * per_stage(lambda lt: lt.bwd))
        t.interference += p.overlap_interference * (ar - t.exposed["dp_replicate"])
    if not cpu:  # NCCL kernels take SMs and HBM bandwidth from the compute they overlap (GPUs only)
        t.interference += p.overlap_interference * n_micro * per_stage(lambda lt: lt.hidden)
    t.overhead = n_micro * per_stage(lambda lt: lt.host) + p.step_overhead_s
    t.optimizer = local * p.optimizer_bytes_per_param / hw.hbm_bw
    if cpu and cpu.get("ops"):  # counted ops outside the layers x measured seconds per op
        fixed_ops = max(0, cpu["ops"]["fixed"] - (cpu.get("head_ops", 0) if head_measured else 0))
        t.overhead = n_micro * per_stage(lambda lt: lt.host) + n_micro * fixed_ops * cpu["op_s"]
    if cpu and "optimizer_s_per_param" in cpu:  # measured clip + foreach AdamW
        t.optimizer = cpu.get("optimizer_fixed_s", 0.0) + local * cpu["optimizer_s_per_param"]

    mem = estimate_memory(w, layout, hw, stack, p)
    tps = w.global_batch * w.seq_len / t.total / layout.world_size
    mfu = metrics_mfu(tps, flops_per_token(m, w.seq_len), hw.peak_flops.get(w.precision))
    return Estimate(layout, mem, t, tps, mfu, mem.total <= hw.hbm_bytes, n_micro)


def ep_seconds(w: Workload, layout: Layout, hw: Hardware, p: Params = PARAMS, stack: Stack = Stack()) -> float:
    """Expert-parallel communication of one MoE layer and micro-batch, none of it hidden: the
    counts and the token rows dispatched and combined in forward, their gradients in backward,
    and the forward's again under full AC (flops.moe_dispatch_bytes). The busiest rank receives
    `expert_imbalance` x the mean and every rank waits for it."""
    act_bytes = 4 if w.precision == "fp32" else 2
    b = moe_dispatch_bytes(w.model, layout.micro_batch, w.seq_len // layout.cp, layout.ep, act_bytes)
    share = cost_moe.moe_token_share(layout, stack)  # folded: this rank routes its T / tp tokens
    b = {k: v if k == "counts" else v / share for k, v in b.items()}
    size, stride = cost_moe.ep_groups(layout, stack)["ep"]

    def a2a(nbytes: float) -> float:
        return cost_moe.all_to_all_seconds(nbytes, size, stride, hw, p.comm_eff)

    rows = b["dispatch"] + b["combine"]
    recompute = layout.ac == "full"
    return ((1 + recompute) * (a2a(b["counts"]) + a2a(rows * w.expert_imbalance))
            + a2a((b["combine_grad"] + b["dispatch_grad"]) * w.expert_imbalance))


def replica_all_reduce_seconds(params: ParamSplit, layout: Layout, stack: Stack, hw: Hardware, nbytes: float,
                               p: Params = PARAMS) -> float:
    """Seconds of the once-per-step gradient all-reduce of a stage's local shard (`nbytes` per
    gradient element): the non-expert part over the dp_replicate replicas, the routed experts
    over their own group (cost_moe.ep_groups "expert_reduce": the replicas under FSDP, the
    expert-data-parallel ranks without it), one after the other on the same links."""
    shard = cost_moe.dense_shard(layout, stack)
    out = 0.0
    if layout.dp_replicate > 1:
        bw, lat = axis_link(layout, ("dp_replicate",), hw)
        out += collective_time("all_reduce", (params.tp / layout.tp + params.replicated) / shard * nbytes,
                               layout.dp_replicate, bw, lat, p)
    size, stride = cost_moe.ep_groups(layout, stack)["expert_reduce"]
    if params.experts and size > 1:
        bw, lat = group_link(size, stride, hw)
        out += collective_time("all_reduce", params.experts / cost_moe.expert_shard(layout, stack) * nbytes,
                               size, bw, lat, p)
    return out
