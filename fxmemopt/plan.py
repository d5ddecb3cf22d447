"""Stage 5, *plan*: what to do with each region, as a frozen, hashable, JSON-able value.

A :class:`Plan` lists the regions to checkpoint and, for each region input, how it is stored for backward.
Planning functions are pure: they take :class:`~fxmemopt.regions.Region` records and the
:class:`~fxmemopt.annotate.AnnotatedGraph` (names and numbers) and never touch fx or modules.

:func:`checkpoint_all` is the "level 1" plan: every candidate region becomes a checkpoint region, and every
region input whose value set is a small integer range is packed at the narrowest width that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .annotate import AnnotatedGraph
from .packing import bits_for_max
from .regions import Region, region_io

__all__ = ["RegionPlan", "Plan", "checkpoint_all", "input_bits", "chunkable"]


@dataclass(frozen=True)
class RegionPlan:
    """One checkpoint region of a plan.

    Attributes:
        name: attribute name of the region in the optimized module.
        anchor: module path it is named after.
        nodes: interior node names (original graph), in graph order.
        pack_bits: per region input (see :attr:`Region.inputs`), 1/2/8 = packed at that width, 0 = kept as is.
        chunks: recompute the region's neuron in this many time slices (1: whole; see Rule 8 in
            :mod:`fxmemopt.runtime`); only for regions :func:`chunkable` accepts.
        keep_prefix: with chunks, keep the prefix's recomputed tensors for its backward (faster) or recompute it
            again (less memory).
    """

    name: str
    anchor: str
    nodes: tuple[str, ...]
    pack_bits: tuple[int, ...]
    chunks: int = 1
    keep_prefix: bool = True


@dataclass(frozen=True)
class Plan:
    """The decisions applied to a traced model: which regions are checkpointed and how inputs are stored."""

    regions: tuple[RegionPlan, ...]

    def to_dict(self) -> dict:
        """A JSON-able dict (lists and strings only)."""
        return {"regions": [{"name": r.name, "anchor": r.anchor, "nodes": list(r.nodes),
                             "pack_bits": list(r.pack_bits), "chunks": r.chunks, "keep_prefix": r.keep_prefix}
                            for r in self.regions]}


def input_bits(graph: AnnotatedGraph, node: str, compress: bool) -> int:
    """Packing width for a region input produced by ``node`` (0: keep as is)."""
    info = graph[node]
    if not compress or not info.is_tensor or not info.value_set.is_int:
        return 0
    return bits_for_max(info.value_set.hi)


def checkpoint_all(regions: list[Region], graph: AnnotatedGraph, compress: bool = True) -> Plan:
    """Level 1: checkpoint every region; pack every input whose value set allows it (when ``compress``)."""
    return Plan(tuple(
        RegionPlan(r.name, r.anchor, r.nodes, tuple(input_bits(graph, i, compress) for i in r.inputs))
        for r in regions
    ))


def chunkable(graph: AnnotatedGraph, nodes: tuple[str, ...]) -> tuple[bool, str]:
    """Can a region over ``nodes`` be recomputed in time chunks exactly? ``(answer, reason)``.

    Yes when its last node is its only stateful call and its output is the region's only output (a
    weight-norm-neuron layer), and that
    module was verified time-chunkable on the example (:attr:`NodeInfo.time_chunkable`). Everything before the
    neuron (BatchNorm over T*N included) still runs over all time steps at once, so nothing changes meaning.
    """
    last = graph[nodes[-1]]
    stateful = [n for n in nodes if graph[n].stateful]
    if stateful != [last.name] or last.op != "call_module":
        return False, "the region's last node is not its only stateful module"
    if any(u in nodes for u in graph.users[last.name]):
        return False, "the neuron's output is used inside the region"
    if region_io(graph, nodes)[1] != (last.name,):
        return False, "the region has outputs besides the neuron's (e.g. a residual sum used later)"
    if not last.time_chunkable:
        return False, (f"{last.target} ({last.module_type}) did not reproduce its output and state when run on "
                       f"time slices of the example, or its input is not one [T, ...] tensor with T >= 2")
    return True, "neuron verified chunkable on the example"
