"""Stage 5, *plan*: what to do with each region, as a frozen, hashable, JSON-able value.

A :class:`Plan` lists the regions to checkpoint and, for each region input, how it is stored for backward.
Planning functions are pure: they take :class:`~fxmemopt.planning.regions.Region` records and the
:class:`~fxmemopt.analysis.annotate.AnnotatedGraph` (names and numbers) and never touch fx or modules.

:func:`checkpoint_all` is the "level 1" plan: every candidate region becomes a checkpoint region, and every
region input whose value set is a small integer range is packed at the narrowest width that holds it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._version import __version__
from ..analysis.facts import AnnotatedGraph
from ..errors import PlanError, format_error
from ..runtime.packing import SUPPORTED_BITS, bits_for_max
from .regions import Region, check_convex, region_io

__all__ = ["RegionPlan", "Plan", "checkpoint_all", "input_bits", "chunkable", "sliceable", "graph_fingerprint",
           "inputs_signature", "check_plan", "PLAN_FORMAT",
           "checkpoint_every"]

#: The ``format`` field of plan files; bumped when the layout changes incompatibly.
PLAN_FORMAT = "fxmemopt-plan/1"
_REGION_KEYS = {"name": str, "anchor": str, "nodes": list, "pack_bits": list, "chunks": int, "keep_prefix": bool,
                "whole_slices": bool}


@dataclass(frozen=True)
class RegionPlan:
    """One checkpoint region of a plan.

    Attributes:
        name: attribute name of the region in the optimized module.
        anchor: module path it is named after.
        nodes: interior node names (original graph), in graph order.
        pack_bits: per region input (see :attr:`Region.inputs`), 1/2/8 = packed at that width, 0 = kept as is.
        chunks: recompute the region's neuron in this many time slices (1: whole; see Rule 8 in
            :mod:`fxmemopt.runtime.checkpoint`); only for regions :func:`chunkable` accepts.
        keep_prefix: with chunks, keep the prefix's recomputed tensors for its backward (faster) or recompute it
            again (less memory).
        whole_slices: with chunks, run the *whole* region on each time slice, prefix included (Rule 9 in
            :mod:`fxmemopt.runtime.checkpoint`; the seed's approximate temporal split, only with
            ``optimize(exact=False)``;
            see :func:`sliceable`) instead of only its neuron (Rule 8).
        recompute: ``False`` for a *packed-saves* region (Rule 11): nothing is recomputed; where its nodes save one
            of its packed inputs for backward, the saved tensor is stored packed (an operation outside the
            checkpoint regions that saves spikes: a convolution's input, a max pool's, an attention matmul's).
        keep_starts: with chunks (Rule 8), keep every slice's start state from the one no-grad replay of the
            neuron instead of one every :func:`checkpoint_every` slices: ``k`` states alive at once during the
            region's backward instead of about ``2 sqrt(k)``, and no second replay of each segment (a third less
            neuron replay at 8 slices). Chosen where the region's backward is not at the predicted peak.
    """

    name: str
    anchor: str
    nodes: tuple[str, ...]
    pack_bits: tuple[int, ...]
    chunks: int = 1
    keep_prefix: bool = True
    whole_slices: bool = False
    recompute: bool = True
    keep_starts: bool = False


@dataclass(frozen=True)
class Plan:
    """The decisions applied to a traced model: which regions are checkpointed and how inputs are stored.

    A plan is plain data and saves as JSON (never pickle): ``summary.plan.to_json()`` and
    ``Plan.from_json(text)``; ``fxmemopt.optimize(model, example_inputs, plan=...)`` applies a saved plan without
    searching or measuring. It carries the fingerprint of the traced graph it was made for
    (:func:`graph_fingerprint`) and the example inputs' shapes and dtypes (:func:`inputs_signature`), so applying
    it to a model it does not fit fails with a :class:`~fxmemopt.errors.PlanError` that says what differs.

    Attributes:
        regions: the regions, in graph order.
        graph_fingerprint: of the traced graph the plan was made for ("" when unknown).
        inputs: the example inputs' ``(shape, dtype)`` (shape ``None`` for non-tensors).
        guards: what the trace specialized on, one ``"kind(expression) == value"`` line per guard
            (:class:`fxmemopt.analysis.trace.Guard`); a plan applies only to a trace that took the same decisions.
    """

    regions: tuple[RegionPlan, ...]
    graph_fingerprint: str = ""
    inputs: tuple[tuple[tuple[int, ...] | None, str], ...] = ()
    guards: tuple[str, ...] = ()

    def to_dict(self, report: dict[str, Any] | None = None) -> dict[str, Any]:
        """A JSON-able dict (lists, numbers and strings only); ``report`` is stored alongside for humans and
        ``fxmemopt explain`` (ignored when the plan is applied)."""
        d: dict[str, Any] = {
            "format": PLAN_FORMAT, "fxmemopt_version": __version__, "graph_fingerprint": self.graph_fingerprint,
            "inputs": [{"shape": None if shape is None else list(shape), "dtype": dtype}
                       for shape, dtype in self.inputs],
            "guards": list(self.guards),
            "regions": [{"name": r.name, "anchor": r.anchor, "nodes": list(r.nodes), "pack_bits": list(r.pack_bits),
                         "chunks": r.chunks, "keep_prefix": r.keep_prefix, "whole_slices": r.whole_slices,
                         "recompute": r.recompute, "keep_starts": r.keep_starts}
                        for r in self.regions]}
        if report is not None:
            d["report"] = report
        return d

    def to_json(self, report: dict[str, Any] | None = None, indent: int | None = 1) -> str:
        """The plan as JSON text (see :meth:`from_json`)."""
        return json.dumps(self.to_dict(report), indent=indent)

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> Plan:
        """Read a plan from :meth:`to_dict`'s layout; :class:`~fxmemopt.errors.PlanError` names the bad field."""
        def bad(field: str, expected: str, got: Any) -> PlanError:
            return PlanError(format_error(f"{source}: {field}", "is not a valid plan field", expected=expected,
                                          got=repr(got)[:200],
                                          fix="Save plans with summary.plan.to_json() (or `fxmemopt optimize "
                                              "--save-plan`) and do not edit them by hand."))
        if not isinstance(d, dict):
            raise bad("top level", "a JSON object", type(d).__name__)
        if d.get("format") != PLAN_FORMAT:
            raise bad("format", repr(PLAN_FORMAT), d.get("format"))
        fp = d.get("graph_fingerprint", "")
        if not isinstance(fp, str):
            raise bad("graph_fingerprint", "a string", fp)
        inputs = d.get("inputs", [])
        if not isinstance(inputs, list):
            raise bad("inputs", "a list", inputs)
        sig = []
        for k, i in enumerate(inputs):
            ok = isinstance(i, dict) and isinstance(i.get("dtype"), str) and (
                i.get("shape") is None or (isinstance(i.get("shape"), list)
                                           and all(isinstance(n, int) for n in i["shape"])))
            if not ok:
                raise bad(f"inputs[{k}]", '{"shape": [ints] or null, "dtype": str}', i)
            sig.append((None if i["shape"] is None else tuple(i["shape"]), i["dtype"]))
        guards = d.get("guards", [])
        if not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
            raise bad("guards", "a list of strings", guards)
        regions = d.get("regions")
        if not isinstance(regions, list):
            raise bad("regions", "a list of region objects", regions)
        out = []
        for k, r in enumerate(regions):
            if not isinstance(r, dict):
                raise bad(f"regions[{k}]", "an object", r)
            for key, typ in _REGION_KEYS.items():
                v = r.get(key)
                if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                    raise bad(f"regions[{k}].{key}", typ.__name__, v)
            if not r["nodes"] or not all(isinstance(n, str) for n in r["nodes"]):
                raise bad(f"regions[{k}].nodes", "a non-empty list of node names", r["nodes"])
            if not all(isinstance(b, int) and not isinstance(b, bool) and b in (0, *SUPPORTED_BITS)
                       for b in r["pack_bits"]):
                raise bad(f"regions[{k}].pack_bits", f"a list of 0 or {'/'.join(map(str, SUPPORTED_BITS))}",
                          r["pack_bits"])
            if r["chunks"] < 1:
                raise bad(f"regions[{k}].chunks", "an int >= 1", r["chunks"])
            recompute = r.get("recompute", True)  # absent in plans saved before packed-saves regions
            if not isinstance(recompute, bool):
                raise bad(f"regions[{k}].recompute", "bool", recompute)
            keep_starts = r.get("keep_starts", False)  # absent in plans saved before it existed
            if not isinstance(keep_starts, bool):
                raise bad(f"regions[{k}].keep_starts", "bool", keep_starts)
            out.append(RegionPlan(r["name"], r["anchor"], tuple(r["nodes"]), tuple(r["pack_bits"]), r["chunks"],
                                  r["keep_prefix"], r["whole_slices"], recompute, keep_starts))
        return cls(tuple(out), fp, tuple(sig), tuple(guards))

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        """Read a plan saved by :meth:`to_json`.

        Raises:
            PlanError: the text is not JSON or not a plan (the message names the offending field).
        """
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as e:
            raise PlanError(format_error(source, "is not valid JSON", got=str(e),
                                         fix="Pass the text of a file written by summary.plan.to_json().")) from e
        return cls.from_dict(d, source)


def graph_fingerprint(graph: AnnotatedGraph) -> str:
    """A short hash of the traced graph's structure: every node's name, opcode, target and inputs, in order.

    Two models with the same architecture (and the same tracing) have the same fingerprint whatever their
    weights; any change to layers, their order or their wiring changes it.
    """
    structure = [[n, graph[n].op, graph[n].target, list(graph[n].inputs)] for n in graph.order]
    return hashlib.sha256(json.dumps(structure).encode()).hexdigest()[:16]


def inputs_signature(inputs: Any) -> tuple[tuple[tuple[int, ...] | None, str], ...]:
    """``(shape, dtype)`` of each example input (shape ``None`` and the type name for non-tensors)."""
    import torch

    return tuple((tuple(a.shape), str(a.dtype).replace("torch.", "")) if isinstance(a, torch.Tensor)
                 else (None, type(a).__name__) for a in inputs)


def guard_lines(guards: Sequence[Any]) -> tuple[str, ...]:
    """The plan file's form of :class:`fxmemopt.analysis.trace.Guard` objects: ``kind(expression) == value``."""
    return tuple(f"{g.kind}({g.expression}) == {g.expected!r}" for g in guards)


def check_plan(plan: Plan, graph: AnnotatedGraph, source: str = "plan", guards: tuple[str, ...] = ()) -> None:
    """Check that ``plan`` fits the traced ``graph`` (raises :class:`~fxmemopt.errors.PlanError` naming what
    does not): same fingerprint, same guards (``guards``: :func:`guard_lines` of this trace), existing and convex
    regions, one packing width per region input, time slices only where they apply."""
    fix = "Re-run fxmemopt.optimize on this model (without plan=) and save the new plan."
    if plan.graph_fingerprint and plan.graph_fingerprint != graph_fingerprint(graph):
        known = set(graph.order)
        missing = sorted({n for r in plan.regions for n in r.nodes if n not in known})
        detail = (f"nodes {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} of the plan are not in the "
                  f"model's graph" if missing else "same node names, different layers or wiring")
        raise PlanError(format_error(source, "was made for a different model", expected=f"graph fingerprint "
                                     f"{plan.graph_fingerprint}", got=f"{graph_fingerprint(graph)} ({detail})",
                                     fix=fix))
    if plan.guards != guards:
        differ = [f"{a} vs {b}" for a, b in zip(plan.guards, guards) if a != b]
        detail = differ[0] if differ else f"{len(plan.guards)} vs {len(guards)} guards"
        raise PlanError(format_error(source, "was made for a trace that specialized on other example inputs",
                                     expected="the plan's guards", got=detail,
                                     fix="Apply it with example inputs like the ones it was made with (its "
                                         "'inputs' field), or re-run fxmemopt.optimize without plan=."))
    seen: dict[str, str] = {}
    for r in plan.regions:
        what = f"{source}: region {r.name!r}"
        unknown = [n for n in r.nodes if n not in graph.nodes]
        if unknown:
            raise PlanError(format_error(what, "names nodes the model's graph does not have",
                                         got=", ".join(unknown[:5]), fix=fix))
        for n in r.nodes:
            if n in seen:
                raise PlanError(format_error(what, f"shares node {n!r} with region {seen[n]!r}", fix=fix))
            seen[n] = r.name
        if check_convex(graph, r.nodes):
            raise PlanError(format_error(what, "is not a convex set of nodes (a path leaves and re-enters it)",
                                         fix=fix))
        inputs = region_io(graph, r.nodes)[0]
        if len(r.pack_bits) != len(inputs):
            raise PlanError(format_error(what, "has the wrong number of packing widths",
                                         expected=f"{len(inputs)} (one per input)", got=str(len(r.pack_bits)),
                                         fix=fix))
        if not r.recompute and (r.chunks > 1 or r.whole_slices or not any(r.pack_bits)):
            raise PlanError(format_error(what, "is a packed-saves region (recompute=false) with time slices or "
                                         "nothing to pack", expected="chunks=1 and at least one packed input",
                                         got=f"chunks={r.chunks}, pack_bits={list(r.pack_bits)}", fix=fix))
        if r.keep_starts and (r.chunks == 1 or r.whole_slices):
            raise PlanError(format_error(what, "keeps slice start states (keep_starts=true) but does not recompute "
                                         "its neuron in time slices", expected="chunks > 1 and whole_slices=false",
                                         got=f"chunks={r.chunks}, whole_slices={str(r.whole_slices).lower()}",
                                         fix=fix))
        if r.chunks > 1:
            ok, why = sliceable(graph, r.nodes)[:2] if r.whole_slices else chunkable(graph, r.nodes)
            if not ok:
                raise PlanError(format_error(what, f"asks for {r.chunks} time slices, but {why}", fix=fix))
            last = graph[r.nodes[-1]]
            if not r.whole_slices and last.step_slices_only and r.chunks < last.time_steps:
                raise PlanError(format_error(
                    what, f"asks for {r.chunks} time slices of its neuron {last.target} ({last.module_type}), which "
                    "has trainable parameters: exact only in one slice per time step",
                    expected=f"chunks={last.time_steps}", got=f"chunks={r.chunks}", fix=fix))


def input_bits(graph: AnnotatedGraph, node: str, compress: bool) -> int:
    """Packing width for a region input produced by ``node`` (0: keep as is)."""
    info = graph[node]
    if not compress or not info.is_tensor or not info.value_set.is_int:
        return 0
    return bits_for_max(info.value_set.hi, info.value_set.negzero)


def checkpoint_all(regions: list[Region], graph: AnnotatedGraph, compress: bool = True) -> Plan:
    """Level 1: checkpoint every region; pack every input whose value set allows it (when ``compress``)."""
    return Plan(tuple(
        RegionPlan(r.name, r.anchor, r.nodes, tuple(input_bits(graph, i, compress) for i in r.inputs))
        for r in regions
    ))


def chunkable(graph: AnnotatedGraph, nodes: tuple[str, ...]) -> tuple[bool, str]:
    """Can a region over ``nodes`` be recomputed in time chunks exactly? ``(answer, reason)``.

    Yes when its last node is a neuron (a stateful module, or a stateless one that returns its state, such as
    norse's ``LIF``), no other node of the region keeps state, the neuron's output is the region's only output (a
    weight-norm-neuron layer), and the neuron was verified time-chunkable on the example
    (:attr:`NodeInfo.time_chunkable`). Everything before the neuron (BatchNorm over T*N included) still runs over
    all time steps at once, so nothing changes meaning. A neuron whose slices give its values but whose gradients
    autograd would sum in another order on slices (:attr:`NodeInfo.slice_refusal`: a synapse filter, whose current
    is both its output and its carried state) is refused with that reason: the runtime cannot reorder autograd's
    sums (Rule 8 of :mod:`fxmemopt.runtime.checkpoint`).
    """
    last = graph[nodes[-1]]
    stateful = [n for n in nodes if graph[n].stateful]
    if not last.seeds_region or stateful not in ([], [last.name]):
        return False, "the region's last node is not its only neuron"
    if any(u in nodes for u in graph.users[last.name]):
        return False, "the neuron's output is used inside the region"
    if region_io(graph, nodes)[1] != (last.name,):
        return False, "the region has outputs besides the neuron's (e.g. a residual sum used later)"
    if not last.time_chunkable and last.slice_refusal:
        return False, f"{last.target} ({last.module_type}): {last.slice_refusal}"
    if not last.time_chunkable:
        return False, (f"{last.target} ({last.module_type}) did not reproduce its output and state when run on "
                       f"time slices of the example, or its input is not one [T, ...] tensor with T >= 2")
    return True, "neuron verified chunkable on the example"


def sliceable(graph: AnnotatedGraph, nodes: tuple[str, ...]) -> tuple[bool, str, tuple[bool, ...]]:
    """Can the whole region over ``nodes`` run on time slices (Rule 9, approximate)? ``(answer, reason, sliced)``.

    Yes when every output is a tensor whose first dimension is the same ``T >= 2`` and at least one input is a
    tensor with that first dimension; ``sliced`` flags those inputs (the others reach every slice whole). Values of
    one time step (:attr:`~fxmemopt.analysis.facts.NodeInfo.per_step`: ``x[t]`` in a loop over time, and what is
    computed from it) have no time dimension, whatever their first one is: a region that outputs one is not sliced,
    and an input that is one is not sliced (found by the property run: at T = 1 a loop's step is ``[N, ...]``, and
    its region was sliced along the batch, each slice's neuron starting from the state another sample left).
    Whether slicing changes the region's values (BatchNorm statistics, attention over T) is not decided here: the
    region is run both ways on the example after the rewrite and the summary reports the difference.
    """
    inputs, outputs = region_io(graph, nodes)
    if any(graph[o].per_step for o in outputs):
        return False, "its outputs are single time steps (x[t] in a loop over time): no time dimension", ()
    firsts = {graph[o].shape[0] if graph[o].is_tensor and graph[o].shape else None for o in outputs}
    if len(firsts) != 1 or None in firsts:
        return False, "its outputs are not tensors with one common first (time) dimension", ()
    (steps,) = firsts
    if steps < 2:
        return False, f"its outputs have T={steps} time steps: nothing to slice", ()
    sliced = tuple(bool(graph[i].is_tensor and graph[i].op != "get_attr" and graph[i].shape
                        and graph[i].shape[0] == steps and not graph[i].per_step) for i in inputs)
    if not any(sliced):
        return False, f"none of its inputs is a tensor with T={steps} leading steps", ()
    return True, f"T={steps}; {sum(sliced)} of {len(inputs)} inputs sliced", sliced


def checkpoint_every(k: int, keep_starts: bool = False) -> int:
    """With ``k`` time slices, a slice start state is kept every this many slices (about ``sqrt(k)``; 1 with
    ``keep_starts``): the schedule the runtime follows (Rule 8 in :mod:`fxmemopt.runtime.checkpoint`) and the cost
    model predicts."""
    return 1 if keep_starts else math.isqrt(max(k - 1, 0)) + 1
