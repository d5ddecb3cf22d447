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

__all__ = ["RegionPlan", "Plan", "checkpoint_all", "input_bits", "chunkable", "sliceable"]


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
        whole_slices: with chunks, run the *whole* region on each time slice, prefix included (Rule 9 in
            :mod:`fxmemopt.runtime`; the seed's approximate temporal split, only with ``optimize(exact=False)``;
            see :func:`sliceable`) instead of only its neuron (Rule 8).
    """

    name: str
    anchor: str
    nodes: tuple[str, ...]
    pack_bits: tuple[int, ...]
    chunks: int = 1
    keep_prefix: bool = True
    whole_slices: bool = False


@dataclass(frozen=True)
class Plan:
    """The decisions applied to a traced model: which regions are checkpointed and how inputs are stored."""

    regions: tuple[RegionPlan, ...]

    def to_dict(self) -> dict:
        """A JSON-able dict (lists and strings only)."""
        return {"regions": [{"name": r.name, "anchor": r.anchor, "nodes": list(r.nodes),
                             "pack_bits": list(r.pack_bits), "chunks": r.chunks, "keep_prefix": r.keep_prefix,
                             "whole_slices": r.whole_slices}
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


def sliceable(graph: AnnotatedGraph, nodes: tuple[str, ...]) -> tuple[bool, str, tuple[bool, ...]]:
    """Can the whole region over ``nodes`` run on time slices (Rule 9, approximate)? ``(answer, reason, sliced)``.

    Yes when every output is a tensor whose first dimension is the same ``T >= 2`` and at least one input is a
    tensor with that first dimension; ``sliced`` flags those inputs (the others reach every slice whole). Whether
    slicing changes the region's values (BatchNorm statistics, attention over T) is not decided here: the region
    is run both ways on the example after the rewrite and the summary reports the difference.
    """
    inputs, outputs = region_io(graph, nodes)
    firsts = {graph[o].shape[0] if graph[o].is_tensor and graph[o].shape else None for o in outputs}
    if len(firsts) != 1 or None in firsts:
        return False, "its outputs are not tensors with one common first (time) dimension", ()
    (steps,) = firsts
    if steps < 2:
        return False, f"its outputs have T={steps} time steps: nothing to slice", ()
    sliced = tuple(bool(graph[i].is_tensor and graph[i].op != "get_attr" and graph[i].shape
                        and graph[i].shape[0] == steps) for i in inputs)
    if not any(sliced):
        return False, f"none of its inputs is a tensor with T={steps} leading steps", ()
    return True, f"T={steps}; {sum(sliced)} of {len(inputs)} inputs sliced", sliced
