"""The facts analysis hands to planning, as plain data (no fx objects): what each graph node produces
(:class:`NodeInfo`), the values a tensor may hold (:class:`ValueSet`), and the whole annotated graph
(:class:`AnnotatedGraph`). Written by :mod:`fxmemopt.analysis.annotate`; read by everything under
:mod:`fxmemopt.planning`, the rewrite and the reports.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import networkx as nx

from ..runtime.steps import TIME_MAJOR, TimeAxis

__all__ = ["ValueSet", "REAL", "UNKNOWN", "BINARY", "MAX_INT_SET", "NodeInfo", "AnnotatedGraph"]


@dataclass(frozen=True)
class ValueSet:
    """The values a tensor may hold: ``{0, ..., hi}`` when ``hi`` is an int, else real (``hi`` None).

    ``unknown`` marks "static inference has no opinion" (opaque leaves, integer placeholders). ``negzero``: the
    integers may include ``-0.0`` (sinabs' ``MultiSpike`` gives it where the membrane is negative), which packing
    stores as one code more (:func:`~fxmemopt.runtime.packing.bits_for_max`).
    """

    hi: int | None = None
    unknown: bool = False
    negzero: bool = False

    @property
    def is_int(self) -> bool:
        return self.hi is not None

    def join(self, other: ValueSet) -> ValueSet:
        """The smallest set containing both (used for cat/stack and tuples)."""
        if self.unknown or other.unknown:
            return UNKNOWN
        if self.hi is None or other.hi is None:
            return REAL
        return ValueSet(max(self.hi, other.hi), negzero=self.negzero or other.negzero)

    def __str__(self) -> str:
        if self.unknown:
            return "unknown"
        if self.hi is None:
            return "real"
        zero = "-0," if self.negzero else ""
        return f"{{{zero}0,1}}" if self.hi == 1 else f"{{{zero}0..{self.hi}}}"


REAL = ValueSet(None)
UNKNOWN = ValueSet(None, unknown=True)
BINARY = ValueSet(1)
#: Integer sets above this bound are treated as real: they could not be packed below 8 bits anyway.
MAX_INT_SET = 255


def _int_set(hi: int, negzero: bool = False) -> ValueSet:
    return ValueSet(hi, negzero=negzero) if 0 <= hi <= MAX_INT_SET else REAL


@dataclass(frozen=True)
class NodeInfo:
    """Plain-data facts about one graph node (everything later stages need; no fx objects).

    Attributes:
        name: node name (unique in the graph).
        op: fx opcode (``placeholder``, ``call_module``, ``call_function``, ``call_method``, ``get_attr``, ``output``).
        target: module path, method name or qualified function name.
        inputs: names of the nodes this node reads, in order, without duplicates.
        module_type: class name for ``call_module`` nodes.
        module_stack: module paths enclosing this node, outermost first; a ``call_module`` node ends with its
            own path.
        is_tensor: the node produces one tensor.
        shape, dtype: of that tensor (``None`` otherwise).
        nbytes: bytes of all tensors the node produces (tuples are summed).
        requires_grad_hint: False for integer/bool outputs (they can never carry gradients).
        static, observed, value_set: static inference, example observation, and the decision (see module doc).
        stateful: the node calls a stateful module (or a leaf that contains one).
        time_chunkable: for a neuron call on one tensor with a time dimension (``time_axis``): calling the module
            on consecutive time slices reproduced its output and final state bit for bit on the example, so it may
            be recomputed in time chunks. The state is carried in the module (``stateful``) or, for a neuron that
            stores nothing, as a value: ``neuron(x)`` / ``neuron(x, s)`` returning ``(out, s)`` (norse's
            multi-step ``LIF``).
        spiking: a module call that turns real values into spikes: its output (or an element of the tuple it
            returns, such as norse's ``(spikes, state)`` or snntorch's ``(spk, mem)``) is a floating tensor holding
            only small non-negative integers on the example, while a floating input holds real values. Such a call
            seeds a region whether or not the module keeps state.
        time_steps: T, the length of the time dimension a ``time_chunkable`` call slices (0 otherwise).
        time_axis: where that call's input and output keep time (:class:`~fxmemopt.runtime.steps.TimeAxis`:
            ``[T, ...]``, ``[B, T, ...]`` or batch and time flattened); time-major where not chunkable.
        step_slices_only: a ``time_chunkable`` neuron with trainable parameters (spikingjelly's
            ``ParametricLIFNode.w``): exact only in slices of one step each, where its parameters' gradients add up
            step by step as over all steps at once (verified on the example, output, state and gradients).
        slice_refusal: for a neuron whose slices reproduce its output and state on the example but whose
            gradients autograd would sum in another order on slices (decided on the autograd graph's structure):
            why it is not ``time_chunkable``; empty otherwise.
        passes_through: the node returned one of its input tensors, or a view of all of it, and wrote none of
            them, on the example (``nn.Identity``, ``nn.Flatten``, a reshape): it computes nothing, so autograd
            saves nothing for it and a checkpoint region has nothing of it to recompute.
        per_step: the node's value is one time step's: taken from its input's leading (time) dimension by an
            integer index (``x[t]``, ``x.select(0, t)``, an item of ``unbind_steps`` or ``unbind``), or computed
            from such values (a ``stack`` or ``cat`` of them is time-major again). Its leading dimension is not time
            (at T = 1 a loop's step is ``[N, ...]``), so a region that outputs one is not sliced in time (Rule 9).
        entry_state_bytes: for a stateful module call, the bytes of the state tensors it held when called and
            read (those rebound before any use excluded: ``ProbeResult.entry_dead``): what a checkpoint region
            around it snapshots at entry and keeps until its backward (snntorch's ``init_hidden`` membrane, one per
            call of a loop in forward).
        macs: multiply-accumulates of a convolution, linear layer or matmul (0 for other nodes): the work its
            forward time scales with, for :mod:`fxmemopt.planning.timing`.
    """

    name: str
    op: str
    target: str
    inputs: tuple[str, ...]
    module_type: str | None
    module_stack: tuple[str, ...]
    is_tensor: bool
    shape: tuple[int, ...] | None
    dtype: str | None
    nbytes: int
    static: ValueSet
    observed: ValueSet
    value_set: ValueSet
    stateful: bool
    time_chunkable: bool = False
    spiking: bool = False
    time_steps: int = 0
    time_axis: TimeAxis = TIME_MAJOR
    step_slices_only: bool = False
    slice_refusal: str = ""
    passes_through: bool = False
    per_step: bool = False
    entry_state_bytes: int = 0
    macs: int = 0

    @property
    def seeds_region(self) -> bool:
        """A neuron: a module call that keeps state or produces spikes, or a spike function (a custom
        autograd.Function) called inline that produces spikes (see ``stateful`` and ``spiking``)."""
        return self.op == "call_module" and self.stateful or self.spiking


@dataclass(frozen=True)
class AnnotatedGraph:
    """The annotated graph as plain data: nodes in execution order, keyed by name.

    Attributes:
        order: node names in graph order.
        nodes: name -> NodeInfo.
        users: name -> names of nodes that read it, in graph order.
    """

    order: tuple[str, ...]
    nodes: dict[str, NodeInfo]
    users: dict[str, tuple[str, ...]]

    def __getitem__(self, name: str) -> NodeInfo:
        return self.nodes[name]

    @property
    def time_steps(self) -> frozenset[int]:
        """The time-major neurons' numbers of time steps (:attr:`NodeInfo.time_steps`, those that run several on
        ``[T, ...]``): a first dimension of that size is time, not batch, when the examples' batch dimension is
        looked for (a neuron on ``[B, T, ...]`` or on batch and time flattened says nothing about it)."""
        return frozenset(info.time_steps for info in self.nodes.values()
                         if info.time_steps and info.time_axis.dim == 0 and not info.time_axis.batch)

    @functools.cached_property
    def digraph(self) -> nx.DiGraph:
        """The data dependencies as a networkx ``DiGraph`` (input -> user), for graph questions: reachability,
        convexity, region growing. Built once per annotated graph."""
        g = nx.DiGraph()
        g.add_nodes_from(self.order)
        g.add_edges_from((i, n) for n in self.order for i in self.nodes[n].inputs)
        return g
