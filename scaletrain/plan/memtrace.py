"""Peak live tensor memory on the CPU: the analogue of `torch.cuda.max_memory_allocated`.

On CUDA the caching allocator counts the bytes of every live tensor allocation, which is what
the planner's memory model describes. On the CPU the trainer can only report the process peak
RSS (interpreter, libraries, freed heap pages). `TensorMemoryTracker` measures the CPU
counterpart of the CUDA number:

* **State at the start of the window** (`state`): the storages of the model parameters and
  buffers and of the optimizer state, each storage counted once (views, tied weights and
  DTensor/FSDP shards that share a storage are one allocation). For a DTensor the local
  tensor's storage is counted (what this rank holds).
* **Every allocation and free inside the window**, from torch's own CPU allocator (c10's
  `DefaultCPUAllocator` reports each allocation with its pointer and size to the profiler when
  `torch.profiler.profile(profile_memory=True)` is on). This sees what a dispatch-mode tracker
  cannot: buffers of torch.compile/inductor kernels, scratch tensors allocated inside an op
  (flash-attention backward, foreach optimizer temporaries, FSDP all-gather/reduce-scatter
  buffers, storage resizes), exactly as the CUDA allocator would.

Peak live tensor bytes = state bytes + the highest running sum of the window's allocations
minus frees. Frees of allocations made before the window (earlier steps' scalars) are not
reported by the allocator and are ignored; the state is counted from the objects instead.
The allocator reports only on threads that run with the profiler enabled (the training loop's
thread: forward, CPU backward, optimizer; not gloo's worker threads or the data loader's):
a collective buffer whose last reference a gloo work object drops on its worker thread shows
no free, and `_events` closes such lifetimes at a bound (see there; `unobserved_frees`).

Categories at the peak: `params` (parameters + buffers), `optimizer` (optimizer state),
`grads` (the allocations that are `.grad` of a parameter when an optimizer step starts:
captured by a global optimizer step pre-hook), `activations` (allocated in forward and still
alive: saved tensors, logits, loss), `backward` (allocated by the autograd engine and not a
gradient: activation gradients, recomputed activations under AC, kernel scratch), `comm`
(allocated inside FSDP/c10d ranges: all-gathered parameters, reduce-scatter buffers),
`optimizer_temp` (allocated inside `Optimizer.step` and not kept as state) and `other`.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

CATEGORIES = ("params", "optimizer", "grads", "activations", "backward", "comm", "optimizer_temp", "other")
STEP_RANGE = "scaletrain::measured_step"
_BACKWARD = "autograd::engine::evaluate_function"
_OPTIMIZER = "Optimizer.step#"
_COMM = ("FSDP::", "fsdp::", "c10d::", "_c10d_functional::", "nccl:", "gloo:", "DDP::")
_COLLECTIVE = _COMM + ("Redistribute", "autograd::engine::evaluate_function: RedistributeBackward")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding this rank's bytes (a DTensor's local shard)."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of the storage behind `t`; None for meta/empty storages."""
    t = _local(t)
    if t.device.type == "meta":
        return None
    st = t.untyped_storage()
    if st.nbytes() == 0:
        return None
    return st.data_ptr(), st.nbytes()


def unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (each storage counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        k = storage_key(t)
        if k is not None:
            seen[k[0]] = max(seen.get(k[0], 0), k[1])
    return sum(seen.values())


def _optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _inner_optimizers(opt: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers of `opt` (a torch optimizer or one holding several: `.optimizers`)."""
    if isinstance(opt, torch.optim.Optimizer):
        return [opt]
    return [o for o in getattr(opt, "optimizers", []) if isinstance(o, torch.optim.Optimizer)]


@dataclass
class TensorPeak:
    """Peak live tensor bytes of the measured window and its breakdown at that peak (bytes)."""

    peak_bytes: int
    at_peak: dict[str, int]
    phase: str  # category of the allocation that reached the peak ("activations", "backward", ...)
    state_bytes: dict[str, int]  # parameters/buffers and optimizer state at the window start
    step_peaks: list[int] = field(default_factory=list)  # peak of each measured step
    allocations: int = 0  # allocator events seen in the window
    top: list[tuple[str, str, int, int]] = field(default_factory=list)  # at the peak: (category, op, count, bytes)
    unobserved_frees: int = 0  # frees the allocator did not report (another thread): closed by _events' rules
    unobserved_free_bytes: int = 0
    unreleased_bytes: int = 0  # allocated in the window, not state, and still alive at its end (should be ~0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Alloc:
    ptr: int
    size: int
    start: int  # ns
    end: float  # ns (inf: still alive at the end)
    kind: str  # "forward" | "backward" | "optimizer" | "comm" (from the enclosing ranges)
    op: str  # the outermost op or range that allocated it
    op_end: int  # ns: end of that outermost op or range
    collective: bool  # allocated inside a collective or a DTensor redistribution


class TensorMemoryTracker:
    """Context manager measuring peak live tensor bytes of the code it wraps.

    `modules` and `optimizers` define the state counted at entry; wrap each training step in
    `with tracker.step():` to also get per-step peaks. The result is `tracker.result`.
    """

    def __init__(self, modules: Iterable[nn.Module], optimizers: Iterable[Any] = ()):
        self.modules = list(modules)
        self.optimizers = [o for opt in optimizers for o in _inner_optimizers(opt)]
        self.result: TensorPeak | None = None
        self._grad_ptrs: list[set[int]] = []  # per optimizer step, in order
        self._state_ptrs: set[int] = set()
        self._hooks: list[Any] = []
        self._prof = None

    # -- state ----------------------------------------------------------------------------
    def _state(self) -> dict[str, int]:
        """Bytes of the parameters + buffers and of the optimizer state, each storage once."""
        params = [t for m in self.modules for t in (*m.parameters(), *m.buffers())]
        opt = [t for o in self.optimizers for t in _optimizer_tensors(o)]
        seen: dict[int, tuple[str, int]] = {}
        for cat, tensors in (("params", params), ("optimizer", opt)):
            for t in tensors:
                k = storage_key(t)
                if k is not None and k[0] not in seen:
                    seen[k[0]] = (cat, k[1])
        out = dict.fromkeys(("params", "optimizer"), 0)
        for cat, n in seen.values():
            out[cat] += n
        return out

    def _pre_step(self, optimizer, args, kwargs) -> None:
        ptrs = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    k = storage_key(p.grad)
                    if k is not None:
                        ptrs.add(k[0])
        self._grad_ptrs.append(ptrs)

    def _post_step(self, optimizer, args, kwargs) -> None:
        for t in _optimizer_tensors(optimizer):
            k = storage_key(t)
            if k is not None:
                self._state_ptrs.add(k[0])

    @contextlib.contextmanager
    def step(self):
        """Mark one training step (for per-step peaks)."""
        with torch.profiler.record_function(STEP_RANGE):
            yield

    def __enter__(self) -> "TensorMemoryTracker":
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._state_bytes = self._state()
        self._hooks = [register_optimizer_step_pre_hook(self._pre_step),
                       register_optimizer_step_post_hook(self._post_step)]
        # record_shapes: the tensor arguments of collectives (which buffers a work object holds)
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                            record_shapes=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._prof.__exit__(*exc)
        finally:
            for h in self._hooks:
                h.remove()
        if exc[0] is None:
            self.result = self._analyse()

    # -- analysis -------------------------------------------------------------------------
    def _events(self) -> tuple[list[_Alloc], list[tuple[int, int]], list[tuple[int, int]]]:
        """(allocations with lifetimes, optimizer-step ranges, measured-step ranges)."""
        from torch._C._profiler import _EventType, _TensorMetadata

        tree = self._prof.profiler.kineto_results.experimental_event_tree()
        raw: list[tuple[int, int, int, str, str, int, bool]] = []  # (time, ptr, size, kind, op, op end, coll.)
        uses: dict[int, list[tuple[int, int]]] = {}  # storage ptr -> (start, end of the outermost op) of collectives
        opt_ranges: list[tuple[int, int]] = []
        step_ranges: list[tuple[int, int]] = []
        stack = [(root, "forward", "", 0, False) for root in tree]
        while stack:
            ev, kind, op, op_end, coll = stack.pop()
            typed = ev.typed
            if typed[0] == _EventType.Allocation:
                f = typed[1]
                if f.device.type == "cpu" and f.alloc_size:
                    raw.append((ev.start_time_ns, int(f.ptr), int(f.alloc_size), kind, op, op_end, coll))
                continue
            name = ev.name
            if not op and name != STEP_RANGE:
                op, op_end = name, ev.end_time_ns
            if typed[0] == _EventType.TorchOp and name.startswith(_COMM):  # a collective's tensor arguments
                for arg in typed[1].inputs:
                    for m in (arg if isinstance(arg, list) else [arg]):
                        if isinstance(m, _TensorMetadata) and m.storage_data_ptr:
                            uses.setdefault(int(m.storage_data_ptr), []).append((ev.start_time_ns, op_end))
            coll = coll or name.startswith(_COLLECTIVE)
            if name.startswith(_OPTIMIZER):
                kind = "optimizer"
                opt_ranges.append((ev.start_time_ns, ev.end_time_ns))
            elif name == STEP_RANGE:
                step_ranges.append((ev.start_time_ns, ev.end_time_ns))
            elif kind != "comm" and name.startswith(_COMM):
                kind = "comm"
            elif kind == "forward" and name.startswith(_BACKWARD):
                kind = "backward"
            stack.extend((c, kind, op, op_end, coll) for c in ev.children)
        raw.sort(key=lambda r: (r[0], r[2] > 0))  # at equal times frees first: never a false peak
        # The allocator reports a free only on a thread with the profiler on. A collective's
        # buffers (its scratch, its inputs and outputs) whose last reference the gloo/NCCL work
        # object drops on its own worker thread show no free. Such a lifetime is closed at the
        # earliest of: (1) the next allocation at the same address (it must have been freed);
        # (2) for a buffer allocated inside a collective or DTensor redistribution, the end of
        # that op; (3) for a buffer passed to a collective, the end of the op around its last
        # such use. Counted in `unobserved_frees`; anything left is reported as unreleased.
        self._unobserved = [0, 0]
        live: dict[int, _Alloc] = {}
        allocs: list[_Alloc] = []

        def close(a: _Alloc, t: float) -> None:
            a.end = max(t, a.start)
            self._unobserved[0] += 1
            self._unobserved[1] += a.size

        for t, ptr, size, kind, op, op_end, coll in raw:
            if size > 0:
                old = live.get(ptr)
                if old is not None:  # (1) the address was free again
                    close(old, t)
                a = _Alloc(ptr, size, t, float("inf"), kind, op, op_end, coll)
                live[ptr] = a
                allocs.append(a)
            else:
                a = live.pop(ptr, None)
                if a is not None:
                    a.end = t
        for a in live.values():
            if a.collective and a.op_end:  # (2)
                close(a, a.op_end)
            elif a.ptr in uses:  # (3)
                later = [end for start, end in uses[a.ptr] if start >= a.start]
                if later:
                    close(a, max(later))
        return allocs, sorted(opt_ranges), sorted(step_ranges)

    def _analyse(self) -> TensorPeak:
        allocs, opt_ranges, step_ranges = self._events()
        category: dict[int, str] = {}
        for i, a in enumerate(allocs):  # gradients: live at the start of an optimizer step
            for (t0, _), ptrs in zip(opt_ranges, self._grad_ptrs):
                if a.ptr in ptrs and a.start <= t0 < a.end:
                    category[i] = "grads"
            if i not in category:
                if a.kind == "optimizer" and a.ptr in self._state_ptrs and a.end == float("inf"):
                    category[i] = "optimizer"  # state created in the window (first step)
                else:
                    category[i] = {"forward": "activations", "backward": "backward", "comm": "comm",
                                   "optimizer": "optimizer_temp"}.get(a.kind, "other")
        points = sorted([(a.start, 1, i) for i, a in enumerate(allocs)]
                        + [(a.end, 0, i) for i, a in enumerate(allocs) if a.end != float("inf")])
        state = sum(self._state_bytes.values())
        cur = dict.fromkeys(CATEGORIES, 0)
        cur["params"], cur["optimizer"] = self._state_bytes["params"], self._state_bytes["optimizer"]
        total = state
        peak, at_peak, phase, peak_time = state, dict(cur), "state", None
        step_peaks = [state] * len(step_ranges)
        for t, is_alloc, i in points:
            c = category[i]
            before = total
            delta = allocs[i].size if is_alloc else -allocs[i].size
            cur[c] += delta
            total += delta
            if is_alloc and total > peak:
                peak, at_peak, phase, peak_time = total, dict(cur), c, (t, i)
            for k, (s0, s1) in enumerate(step_ranges):
                if s0 <= t <= s1:
                    step_peaks[k] = max(step_peaks[k], before, total)
        top: dict[tuple[str, str], list[int]] = {}
        if peak_time is not None:  # what was live right after the allocation that set the peak
            t_peak, i_peak = peak_time
            for i, a in enumerate(allocs):
                if (a.start, i) <= (t_peak, i_peak) and (a.end > t_peak or (a.end == t_peak and i == i_peak)):
                    entry = top.setdefault((category[i], a.op), [0, 0])
                    entry[0] += 1
                    entry[1] += a.size
        ranked = sorted(((c, op, n, b) for (c, op), (n, b) in top.items()), key=lambda x: -x[3])
        unreleased = sum(a.size for i, a in enumerate(allocs)
                         if a.end == float("inf") and category[i] not in ("optimizer", "params"))
        return TensorPeak(int(peak), {k: int(v) for k, v in at_peak.items()}, phase,
                          dict(self._state_bytes), [int(p) for p in step_peaks], len(allocs), ranked[:16],
                          self._unobserved[0], self._unobserved[1], int(unreleased))


def format_peak(p: TensorPeak, gib: float = 2.0**30) -> str:
    """One line: peak and its nonzero parts in GiB."""
    parts = ", ".join(f"{k} {v / gib:.3f}" for k, v in p.at_peak.items() if v)
    return f"peak live tensors {p.peak_bytes / gib:.3f} GiB (reached in {p.phase}; at the peak: {parts} GiB)"
