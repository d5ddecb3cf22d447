"""Stage 4, *costgraph*: predict the peak memory and extra compute of a plan without running it.

What the graph encodes
    One instrumented training step of the *unoptimized* traced model
    (:func:`fxmemopt.profiling.record.record_step`) records every tensor storage allocated during the step: its
    size, the event at which it was allocated and freed, the graph node that allocated it (forward) or whose
    backward allocated it (backward, attributed through autograd sequence numbers), the graph nodes whose
    operations saved it for backward, and whether it is a node's output value. :func:`build_cost_graph` puts this
    on a networkx ``DiGraph`` keyed by node names: each node carries its facts (bytes, shape, value set, whether it
    is a neuron), the storages it allocated, its forward events and forward time; edges are data dependencies; the
    graph carries the step's event order. :func:`simulate` and the search (:mod:`fxmemopt.planning.search`) read
    nothing else (:func:`facts` gives the nodes' facts back as an :class:`~fxmemopt.analysis.facts.AnnotatedGraph`
    for the region helpers).

Why a trace replay
    The unoptimized step replays exactly (same events, same lifetimes), so the baseline prediction is the measured
    peak. A plan changes lifetimes in a few well-defined ways (NOTE [Checkpoint region invariants] in
    :mod:`fxmemopt.runtime.checkpoint`), which :func:`simulate` applies to the recorded lifetimes:

    * tensors saved only by nodes inside checkpoint regions die when their region's forward returns, and are
      re-created when the region recomputes (just before its first backward event), then die when backward
      unpacks them (recorded per storage); those the recorded backward never unpacked (a neuron's last state
      update) are not recomputed;
    * a region's temporaries and outputs reappear during its recomputation at the same relative moments, up to
      the allocation of the last saved tensor backward uses (recomputation stops there);
    * packed inputs are allocated when a region is entered (plus a transient for the check and packing) and live
      until the region's backward has run; inputs kept by reference live to the end of the step (the frame lives
      until the neuron's state is reset);
    * a packed-saves region (Rule 11) keeps, for each spike value its node saves, only the payload, from the node's
      forward until backward last reads the value (plus the packing's transient, and a full unpacked copy at that
      read); the value itself dies at its natural release when nothing else saves it.

    Compute: a checkpointed region runs its forward twice; the extra time is the sum of its nodes' forward times
    (timed node by node in separate untracked forwards, scaled to add up to the step's own forward), plus what the
    recording measured on this machine: packing per value packed (per width), copying per byte sliced (Rule 8's
    parts and concatenations), each region's own overhead; a sliced neuron's no-grad replays cost its forward
    timed without grad, per slice replayed.

Known limitations
    The prediction is for the example inputs (memory scales with batch and T, so record at the size you train
    at). Allocations inside a single kernel (workspaces) are invisible to both the recorder and the CPU tracker;
    on CUDA the caching allocator's rounding adds a few percent.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import networkx as nx

from ..analysis.facts import AnnotatedGraph
from ..runtime.packing import PACK_CHUNK, packed_nbytes
from .plan import Plan, RegionPlan, checkpoint_every
from .regions import region_io, side_effects, unit_order

__all__ = ["StorageRecord", "StepTrace", "Prediction", "build_cost_graph", "facts", "simulate",
           "region_working_sets"]

LOSS = "<loss>"


@dataclass(frozen=True)
class StorageRecord:
    """One storage allocated during the recorded step.

    Attributes:
        nbytes: its size.
        alloc: event index at which it was allocated.
        free: event index after which it was freed (``None``: still alive at the end of the step).
        node: graph node that allocated it (forward) or whose backward allocated it.
        phase: ``"fwd"`` or ``"bwd"``.
        saved_by: graph nodes whose operations saved it for backward.
        value_of: the graph node whose output value lives in this storage (``None`` for temporaries).
        consumed: last event at which backward unpacked it (``None``: saved but never used by backward, like a
            neuron's last state update).
        views: every graph node whose output value lives in this storage (``value_of`` and views of it).
    """

    nbytes: int
    alloc: int
    free: int | None
    node: str
    phase: str
    saved_by: tuple[str, ...]
    value_of: str | None
    consumed: int | None = None
    views: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepTrace:
    """A recorded unoptimized training step.

    Attributes:
        events: per event index, ``(phase, node)``; phase is ``"fwd"``, ``"loss"`` or ``"bwd"``.
        storages: every storage allocated during the step.
        node_events: node -> (first, last) forward event index of that node (including its end marker).
        fwd_time_s: node -> forward wall time (separate untracked run, grad enabled).
        step_time_s: wall time of one untracked step.
        peak_bytes: the recorder's own peak (equals :func:`fxmemopt.measure_step`'s on CPU).
        pack_s_per_value: seconds to check, pack and unpack one spike value on this machine (0: not measured).
        copy_s_per_byte: seconds to copy one byte of a large tensor on this machine (0: not measured).
        region_overhead_s: seconds one checkpoint region adds beyond its recomputation (0: not measured).
        pack_s_per_value_by_bits: ``(bits, seconds)`` for the other packing widths (2 and 8 bits take another
            path than spikes: measured 5-10x the time per value); a width not listed costs ``pack_s_per_value``.
        fwd_nograd_time_s: node -> forward wall time without grad (timed like ``fwd_time_s``): what a neuron's
            no-grad replay for slice start states costs (Rule 8). Empty: charged as :data:`NO_GRAD_REPLAY_COST` of
            the forward with grad.
    """

    events: tuple[tuple[str, str], ...]
    storages: tuple[StorageRecord, ...]
    node_events: dict[str, tuple[int, int]]
    fwd_time_s: dict[str, float]
    step_time_s: float
    peak_bytes: int
    pack_s_per_value: float = 0.0
    copy_s_per_byte: float = 0.0
    region_overhead_s: float = 0.0
    pack_s_per_value_by_bits: tuple[tuple[int, float], ...] = ()
    fwd_nograd_time_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Prediction:
    """What :func:`simulate` predicts for a plan.

    Attributes:
        peak_bytes: predicted peak live bytes of a training step (same quantity as ``measure_step``).
        peak_at: ``"phase:node"`` where the peak occurs (``recompute:<region>`` inside a recomputation).
        extra_compute_s: predicted extra step time (recomputed forwards).
        step_time_s: predicted step time (baseline + extra).
        timeline: ``(label, live bytes)`` per simulated position (only when asked for).
    """

    peak_bytes: int
    peak_at: str
    extra_compute_s: float
    step_time_s: float
    timeline: tuple[tuple[str, int], ...] = field(default=(), repr=False)


def build_cost_graph(annotated: AnnotatedGraph, trace: StepTrace) -> nx.DiGraph:
    """The cost graph: a networkx ``DiGraph`` keyed by node names that holds everything planning reads.

    Node attributes (one per traced node, in ``graph.graph["order"]``):

    * ``info``: the node's :class:`~fxmemopt.analysis.facts.NodeInfo` (shape, dtype, bytes, value set, whether it
      is a neuron, T) — plain data;
    * ``storages``: the :class:`StorageRecord` s the node allocated in forward or whose backward allocated them
      (size, allocation and release events, who saved them, when backward last read them);
    * ``fwd_events``: the ``(first, last)`` step events of its forward; ``fwd_time_s``: its forward time;
      ``fwd_nograd_time_s``: its forward time without grad (``None`` when not measured);
    * for drawing and reading: ``op``, ``target``, ``out_bytes``, ``alloc_bytes`` (bytes it allocated in forward),
      ``saved_bytes`` (of those, the bytes saved for backward), ``shape``, ``dtype``, ``value_set`` (a string).

    Storages the step allocated outside any traced node (the loss) sit on a node named ``"<loss>"`` (``info`` None,
    not in ``order``). Edges: data dependencies, with the bytes that flow (``nbytes``). Graph attributes: ``order``
    (the traced order), ``events`` (the step's ``(phase, node)`` sequence: forward, loss, backward),
    ``step_time_s`` (one unoptimized step), ``peak_bytes`` (the recorded peak), ``pack_s_per_value`` (the time
    to pack and unpack one spike value), ``pack_s_per_value_by_bits`` (optional: ``{bits: seconds}`` for the
    other widths), ``copy_s_per_byte`` (to copy one byte) and ``region_overhead_s`` (what a
    region costs beyond its recomputation).

    Nothing in it refers to fx or torch objects: a cost graph can be built by hand, pickled, drawn or saved
    (``nx.write_gml`` with ``stringizer=str``), and :func:`simulate` needs nothing else.
    """
    g = nx.DiGraph(order=annotated.order, events=trace.events, step_time_s=trace.step_time_s,
                   peak_bytes=trace.peak_bytes, pack_s_per_value=trace.pack_s_per_value,
                   copy_s_per_byte=trace.copy_s_per_byte, region_overhead_s=trace.region_overhead_s,
                   pack_s_per_value_by_bits=dict(trace.pack_s_per_value_by_bits))
    by_node: dict[str, list[StorageRecord]] = {}
    for s in trace.storages:
        by_node.setdefault(s.node, []).append(s)
    for name in annotated.order:
        info = annotated[name]
        mine = by_node.pop(name, [])
        fwd = [s for s in mine if s.phase == "fwd"]
        g.add_node(name, info=info, storages=tuple(mine), fwd_events=trace.node_events.get(name),
                   fwd_time_s=trace.fwd_time_s.get(name, 0.0), fwd_nograd_time_s=trace.fwd_nograd_time_s.get(name),
                   op=info.op, target=info.target, out_bytes=info.nbytes, alloc_bytes=sum(s.nbytes for s in fwd),
                   saved_bytes=sum(s.nbytes for s in fwd if s.saved_by), shape=info.shape, dtype=info.dtype,
                   value_set=str(info.value_set))
    for name in annotated.order:
        for i in annotated[name].inputs:
            g.add_edge(i, name, nbytes=annotated[i].nbytes)
    for name in trace.node_events:
        if name not in g:
            by_node.setdefault(name, [])
    for name, rest in by_node.items():  # the loss (and anything else the step ran outside the traced nodes)
        g.add_node(name, info=None, storages=tuple(rest), fwd_events=trace.node_events.get(name),
                   fwd_time_s=trace.fwd_time_s.get(name, 0.0), op="step", target=name, out_bytes=0,
                   alloc_bytes=sum(s.nbytes for s in rest if s.phase == "fwd"), saved_bytes=0, shape=None,
                   dtype=None, value_set="")
    return g


def facts(graph: nx.DiGraph) -> AnnotatedGraph:
    """The traced nodes' facts read back from a cost graph: ``info`` of each node in ``order``, users from its
    out-edges (in order)."""
    order = graph.graph["order"]
    position = {n: i for i, n in enumerate(order)}
    nodes = {n: graph.nodes[n]["info"] for n in order}
    users = {n: tuple(sorted((u for u in graph.successors(n) if u in position), key=position.__getitem__))
             for n in order}
    return AnnotatedGraph(tuple(order), nodes, users)


def _storages(graph: nx.DiGraph) -> list[StorageRecord]:
    """Every storage of the recorded step, in allocation order."""
    return sorted((s for _, rs in graph.nodes(data="storages") for s in rs or ()), key=lambda s: (s.alloc, s.nbytes))


def _fwd_times(graph: nx.DiGraph) -> dict[str, float]:
    return {n: t for n, t in graph.nodes(data="fwd_time_s") if t is not None}


#: A neuron's no-grad replay (slice start states, Rule 8) costs this fraction of its forward with grad, where the
#: cost graph has no measured no-grad forward times (a graph built by hand): measured on this project's LIF neuron,
#: T=8, N=8, 32 ch at 32x32, one thread, one step at a time without grad against all steps with grad: 9.1 vs 13.6 ms.
#: (It was 0.15, read off a whole step's difference; timed directly, the replays of DeepConvSNN's default took
#: 180 ms of a 1.2 s step, where 0.15 predicted about 50 ms.)
NO_GRAD_REPLAY_COST = 0.67

_ELEMENT_SIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
                 "int8": 1, "uint8": 1, "bool": 1}


class _Block(NamedTuple):
    """One recomputation (a replay block, Rules 3 and 8): ``kind`` is ``"all"`` (an unsliced region, or a region on
    whole slices), ``"slice"`` (slice ``index`` of a time-sliced region; the last slice runs first and replays the
    prefix) or ``"prefix"`` (the prefix again, when the slices do not keep it)."""

    region: str
    kind: str
    index: int = 0


@dataclass(frozen=True)
class _Slicing:
    """A time-sliced region (Rule 8): its prefix feeds a neuron recomputed in ``k`` slices of ``sizes`` steps."""

    k: int
    steps: int
    sizes: tuple[int, ...]
    neuron: str
    prefix_nodes: frozenset[str]
    fwd_slice: dict[int, int]  # the neuron's forward events -> the slice they belong to
    out_bytes: int  # the neuron's time-major output (all it returns, or the first of (out, state))
    state_bytes: int  # one slice start state
    every: int  # a start state kept every this many slices by the first replay (checkpoint_every)

    @property
    def replayed_slices(self) -> int:
        """Slices the no-grad replays step the neuron through, as the runtime schedules them (Rule 8): the first
        replay steps slices ``0 .. k-2``; each segment but the last, whose states the first replay keeps, is stepped
        again from its checkpoint (``every - 1`` slices) when backward reaches it. 11 for 8 slices (every 3), 7 with
        every start state kept."""
        last_first = (self.k - 1) - (self.k - 1) % self.every
        return (self.k - 1) + (last_first // self.every) * (self.every - 1)

    def first_block(self, region: str) -> _Block:
        return _Block(region, "slice", self.k - 1)


@dataclass(frozen=True)
class _Replays:
    """Where a plan recomputes: each block's forward events, the backward event each block runs before, the
    time-sliced regions, and the whole-slice regions with the share of T one slice holds (Rule 9)."""

    blocks: dict[_Block, tuple[int, ...]]
    trigger: dict[int, _Block]
    slicing: dict[str, _Slicing]
    whole_share: dict[str, float]
    bwd_events: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class _Layout:
    """The simulated step as positions: the forward in the rewritten order (``pack``/``enter``/``exit`` around each
    region), the loss, then the recorded backward with each replay block inserted before the event that triggers it.

    ``pos`` maps a recorded event to its position; ``rc_pos`` a block's forward events to theirs."""

    labels: tuple[str, ...]
    pos: dict[int, int]
    entry: dict[str, int]
    exit: dict[str, int]
    rc_start: dict[_Block, int]
    rc_pos: dict[_Block, dict[int, int]]
    rc_end: dict[_Block, int]
    bwd_last: dict[str, int]

    @property
    def end(self) -> int:
        return len(self.labels)

    def at(self, event: int | None) -> int:
        """The position of a recorded event (``None`` or an event not simulated: the end of the step)."""
        return self.end - 1 if event is None else self.pos.get(event, self.end - 1)


class _Live:
    """Live bytes per position, accumulated as intervals (a difference array)."""

    def __init__(self, end: int) -> None:
        self.delta = [0] * (end + 2)

    def add(self, nbytes: int, start: int, stop: int) -> None:
        """``nbytes`` alive at positions ``start..stop`` inclusive."""
        if nbytes <= 0 or stop < start:
            return
        self.delta[start] += nbytes
        self.delta[stop + 1] -= nbytes


def _events_of(ne: dict[str, tuple[int, int]], nodes: Iterable[str]) -> list[int]:
    return [e for n in nodes for e in range(ne[n][0], ne[n][1] + 1)]


def _step_ends(storages: Sequence[StorageRecord], neuron: str, first: int, last: int, steps: int,
               step_bytes: int) -> list[int] | None:
    """The forward events at which each time step of a neuron's recorded forward ends, read off its state, or
    ``None`` where the recording does not show them.

    A neuron that rebinds its state every step (``self.v = ...``, or a loop variable) frees the previous step's
    state when it makes the new one: those storages (one step of the output each) form a chain, each freed at the
    event that allocated the next. The last ``steps`` links are the steps' ends (a state made lazily in the first
    step comes before them). Accepted only when every step after the first spans the same number of events (the
    same operations each step, as a loop over time runs): a neuron that keeps every step's state, runs all steps in
    one kernel or varies per step shows no such chain, and its steps are taken as equal shares of its events."""
    mine = [s for s in storages if s.node == neuron and s.phase == "fwd" and first <= s.alloc <= last
            and s.nbytes == step_bytes]
    at = {s.alloc: s for s in mine}
    longest: list[int] = []
    for s in mine:
        chain = [s.alloc]
        while at[chain[-1]].free in at and at[chain[-1]].free > chain[-1] and len(chain) <= steps:
            chain.append(at[chain[-1]].free)  # type: ignore[arg-type]
        longest = max(longest, chain, key=len)
    ends = longest[-steps:]
    if len(ends) < steps or len({b - a for a, b in zip(ends, ends[1:])}) > 1:
        return None
    return ends


def _slice_triggers(storages: Sequence[StorageRecord], neuron: str, fwd_slice: dict[int, int], k: int,
                    events: Sequence[tuple[str, str]]) -> dict[int, int] | None:
    """The backward event before which each slice of a sliced neuron recomputes, or ``None`` where the recording
    does not show it: recomputation runs when backward first unpacks one of the tensors the slice saved (Rule 3; the
    neuron's own saves, not its output saved by the next layer), and a storage's ``consumed`` is the event after
    which backward unpacked it. Slice -> event, the last slice first;
    ``None`` unless every slice has one and they come in that order."""
    found: dict[int, int] = {}
    for s in storages:
        if s.node == neuron and neuron in s.saved_by and s.consumed is not None and s.alloc in fwd_slice:
            c = fwd_slice[s.alloc]
            found[c] = min(found.get(c, s.consumed + 1), s.consumed + 1)
    at = [found.get(c) for c in reversed(range(k))]
    if None in at or any(b <= a for a, b in zip(at, at[1:])) or not all(  # type: ignore[operator]
            e < len(events) and events[e][0] == "bwd" for e in at):  # type: ignore[operator]
        return None
    return found


def _own_storages(storages: Sequence[StorageRecord]) -> dict[str, list[StorageRecord]]:
    """Node -> the storages it allocated, in the order of ``storages``: what a sliced neuron's facts are read from
    (scanning every storage once per sliced region made a simulation quadratic in the depth of the network)."""
    own: dict[str, list[StorageRecord]] = {}
    for s in storages:
        own.setdefault(s.node, []).append(s)
    return own


def _replays(annotated: AnnotatedGraph, regions: Sequence[RegionPlan], ne: dict[str, tuple[int, int]],
             events: Sequence[tuple[str, str]], storages: Sequence[StorageRecord] = (),
             own: dict[str, list[StorageRecord]] | None = None) -> _Replays:
    """Which forward events each region's recomputation replays, and before which backward event.

    An unsliced region is one block, run just before its first backward event. A time-sliced region (prefix ->
    neuron, k slices) has one block per slice, run before that slice's first backward event (the first also replays
    the prefix), and, when the prefix is not kept, a prefix block before the prefix's backward. A slice's forward
    events are its steps' (:func:`_step_ends`) and its block runs when backward first unpacks what it saved
    (:func:`_slice_triggers`), where the recorded ``storages`` show them; otherwise each step is an equal share of
    the neuron's forward and backward events. ``own``: :func:`_own_storages` of ``storages``, if already made."""
    own = _own_storages(storages) if own is None else own
    region_of = {n: r.name for r in regions for n in r.nodes}
    bwd: dict[str, list[int]] = {}
    for e, (phase, node) in enumerate(events):
        if phase == "bwd" and node in region_of:
            bwd.setdefault(node, []).append(e)
    blocks: dict[_Block, tuple[int, ...]] = {}
    trigger: dict[int, _Block] = {}
    slicing: dict[str, _Slicing] = {}
    whole_share: dict[str, float] = {}
    for r in regions:
        neuron = r.nodes[-1] if not r.whole_slices else region_io(annotated, r.nodes)[1][0]
        info = annotated[neuron]
        steps = info.time_steps if not r.whole_slices and r.chunks > 1 else (info.shape or (1,))[0] if info.shape else 1
        k = max(1, min(r.chunks, steps))
        if k == 1 or r.whole_slices:
            # Whole-region slices (Rule 9) are one block whose tensors exist one slice at a time: the region's own
            # forward storages are scaled by the largest slice's share of T (an approximation; its outputs stay whole).
            block = _Block(r.name, "all")
            blocks[block] = tuple(_events_of(ne, r.nodes))
            firsts = [bwd[n][0] for n in r.nodes if bwd.get(n)]
            if firsts:
                trigger.setdefault(min(firsts), block)
            if k > 1:
                whole_share[r.name] = math.ceil(steps / k) / steps
            continue
        sizes = tuple(steps // k + (1 if i < steps % k else 0) for i in range(k))
        bounds = [sum(sizes[:i]) for i in range(k + 1)]

        def slice_of(t: int, bounds: list[int] = bounds) -> int:
            return max(i for i in range(len(bounds) - 1) if bounds[i] <= t)

        first, last = ne[neuron]
        nfwd = last - first + 1
        out_bytes = info.nbytes if info.is_tensor else annotated[info.inputs[0]].nbytes
        ends = _step_ends(own.get(neuron, ()), neuron, first, last, steps, out_bytes // max(1, steps))
        if ends is not None:  # a step ends with the state it makes (the events after the last: the last step's)
            fwd_slice = {e: slice_of(min(steps - 1, bisect.bisect_left(ends, e))) for e in range(first, last + 1)}
        else:
            fwd_slice = {e: slice_of(min(steps - 1, (e - first) * steps // nfwd)) for e in range(first, last + 1)}
        prefix = _events_of(ne, r.nodes[:-1])
        nb = bwd.get(neuron, [])
        unpacked = _slice_triggers(own.get(neuron, ()), neuron, fwd_slice, k, events)
        if unpacked is not None:
            for c, e in unpacked.items():
                trigger.setdefault(e, _Block(r.name, "slice", c))
        else:
            for i, e in enumerate(nb):  # the neuron's backward runs from the last step to the first
                trigger.setdefault(e, _Block(r.name, "slice",
                                             slice_of(steps - 1 - min(steps - 1, i * steps // len(nb)))))
        for c in reversed(range(k)):  # the last slice's block runs first and replays the prefix
            blocks[_Block(r.name, "slice", c)] = tuple((prefix if c == k - 1 else [])
                                                       + [e for e in range(first, last + 1) if fwd_slice[e] == c])
        if not r.keep_prefix:
            blocks[_Block(r.name, "prefix")] = tuple(prefix)
            firsts = [bwd[n][0] for n in r.nodes[:-1] if bwd.get(n)]
            if firsts:
                trigger.setdefault(min(firsts), _Block(r.name, "prefix"))
        # The neuron's time-major output: all it returns, or the first element of (out, state) (norse's LIF), which
        # has the shape of its input. One slice start state: the state a neuron returns (exact), or one time step of
        # its output (an estimate for a state kept in the module, which holds one membrane per output element).
        state_bytes = info.nbytes - out_bytes if not info.is_tensor else out_bytes // max(1, steps)
        slicing[r.name] = _Slicing(k, steps, sizes, neuron, frozenset(r.nodes[:-1]), fwd_slice, out_bytes,
                                   state_bytes, checkpoint_every(k, r.keep_starts))
    return _Replays(blocks, trigger, slicing, whole_share, {n: tuple(es) for n, es in bwd.items()})


def _layout(annotated: AnnotatedGraph, regions: Sequence[RegionPlan], ne: dict[str, tuple[int, int]],
            events: Sequence[tuple[str, str]], replays: _Replays) -> _Layout:
    """Positions of the simulated step (see :class:`_Layout`)."""
    region_of = {n: r.name for r in regions for n in r.nodes}
    labels: list[str] = []
    pos: dict[int, int] = {}
    entry: dict[str, int] = {}
    exit_: dict[str, int] = {}
    inputs_of = {n: annotated[n].inputs for n in annotated.order}
    for unit, members in unit_order(annotated.order, inputs_of, region_of, *side_effects(annotated)):
        if unit in region_of.values():
            entry[unit] = len(labels)
            labels += [f"pack:{unit}", f"enter:{unit}"]
        for n in members:
            for e in range(ne[n][0], ne[n][1] + 1):
                pos[e] = len(labels)
                labels.append(f"fwd:{n}")
        if unit in region_of.values():
            exit_[unit] = len(labels)
            labels.append(f"exit:{unit}")
    fwd_end = max((last for _, last in ne.values()), default=-1)
    for e in range(fwd_end + 1, len(events)):
        if events[e][0] == "loss":
            pos[e] = len(labels)
            labels.append(f"loss:{events[e][1]}")
    # Backward: the recorded order with the replay blocks inserted.
    rc_start: dict[_Block, int] = {}
    rc_pos: dict[_Block, dict[int, int]] = {}
    rc_end: dict[_Block, int] = {}
    bwd_last: dict[str, int] = {}
    for e, (phase, node) in enumerate(events):
        if phase != "bwd":
            continue
        b = replays.trigger.get(e)
        if b is not None and b not in rc_start:
            rc_start[b] = len(labels)
            rc_pos[b] = {}
            for fe in replays.blocks[b]:
                rc_pos[b][fe] = len(labels)
                labels.append(f"recompute:{b.region}")
            rc_end[b] = len(labels)
            labels.append(f"recompute-end:{b.region}")
        pos[e] = len(labels)
        labels.append(f"bwd:{node}")
        if node in region_of:
            bwd_last[region_of[node]] = pos[e]
    for r in regions:  # regions whose backward never ran (nothing required grad through them)
        bwd_last.setdefault(r.name, len(labels) - 1)
    return _Layout(tuple(labels), pos, entry, exit_, rc_start, rc_pos, rc_end, bwd_last)


def _provides(region: RegionPlan, slicing: _Slicing | None, s: StorageRecord) -> list[tuple[_Block, bool]]:
    """The blocks that recompute ``s`` (allocated inside ``region``), and whether each keeps it (if saved)."""
    if slicing is None:
        return [(_Block(region.name, "all"), True)]
    if s.node == slicing.neuron:
        return [(_Block(region.name, "slice", slicing.fwd_slice[s.alloc]), True)]
    first = slicing.first_block(region.name)
    if region.keep_prefix:
        return [(first, True)]
    return [(first, False), (_Block(region.name, "prefix"), True)]


def _recompute_stops(lay: _Layout, storages: Sequence[StorageRecord], by_region: dict[str, RegionPlan],
                     region_of: dict[str, str], replays: _Replays, ne: dict[str, tuple[int, int]]) -> dict[_Block, int]:
    """Where each block's recomputation stops: once the last tensor it must keep is captured (Rule 3), except a
    sliced region's first block, which must finish the prefix to get the neuron's input."""
    stop = dict(lay.rc_start)
    for s in storages:
        home = region_of.get(s.node)
        if s.phase != "fwd" or s.consumed is None or home is None or \
                not any(region_of.get(m) == home for m in s.saved_by):
            continue
        for b, keeps in _provides(by_region[home], replays.slicing.get(home), s):
            if keeps and b in lay.rc_pos:
                stop[b] = max(stop[b], lay.rc_pos[b][s.alloc])
    for r, sl in replays.slicing.items():
        b = sl.first_block(r)
        if b in lay.rc_pos:
            stop[b] = max([stop[b]] + [lay.rc_pos[b][e] for e in _events_of(ne, sl.prefix_nodes) if e in lay.rc_pos[b]])
    return stop


def _prefix_end(lay: _Layout, ne: dict[str, tuple[int, int]], sl: _Slicing, block: _Block) -> int:
    """Where a time-sliced region's first block has finished its prefix: the position of the prefix's last event
    (its last node's end marker, after every operation of the prefix), or the block's start for an empty prefix.
    The parts and start states are made there (Rule 8)."""
    positions = [lay.rc_pos[block][e] for e in _events_of(ne, sl.prefix_nodes) if e in lay.rc_pos[block]]
    return max(positions, default=lay.rc_start[block])


def _charge_region_inputs(live: _Live, annotated: AnnotatedGraph, regions: Sequence[RegionPlan],
                          lay: _Layout) -> dict[str, list[str]]:
    """Packed inputs: allocated when the region is entered (plus a transient for the check and the packing), alive
    until its backward has run. Returns the inputs kept by reference (node -> regions)."""
    kept_by_ref: dict[str, list[str]] = {}
    for r in regions:
        for i, b in zip(region_io(annotated, r.nodes)[0], r.pack_bits):
            info = annotated[i]
            if info.is_tensor and info.op != "get_attr" and b == 0:
                kept_by_ref.setdefault(i, []).append(r.name)
            elif info.is_tensor and b:
                numel = math.prod(info.shape or ())
                live.add(packed_nbytes(numel, b), lay.entry[r.name] + 1, lay.bwd_last[r.name])
                elsize = _ELEMENT_SIZE.get(info.dtype or "", 4)
                # the packing's transient: for 1 bit, two buffers of at most PACK_CHUNK values (the check on the
                # integer view, the bool marks); for 2 and 8 bits, a uint8 copy + the round trip
                transient = min(numel, PACK_CHUNK) * (elsize + 1) if b == 1 else numel * (1 + elsize)
                live.add(transient, lay.entry[r.name], lay.entry[r.name])
    return kept_by_ref


def _waits_per_step(storages: Sequence[StorageRecord], sl: _Slicing, x_bytes: int, bwd_last: int) -> bool:
    """Whether the sliced neuron's recorded backward keeps each time step's input gradient until its end, where one
    operation joins them (a loop over ``x_seq.unbind(0)``, as spikingjelly's ``lif_multi_step`` runs on CPU:
    ``UnbindBackward`` stacks them all at once).

    The sign: storages of the neuron's backward, each at least one step of its input and smaller than its output,
    allocated before its last event and alive until then, that add up to all steps but one at least. Those storages
    are then the slices' gradients, charged with their recorded lifetimes: the sliced run stacks each slice's at the
    end of its backward into a tensor of the same size that lives as long, so charging the slices' gradients again
    would count the neuron's input gradient twice while backward goes through the slices. A neuron whose per-step
    gradient buffers have the input's full size (``x_seq[t]``: ``SelectBackward`` accumulates into one buffer)
    shows no such storages."""
    steps = max(1, sl.steps)
    waiting = sum(st.nbytes for st in storages
                  if st.phase == "bwd" and st.node == sl.neuron and st.free is not None
                  and st.alloc < bwd_last <= st.free and st.nbytes * steps >= x_bytes and st.nbytes < sl.out_bytes)
    return waiting > 0 and waiting * steps >= x_bytes * (steps - 1)


def _charge_slices(live: _Live, annotated: AnnotatedGraph, own: dict[str, list[StorageRecord]], lay: _Layout,
                   replays: _Replays, ne: dict[str, tuple[int, int]],
                   kept_by_ref: dict[str, list[str]]) -> dict[str, StorageRecord]:
    """Time-sliced regions (Rule 8): the concatenation of slice outputs in forward. In backward, the first block
    recomputes the neuron's input, replays the neuron for every slice's start state, and copies the input into one
    part per slice (views instead, when the input is one the region keeps by reference: it is alive anyway); a
    slice's part and start state die when that slice has been recomputed. Returns, per region, the storage of the
    neuron's input recomputed by the prefix (charged here, not again with the storages). ``own``: each node's
    storages (:func:`_own_storages`)."""
    x_storage: dict[str, StorageRecord] = {}
    for r, sl in replays.slicing.items():
        neuron_end = lay.pos[ne[sl.neuron][1]]
        live.add(sl.out_bytes, neuron_end, neuron_end)
        first_b, last_b = sl.first_block(r), _Block(r, "slice", 0)
        if first_b not in lay.rc_start or last_b not in lay.rc_end:
            continue
        x_node = annotated[sl.neuron].inputs[0]
        x_bytes = annotated[x_node].nbytes
        held = r in kept_by_ref.get(x_node, ())  # the parts are views of a stored input: nothing new
        parts_at = _prefix_end(lay, ne, sl, first_b)  # where the parts are made
        # The first no-grad replay (the start states) runs once the parts are made and the whole input is dropped:
        # at the next position, the block's first of the neuron.
        replay_at = parts_at + 1
        every = sl.every  # start states: a checkpoint every `every` slices (Rule 8)
        for c in range(sl.k):
            b = _Block(r, "slice", c)
            if b in lay.rc_end:
                if not held:
                    live.add(x_bytes * sl.sizes[c] // sl.steps, parts_at, lay.rc_end[b])
                # The first slice starts from the region's entry state (referenced anyway); checkpoints and the last
                # segment's states exist from the first replay, the others from their segment's replay.
                segment_end = min(sl.k - 1, c - c % every + every - 1)
                made = replay_at if c % every == 0 or segment_end == sl.k - 1 else \
                    lay.rc_start.get(_Block(r, "slice", segment_end), replay_at)
                if c:
                    live.add(sl.state_bytes, made, lay.rc_end[b])
        # Each slice's input gradient waits for the others (the split's backward takes them all at once), unless the
        # recorded backward shows them already (_waits_per_step).
        nb = replays.bwd_events.get(sl.neuron, ())
        prefix_bwd = [e for n in sl.prefix_nodes for e in replays.bwd_events.get(n, ())]
        if nb and not _waits_per_step(own.get(sl.neuron, ()), sl, x_bytes, nb[-1]):
            done = lay.pos[min([nb[-1]] + [e for e in prefix_bwd if e > nb[0]])]
            for c in range(sl.k):
                b = _Block(r, "slice", c)
                if b in lay.rc_end:
                    live.add(x_bytes * sl.sizes[c] // sl.steps, lay.rc_end[b], done)
        # The neuron's whole input (the storage its input node's value lives in) exists from its recomputation until
        # it is copied into the parts. Otherwise (an input of the region) it is the unpacked input, alive from the
        # block's start.
        candidates = [st for n in sl.prefix_nodes for st in own.get(n, ()) if st.phase == "fwd" and x_node in st.views]
        if candidates:  # the first allocated (one event allocates for one node: no ties across nodes)
            x_storage[r] = first = min(candidates, key=lambda st: (st.alloc, st.nbytes))
            live.add(x_bytes, lay.rc_pos[first_b][first.alloc], parts_at)
        elif not held:
            live.add(x_bytes, lay.rc_start[first_b], parts_at)
    return x_storage


def _charge_whole_slices(live: _Live, annotated: AnnotatedGraph, by_region: dict[str, RegionPlan], lay: _Layout,
                         replays: _Replays) -> None:
    """Regions on whole slices (Rule 9): the slices' outputs and their concatenation at exit; every slice after the
    first keeps its entry states (one time step of each stateful module's output, an estimate of its state) from
    forward to the region's backward."""
    for r, share in replays.whole_share.items():
        nodes = by_region[r].nodes
        outs = region_io(annotated, nodes)[1]
        live.add(sum(annotated[o].nbytes for o in outs), lay.exit[r], lay.exit[r])
        steps = annotated[outs[0]].shape[0]
        state = sum(annotated[n].nbytes // steps for n in nodes if annotated[n].stateful)
        live.add((round(1 / share) - 1) * state, lay.exit[r], lay.bwd_last[r])


def _used_at(lay: _Layout, consumed: int | None, start: int, otherwise: int) -> int:
    """Where backward is done with a tensor recomputed at ``start`` that it unpacked after event ``consumed``: that
    event's position, or, where the unpack itself set off the recomputation (the block runs between the unpack and
    the operation that reads the tensor: :func:`_slice_triggers`), the next event's. ``otherwise`` (the region's
    last backward event) where neither comes at or after ``start``."""
    if consumed is None:
        return otherwise
    at = lay.pos.get(consumed, -1)
    if at < start:
        at = lay.pos.get(consumed + 1, -1)
    return at if at >= start else otherwise


def _charge_storages(live: _Live, annotated: AnnotatedGraph, storages: Sequence[StorageRecord], lay: _Layout,
                     replays: _Replays, by_region: dict[str, RegionPlan], ne: dict[str, tuple[int, int]],
                     kept_by_ref: dict[str, list[str]], x_storage: dict[str, StorageRecord],
                     packs: dict[str, dict[str, int]], pack_s: Callable[[int, int], float]) -> float:
    """Every recorded storage, with the lifetime the plan gives it (see the module docstring). ``packs``: the
    packed-saves regions' nodes -> {input node: bits}. Returns the seconds packed-saves regions spend packing
    (``pack_s(values, bits)``)."""
    region_of = {n: r for r in by_region for n in by_region[r].nodes}
    packing_s = 0.0
    rc_stop = _recompute_stops(lay, storages, by_region, region_of, replays, ne)
    last_user_end = {n: max((lay.pos[ne[u][1]] for u in annotated.users[n] if u in ne), default=lay.pos[ne[n][1]])
                     for n in annotated.order}
    slicing_of_neuron = {sl.neuron: sl for sl in replays.slicing.values()}
    neuron_bwd_last = {sl.neuron: max(replays.bwd_events.get(sl.neuron, (-1,))) for sl in replays.slicing.values()}
    whole_outputs = {o for r in replays.whole_share for o in region_io(annotated, by_region[r].nodes)[1]}

    def size(s: StorageRecord) -> int:
        share = replays.whole_share.get(region_of.get(s.node, ""))
        if share is None or s.free is None or s.phase != "fwd" or any(v in whole_outputs for v in s.views):
            # Not one slice's: an output, alive after the step (a module's final state), or made by backward (the
            # slices' gradients add up into whole-size buffers: scaled too, predictions were 20-33% below the
            # measured peak on test_approximate's residual nets; whole, within 1% there at 2 and 4 slices, and
            # at most 18% above on a smaller one)
            return s.nbytes
        return int(s.nbytes * share)

    for s in storages:
        if s.phase != "fwd" or s.node not in ne:
            nbytes, start = size(s), lay.at(s.alloc)
            sl = slicing_of_neuron.get(s.node)
            if sl is not None and s.phase == "bwd" and nbytes >= sl.out_bytes:
                if s.free is not None and s.free <= neuron_bwd_last[s.node]:
                    # A sliced neuron's backward works on one slice at a time: per-step gradient buffers are
                    # slice-sized.
                    nbytes //= sl.k
                else:
                    # The full input gradient exists only once every slice is done (the split's backward); until
                    # then the slices' gradients wait (charged with the slices).
                    start = max(start, lay.pos[neuron_bwd_last[s.node]])
            live.add(nbytes, start, lay.at(s.free))
            continue
        home = region_of.get(s.node)
        stop = lay.at(s.free)
        views = s.views or ((s.value_of,) if s.value_of else ())
        if any(v in kept_by_ref for v in views):
            # A frame lives until its neuron's state is reset (its final-state handles keep it, so a later backward
            # through the state still works): an input it keeps by reference lives to the end of the step.
            stop = lay.end - 1
        # Packed saves (Rule 11): a saver outside the checkpoint regions that packs this value keeps only the
        # payload, from its forward until backward last reads it (which unpacks a transient full copy).
        packers = {m: v for m in s.saved_by if m not in region_of and m in packs
                   for v in views if packs[m].get(v)}
        for m, v in packers.items():
            info, b = annotated[v], packs[m][v]
            numel = math.prod(info.shape or ())
            packing_s += pack_s(numel, b)
            at, used = lay.pos[ne[m][1]], lay.at(s.consumed)
            live.add(packed_nbytes(numel, b), at, max(at, used))
            live.add(min(numel, PACK_CHUNK) * (_ELEMENT_SIZE.get(info.dtype or "", 4) + 1), at, at)
            if s.consumed is not None:
                live.add(s.nbytes, used, used)
        saver_regions = {region_of.get(m) for m in s.saved_by if m not in packers}
        saved_in_regions = bool(s.saved_by) and None not in saver_regions
        if saved_in_regions:
            # Saved only inside regions: not kept by the forward (Rule 1); dies at its natural release, or with the
            # frame that keeps it by reference as an input.
            held_by = {r for v in views for r in kept_by_ref.get(v, ())}
            release = max(last_user_end[v] for v in views) if views else lay.pos[s.alloc]
            live.add(size(s), lay.pos[s.alloc], stop if held_by else release)
            if s.consumed is None:
                continue  # never used by the recorded backward (a neuron's last state update): not recomputed
            for r in saver_regions:
                if r is None or r in held_by or s.node in by_region[r].nodes:
                    # recomputed by its own region's blocks (below), or alive anyway: the region's stored input
                    continue
                sl = replays.slicing.get(r)
                b = _Block(r, "all") if sl is None else sl.first_block(r) if by_region[r].keep_prefix \
                    else _Block(r, "prefix")
                if b in lay.rc_start:  # an input of r that r saves: it comes back when r recomputes
                    live.add(s.nbytes, lay.rc_start[b], _used_at(lay, s.consumed, lay.rc_start[b], lay.bwd_last[r]))
                first = sl.first_block(r) if sl is not None else None
                if first is not None and first != b and first in lay.rc_start:
                    # The first block runs the prefix too, on the input unpacked again, which lives until the
                    # prefix's saved tensors are dropped, once the parts are made (Rule 8: the prefix not kept).
                    live.add(s.nbytes, lay.rc_start[first], _prefix_end(lay, ne, sl, first))
        else:
            live.add(size(s), lay.pos[s.alloc], stop)
        if home is None:
            continue
        for b, keeps in _provides(by_region[home], replays.slicing.get(home), s):
            if b not in lay.rc_start or s is x_storage.get(home):
                continue  # the sliced neuron's recomputed input is charged with the slices
            start = lay.rc_pos[b][s.alloc]
            if saved_in_regions and keeps and home in saver_regions and s.consumed is not None:
                live.add(size(s), start, _used_at(lay, s.consumed, start, lay.bwd_last[home]))
            elif start <= rc_stop[b]:
                # A temporary or output of the region: it reappears during recomputation and is dropped when that
                # ends (or when it died in the forward, if earlier).
                stop_rc = lay.rc_pos[b].get(s.free, lay.rc_end[b]) if s.free is not None else lay.rc_end[b]
                stop_rc = min(stop_rc, rc_stop[b])
                sl = replays.slicing.get(home)
                if sl is not None and b == sl.first_block(home) and s.node in sl.prefix_nodes:
                    # The first block runs the prefix as one call that returns only the neuron's input (Rule 8):
                    # the prefix's other tensors are gone before the parts are copied and the slice recomputes.
                    stop_rc = min(stop_rc, _prefix_end(lay, ne, sl, b) - 1)
                share = replays.whole_share.get(home)
                live.add(size(s) if share is None else int(s.nbytes * share), start, max(start, stop_rc))
    return packing_s


def simulate(graph: nx.DiGraph, plan: Plan | None, *, with_timeline: bool = False) -> Prediction:
    """Predict the peak memory and step time of ``plan`` (``None``: the unoptimized model).

    The stages: where the plan recomputes (:func:`_replays`), the simulated step's positions (:func:`_layout`),
    then every byte charged over the positions it is alive at (packed region inputs, time slices, whole slices,
    the recorded storages), and the peak read off the running sum.

    Args:
        graph: from :func:`build_cost_graph` (or built by hand with the same attributes).
        plan: the plan to simulate.
        with_timeline: also return the live-bytes timeline.

    Returns:
        A :class:`Prediction`.
    """
    annotated = facts(graph)
    storages = _storages(graph)
    every = plan.regions if plan is not None else ()
    regions = tuple(r for r in every if r.recompute)
    packs = {n: {i: b for i, b in zip(region_io(annotated, r.nodes)[0], r.pack_bits) if b}
             for r in every if not r.recompute for n in r.nodes}
    by_region = {r.name: r for r in regions}
    events = graph.graph["events"]
    ne = {n: e for n, e in graph.nodes(data="fwd_events") if e is not None}

    own = _own_storages(storages)
    replays = _replays(annotated, regions, ne, events, storages, own)
    lay = _layout(annotated, regions, ne, events, replays)
    live = _Live(lay.end)
    kept_by_ref = _charge_region_inputs(live, annotated, regions, lay)
    x_storage = _charge_slices(live, annotated, own, lay, replays, ne, kept_by_ref)
    _charge_whole_slices(live, annotated, by_region, lay, replays)
    pack_s = functools.partial(pack_seconds, graph)
    packing_s = _charge_storages(live, annotated, storages, lay, replays, by_region, ne, kept_by_ref, x_storage,
                                 packs, pack_s)

    best, best_at, cur = 0, 0, 0
    timeline = []
    for p in range(lay.end):
        cur += live.delta[p]
        if cur > best:
            best, best_at = cur, p
        if with_timeline:
            timeline.append((lay.labels[p], cur))
    fwd = _fwd_times(graph)
    extra = sum(fwd.get(n, 0.0) for r in regions for n in r.nodes)
    # packing: each packed value is checked and packed once in forward and unpacked once in backward
    packing_s += sum(pack_s(math.prod(annotated[i].shape or ()), b) for r in regions
                     for i, b in zip(region_io(annotated, r.nodes)[0], r.pack_bits) if b and annotated[i].is_tensor)
    extra += packing_s
    # each region's own bookkeeping (entry, snapshots, handles, the replay's context; a packed-saves region: entry)
    extra += graph.graph.get("region_overhead_s", 0.0) * (len(regions) + 0.25 * (len(every) - len(regions)))
    copy_s = graph.graph.get("copy_s_per_byte", 0.0)
    for r, sl in replays.slicing.items():
        # the no-grad replays for slice start states (a fraction of the neuron's forward with grad), the copies
        # slicing makes (outputs concatenated in forward; in backward the input's parts and their gradients'
        # concatenation), and the prefix again if not kept
        nograd = graph.nodes[sl.neuron].get("fwd_nograd_time_s")
        per_pass = nograd if nograd is not None else fwd.get(sl.neuron, 0.0) * NO_GRAD_REPLAY_COST
        extra += per_pass * sl.replayed_slices / sl.k
        x_bytes = annotated[annotated[sl.neuron].inputs[0]].nbytes
        extra += (sl.out_bytes + 2 * x_bytes) * copy_s
        if not by_region[r].keep_prefix:
            extra += sum(fwd.get(n, 0.0) for n in sl.prefix_nodes)
    return Prediction(best, lay.labels[best_at] if lay.labels else "", extra, graph.graph["step_time_s"] + extra,
                      tuple(timeline))


def pack_seconds(graph: nx.DiGraph, values: int, bits: int) -> float:
    """Seconds to pack ``values`` values at ``bits`` bits in forward and unpack them in backward, at the cost
    graph's measured rates (``pack_s_per_value_by_bits``, else ``pack_s_per_value``)."""
    rate = graph.graph.get("pack_s_per_value_by_bits", {}).get(bits)
    return values * (graph.graph.get("pack_s_per_value", 0.0) if rate is None else rate)


def retained_bytes(prediction: Prediction) -> int:
    """Live bytes when backward starts (what one forward keeps for backward, its output included), from a
    :func:`simulate` timeline (``with_timeline=True``)."""
    kept = 0
    for label, live in prediction.timeline:
        if label.startswith(("bwd:", "recompute:")):
            break
        kept = live
    return kept


def peak_over_calls(prediction: Prediction, calls: int) -> int:
    """Predicted peak of a training step made of ``calls`` forward calls and one backward (a single-step network
    called once per time step): each earlier call keeps what a forward keeps for backward until the backward runs,
    and the last call's step comes on top of that. A linear model from one recorded call: it does not see what a
    call keeps only because the next call reads it (a neuron state carrying the autograd graph from call to call).
    Measured on snntorch's tutorial-7 net over 16 calls: unoptimized +22%, optimized -27% (see the README)."""
    return prediction.peak_bytes + (calls - 1) * retained_bytes(prediction)


def region_working_sets(timeline: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Per region, the predicted working set of its recomputation: the most live bytes while it recomputes, minus
    the live bytes just before it started (from a :func:`simulate` timeline, ``with_timeline=True``)."""
    sets: dict[str, int] = {}
    before = 0
    for label, live in timeline:
        phase, _, region = label.partition(":")
        if phase == "recompute":
            sets[region] = max(sets.get(region, 0), live - before)
        else:
            before = live
    return sets
