"""Record one unoptimized training step for the cost graph (:mod:`fxmemopt.planning.costgraph`).

:func:`record_step` runs the traced model under a dispatch-level storage recorder that attributes every storage to
the graph node that allocated it (forward) or whose backward allocated it (through autograd sequence numbers), notes
which nodes saved it for backward and when backward last unpacked it, and times each node's forward in a separate
untracked run. The result is a :class:`~fxmemopt.planning.costgraph.StepTrace`: plain data, no fx objects.
"""

from __future__ import annotations

import functools
import statistics
import time
import weakref
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from .. import compat
from ..analysis.state import ModelState
from ..compat import TorchDispatchMode, tree_leaves
from ..planning.costgraph import LOSS, StepTrace, StorageRecord
from .measure import default_loss, gc_paused, reset_states

__all__ = ["forward_node_times", "record_step"]


class _Recorder(TorchDispatchMode):
    """Dispatch-level storage recorder with node attribution (same counting rule as LiveBytesTracker)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self.phase = "fwd"
        self.node = ""
        self.recs: dict[int, dict[str, Any]] = {}
        self.done: list[dict[str, Any]] = []
        self.live = 0
        self.peak = 0
        self.seq_starts: list[int] = []
        self.seq_nodes: list[str] = []
        self.last_bwd_node = LOSS
        self.closed = False  # set when the step is over: later frees (state restore) mean "alive at the end"
        self.created = 0  # storages seen so far: their creation order, the same at every batch size (scaled.py)

    def mark(self) -> int:
        self.events.append((self.phase, self.node))
        return len(self.events) - 1

    def _bwd_node(self) -> str:
        n = compat.current_autograd_node()
        if n is None:
            return self.last_bwd_node
        seq = compat.node_sequence_nr(n)
        k = bisect_right(self.seq_starts, seq) - 1
        if 0 <= k and seq < 2**63:
            self.last_bwd_node = self.seq_nodes[k]
        return self.last_bwd_node

    def _free(self, key: int) -> None:
        rec = self.recs.pop(key, None)
        if rec is not None:
            rec["free"] = None if self.closed else len(self.events) - 1
            self.live -= rec["nbytes"]
            self.done.append(rec)

    def storage_key(self, t: torch.Tensor) -> int | None:
        try:
            return compat.storage_key(t.untyped_storage())
        except (RuntimeError, NotImplementedError):
            return None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = {self.storage_key(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        out = func(*args, **kwargs)
        if self.phase == "bwd":
            self.node = self._bwd_node()
        ev = self.mark()
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key = compat.storage_key(storage)
            if key in self.recs or key in inputs:
                continue
            rec = {"nbytes": storage.nbytes(), "alloc": ev, "free": None, "node": self.node, "seq": self.created,
                   "phase": self.phase, "saved_by": set(), "value_of": None, "consumed": None, "views": []}
            self.recs[key] = rec
            self.created += 1
            self.live += rec["nbytes"]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out


class _RecordingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, rec: _Recorder) -> None:
        super().__init__(gm)
        self.rec = rec
        self.node_events: dict[str, tuple[int, int]] = {}
        # A value nothing uses dies as soon as it is made, as in the GraphModule's own code (``x = None`` right after
        # it): the interpreter frees a value only after its last user, so it would keep an unused one (a neuron's
        # final state that the model drops, and whatever its autograd graph saved) to the end of the forward, and
        # the recording would charge every plan for it (norse's Lift: 0.75 MiB of a SequentialState step).
        for node in gm.graph.nodes:
            if not node.users and node.op != "output":
                self.user_to_last_uses.setdefault(node, []).append(node)

    def run_node(self, n: fx.Node) -> Any:
        rec = self.rec
        rec.node = n.name
        first = len(rec.events)
        rec.seq_starts.append(compat.autograd_sequence_nr())
        rec.seq_nodes.append(n.name)
        result = super().run_node(n)
        for t in tree_leaves(result):
            if isinstance(t, torch.Tensor):
                r = rec.recs.get(rec.storage_key(t))
                if r is not None:
                    if r["value_of"] is None:
                        r["value_of"] = n.name
                    if n.name not in r["views"]:
                        r["views"].append(n.name)
        last = rec.mark()  # end marker: frees after this node's last use land here
        self.node_events[n.name] = (first, last)
        return result


class _TimingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.times: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        t0 = time.perf_counter()
        out = super().run_node(n)
        self.times[n.name] = self.times.get(n.name, 0.0) + time.perf_counter() - t0
        return out


def pack_time_per_value(numel: int = 1 << 20, repeats: int = 3, bits: int = 1) -> float:
    """Seconds to check, pack and later unpack one value (float32) at ``bits`` bits, measured here on ``numel``
    values (best of ``repeats``): what the cost model charges per value a plan packs at that width
    (:mod:`fxmemopt.runtime.packing`; spikes take a faster path than 2 and 8 bits)."""
    from ..runtime.packing import try_pack, unpack

    x = (torch.arange(numel) % 3).clamp_max((1 << bits) - 1).float()  # no draw from the global RNG
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = try_pack(x, bits)
        assert p is not None
        unpack(p)
        best = min(best, time.perf_counter() - t0)
    return best / numel


def copy_time_per_byte(nbytes: int = 1 << 22, repeats: int = 3) -> float:
    """Seconds to copy one byte of a large float tensor here (best of ``repeats`` clones of ``nbytes``): what the
    cost model charges for the copies time slices make (their inputs' parts, their outputs' concatenation)."""
    x = torch.zeros(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.clone()
        best = min(best, time.perf_counter() - t0)
    return best / nbytes


def region_overhead() -> float:
    """Seconds one checkpoint region adds to a training step beyond its recomputed forward, measured here on a
    typical small region (convolution, BatchNorm, a multi-step LIF neuron over 4 steps; the median of seven
    interleaved rounds of ten steps, against the same layers unwrapped): entering the region, snapshots
    (BatchNorm's statistics, the neuron), saved-tensor handles, classifying them at exit, and the replay's context
    in backward. What the cost model
    charges per region; it matters where layers are small. Measured 0.5-1.0 ms on this project's 2-core CPU
    machine: a tiny single-step neuron, which this measured before, gave 0.02-0.4 ms, and SEW-ResNet-18's 21 regions
    (width 0.5, T=4, N=4, 64x64) spent about 1.2 ms each. Listeners of
    :func:`~fxmemopt.runtime.checkpoint.region_events` do not hear this region."""
    import operator

    from ..runtime.checkpoint import CheckpointRegion, RegionSpec, _listeners, release_args
    from ..snn.neuron import LIFNode

    steps, batch, ch, hw = 4, 2, 4, 8
    g = fx.Graph()
    box = g.placeholder("inputs")
    x_node = g.call_function(operator.getitem, (box, 0))
    g.call_function(release_args, (box,))
    flat = g.call_method("flatten", (x_node, 0, 1))
    y = g.call_module("bn", (g.call_module("conv", (flat,)),))
    g.output(g.call_module("sn", (g.call_method("view", (y, steps, batch, ch, hw, hw)),)))
    body = fx.GraphModule({"conv": nn.Conv2d(ch, ch, 3, padding=1, bias=False), "bn": nn.BatchNorm2d(ch),
                           "sn": LIFNode()}, g)
    bn_buffers = tuple(("bn", b) for b in ("running_mean", "running_var", "num_batches_tracked"))
    region = CheckpointRegion(body, RegionSpec("calibration", "sn", ("conv", "bn", "sn"), ("x",), (0,),
                                               (("sn", ()),), bn_buffers, bn_buffers))
    # (no draw from the global RNG)
    x = torch.linspace(0.0, 2.0, steps * batch * ch * hw * hw).view(steps, batch, ch, hw, hw).requires_grad_()

    def ten(step: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        for _ in range(10):
            body.sn.reset()
            step()
        return (time.perf_counter() - t0) / 10

    token = _listeners.set(())
    rounds = []
    try:
        with torch.enable_grad():
            for _ in range(7):  # interleaved, the median of the rounds' differences: steadier than minima
                wrapped_s = ten(lambda: region([x]).sum().backward())
                plain_s = ten(lambda: body([x]).sum().backward())
                forward_s = ten(lambda: body([x]))
                rounds.append(wrapped_s - plain_s - forward_s)  # (the region also runs the forward again)
    finally:
        _listeners.reset(token)
    return max(0.0, statistics.median(rounds))


@functools.lru_cache(maxsize=8)
def machine_costs(threads: int) -> tuple[float, float, float, tuple[tuple[int, float], ...]]:
    """``(pack_time_per_value(), copy_time_per_byte(), region_overhead(), ((2, 2-bit pack time), (8, 8-bit)))``
    on the CPU, measured once per process and torch thread count (they are the machine's, not the model's: about
    0.15 s to measure)."""
    by_bits = tuple((b, pack_time_per_value(1 << 18, bits=b)) for b in (2, 8))
    return pack_time_per_value(), copy_time_per_byte(), region_overhead(), by_bits


def forward_node_times(gm: fx.GraphModule, inputs: Sequence[Any], stateful: dict[str, Sequence[str]], *,
                       repeats: int = 2, warmup: int = 1) -> dict[str, float]:
    """Node -> forward wall time of ``gm`` without grad on ``inputs`` (the fastest of ``repeats`` after ``warmup``
    runs), the model's state, buffers and RNG restored afterwards.

    Without grad a forward keeps only the values still to be used (the interpreter drops each after its last use),
    so this runs at a batch whose training step would not fit (:mod:`fxmemopt.profiling.scaled`)."""
    saved = ModelState.capture(gm, stateful)
    runs, plain = [], []
    with saved.restored_after(), torch.no_grad():
        for _ in range(repeats + warmup):
            saved.restore()
            reset_states(gm)
            timer = _TimingInterpreter(gm)
            timer.run(*inputs)
            runs.append(timer.times)
            saved.restore()
            reset_states(gm)
            t0 = time.perf_counter()
            gm(*inputs)
            plain.append(time.perf_counter() - t0)
    runs, plain = runs[warmup:], plain[warmup:]
    times = {k: min(t.get(k, 0.0) for t in runs) for k in runs[0]}
    total = sum(times.values())
    # node by node adds the interpreter's overhead: scaled to add up to the plain forward (as record_step does)
    scale = min(2.0, max(0.5, min(plain) / total)) if total > 0 else 1.0
    return {k: v * scale for k, v in times.items()}


def record_step(gm: fx.GraphModule, inputs: Sequence[Any], stateful: dict[str, Sequence[str]], *,
                loss_fn: Callable[[Any], torch.Tensor] | None = None, timing_repeats: int = 2) -> StepTrace:
    """Record one unoptimized training step of the traced module ``gm`` (see the module docstring).

    Neuron states are reset first (as :func:`fxmemopt.measure_step` does); buffers, states, gradients and the RNG
    are restored afterwards, so recording has no side effects.

    Args:
        gm: the traced, unoptimized GraphModule (shares modules with the user's model).
        inputs: the example inputs.
        stateful: stateful module paths -> state attribute names.
        loss_fn: output -> scalar loss; default :func:`fxmemopt.profiling.measure.default_loss`.
        timing_repeats: untracked steps and node-by-node forwards timed, interleaved (after one warm-up step); the
            fastest of each counts. 0: no timing (the warm-up step still runs; times are empty and the step time
            0: :mod:`fxmemopt.profiling.scaled` times at another size).

    Returns:
        The :class:`StepTrace`.
    """
    loss_fn = loss_fn or default_loss
    params = list(gm.parameters())
    saved = ModelState.capture(gm, stateful)
    with saved.restored_after():
        def clear() -> None:
            saved.restore()  # every step starts from the same state (plain neurons' rebound attributes included)
            for p in params:
                p.grad = None
            reset_states(gm)

        def backward(loss: torch.Tensor) -> None:
            if loss.requires_grad:  # a model with nothing to train has no backward to record
                loss.backward()

        def timed_nodes(grad: bool) -> dict[str, float]:
            timer = _TimingInterpreter(gm)
            clear()
            with torch.set_grad_enabled(grad):
                timer.run(*inputs)
            return timer.times

        # Timing: one warm-up step, then, interleaved, timed steps (forward timed apart) and node-by-node timed
        # forwards (untracked). The fastest of each is kept (the least disturbed by other work on the machine), and
        # the nodes' times are scaled to add up to the step's own forward: timing node by node adds the
        # interpreter's overhead, and a machine under load slows one measurement and not the other.
        clear()
        backward(loss_fn(gm(*inputs)))
        step_times, forward_times, node_times, nograd_times = [0.0], [0.0], [{}], [{}]
        if timing_repeats > 0:
            step_times, forward_times, node_times, nograd_times = [], [], [], []
        for _ in range(timing_repeats):
            clear()
            t0 = time.perf_counter()
            out = gm(*inputs)
            t1 = time.perf_counter()
            backward(loss_fn(out))
            step_times.append(time.perf_counter() - t0)
            forward_times.append(t1 - t0)
            del out
            node_times.append(timed_nodes(True))
            # and without grad: what a sliced neuron's replays for its slice start states cost (Rule 8)
            nograd_times.append(timed_nodes(False))
        fwd_time = {k: min(t.get(k, 0.0) for t in node_times) for k in node_times[0]}
        fwd_nograd = {k: min(t.get(k, 0.0) for t in nograd_times) for k in nograd_times[0]}
        total = sum(fwd_time.values())
        if total > 0:
            scale = min(2.0, max(0.5, min(forward_times) / total))
            fwd_time = {k: v * scale for k, v in fwd_time.items()}
            fwd_nograd = {k: v * scale for k, v in fwd_nograd.items()}

        clear()
        rec = _Recorder()
        interp = _RecordingInterpreter(gm, rec)

        def on_save(t: torch.Tensor) -> tuple[dict[str, Any] | None, torch.Tensor]:
            r = rec.recs.get(rec.storage_key(t)) if rec.phase == "fwd" else None
            if r is not None:
                r["saved_by"].add(rec.node)
            return r, t

        def on_unpack(packed: tuple[dict[str, Any] | None, torch.Tensor]) -> torch.Tensor:
            r, t = packed
            if r is not None:
                r["consumed"] = len(rec.events) - 1
            return t

        with gc_paused(), rec, compat.saved_tensors_hooks(on_save, on_unpack):
            out = interp.run(*inputs)
            interp.env.clear()  # (the interpreter keeps the output node's value)
            rec.phase, rec.node = "loss", LOSS
            rec.seq_starts.append(compat.autograd_sequence_nr())
            rec.seq_nodes.append(LOSS)
            loss = loss_fn(out)
            # The output is a temporary while backward runs, as in a training loop and measure_step: kept here, the
            # recorded peak was above the measured one by the output's bytes (10% of a 2x2-image model's).
            del out
            rec.phase = "bwd"
            backward(loss)
            del loss
            rec.phase, rec.node = "bwd", LOSS
            rec.mark()
            rec.closed = True
    records = rec.done + list(rec.recs.values())
    # in allocation order (events, then creation within one event): the same at every batch size (scaled.py)
    storages = tuple(StorageRecord(r["nbytes"], r["alloc"], r["free"], r["node"], r["phase"],
                                   tuple(sorted(r["saved_by"])), r["value_of"], r["consumed"], tuple(r["views"]))
                     for r in sorted(records, key=lambda r: (r["alloc"], r["seq"])))
    step_time = min(step_times)
    device = next((t.device for t in tree_leaves(list(inputs)) if isinstance(t, torch.Tensor)), None)
    on_cpu = device is None or device.type == "cpu"
    costs = machine_costs(torch.get_num_threads()) if on_cpu else (0.0, 0.0, 0.0, ())
    return StepTrace(tuple(rec.events), storages, interp.node_events, fwd_time, step_time, rec.peak, *costs,
                     fwd_nograd_time_s=fwd_nograd)
