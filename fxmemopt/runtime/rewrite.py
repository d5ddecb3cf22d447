"""Stage 8, *rewrite*: build the optimized ``GraphModule`` from the traced graph and a
:class:`~fxmemopt.planning.plan.Plan`.

Each planned region's nodes are copied into a *body* graph (region inputs become placeholders, region outputs the
output) and replaced in the top-level graph by one ``call_module`` of a
:class:`~fxmemopt.runtime.checkpoint.CheckpointRegion` (plus ``getitem`` nodes when it has several outputs). Regions are
convex, so the collapsed graph is a DAG; it is emitted in a stable topological order that keeps every node as
early as the original order allows. The input graph is never mutated (Rule 3 of the design: original and
rewritten stay side by side for verification).

The result's module tree is the model's own (see :func:`fxmemopt.analysis.trace.make_graph_module`), so parameters,
buffers and ``state_dict()`` keys are shared and equal.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

from torch import fx, nn
from torch.nn.modules.batchnorm import _NormBase

from ..analysis.facts import AnnotatedGraph
from ..analysis.trace import _resolve, make_graph_module
from ..analysis.units import Units
from ..errors import InternalError, PlanError, format_error
from ..planning.plan import Plan, RegionPlan, sliceable
from ..planning.regions import is_metadata, metadata_closure, region_io, side_effects, unit_order
from .checkpoint import (
    CheckpointRegion,
    ChunkedRegion,
    PackedRegion,
    RegionSpec,
    RegionStats,
    SlicedRegion,
    region_args,
    release_args,
)
from .hierarchy import install, outline_units, region_chain

__all__ = ["rewrite"]


def _owned_buffers(model: nn.Module, paths: Sequence[str], mutated: set[tuple[str, str]],
                   stateful: dict[str, Sequence[str]]
                   ) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    buffers: dict[tuple[str, str], None] = {}
    clone: dict[tuple[str, str], None] = {}
    for path in paths:
        for sub_path, sub in model.get_submodule(path).named_modules(prefix=path):
            for name, buf in sub._buffers.items():
                if buf is None or name in stateful.get(sub_path, ()):
                    continue  # a buffer the forward rebinds is module state (snapshotted, Rule 2), not a statistic
                key = (sub_path, name)
                buffers[key] = None
                # Norm layers update statistics in training whatever mode the probe saw; others as observed.
                if key in mutated or (isinstance(sub, _NormBase) and name in (
                        "running_mean", "running_var", "num_batches_tracked")):
                    clone[key] = None
    return tuple(buffers), tuple(clone)


def _body(model: nn.Module, graph: fx.Graph, rp: RegionPlan, nodes: tuple[str, ...], inputs: tuple[str, ...],
          outputs: tuple[str, ...], node_by_name: dict[str, fx.Node]) -> fx.GraphModule:
    body = fx.Graph()
    env: dict[str, fx.Node] = {}
    box = body.placeholder("inputs")
    for k, name in enumerate(inputs):
        env[name] = body.create_node("call_function", operator.getitem, (box, k), {}, name=name)
    body.call_function(release_args, (box,))
    for name in nodes:
        env[name] = body.node_copy(node_by_name[name], lambda n: env[n.name])
    body.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    body.lint()
    targets = {str(n.target): _resolve(model, str(n.target)) for n in body.nodes if n.op == "call_module"}
    return fx.GraphModule(targets, body, class_name=f"{rp.name}_body")


def rewrite(model: nn.Module, graph: fx.Graph, constants: dict[str, Any], annotated: AnnotatedGraph, plan: Plan,
            stateful: dict[str, Sequence[str]], mutated_buffers: Sequence[tuple[str, str]],
            class_name: str, units: Units | None = None, entry_dead: Mapping[str, Sequence[str]] | None = None
            ) -> tuple[fx.GraphModule, dict[str, RegionStats]]:
    """Apply ``plan`` to the traced ``graph`` of ``model``.

    Args:
        model: the user's model (its modules are shared, never copied).
        graph: the traced graph (not mutated).
        constants: tensor constants the graph reads by ``get_attr`` (from :func:`fxmemopt.analysis.trace.trace`).
        annotated: the annotations of ``graph``.
        plan: which regions to build.
        stateful: stateful module path -> state attribute names.
        mutated_buffers: (module path, buffer) pairs the forward mutates.
        class_name: name of the generated GraphModule class.
        units: modules kept as modules (:mod:`fxmemopt.runtime.hierarchy`); ``gm.fxmemopt_units`` lists those
            kept and ``gm.fxmemopt_unit_notes`` why others were not.
        entry_dead: module path -> state names rebound before any use of their entry values
            (``ProbeResult.entry_dead``): regions keep only their metadata (checkpoint Rule 2).

    Returns:
        ``(gm, stats)``: the optimized GraphModule and the live run-time counters of each region.
    """
    units = units or Units()
    node_by_name = {n.name: n for n in graph.nodes}
    region_of: dict[str, RegionPlan] = {}
    for rp in plan.regions:
        for n in rp.nodes:
            if n in region_of:
                raise InternalError(f"node {n} is in regions {region_of[n].name} and {rp.name}")
            region_of[n] = rp
    mutated = set(mutated_buffers)
    modules: dict[str, CheckpointRegion] = {}
    io: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    stats: dict[str, RegionStats] = {}
    for rp in plan.regions:
        held_by = {units.chains.get(n, ())[-1:] for n in rp.nodes if not is_metadata(annotated, n)}
        if len(held_by) > 1:  # a saved plan made without these keep_modules
            raise PlanError(format_error(
                f"region {rp.name!r}", "crosses the boundary of a module kept with keep_modules",
                expected="every region inside one kept module (or in none)",
                got=f"nodes in {', '.join(sorted(repr(h[0]) if h else '<root>' for h in held_by))}",
                fix="Optimize without plan= to search again with these keep_modules, or pass the keep_modules the "
                    "plan was made with."))
        inputs, outputs = region_io(annotated, rp.nodes)
        if len(rp.pack_bits) != len(inputs):
            raise InternalError(f"plan for {rp.name} has {len(rp.pack_bits)} pack widths for {len(inputs)} inputs")
        io[rp.name] = (inputs, outputs)
        paths = [str(node_by_name[n].target) for n in rp.nodes if node_by_name[n].op == "call_module"]
        prefixes = tuple(dict.fromkeys(paths))
        inner_state = tuple((p, tuple(names)) for p, names in stateful.items()
                            if any(p == q or p.startswith(q + ".") for q in prefixes))
        buffers, clone = _owned_buffers(model, prefixes, mutated, stateful)
        dead = tuple((p, tuple(entry_dead[p])) for p, _ in inner_state if entry_dead and entry_dead.get(p))
        spec = RegionSpec(rp.name, rp.anchor, rp.nodes, inputs, rp.pack_bits, inner_state, buffers, clone, dead)
        stats[rp.name] = RegionStats()
        if not rp.recompute:
            # Rule 11: saved spikes packed, nothing recomputed.
            body = _body(model, graph, rp, rp.nodes, inputs, outputs, node_by_name)
            modules[rp.name] = PackedRegion(body, spec, stats[rp.name])
        elif rp.chunks > 1 and rp.whole_slices:
            # Rule 9: the whole body runs on time slices of the time-major inputs.
            ok, why, sliced = sliceable(annotated, rp.nodes)
            if not ok:
                raise InternalError(f"plan asks to slice {rp.name} whole, but {why}")
            # x.shape[0] and the like are recomputed from each slice inside the body (its inputs stay as they are)
            body = _body(model, graph, rp, metadata_closure(annotated, rp.nodes), inputs, outputs, node_by_name)
            modules[rp.name] = SlicedRegion(body, spec, stats[rp.name], chunks=rp.chunks, sliced=sliced)
        elif rp.chunks > 1:
            # Rule 8: the body is the prefix up to the neuron's input (and the state it is given, for a neuron that
            # takes its state as an argument); the neuron is called by the region.
            neuron_node = node_by_name[rp.nodes[-1]]
            args = neuron_node.args
            functional = not annotated[neuron_node.name].stateful
            arity_ok = 1 <= len(args) <= 2 if functional else len(args) == 1  # neuron(x) / neuron(x, state)
            if outputs != (neuron_node.name,) or neuron_node.op != "call_module" or neuron_node.kwargs \
                    or not arity_ok or not isinstance(args[0], fx.Node):
                raise InternalError(f"plan asks to chunk {rp.name}, which is not prefix -> neuron")
            state_node = args[1] if len(args) == 2 and isinstance(args[1], fx.Node) else None
            prefix = rp.nodes[:-1]
            body = _body(model, graph, rp, prefix, inputs,
                         (args[0].name,) if state_node is None else (args[0].name, state_node.name), node_by_name)
            path = str(neuron_node.target)
            # the neuron's own state and that of every stateful module inside it (Rule 8)
            states = tuple((p[len(path) + 1:], names) for p, names in inner_state
                           if p == path or p.startswith(path + "."))
            initial = ("module" if not functional else "absent" if len(args) == 1
                       else "body" if state_node is not None else "constant")
            modules[rp.name] = ChunkedRegion(body, model.get_submodule(path), path, states, rp.chunks, spec,
                                             stats[rp.name], keep_prefix=rp.keep_prefix, initial_state=initial,
                                             state_constant=args[1] if initial == "constant" else None,
                                             keep_starts=rp.keep_starts,
                                             time_axis=annotated[neuron_node.name].time_axis)
        else:
            body = _body(model, graph, rp, rp.nodes, inputs, outputs, node_by_name)
            modules[rp.name] = CheckpointRegion(body, spec, stats[rp.name])

    # Units (a region or a single node) in the collapsed graph's topological order.
    order = [n.name for n in graph.nodes]
    inputs_of = {n.name: [i.name for i in n.all_input_nodes] for n in graph.nodes}
    region_name = {n: rp.name for n, rp in region_of.items()}
    new = fx.Graph()
    env: dict[str, fx.Node] = {}
    chain_of: dict[fx.Node, tuple[str, ...]] = {}  # the kept modules enclosing each new node
    for u, _ in unit_order(order, inputs_of, region_name, *side_effects(annotated)):
        if u in modules:
            inputs, outputs = io[u]
            chain = region_chain(units.chains, next(rp.nodes for rp in plan.regions if rp.name == u))
            box = new.create_node("call_function", region_args, tuple(env[i] for i in inputs), {},
                                  name=f"{u}_inputs")
            call = new.call_module(u, (box,))
            chain_of[box] = chain_of[call] = chain
            if len(outputs) == 1:
                env[outputs[0]] = call
            else:
                for k, o in enumerate(outputs):
                    env[o] = new.create_node("call_function", operator.getitem, (call, k), {}, name=o)
                    chain_of[env[o]] = chain
        else:
            env[u] = new.node_copy(node_by_name[u], lambda n: env[n.name])
            chain_of[env[u]] = units.chains.get(u, ())
    new.lint()
    kept: dict[str, fx.GraphModule] = {}
    notes: list[str] = []
    if units.outlined:
        new, kept, notes = outline_units(new, model, units, chain_of, modules)
    top = {n.target for n in new.nodes if n.op == "call_module"}
    gm = make_graph_module(model, new, class_name,
                           extra={**{k: v for k, v in modules.items() if k in top}, **constants})
    fresh: set[int] = set()
    for path, unit in kept.items():
        install(gm, path, unit, fresh)
    gm.fxmemopt_units = tuple(p for p in units.outlined if _is_kept(gm, p)) + units.leaves
    gm.fxmemopt_unit_notes = tuple(notes) + tuple(f"keep_modules: {p!r} is not kept as a module: {why}"
                                                  for p, why in units.skipped)
    return gm, stats


def _is_kept(gm: nn.Module, path: str) -> bool:
    try:
        return isinstance(gm.get_submodule(path), fx.GraphModule)
    except AttributeError:
        return False
