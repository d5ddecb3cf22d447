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
    * a time-sliced neuron (Rule 8) runs its forward slice by slice: what a step makes and the unsliced call keeps
      to its end (each step's spikes, until all are stacked) dies with its slice, whose own stack of its steps
      lives until the slices are joined (:func:`_sliced_forward_stop`; where the recording does not show the
      steps, as recorded);
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
import collections
import functools
import itertools
import math
import operator
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import networkx as nx

from ..analysis.facts import AnnotatedGraph
from ..runtime.packing import PACK_CHUNK, packed_nbytes
from ..runtime.steps import TIME_MAJOR
from .plan import Plan, RegionPlan, checkpoint_every
from .regions import region_io, side_effects, unit_order
from .timing import steady_times

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
      ``fwd_nograd_time_s``: its forward time without grad (``None`` when not measured); both calibrated per kind of
      node (:func:`fxmemopt.planning.timing.steady_times`: robust to a busy machine), the measurements themselves in
      ``measured_fwd_time_s`` and ``measured_fwd_nograd_time_s``;
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
    # per-kind calibrated times (planning.timing): what the search weighs; the measurements stay beside them
    steady = steady_times(annotated.nodes, trace.fwd_time_s)
    steady_nograd = steady_times(annotated.nodes, trace.fwd_nograd_time_s)
    for name in annotated.order:
        info = annotated[name]
        mine = by_node.pop(name, [])
        fwd = [s for s in mine if s.phase == "fwd"]
        g.add_node(name, info=info, storages=tuple(mine), fwd_events=trace.node_events.get(name),
                   fwd_time_s=steady.get(name, 0.0), fwd_nograd_time_s=steady_nograd.get(name),
                   measured_fwd_time_s=trace.fwd_time_s.get(name, 0.0),
                   measured_fwd_nograd_time_s=trace.fwd_nograd_time_s.get(name),
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
    #: the forward event at which each slice's last step ends, and the last step's end (after it: the neuron's
    #: tail, where the unsliced call joins its steps); ``None`` where the recording does not show the steps
    slice_ends: tuple[int, ...] | None = None
    tail: int | None = None
    last_event: int = 0  # the neuron's last forward event

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


class _RegionReplays(NamedTuple):
    """One region plan's replay blocks, derived once per region plan (:func:`_region_replays`).

    ``blocks``: each block's forward events, in the order it replays them; ``triggers``: ``(backward event, block)``
    in the order the region claims them (a block runs before the first of its events no earlier region claimed);
    ``slicing``/``share``: its time slicing (Rule 8) or its whole slices' share of T (Rule 9), ``None`` if not;
    ``index``: per block, each replayed event -> its offset from the block's start (the last, where an event is
    replayed twice); ``stops``: per block, the offset where recomputation stops (:func:`_stop_offsets`);
    ``prefix_end``: a sliced region's first block's offset where its prefix is done (:func:`_prefix_end`)."""

    blocks: dict[_Block, tuple[int, ...]]
    triggers: list[tuple[int, _Block]]
    slicing: _Slicing | None
    share: float | None
    index: dict[_Block, dict[int, int]]
    stops: dict[_Block, int]
    prefix_end: int


@dataclass(frozen=True)
class _Replays:
    """Where a plan recomputes: each block's forward events, the backward event each block runs before, the
    time-sliced regions, and the whole-slice regions with the share of T one slice holds (Rule 9); ``bwd_events``:
    each node's backward events; ``parts``: each region's :class:`_RegionReplays`."""

    blocks: dict[_Block, tuple[int, ...]]
    trigger: dict[int, _Block]
    slicing: dict[str, _Slicing]
    whole_share: dict[str, float]
    bwd_events: dict[str, tuple[int, ...]]
    parts: dict[str, _RegionReplays] = field(default_factory=dict)


@dataclass(frozen=True)
class _Layout:
    """The simulated step as positions: the forward in the rewritten order (``pack``/``enter``/``exit`` around each
    region), the loss, then the recorded backward with each replay block inserted before the event that triggers it.

    ``pos`` gives a recorded event's position (-1: not simulated); a block's replayed event ``e`` sits at
    ``rc_start[b] + rc_index[b][e]``. From position ``tail_start`` on (the loss and the backward), ``tail_live``
    holds the live bytes of the storages whose lifetime no plan changes (:attr:`_Recorded.tail_at`), added to the
    charges' running sum at the end."""

    labels: list[str]
    pos: list[int]
    entry: dict[str, int]
    exit: dict[str, int]
    rc_start: dict[_Block, int]
    rc_index: dict[_Block, dict[int, int]]
    rc_end: dict[_Block, int]
    bwd_last: dict[str, int]
    tail_start: int
    tail_live: list[int]

    @property
    def end(self) -> int:
        return len(self.labels)

    def get(self, event: int | None, default: int) -> int:
        """The position of a recorded event, or ``default`` (``None``, or an event not simulated)."""
        p = self.pos[event] if event is not None and 0 <= event < len(self.pos) else -1
        return p if p >= 0 else default

    def at(self, event: int | None) -> int:
        """The position of a recorded event (``None`` or an event not simulated: the end of the step)."""
        return self.get(event, len(self.labels) - 1)

    def of(self, event: int) -> int:
        """The position of a recorded event that is simulated (``KeyError`` otherwise)."""
        p = self.get(event, -1)
        if p < 0:
            raise KeyError(event)
        return p

    def rc_at(self, block: _Block, event: int) -> int:
        """The position of ``block``'s replay of forward ``event`` (``KeyError`` where the block does not replay it)."""
        return self.rc_start[block] + self.rc_index[block][event]


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

    def add_segment(self, start: int, deltas: Sequence[int]) -> None:
        """A difference array of positions ``start ..`` (charges summed inside one segment of the layout)."""
        end = start + len(deltas)
        self.delta[start:end] = map(operator.add, self.delta[start:end], deltas)


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


class _StepIndex:
    """The recorded step's facts a region's replay blocks are derived from (:func:`_region_replays`): the nodes'
    facts, each node's forward events, backward events (in order) and storages (:func:`_own_storages`); ``memo``
    holds what has been derived per region plan (its blocks, its inputs, its charges), so the hundreds of plans a
    search predicts, which differ in a region or two, derive each region's once."""

    def __init__(self, annotated: AnnotatedGraph, ne: dict[str, tuple[int, int]],
                 events: Sequence[tuple[str, str]], storages: Sequence[StorageRecord]) -> None:
        self.annotated, self.ne, self.events = annotated, ne, events
        self.own = _own_storages(storages)
        bwd: dict[str, list[int]] = {}
        for e, (phase, node) in enumerate(events):
            if phase == "bwd":
                bwd.setdefault(node, []).append(e)
        self.bwd = {n: tuple(es) for n, es in bwd.items()}
        self.memo: dict[tuple, Any] = {}
        self._io: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def io(self, nodes: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """:func:`~fxmemopt.planning.regions.region_io` of ``nodes``, once per node tuple."""
        hit = self._io.get(nodes)
        if hit is None:
            hit = self._io[nodes] = region_io(self.annotated, nodes)
        return hit


class _Recorded(_StepIndex):
    """What :func:`simulate` reads from a cost graph's recorded step, derived once per graph (:func:`_recorded`):
    nothing here depends on the plan.

    Besides :class:`_StepIndex`: the storages in allocation order (``storages``, read by index ``k``) and the nodes
    whose values live in each (``views``: ``views``, else ``value_of``); the traced nodes' forward storages by node
    (``fwd_by_node``); the tail (the loss and the backward events, which no plan reorders: a plan only inserts
    replay blocks between them) with its labels; and the storages allocated in the tail (backward, the loss) summed
    once as live bytes per tail element (``tail_at``) and just before it (``tail_gap``: what a replay block inserted
    there sees). A plan changes the lifetime of few of those (a sliced neuron's, a whole-slice region's:
    ``tail_of``, taken back and charged as the plan has it); ``outside``: the rest of them, charged by every plan.

    Times (``fwd_time_s``, the graph's rates) are not here: :func:`simulate` reads them on every call, so a test may
    change them between predictions.
    """

    def __init__(self, graph: nx.DiGraph) -> None:
        annotated = facts(graph)
        self.storages = storages = tuple(_storages(graph))
        ne = {n: e for n, e in graph.nodes(data="fwd_events") if e is not None}
        super().__init__(annotated, ne, graph.graph["events"], storages)
        self.views = tuple(s.views or ((s.value_of,) if s.value_of else ()) for s in storages)
        self.inputs_of = {n: annotated[n].inputs for n in annotated.order}
        self.side = side_effects(annotated)
        self.order_index = {n: i for i, n in enumerate(annotated.order)}
        #: per traced node, the last forward event of each of its users (its own last, if none): where a value
        #: saved only inside regions dies (its natural release)
        self.user_ends = {n: tuple(ne[u][1] for u in annotated.users[n] if u in ne) or (ne[n][1],)
                          for n in annotated.order}
        self.fwd_end = max((last for _, last in ne.values()), default=-1)
        self._flat()
        self._tail()
        self.forwards: collections.OrderedDict[tuple, tuple[list[str], list[int], dict[str, int], dict[str, int]]] \
            = collections.OrderedDict()

    def _flat(self) -> None:
        """The traced nodes' forward events in graph order (``flat_events``) with their labels, each node's
        ``span`` in them, and ``flat_run``: per element, the run of consecutive events it belongs to (what the
        forward layout lays out as one slice)."""
        self.flat_events: list[int] = []
        self.flat_labels: list[str] = []
        self.span: dict[str, tuple[int, int]] = {}
        for n in self.annotated.order:
            first, last = self.ne[n]
            i = len(self.flat_events)
            self.flat_events.extend(range(first, last + 1))
            self.flat_labels.extend([f"fwd:{n}"] * (last + 1 - first))
            self.span[n] = (i, len(self.flat_events))
        flat = self.flat_events
        self.flat_run = list(itertools.accumulate((0, *(b != a + 1 for a, b in zip(flat, flat[1:])))))[:len(flat)]

    def _tail(self) -> None:
        """The tail's events and labels, the storages it sums (``tail_at``, ``tail_gap``, ``tail_of``), the others."""
        events, ne, storages = self.events, self.ne, self.storages
        self.loss = tuple(e for e in range(self.fwd_end + 1, len(events)) if events[e][0] == "loss")
        bwd = tuple(e for e, (phase, _) in enumerate(events) if phase == "bwd")
        self.first_bwd = len(self.loss)
        self.tail = tail = self.loss + bwd
        self.tail_labels = tuple(f"{events[e][0]}:{events[e][1]}" for e in tail)
        self.bwd_contiguous = bwd == tuple(range(bwd[0], bwd[-1] + 1)) if bwd else True
        index = {e: i for i, e in enumerate(tail)}
        self.tail_index = index
        fwd_events = {e for n in self.annotated.order if n in ne for e in range(ne[n][0], ne[n][1] + 1)}
        at_delta = [0] * (len(tail) + 1)
        gap_delta = [0] * (len(tail) + 1)
        #: the traced nodes' forward storages (indexes), by node
        self.fwd_by_node: dict[str, list[int]] = {}
        #: node -> ``(k, first, last)`` of its storages summed in the tail (tail elements ``first..last``)
        self.tail_of: dict[str, list[tuple[int, int, int]]] = {}
        self.outside: list[int] = []
        for k, s in enumerate(storages):
            if s.phase == "fwd" and s.node in ne:
                self.fwd_by_node.setdefault(s.node, []).append(k)
                continue
            a = index.get(s.alloc)  # type: ignore[arg-type]
            # freed in the forward: never alive in the tail (its stop comes before its start)
            b = index.get(s.free, len(tail) - 1) if s.free not in fwd_events else -1  # type: ignore[arg-type]
            if a is None or s.nbytes <= 0:
                self.outside.append(k)  # allocated before the tail: charged by each plan (rare)
            elif b >= a:
                at_delta[a] += s.nbytes
                at_delta[b + 1] -= s.nbytes
                gap_delta[a + 1] += s.nbytes
                gap_delta[b + 1] -= s.nbytes
                self.tail_of.setdefault(s.node, []).append((k, a, b))
        #: per node, the savers and the values of its forward storages (what makes a plan touch them), and each
        #: storage's ``(nbytes, alloc, free)`` (those of positive size)
        self.fwd_deps = {n: ({m for k in ks for m in storages[k].saved_by}, {v for k in ks for v in self.views[k]})
                         for n, ks in self.fwd_by_node.items()}
        self.plain_of = {n: [(storages[k].nbytes, storages[k].alloc, storages[k].free) for k in ks
                             if storages[k].nbytes > 0] for n, ks in self.fwd_by_node.items()}
        self.tail_at = list(itertools.accumulate(at_delta))[:len(tail)]
        self.tail_gap = list(itertools.accumulate(gap_delta))[:len(tail)]


#: cost graph -> (what its derived facts were derived from, the facts): see :func:`_recorded`
_RECORDED: weakref.WeakKeyDictionary[nx.DiGraph, tuple[list[object], _Recorded]] = weakref.WeakKeyDictionary()


def _recorded(graph: nx.DiGraph) -> _Recorded:
    """The graph's :class:`_Recorded`, derived on first use and again whenever the recorded step it came from is no
    longer the graph's (a node's ``storages``, ``info`` or ``fwd_events`` replaced, nodes added or removed, other
    ``events`` or ``order``): checked by identity on every call, which costs one pass over the nodes."""
    stamp: list[object] = [graph.graph.get("events"), graph.graph.get("order")]
    for _, d in graph.nodes(data=True):
        stamp += (d.get("storages"), d.get("info"), d.get("fwd_events"))
    hit = _RECORDED.get(graph)
    if hit is not None and len(hit[0]) == len(stamp) and all(a is b for a, b in zip(hit[0], stamp)):
        return hit[1]
    rec = _Recorded(graph)
    _RECORDED[graph] = (stamp, rec)
    return rec


def _region_replays(idx: _StepIndex, r: RegionPlan) -> _RegionReplays:
    """Which forward events region ``r``'s recomputation replays, and before which backward events: once per region
    plan (see :func:`_replays`)."""
    key = ("replays", r)
    hit = idx.memo.get(key)
    if hit is not None:
        return hit
    annotated, ne, bwd = idx.annotated, idx.ne, idx.bwd
    neuron = r.nodes[-1] if not r.whole_slices else idx.io(r.nodes)[1][0]
    info = annotated[neuron]
    steps = info.time_steps if not r.whole_slices and r.chunks > 1 else (info.shape or (1,))[0] if info.shape else 1
    k = max(1, min(r.chunks, steps))
    if k == 1 or r.whole_slices:
        # Whole-region slices (Rule 9) are one block whose tensors exist one slice at a time: the region's own
        # forward storages are scaled by the largest slice's share of T (an approximation; its outputs stay whole).
        block = _Block(r.name, "all")
        blocks = {block: tuple(_events_of(ne, r.nodes))}
        firsts = [bwd[n][0] for n in r.nodes if bwd.get(n)]
        triggers = [(min(firsts), block)] if firsts else []
        slicing, share = None, math.ceil(steps / k) / steps if k > 1 else None
    else:
        blocks, triggers, slicing = _sliced_replays(idx, r, neuron, steps, k)
        share = None
    index = {b: {e: i for i, e in enumerate(replayed)} for b, replayed in blocks.items()}
    prefix_end = 0
    if slicing is not None:
        first = index[slicing.first_block(r.name)]
        prefix_end = max((first[e] for e in _events_of(ne, slicing.prefix_nodes) if e in first), default=0)
    hit = _RegionReplays(blocks, triggers, slicing, share, index, {}, prefix_end)
    hit.stops.update(_stop_offsets(idx, r, hit))
    idx.memo[key] = hit
    return hit


def _sliced_replays(idx: _StepIndex, r: RegionPlan, neuron: str, steps: int, k: int
                    ) -> tuple[dict[_Block, tuple[int, ...]], list[tuple[int, _Block]], _Slicing]:
    """A time-sliced region's blocks, triggers and slicing (see :func:`_replays`)."""
    annotated, ne, bwd, own = idx.annotated, idx.ne, idx.bwd, idx.own
    info = annotated[neuron]
    blocks: dict[_Block, tuple[int, ...]] = {}
    triggers: list[tuple[int, _Block]] = []
    sizes = tuple(TIME_MAJOR.sizes(steps, k))  # as the runtime cuts them (k is clamped to T already)
    bounds = [sum(sizes[:i]) for i in range(k + 1)]

    def slice_of(t: int) -> int:
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
    nb = bwd.get(neuron, ())
    unpacked = _slice_triggers(own.get(neuron, ()), neuron, fwd_slice, k, idx.events)
    if unpacked is not None:
        triggers += [(e, _Block(r.name, "slice", c)) for c, e in unpacked.items()]
    else:
        for i, e in enumerate(nb):  # the neuron's backward runs from the last step to the first
            triggers.append((e, _Block(r.name, "slice", slice_of(steps - 1 - min(steps - 1, i * steps // len(nb))))))
    for c in reversed(range(k)):  # the last slice's block runs first and replays the prefix
        blocks[_Block(r.name, "slice", c)] = tuple((prefix if c == k - 1 else [])
                                                   + [e for e in range(first, last + 1) if fwd_slice[e] == c])
    if not r.keep_prefix:
        blocks[_Block(r.name, "prefix")] = tuple(prefix)
        firsts = [bwd[n][0] for n in r.nodes[:-1] if bwd.get(n)]
        if firsts:
            triggers.append((min(firsts), _Block(r.name, "prefix")))
    # The neuron's time-major output: all it returns, or the first element of (out, state) (norse's LIF), which
    # has the shape of its input. One slice start state: the state a neuron returns (exact), or one time step of
    # its output (an estimate for a state kept in the module, which holds one membrane per output element).
    state_bytes = info.nbytes - out_bytes if not info.is_tensor else out_bytes // max(1, steps)
    slice_ends = tuple(ends[bounds[c + 1] - 1] for c in range(k)) if ends is not None else None
    slicing = _Slicing(k, steps, sizes, neuron, frozenset(r.nodes[:-1]), fwd_slice, out_bytes, state_bytes,
                       checkpoint_every(k, r.keep_starts), slice_ends, ends[-1] if ends is not None else None, last)
    return blocks, triggers, slicing


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


def _stop_offsets(idx: _StepIndex, r: RegionPlan, parts: _RegionReplays) -> dict[_Block, int]:
    """Where each block of region ``r`` stops recomputing, as an offset from the block's start: once the last tensor
    it must keep is captured (Rule 3), except a sliced region's first block, which must finish the prefix to get the
    neuron's input."""
    stop = dict.fromkeys(parts.blocks, 0)
    nodes = set(r.nodes)
    for n in r.nodes:
        for s in idx.own.get(n, ()):
            if s.phase != "fwd" or s.consumed is None or not any(m in nodes for m in s.saved_by):
                continue
            for b, keeps in _provides(r, parts.slicing, s):
                if keeps:
                    stop[b] = max(stop[b], parts.index[b][s.alloc])
    if parts.slicing is not None:
        b = parts.slicing.first_block(r.name)
        stop[b] = max(stop[b], parts.prefix_end)
    return stop


def _replays(annotated: AnnotatedGraph, regions: Sequence[RegionPlan], ne: dict[str, tuple[int, int]],
             events: Sequence[tuple[str, str]], storages: Sequence[StorageRecord] = (),
             idx: _StepIndex | None = None) -> _Replays:
    """Which forward events each region's recomputation replays, and before which backward event.

    An unsliced region is one block, run just before its first backward event. A time-sliced region (prefix ->
    neuron, k slices) has one block per slice, run before that slice's first backward event (the first also replays
    the prefix), and, when the prefix is not kept, a prefix block before the prefix's backward. A slice's forward
    events are its steps' (:func:`_step_ends`) and its block runs when backward first unpacks what it saved
    (:func:`_slice_triggers`), where the recorded ``storages`` show them; otherwise each step is an equal share of
    the neuron's forward and backward events. Where two blocks would run before the same event, the earlier
    region's does. ``idx``: the recorded step's :class:`_StepIndex` (:func:`simulate` passes its graph's), else
    derived from the arguments."""
    idx = _StepIndex(annotated, ne, events, storages) if idx is None else idx
    blocks: dict[_Block, tuple[int, ...]] = {}
    trigger: dict[int, _Block] = {}
    slicing: dict[str, _Slicing] = {}
    whole_share: dict[str, float] = {}
    parts: dict[str, _RegionReplays] = {}
    for r in regions:
        parts[r.name] = part = _region_replays(idx, r)
        blocks.update(part.blocks)
        for e, b in part.triggers:
            trigger.setdefault(e, b)
        if part.slicing is not None:
            slicing[r.name] = part.slicing
        if part.share is not None:
            whole_share[r.name] = part.share
    return _Replays(blocks, trigger, slicing, whole_share, idx.bwd, parts)


#: forward layouts kept per cost graph (:func:`_forward`): a search's consecutive predictions often differ only in
#: how a region recomputes (its slices, what it keeps), not in which nodes the regions hold
FORWARD_LAYOUTS_KEPT = 8


def _forward(rec: _Recorded, regions: Sequence[RegionPlan]
             ) -> tuple[list[str], list[int], dict[str, int], dict[str, int]]:
    """The forward part of the layout (see :class:`_Layout`): its labels, the positions of the forward events (the
    others -1), each region's entry (its ``pack`` position) and exit. Runs of nodes whose events follow each other
    in the recorded forward are laid out as one slice. The last :data:`FORWARD_LAYOUTS_KEPT` are kept per graph,
    by the regions' names and nodes (the caller copies the lists before extending them)."""
    key = tuple((r.name, r.nodes) for r in regions)
    hit = rec.forwards.get(key)
    if hit is not None:
        rec.forwards.move_to_end(key)
        return hit
    region_of = {n: r.name for r in regions for n in r.nodes}
    names = set(region_of.values())
    labels: list[str] = []
    pos = [-1] * max(len(rec.events), rec.fwd_end + 1)
    entry: dict[str, int] = {}
    exit_: dict[str, int] = {}
    flat, run_of, span = rec.flat_events, rec.flat_run, rec.span
    run = [0, 0]  # the nodes' events not laid out yet: flat[run[0]:run[1]]

    def lay_run() -> None:
        i, j = run
        if j > i:
            here = len(labels)
            labels.extend(rec.flat_labels[i:j])
            if run_of[i] == run_of[j - 1]:  # consecutive events
                pos[flat[i]:flat[j - 1] + 1] = range(here, here + j - i)
            else:
                for t in range(i, j):
                    pos[flat[t]] = here + t - i
        run[0] = run[1] = j

    for unit, members in unit_order(rec.annotated.order, rec.inputs_of, region_of, *rec.side):
        if unit in names:
            lay_run()
            entry[unit] = len(labels)
            labels += [f"pack:{unit}", f"enter:{unit}"]
        for n in members:
            i, j = span[n]
            if i != run[1]:
                lay_run()
                run[0] = i
            run[1] = j
        if unit in names:
            lay_run()
            exit_[unit] = len(labels)
            labels.append(f"exit:{unit}")
    lay_run()
    hit = rec.forwards[key] = (labels, pos, entry, exit_)
    if len(rec.forwards) > FORWARD_LAYOUTS_KEPT:
        rec.forwards.popitem(last=False)
    return hit


def _layout(rec: _Recorded, regions: Sequence[RegionPlan], replays: _Replays) -> _Layout:
    """Positions of the simulated step (see :class:`_Layout`)."""
    labels, pos, entry, exit_ = _forward(rec, regions)
    labels, pos = labels.copy(), pos.copy()
    # The loss, then the backward: the recorded order with the replay blocks inserted, each before the first event
    # that triggers it.
    tail, tail_start = rec.tail, len(labels)
    tail_live: list[int] = []
    rc_start: dict[_Block, int] = {}
    rc_index: dict[_Block, dict[int, int]] = {}
    rc_end: dict[_Block, int] = {}
    inserts: dict[_Block, int] = {}
    for i, b in sorted((rec.tail_index[e], b) for e, b in replays.trigger.items() if e in rec.tail_index):
        inserts.setdefault(b, i)

    def events(i: int, j: int) -> None:  # tail elements i..j-1, in order
        here = len(labels)
        if rec.bwd_contiguous and i >= rec.first_bwd and j > i:
            pos[tail[i]:tail[j - 1] + 1] = range(here, here + j - i)
        else:
            for k, e in enumerate(tail[i:j]):
                pos[e] = here + k
        labels.extend(rec.tail_labels[i:j])
        tail_live.extend(rec.tail_at[i:j])

    done = 0
    for b, i in sorted(inserts.items(), key=lambda bi: bi[1]):
        events(done, i)
        done = i
        rc_start[b] = len(labels)
        rc_index[b] = replays.parts[b.region].index[b]
        replayed = len(replays.blocks[b])
        labels += [f"recompute:{b.region}"] * replayed
        rc_end[b] = len(labels)
        labels.append(f"recompute-end:{b.region}")
        tail_live += [rec.tail_gap[i]] * (replayed + 1)
    events(done, len(tail))
    bwd_last: dict[str, int] = {}
    for r in regions:  # the last backward event of its nodes (the end, where nothing required grad through them)
        lasts = [rec.bwd[n][-1] for n in r.nodes if n in rec.bwd]
        bwd_last[r.name] = pos[max(lasts)] if lasts else len(labels) - 1
    return _Layout(labels, pos, entry, exit_, rc_start, rc_index, rc_end, bwd_last, tail_start, tail_live)


def _region_inputs(rec: _Recorded, r: RegionPlan) -> tuple[list[str], list[tuple[int, int]]]:
    """Region ``r``'s inputs kept by reference, and per packed input its payload's bytes and the packing's
    transient. Once per region plan."""
    key = ("inputs", r.nodes, r.pack_bits)
    hit = rec.memo.get(key)
    if hit is not None:
        return hit
    by_ref: list[str] = []
    packed: list[tuple[int, int]] = []
    for i, b in zip(rec.io(r.nodes)[0], r.pack_bits):
        info = rec.annotated[i]
        if info.op != "get_attr" and b == 0:
            # a tensor, or a container of them (norse's LIFState threaded from step to step): its tensors are kept
            # as they are (a container is never packed)
            by_ref.append(i)
        elif info.is_tensor and b:
            numel = math.prod(info.shape or ())
            elsize = _ELEMENT_SIZE.get(info.dtype or "", 4)
            # the packing's transient: for 1 bit, two buffers of at most PACK_CHUNK values (the check on the
            # integer view, the bool marks); for 2 and 8 bits, a uint8 copy + the round trip
            transient = min(numel, PACK_CHUNK) * (elsize + 1) if b == 1 else numel * (1 + elsize)
            packed.append((packed_nbytes(numel, b), transient))
    hit = rec.memo[key] = (by_ref, packed)
    return hit


def _charge_region_inputs(live: _Live, rec: _Recorded, regions: Sequence[RegionPlan],
                          lay: _Layout) -> dict[str, list[str]]:
    """Packed inputs: allocated when the region is entered (plus a transient for the check and the packing), alive
    until its backward has run. Returns the inputs kept by reference (node -> regions)."""
    kept_by_ref: dict[str, list[str]] = {}
    for r in regions:
        by_ref, packed = _region_inputs(rec, r)
        for i in by_ref:
            kept_by_ref.setdefault(i, []).append(r.name)
        entry = lay.entry[r.name]
        # the states its neurons read, snapshotted at entry by reference, until its backward (checkpoint Rule 2)
        state = sum(rec.annotated[n].entry_state_bytes for n in r.nodes)
        if state:
            live.add(state, entry, lay.bwd_last[r.name])
        for payload, transient in packed:
            live.add(payload, entry + 1, lay.bwd_last[r.name])
            live.add(transient, entry, entry)
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


class _SliceFacts(NamedTuple):
    """What a time-sliced region's charges read of the recorded step (:func:`_slice_facts`): the neuron's input node
    and its bytes; the storage the prefix recomputes it in (``None``: an input of the region); the backward event
    by which every slice's input gradient is joined (``None``: none waits, the neuron's backward shows them already
    (:func:`_waits_per_step`), or it has no backward)."""

    x_node: str
    x_bytes: int
    x_storage: StorageRecord | None
    done: int | None


def _slice_facts(rec: _StepIndex, r: RegionPlan, sl: _Slicing) -> _SliceFacts:
    """A time-sliced region's :class:`_SliceFacts`, once per region plan."""
    key = ("slice facts", r)
    hit = rec.memo.get(key)
    if hit is not None:
        return hit
    x_node = rec.annotated[sl.neuron].inputs[0]
    x_bytes = rec.annotated[x_node].nbytes
    candidates = [st for n in sl.prefix_nodes for st in rec.own.get(n, ()) if st.phase == "fwd" and x_node in st.views]
    # the first allocated (one event allocates for one node: no ties across nodes)
    first = min(candidates, key=lambda st: (st.alloc, st.nbytes)) if candidates else None
    nb = rec.bwd.get(sl.neuron, ())
    done = None
    if nb and not _waits_per_step(rec.own.get(sl.neuron, ()), sl, x_bytes, nb[-1]):
        prefix_bwd = [e for n in sl.prefix_nodes for e in rec.bwd.get(n, ())]
        done = min([nb[-1]] + [e for e in prefix_bwd if e > nb[0]])
    hit = rec.memo[key] = _SliceFacts(x_node, x_bytes, first, done)
    return hit


def _charge_slices(live: _Live, rec: _Recorded, lay: _Layout, replays: _Replays, by_region: dict[str, RegionPlan],
                   kept_by_ref: dict[str, list[str]]) -> dict[str, StorageRecord]:
    """Time-sliced regions (Rule 8): the concatenation of slice outputs in forward. In backward, the first block
    recomputes the neuron's input, replays the neuron for every slice's start state, and copies the input into one
    part per slice (views instead, when the input is one the region keeps by reference: it is alive anyway); a
    slice's part and start state die when that slice has been recomputed. Returns, per region, the storage of the
    neuron's input recomputed by the prefix (charged here, not again with the storages)."""
    x_storage: dict[str, StorageRecord] = {}
    for r, sl in replays.slicing.items():
        neuron_end = lay.of(rec.ne[sl.neuron][1])
        live.add(sl.out_bytes, neuron_end, neuron_end)
        first_b, last_b = sl.first_block(r), _Block(r, "slice", 0)
        if first_b not in lay.rc_start or last_b not in lay.rc_end:
            continue
        part = replays.parts[r]
        x_node, x_bytes, x_first, done = _slice_facts(rec, by_region[r], sl)
        held = r in kept_by_ref.get(x_node, ())  # the parts are views of a stored input: nothing new
        parts_at = lay.rc_start[first_b] + part.prefix_end  # where the parts are made
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
        if done is not None:
            done_at = lay.of(done)
            for c in range(sl.k):
                b = _Block(r, "slice", c)
                if b in lay.rc_end:
                    live.add(x_bytes * sl.sizes[c] // sl.steps, lay.rc_end[b], done_at)
        # The neuron's whole input (the storage its input node's value lives in) exists from its recomputation until
        # it is copied into the parts. Otherwise (an input of the region) it is the unpacked input, alive from the
        # block's start.
        if x_first is not None:
            x_storage[r] = x_first
            live.add(x_bytes, lay.rc_at(first_b, x_first.alloc), parts_at)
        elif not held:
            live.add(x_bytes, lay.rc_start[first_b], parts_at)
    return x_storage


def _charge_whole_slices(live: _Live, rec: _Recorded, by_region: dict[str, RegionPlan], lay: _Layout,
                         replays: _Replays) -> None:
    """Regions on whole slices (Rule 9): the slices' outputs and their concatenation at exit; every slice after the
    first keeps its entry states (one time step of each stateful module's output, an estimate of its state) from
    forward to the region's backward."""
    annotated = rec.annotated
    for r, share in replays.whole_share.items():
        nodes = by_region[r].nodes
        outs = rec.io(nodes)[1]
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
    at = lay.get(consumed, -1)
    if at < start:
        at = lay.get(consumed + 1, -1)
    return at if at >= start else otherwise


def _large_backward(rec: _Recorded, node: str, nbytes: int) -> list[tuple[int, int, int]]:
    """The entries of ``rec.tail_of[node]`` that are backward storages of ``nbytes`` at least, once per pair."""
    key = ("large backward", node, nbytes)
    hit = rec.memo.get(key)
    if hit is None:
        hit = rec.memo[key] = [(k, a, b) for k, a, b in rec.tail_of.get(node, ())
                               if rec.storages[k].phase == "bwd" and rec.storages[k].nbytes >= nbytes]
    return hit


def _charge_tail(live: _Live, rec: _Recorded, lay: _Layout, replays: _Replays, by_region: dict[str, RegionPlan],
                 region_of: dict[str, str], whole_outputs: set[str]) -> None:
    """The storages allocated in the tail (backward, the loss) whose lifetime the plan changes, and those not summed
    in the tail (``_Recorded.outside``); the others are alive from their allocation to their release, in the
    layout's ``tail_live``.

    A sliced neuron's backward works on one slice at a time, and a whole-slice region's storages are one slice's:
    their tail sums are taken back and they are charged as the plan has them."""
    slicing_of_neuron = {sl.neuron: sl for sl in replays.slicing.values()}
    neuron_bwd_last = {sl.neuron: max(replays.bwd_events.get(sl.neuron, (-1,))) for sl in replays.slicing.values()}
    whole_nodes = {n for r in replays.whole_share for n in by_region[r].nodes}
    special = set(slicing_of_neuron) | whole_nodes
    storages, tail, pos, delta = rec.storages, rec.tail, lay.pos, live.delta
    again: list[int] = []
    for n in special:
        # a sliced neuron's changes only its backward storages as large as its output at least
        mine = rec.tail_of.get(n, ()) if n in whole_nodes else _large_backward(rec, n, slicing_of_neuron[n].out_bytes)
        for k, a, b in mine:
            delta[pos[tail[a]]] -= storages[k].nbytes
            delta[pos[tail[b]] + 1] += storages[k].nbytes
            again.append(k)
    for k in itertools.chain(rec.outside, again):
        s = storages[k]
        if s.node not in special:
            live.add(s.nbytes, lay.at(s.alloc), lay.at(s.free))
            continue
        share = replays.whole_share.get(region_of.get(s.node, ""))
        # Not one slice's: an output, alive after the step (a module's final state), or made by backward (the
        # slices' gradients add up into whole-size buffers: scaled too, predictions were 20-33% below the measured
        # peak on test_approximate's residual nets; whole, within 1% there at 2 and 4 slices, and at most 18%
        # above on a smaller one)
        whole = share is None or s.free is None or s.phase != "fwd" or any(v in whole_outputs for v in s.views)
        nbytes, start = s.nbytes if whole else int(s.nbytes * share), lay.at(s.alloc)  # type: ignore[operator]
        sl = slicing_of_neuron.get(s.node)
        if sl is not None and s.phase == "bwd" and nbytes >= sl.out_bytes:
            if s.free is not None and s.free <= neuron_bwd_last[s.node]:
                # A sliced neuron's backward works on one slice at a time: per-step gradient buffers are
                # slice-sized.
                nbytes //= sl.k
            else:
                # The full input gradient exists only once every slice is done (the split's backward); until
                # then the slices' gradients wait (charged with the slices).
                start = max(start, lay.of(neuron_bwd_last[s.node]))
        live.add(nbytes, start, lay.at(s.free))


@dataclass(frozen=True)
class _PlanFacts:
    """What the charges of a forward storage read from the plan (see :func:`_storage_charges`): the recompute
    regions (by node, by name, their replay blocks), the replay blocks that run (their starts), each sliced region's
    recomputed neuron input, the inputs kept by reference, the packed-saves regions' packed inputs, the whole-slice
    shares and outputs."""

    region_of: dict[str, str]
    by_region: dict[str, RegionPlan]
    parts: dict[str, _RegionReplays]
    runs: dict[_Block, int]
    x_storage: dict[str, StorageRecord]
    kept_by_ref: dict[str, list[str]]
    packs: dict[str, dict[str, int]]
    whole_share: dict[str, float]
    whole_outputs: set[str]


# A charge's ends are symbolic positions ``(kind, a, b)``, placed by _place once the plan's layout is known: a
# recorded event (that must be simulated), a recorded event or else the end of the step, the end of the step, the
# last of some forward events (``a``: a tuple), a replay block's start plus an offset, and (a stop only) where
# backward is done with a recomputed tensor (``_used_at`` of event ``a``, else the last backward event of region
# ``b``). A charge's stop is as placed, or not before its start.
_EVENT, _EVENT_OR_END, _END, _LAST_USE, _BLOCK, _USED = range(6)
_AS_PLACED, _NOT_BEFORE_START = range(2)

_Where = tuple[int, Any, Any]
_Charge = tuple[int, _Where, _Where, int]


class _Charges:
    """The charges of some forward storages under a plan (:func:`_storage_charges`): ``placed``, symbolic
    ``(nbytes, start, stop, how)`` intervals (:func:`_place`); ``local``, those inside one segment of the layout
    whose positions only the home region's plan fixes, summed as a difference array from the segment's start (its
    forward unit, keyed by its name, from its ``pack`` position: ``unit`` gives its events' offsets; or one of its
    replay blocks); ``packing``, ``(storage index, values, bits)`` per value packed by a packed-saves region."""

    def __init__(self, home: str | None = None, unit: dict[int, int] | None = None) -> None:
        self.placed: list[_Charge] = []
        self.local: dict[_Block | str, list[int]] = {}
        self.packing: list[tuple[int, int, int]] = []
        self._home, self._unit = home, unit or {}
        self._unit_len = max(self._unit.values(), default=0) + 3

    def _offset(self, where: _Where) -> int | None:
        """A symbolic position's offset in the home region's forward unit, ``None`` if elsewhere."""
        kind, a, _ = where
        if kind == _EVENT or kind == _EVENT_OR_END:
            return self._unit.get(a)
        if kind == _LAST_USE and all(e in self._unit for e in a):
            return max(self._unit[e] for e in a)
        return None

    def charge(self, nbytes: int, start: _Where, stop: _Where, how: int = _AS_PLACED) -> None:
        if self._home is not None and how == _AS_PLACED:
            a, b = self._offset(start), self._offset(stop)
            if a is not None and b is not None:
                self.segment(self._home, self._unit_len, nbytes, a, b)
                return
        self.placed.append((nbytes, start, stop, how))

    def segment(self, segment: _Block | str, length: int, nbytes: int, start: int, stop: int) -> None:
        """``nbytes`` alive at offsets ``start..stop`` of a segment of ``length`` positions."""
        if nbytes > 0 and stop >= start:
            deltas = self.local.get(segment)
            if deltas is None:
                deltas = self.local[segment] = [0] * (length + 2)
            deltas[start] += nbytes
            deltas[stop + 1] -= nbytes


def _place(charges: Iterable[_Charge], live: _Live, lay: _Layout) -> None:
    """Charge symbolic intervals (see :class:`_Charges`) at the layout's positions: ``live.add`` with the ends
    placed, the common kinds inline (a search places thousands per prediction)."""
    pos, rc_start, bwd_last, last, delta = lay.pos, lay.rc_start, lay.bwd_last, lay.end - 1, live.delta
    events = len(pos)
    for nbytes, start_at, stop_at, how in charges:
        kind, a, b = start_at
        if kind == _EVENT:
            start = pos[a] if 0 <= a < events else -1
            if start < 0:
                raise KeyError(a)
        elif kind == _BLOCK:
            start = rc_start[a] + b
        else:
            start = _position(lay, start_at)
        kind, a, b = stop_at
        if kind == _EVENT_OR_END:
            stop = pos[a] if a is not None and 0 <= a < events else -1
            if stop < 0:
                stop = last
        elif kind == _USED:  # _used_at(lay, a, start, bwd_last[b]), inline
            stop = pos[a] if 0 <= a < events else -1
            if stop < start:
                stop = pos[a + 1] if 0 <= a + 1 < events else -1
                if stop < start:
                    stop = bwd_last[b]
        elif kind == _BLOCK:
            stop = rc_start[a] + b
        else:
            stop = _position(lay, stop_at)
        if how == _NOT_BEFORE_START and stop < start:
            stop = start
        if nbytes > 0 and stop >= start:
            delta[start] += nbytes
            delta[stop + 1] -= nbytes


def _position(lay: _Layout, where: _Where) -> int:
    """A symbolic position's place in the layout (see :class:`_Charges`; not ``_USED``, which needs its start)."""
    kind, a, b = where
    if kind == _EVENT:
        return lay.of(a)
    if kind == _BLOCK:
        return lay.rc_start[a] + b
    if kind == _EVENT_OR_END:
        return lay.at(a)
    if kind == _LAST_USE:
        return max(lay.of(e) for e in a)
    return lay.end - 1


def _storage_charges(rec: _Recorded, k: int, plan: _PlanFacts, out: _Charges) -> None:
    """The intervals forward storage ``k`` (of a traced node) is alive at under ``plan`` (see the module
    docstring), as charges (:class:`_Charges`)."""
    annotated, ne = rec.annotated, rec.ne
    s, views = rec.storages[k], rec.views[k]
    region_of, by_region, kept_by_ref, packs = plan.region_of, plan.by_region, plan.kept_by_ref, plan.packs
    home = region_of.get(s.node)
    share = plan.whole_share.get(home) if home is not None else None
    nbytes = s.nbytes if share is None or s.free is None or any(v in plan.whole_outputs for v in s.views) \
        else int(s.nbytes * share)  # a whole-slice region's storages are one slice's, but for its outputs
    # A frame lives until its neuron's state is reset (its final-state handles keep it, so a later backward through
    # the state still works): an input it keeps by reference lives to the end of the step.
    stop: _Where = (_END, 0, 0) if any(v in kept_by_ref for v in views) else (_EVENT_OR_END, s.free, 0)
    # Packed saves (Rule 11): a saver outside the checkpoint regions that packs this value keeps only the payload,
    # from its forward until backward last reads it (which unpacks a transient full copy).
    packers = {m: v for m in s.saved_by if m not in region_of and m in packs for v in views if packs[m].get(v)}
    for m, v in packers.items():
        info, b = annotated[v], packs[m][v]
        numel = math.prod(info.shape or ())
        out.packing.append((k, numel, b))
        at_m, used = (_EVENT, ne[m][1], 0), (_EVENT_OR_END, s.consumed, 0)
        out.charge(packed_nbytes(numel, b), at_m, used, _NOT_BEFORE_START)
        out.charge(min(numel, PACK_CHUNK) * (_ELEMENT_SIZE.get(info.dtype or "", 4) + 1), at_m, at_m)
        if s.consumed is not None:
            out.charge(s.nbytes, used, used)
    saver_regions = {region_of.get(m) for m in s.saved_by if m not in packers}
    done = _done_with(rec, s)
    saved_in_regions = bool(s.saved_by) and None not in saver_regions
    if saved_in_regions:
        # Saved only inside regions: not kept by the forward (Rule 1); dies at its natural release, or with the
        # frame that keeps it by reference as an input.
        held_by = {r for v in views for r in kept_by_ref.get(v, ())}
        release = (_LAST_USE, tuple(e for v in views for e in rec.user_ends[v]), 0) if views else \
            (_EVENT, s.alloc, 0)
        out.charge(nbytes, (_EVENT, s.alloc, 0), stop if held_by else release)
        if s.consumed is None:
            return  # never used by the recorded backward (a neuron's last state update): not recomputed
        for r in saver_regions:
            if r is None or r in held_by or s.node in by_region[r].nodes:
                continue  # recomputed by its own region's blocks (below), or alive anyway: the region's stored input
            _charge_saved_input(s, r, plan, out, done)
    else:
        out.charge(nbytes, (_EVENT, s.alloc, 0), _sliced_forward_stop(s, plan, home, stop))
    if home is not None:
        _charge_recomputed(s, home, nbytes, share, saved_in_regions and home in saver_regions, plan, out, done)


def _done_with(rec: _Recorded, s: StorageRecord) -> int | None:
    """The last backward event of the operation that last unpacked saved storage ``s``: the checkpoint drops its
    reference on unpack, but the backward function holds the tensor until it returns, so a recomputed tensor is
    alive while that function allocates its gradients. Its recorded release where that is still within the same
    node's backward (a max-pool's backward unpacks its input and indices, then allocates the input's gradient: 18%
    of the peak missed when the input was freed at the unpack); else the unpack (``s.consumed``)."""
    c = s.consumed
    if c is None or s.free is None or s.free <= c:
        return c
    events = rec.events
    reader = events[c + 1] if c + 1 < len(events) else None
    if reader is None or reader[0] != "bwd" or any(events[e] != reader for e in range(c + 1, s.free + 1)):
        return c
    return s.free


def _sliced_forward_stop(s: StorageRecord, plan: _PlanFacts, home: str | None, stop: _Where) -> _Where:
    """Where a storage of a time-sliced neuron (Rule 8) dies in the region's *forward*: one made in slice ``c`` that
    the unsliced call keeps to its tail (a step's spikes, held until all steps are stacked) dies with its slice,
    whose own stack takes its steps; everything else as recorded (``stop``)."""
    sl = plan.parts[home].slicing if home is not None else None
    if sl is None or sl.slice_ends is None or sl.tail is None or s.node != sl.neuron or s.free is None:
        return stop
    c = sl.fwd_slice.get(s.alloc)
    if c is None or c == sl.k - 1 or s.free <= sl.tail:
        return stop
    return (_EVENT, sl.slice_ends[c], 0)


def _charge_saved_input(s: StorageRecord, r: str, plan: _PlanFacts, out: _Charges, done: int | None) -> None:
    """An input of region ``r`` that ``r`` saves: it comes back when ``r`` recomputes, until backward is done with
    it; where the prefix is not kept, the first block runs the prefix too, on the input unpacked again, which lives
    until the prefix's saved tensors are dropped, once the parts are made (Rule 8)."""
    part = plan.parts[r]
    sl = part.slicing
    b = _Block(r, "all") if sl is None else sl.first_block(r) if plan.by_region[r].keep_prefix \
        else _Block(r, "prefix")
    if b in plan.runs:
        out.charge(s.nbytes, (_BLOCK, b, 0), (_USED, done, r))
    first = sl.first_block(r) if sl is not None else None
    if first is not None and first != b and first in plan.runs:
        out.charge(s.nbytes, (_BLOCK, first, 0), (_BLOCK, first, part.prefix_end))


def _charge_recomputed(s: StorageRecord, home: str, nbytes: int, share: float | None, saved_here: bool,
                       plan: _PlanFacts, out: _Charges, done: int | None) -> None:
    """A storage of region ``home`` again in the blocks that recompute it: kept (saved by the region, used by
    backward) until backward is done with it, or a temporary or output of the region, which reappears during
    recomputation and is dropped when that ends (or when it died in the forward, if earlier)."""
    part = plan.parts[home]
    sl = part.slicing
    for b, keeps in _provides(plan.by_region[home], sl, s):
        if b not in plan.runs or s is plan.x_storage.get(home):
            continue  # the sliced neuron's recomputed input is charged with the slices
        index = part.index[b]
        start = index[s.alloc]
        if saved_here and keeps and s.consumed is not None:
            out.charge(nbytes, (_BLOCK, b, start), (_USED, done, home))
        elif start <= part.stops[b]:
            length = len(part.blocks[b])
            stop_rc = min(index.get(s.free, length) if s.free is not None else length, part.stops[b])
            if sl is not None and b == sl.first_block(home) and s.node in sl.prefix_nodes:
                # The first block runs the prefix as one call that returns only the neuron's input (Rule 8): the
                # prefix's other tensors are gone before the parts are copied and the slice recomputes.
                stop_rc = min(stop_rc, part.prefix_end - 1)
            out.segment(b, length, nbytes if share is None else int(s.nbytes * share), start, max(start, stop_rc))


def _neighbourhood(rec: _Recorded, nodes: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The views and the savers of the forward storages ``nodes`` allocate (sorted): what their charges read of
    the other regions."""
    key = ("neighbourhood", nodes)
    hit = rec.memo.get(key)
    if hit is None:
        ks = [k for n in nodes for k in rec.fwd_by_node.get(n, ())]
        hit = rec.memo[key] = (tuple(sorted({v for k in ks for v in rec.views[k]})),
                               tuple(sorted({m for k in ks for m in rec.storages[k].saved_by})))
    return hit


def _unit_offsets(rec: _Recorded, r: RegionPlan) -> dict[int, int]:
    """Region ``r``'s forward unit in the layout: each forward event of its nodes -> its offset from the unit's
    first position (``pack``, ``enter``, then its nodes' events in graph order). Once per node tuple."""
    key = ("unit", r.nodes)
    hit = rec.memo.get(key)
    if hit is None:
        members = sorted(r.nodes, key=rec.order_index.__getitem__)
        hit = rec.memo[key] = {e: 2 + i for i, e in enumerate(_events_of(rec.ne, members))}
    return hit


def _region_charges(rec: _Recorded, r: RegionPlan, plan: _PlanFacts) -> _Charges:
    """The charges of the forward storages region ``r`` allocates (:func:`_storage_charges`), derived once per
    everything they read: ``r``'s plan and which of its blocks run, and, for the values those storages hold and the
    operations that save them, which regions keep them by reference, which region (its plan and running blocks)
    or packed-saves region saves them, and which are whole-slice outputs. A plan that changes one region finds
    every other region's charges already derived, unless it neighbours the change."""
    views, savers = _neighbourhood(rec, r.nodes)
    blocks = plan.parts[r.name].blocks

    def saver(m: str) -> object:
        name = plan.region_of.get(m)
        if name is None:
            return tuple(sorted(plan.packs[m].items())) if m in plan.packs else None
        if name == r.name:
            return True
        return plan.by_region[name], tuple(b in plan.runs for b in plan.parts[name].blocks)

    key = ("charges", r, tuple(b in plan.runs for b in blocks),
           tuple(tuple(plan.kept_by_ref.get(v, ())) for v in views), tuple(saver(m) for m in savers),
           tuple(v in plan.whole_outputs for v in views) if r.name in plan.whole_share else None)
    hit = rec.memo.get(key)
    if hit is None:
        hit = rec.memo[key] = _Charges(r.name, _unit_offsets(rec, r))
        for n in r.nodes:
            for k in rec.fwd_by_node.get(n, ()):
                _storage_charges(rec, k, plan, hit)
        sl = plan.parts[r.name].slicing
        if sl is not None and sl.slice_ends is not None:
            # each slice's own stack of its steps (the runtime's slice outputs), alive until they are joined
            for c in range(sl.k - 1):
                hit.charge(sl.out_bytes * sl.sizes[c] // max(1, sl.steps), (_EVENT, sl.slice_ends[c], 0),
                           (_EVENT, sl.last_event, 0))
    return hit


def _charge_outside(live: _Live, rec: _Recorded, lay: _Layout, plan: _PlanFacts) -> list[tuple[int, int, int]]:
    """The forward storages of the nodes outside the recompute regions: those the plan touches (saved or kept by
    reference by a region, saved by a packed-saves one) one by one (:func:`_storage_charges`); the rest alive from
    allocation to release. Returns the values packed (see :class:`_Charges`)."""
    region_of, packs, kept_by_ref = plan.region_of, plan.packs, plan.kept_by_ref
    touched = _Charges()
    storages, views, pos, delta, last = rec.storages, rec.views, lay.pos, live.delta, lay.end - 1
    events = len(pos)
    for n, ks in rec.fwd_by_node.items():
        if n in region_of:
            continue
        savers, viewed = rec.fwd_deps[n]
        if any(m in region_of or m in packs for m in savers) or any(v in kept_by_ref for v in viewed):
            for k in ks:
                s = storages[k]
                if any(m in region_of or m in packs for m in s.saved_by) or any(v in kept_by_ref for v in views[k]):
                    _storage_charges(rec, k, plan, touched)
                else:
                    live.add(s.nbytes, lay.of(s.alloc), lay.at(s.free))
            continue
        for nbytes, alloc, free in rec.plain_of[n]:  # live.add(nbytes, lay.of(alloc), lay.at(free)), inline
            start = pos[alloc] if 0 <= alloc < events else -1
            if start < 0:
                raise KeyError(alloc)
            stop = pos[free] if free is not None and 0 <= free < events else -1
            if stop < 0:
                stop = last
            if stop >= start:
                delta[start] += nbytes
                delta[stop + 1] -= nbytes
    _place(touched.placed, live, lay)
    return touched.packing


def _charge_storages(live: _Live, rec: _Recorded, lay: _Layout, replays: _Replays, by_region: dict[str, RegionPlan],
                     kept_by_ref: dict[str, list[str]], x_storage: dict[str, StorageRecord],
                     packs: dict[str, dict[str, int]], pack_s: Callable[[int, int], float]) -> float:
    """Every recorded storage, with the lifetime the plan gives it (see the module docstring). ``packs``: the
    packed-saves regions' nodes -> {input node: bits}. Returns the seconds packed-saves regions spend packing
    (``pack_s(values, bits)``).

    Only the storages a plan can change are looked at one by one: those its regions allocate (from each region's
    charges, derived once per region plan and neighbourhood: :func:`_region_charges`), save or keep by reference,
    those packed-saves regions save, and the backward storages of its sliced neurons and whole-slice regions
    (:func:`_charge_tail`); every other storage lives from its allocation to its release, wherever the layout puts
    those events."""
    region_of = {n: r for r in by_region for n in by_region[r].nodes}
    whole_outputs = {o for r in replays.whole_share for o in rec.io(by_region[r].nodes)[1]}
    _charge_tail(live, rec, lay, replays, by_region, region_of, whole_outputs)
    plan = _PlanFacts(region_of, by_region, replays.parts, lay.rc_start, x_storage, kept_by_ref, packs,
                      replays.whole_share, whole_outputs)
    packing: list[tuple[int, int, int]] = []
    for r in by_region.values():
        charges = _region_charges(rec, r, plan)
        _place(charges.placed, live, lay)
        for segment, deltas in charges.local.items():
            live.add_segment(lay.entry[segment] if isinstance(segment, str) else lay.rc_start[segment], deltas)
        packing += charges.packing
    packing += _charge_outside(live, rec, lay, plan)
    packing.sort(key=lambda kvb: kvb[0])  # packing's seconds add up in allocation order
    seconds = 0.0
    for _, values, bits in packing:
        seconds += pack_s(values, bits)
    return seconds


def simulate(graph: nx.DiGraph, plan: Plan | None, *, with_timeline: bool = False) -> Prediction:
    """Predict the peak memory and step time of ``plan`` (``None``: the unoptimized model).

    The stages: where the plan recomputes (:func:`_replays`), the simulated step's positions (:func:`_layout`),
    then every byte charged over the positions it is alive at (packed region inputs, time slices, whole slices,
    the recorded storages), and the peak read off the running sum.

    Linear in the recorded step (its events and storages) and the plan's regions. What does not depend on the plan
    (the storages in order and their indexes, each node's events, the backward's storages summed) is derived once
    per cost graph, and what depends on one region alone (its replay blocks, where they stop, its inputs, its
    storages' charges) once per region plan: a search predicts hundreds of plans of one graph that differ in a
    region or two.

    Args:
        graph: from :func:`build_cost_graph` (or built by hand with the same attributes). Its recorded step
            (``storages``, ``info``, ``fwd_events``, ``events``, ``order``) is derived once; replacing any of them
            makes the next call derive it again. Times are read on every call.
        plan: the plan to simulate.
        with_timeline: also return the live-bytes timeline.

    Returns:
        A :class:`Prediction`.
    """
    rec = _recorded(graph)
    annotated = rec.annotated
    every = plan.regions if plan is not None else ()
    regions = tuple(r for r in every if r.recompute)
    packs = {n: {i: b for i, b in zip(rec.io(r.nodes)[0], r.pack_bits) if b}
             for r in every if not r.recompute for n in r.nodes}
    by_region = {r.name: r for r in regions}

    replays = _replays(annotated, regions, rec.ne, rec.events, idx=rec)
    lay = _layout(rec, regions, replays)
    live = _Live(lay.end)
    kept_by_ref = _charge_region_inputs(live, rec, regions, lay)
    x_storage = _charge_slices(live, rec, lay, replays, by_region, kept_by_ref)
    _charge_whole_slices(live, rec, by_region, lay, replays)
    pack_s = functools.partial(pack_seconds, graph)
    packing_s = _charge_storages(live, rec, lay, replays, by_region, kept_by_ref, x_storage, packs, pack_s)

    # the running sum of the charges, and in the tail the storages summed once per graph
    running = list(itertools.accumulate(live.delta[:lay.end]))
    running[lay.tail_start:] = map(operator.add, running[lay.tail_start:], lay.tail_live)
    best = max(running, default=0)
    best_at = running.index(best) if best > 0 else 0  # the first position at the peak
    best = max(best, 0)
    fwd = _fwd_times(graph)
    extra = sum(fwd.get(n, 0.0) for r in regions for n in r.nodes)
    # packing: each packed value is checked and packed once in forward and unpacked once in backward
    packing_s += sum(pack_s(math.prod(annotated[i].shape or ()), b) for r in regions
                     for i, b in zip(rec.io(r.nodes)[0], r.pack_bits) if b and annotated[i].is_tensor)
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
                      tuple(zip(lay.labels, running)) if with_timeline else ())


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
