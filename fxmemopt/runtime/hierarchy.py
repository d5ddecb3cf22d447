"""Stage 8, *rewrite* (kept modules): put the code of each module kept with ``optimize(keep_modules=...)`` back
into a module at its own path, which the optimized module calls.

After regions are collapsed (:mod:`fxmemopt.runtime.rewrite`), the nodes traced inside a kept module's call (its
regions' calls included: no region crosses a kept module's boundary, :mod:`fxmemopt.planning.regions`) are moved
into a ``GraphModule`` of their own, innermost modules first, and replaced by one ``call_module`` of it. That
``GraphModule`` holds the original module's children, parameters and buffers (same objects, same names), so
``state_dict()`` keys do not change, and ``fully_shard(gm.get_submodule("blocks.0"))``, forward hooks and
``torch.compile`` of it work as on the original block. Containers on the way to it (``blocks``, a ``ModuleList``)
are shallow copies in the result: the user's model is never modified.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Mapping
from typing import Any

import networkx as nx
from torch import fx, nn

from ..analysis.annotate import _target_name
from ..analysis.trace import _resolve
from ..analysis.units import Units
from ..compat import copy_non_persistent_buffers
from ..errors import ShardingError, format_error
from ..planning.regions import SIDE_EFFECT_TARGETS, convex_violations, unit_order

__all__ = ["outline_units", "install", "uncalled_modules", "UncalledModulesCheck"]


def install(root: nn.Module, path: str, module: nn.Module, fresh: set[int]) -> None:
    """Put ``module`` at ``path`` under ``root``, copying each container on the way (ids in ``fresh`` are copies
    already: the user's containers are shared with the model and must not change)."""
    *parents, last = path.split(".")
    owner = root
    for name in parents:
        child = owner._modules[name]
        if id(child) not in fresh:
            child = copy.copy(child)
            for d in ("_modules", "_parameters", "_buffers"):
                child.__dict__[d] = dict(child.__dict__[d])
            fresh.add(id(child))
            owner._modules[name] = child
        owner = child
    owner._modules[last] = module


def outline_units(graph: fx.Graph, model: nn.Module, units: Units, chain_of: dict[fx.Node, tuple[str, ...]],
                  regions: Mapping[str, nn.Module]) -> tuple[fx.Graph, dict[str, fx.GraphModule], list[str]]:
    """Move each outlined unit's nodes into a GraphModule of its own, innermost first.

    Args:
        graph: the collapsed top-level graph (not mutated).
        model: the user's model.
        units: the kept modules.
        chain_of: node of ``graph`` -> the outlined paths enclosing it, outermost first.
        regions: region name -> its module (those whose call moves into a unit are registered there).

    Returns:
        ``(graph, modules, notes)``: the top-level graph calling the outermost units, ``path -> GraphModule`` of
        those (inner ones are installed inside them), and a note per unit that could not be kept.
    """
    chain = dict(chain_of)
    built: dict[str, fx.GraphModule] = {}
    notes: list[str] = []
    fresh: set[int] = set()
    for path in sorted(units.outlined, key=lambda p: -p.count(".")):
        prefix = path + "."
        members = [n for n in graph.nodes if chain.get(n) and chain[n][-1] == path and not (
            n.op == "get_attr" and not str(n.target).startswith(prefix))]
        member_set = set(members)
        why = ""
        if not members:
            why = "no node was traced inside it"
        elif any(n.op == "call_module" and not str(n.target).startswith(prefix) and str(n.target) not in regions
                 for n in members):
            why = "its forward calls a module registered elsewhere"
        else:
            g = nx.DiGraph()
            g.add_nodes_from(graph.nodes)
            g.add_edges_from((i, n) for n in graph.nodes for i in n.all_input_nodes)
            if convex_violations(g, list(graph.nodes), member_set):
                why = "its code and the code around it interleave (a value leaves it and comes back)"
        if why:
            notes.append(f"keep_modules: {path!r} is not kept as a module: {why}; its code is inlined")
            for n in members:
                chain[n] = chain[n][:-1]
            continue
        inputs = [i for i in graph.nodes if i not in member_set and any(u in member_set for u in i.users)]
        outputs = [n for n in members if any(u not in member_set for u in n.users)]
        sub = fx.Graph()
        env: dict[fx.Node, fx.Node] = {i: sub.placeholder(i.name) for i in inputs}
        for n in members:
            env[n] = sub.node_copy(n, env.__getitem__)
            if n.op in ("call_module", "get_attr") and str(n.target).startswith(prefix):
                env[n].target = str(n.target)[len(prefix):]
        sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs) if outputs else None)
        sub.lint()
        original = model.get_submodule(path)
        targets = {}
        for n in sub.nodes:
            if n.op in ("call_module", "get_attr"):
                t = str(n.target)
                targets[t] = regions[t] if t in regions and n.op == "call_module" else \
                    built.get(prefix + t) or _resolve(original, t)
        unit = fx.GraphModule(targets, sub, class_name=type(original).__name__)
        unit.__dict__["_modules"] = dict(original._modules)
        unit.__dict__["_parameters"] = dict(original._parameters)
        unit.__dict__["_buffers"] = dict(original._buffers)
        copy_non_persistent_buffers(unit, original)
        unit.training = original.training
        for inner in [q for q in built if q.startswith(prefix)]:
            install(unit, inner[len(prefix):], built.pop(inner), fresh)
        for n in members:
            if n.op == "call_module" and str(n.target) in regions:
                unit._modules[str(n.target)] = regions[str(n.target)]
        built[path] = unit
        # the top-level graph again, with the unit collapsed into one call (stable topological order)
        order = [n.name for n in graph.nodes]
        by_name = {n.name: n for n in graph.nodes}
        barriers = [n.name for n in graph.nodes
                    if n not in member_set and n.op == "call_function" and _target_name(n) in SIDE_EFFECT_TARGETS]
        writes = {n.name: n.all_input_nodes[0].name for n in graph.nodes
                  if n.name in barriers and n.target is operator.setitem and n.all_input_nodes}
        emitted = unit_order(order, {n.name: [i.name for i in n.all_input_nodes] for n in graph.nodes},
                             {n.name: path for n in members}, barriers, writes)
        new = fx.Graph()
        new_env: dict[fx.Node, fx.Node] = {}
        new_chain: dict[fx.Node, tuple[str, ...]] = {}
        parent = chain[members[0]][:-1]
        for u, _ in emitted:
            if u != path:
                old = by_name[u]
                new_env[old] = new.node_copy(old, new_env.__getitem__)
                new_chain[new_env[old]] = chain.get(old, ())
                continue
            call = new.call_module(path, tuple(new_env[i] for i in inputs))
            new_chain[call] = parent
            if len(outputs) == 1:
                new_env[outputs[0]] = call
            for k, o in enumerate(outputs if len(outputs) > 1 else ()):
                new_env[o] = new.create_node("call_function", operator.getitem, (call, k), {}, name=o.name)
                new_chain[new_env[o]] = parent
        new.lint()
        graph, chain = new, new_chain
    return graph, built, notes


def region_chain(chains: Mapping[str, tuple[str, ...]], nodes: tuple[str, ...]) -> tuple[str, ...]:
    """The kept modules enclosing a region: those of most of its nodes (metadata it absorbed may come from
    around it)."""
    counts = Counter(chains.get(n, ()) for n in nodes)
    return counts.most_common(1)[0][0] if counts else ()


def uncalled_modules(gm: fx.GraphModule) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the modules whose code ``gm`` inlined: they enclose modules ``gm`` calls (its graph,
    its kept modules' graphs, its regions' bodies) but are not called themselves. Hooks on them never run, and
    sharding one with FSDP2 would leave its parameters sharded (see
    :class:`UncalledModulesCheck`)."""
    from .checkpoint import CheckpointRegion, ChunkedRegion

    called: set[str] = set()

    def visit(g: fx.GraphModule, prefix: str) -> None:
        for n in g.graph.nodes:
            if n.op != "call_module":
                continue
            sub = g.get_submodule(str(n.target))
            if isinstance(sub, CheckpointRegion):
                body = sub.__dict__["body"]
                called.update(str(m.target) for m in body.graph.nodes if m.op == "call_module")
                if isinstance(sub, ChunkedRegion):
                    called.add(sub.neuron_path)
                continue
            called.add(prefix + str(n.target))
            if isinstance(sub, fx.GraphModule):
                visit(sub, prefix + str(n.target) + ".")

    visit(gm, "")
    enclosing = {c.rsplit(".", k)[0] for c in called for k in range(1, c.count(".") + 1)}
    return [(p, gm.get_submodule(p)) for p in sorted(enclosing - called)]


class UncalledModulesCheck:
    """A forward pre-hook of an optimized module: raise :class:`~fxmemopt.errors.ShardingError` when a module it
    never calls (a traced block whose code was inlined) was sharded with FSDP2's ``fully_shard``, instead of the
    "mixed torch.Tensor and DTensor" error torch would raise deep inside the first layer.

    Costs one ``isinstance`` per such module and call (none when ``torch.distributed`` is unavailable).
    """

    def __init__(self, uncalled: list[tuple[str, nn.Module]], kept: tuple[str, ...]) -> None:
        self.uncalled = uncalled
        self.kept = kept
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # no torch.distributed in this build: nothing can be sharded
            FSDPModule = None  # noqa: N806
        self.fsdp_module = FSDPModule

    def __call__(self, module: nn.Module, args: Any) -> None:
        if self.fsdp_module is None:
            return
        for path, m in self.uncalled:
            if isinstance(m, self.fsdp_module):
                raise ShardingError(format_error(
                    f"module {path!r} (sharded with fully_shard)",
                    "is never called by the optimized module: its code was traced into its parent, so FSDP2 would "
                    "never gather its parameters",
                    expected=f"fully_shard on modules the optimized module calls (kept: {list(self.kept) or 'none'})",
                    got=f"{type(m).__name__} at {path!r}",
                    fix=f"Optimize with keep_modules=[{path!r}, ...] (or the block class), then shard with "
                        f"fxmemopt.distributed.fully_shard(gm, **fsdp_kwargs)."))
