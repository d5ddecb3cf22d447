"""Stage 3, *regions*: which nodes form the checkpoint regions ("weight-norm-neuron" layers).

A region is a set of graph nodes whose forward is recomputed in backward from the region's inputs alone. This
stage only chooses node sets; it works on :class:`~fxmemopt.annotate.AnnotatedGraph` (names and numbers) and
never touches fx.

Two ways to find regions:

* **automatic** (``targets=None``): every call of a stateful module (a spiking neuron) seeds one region,
  together with the stateless nodes that feed it since the previous layer boundary. The walk goes backwards
  from the neuron through node inputs and stops at placeholders, parameter reads (``get_attr``), other stateful
  calls and nodes an earlier region already claimed. Seeds are taken in graph order, which keeps every region
  *convex* (no path leaves a region and comes back), so collapsing a region into one call keeps the graph acyclic.
  Nodes that feed no neuron (the classifier head) stay outside regions.
* **by module class** (``targets=(VGGBlock,)``): every call of a module whose class is a target forms one region
  of all nodes traced inside that call (the outermost target wins when targets nest). A leaf module that is a
  target forms a one-node region.

Region names come from module paths (``ckpt_features_3_lif``), so ``gm.code`` stays readable.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .annotate import AnnotatedGraph
from .errors import InternalError, RegionError, TargetsMatchNothingError, format_error

__all__ = ["Region", "find_regions", "region_io", "check_convex", "unit_order", "split_region"]

#: Opcodes that never belong to a region interior: inputs, the output, and parameter/buffer reads (which are
#: passed into regions by reference and cost nothing to keep).
_BOUNDARY_OPS = ("placeholder", "output", "get_attr")


@dataclass(frozen=True)
class Region:
    """A candidate checkpoint region.

    Attributes:
        name: a Python identifier, unique, derived from ``anchor``.
        anchor: the module path the region is named after (its neuron, or its target module).
        nodes: interior node names in graph order.
        inputs: names of outside nodes the interior reads, in order of first use.
        outputs: interior nodes read outside the region, in graph order.
        stateful: interior nodes that call stateful modules.
    """

    name: str
    anchor: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    stateful: tuple[str, ...]


def region_io(graph: AnnotatedGraph, nodes: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Inputs (outside nodes read by ``nodes``, first-use order) and outputs (nodes read outside) of a node set."""
    members = set(nodes)
    inputs: dict[str, None] = {}
    outputs: list[str] = []
    for name in graph.order:
        if name not in members:
            continue
        for i in graph[name].inputs:
            if i not in members:
                inputs.setdefault(i, None)
        if any(u not in members for u in graph.users[name]):
            outputs.append(name)
    return tuple(inputs), tuple(outputs)


def check_convex(graph: AnnotatedGraph, nodes: Iterable[str]) -> list[str]:
    """Outside nodes that lie on a path from the set back into it (empty when the set is convex)."""
    members = set(nodes)
    position = {n: i for i, n in enumerate(graph.order)}
    last = max(position[n] for n in members)
    # Forward reachability from the set's outside users, limited to nodes before the set's last member.
    frontier = [u for n in members for u in graph.users[n] if u not in members and position[u] < last]
    reached: set[str] = set()
    bad: list[str] = []
    while frontier:
        n = frontier.pop()
        if n in reached:
            continue
        reached.add(n)
        for u in graph.users[n]:
            if u in members:
                bad.append(n)
            elif position[u] < last:
                frontier.append(u)
    return sorted(set(bad), key=position.__getitem__)


def _identifier(path: str) -> str:
    ident = re.sub(r"\W", "_", path).strip("_") or "root"
    return f"ckpt_{ident}"


def _make(graph: AnnotatedGraph, anchor: str, nodes: list[str], used: set[str]) -> Region:
    position = {n: i for i, n in enumerate(graph.order)}
    ordered = tuple(sorted(nodes, key=position.__getitem__))
    inputs, outputs = region_io(graph, ordered)
    base = _identifier(anchor)
    name, k = base, 1
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    stateful = tuple(n for n in ordered if graph[n].stateful)
    return Region(name, anchor, ordered, inputs, outputs, stateful)


def _auto_regions(graph: AnnotatedGraph, within: set[str] | None = None,
                  used: set[str] | None = None) -> list[Region]:
    claimed: set[str] = set() if within is None else {n for n in graph.order if n not in within}
    regions: list[Region] = []
    used = set() if used is None else used
    for seed in graph.order:
        info = graph[seed]
        if not (info.op == "call_module" and info.stateful) or seed in claimed:
            continue
        members = [seed]
        claimed.add(seed)
        stack = list(info.inputs)
        while stack:
            n = stack.pop()
            ni = graph[n]
            if n in claimed or ni.op in _BOUNDARY_OPS or (ni.op == "call_module" and ni.stateful):
                continue
            claimed.add(n)
            members.append(n)
            stack.extend(ni.inputs)
        regions.append(_make(graph, info.target, members, used))
    return regions


def split_region(graph: AnnotatedGraph, region: Region, used: set[str]) -> list[Region]:
    """Split a multi-neuron region (a ``targets`` block) into one weight-norm-neuron region per neuron.

    The walk of the automatic mode runs inside the block only; nodes after the last neuron (a residual add) join
    the last part. Returns ``[]`` when the block has fewer than two neurons or a part would not be convex.
    """
    parts = _auto_regions(graph, within=set(region.nodes), used=used)
    if len(parts) < 2:
        return []
    covered = {n for p in parts for n in p.nodes}
    rest = [n for n in region.nodes if n not in covered]
    if rest:
        last = parts[-1]
        parts[-1] = dataclasses.replace(_make(graph, last.anchor, list(last.nodes) + rest, set()), name=last.name)
    if any(check_convex(graph, p.nodes) for p in parts):
        return []
    return parts


def _target_regions(graph: AnnotatedGraph, target_paths: set[str]) -> list[Region]:
    groups: dict[str, list[str]] = {}
    anchors: dict[str, str] = {}
    for name in graph.order:
        info = graph[name]
        if info.op in _BOUNDARY_OPS:
            continue
        for key in info.module_stack:  # outermost first: the outermost target wins
            path = key.split("@")[0]
            if path in target_paths:
                groups.setdefault(key, []).append(name)
                anchors[key] = path
                break
    used: set[str] = set()
    regions = []
    for key, members in groups.items():
        bad = check_convex(graph, members)
        if bad:
            raise RegionError(format_error(
                f"module {anchors[key]!r}", "its traced nodes do not form a self-contained region",
                expected="no path from the module's outputs back into it", got=f"via {', '.join(bad)}",
                fix="Pass a different module class in targets, or targets=None for automatic regions.",
            ))
        regions.append(_make(graph, anchors[key], members, used))
    return regions


def find_regions(graph: AnnotatedGraph, target_paths: set[str] | None = None,
                 target_names: str = "") -> list[Region]:
    """Find the candidate checkpoint regions of an annotated graph.

    Args:
        graph: the annotated graph.
        target_paths: module paths of target instances (``None``: automatic weight-norm-neuron regions).
        target_names: the target class names, for the error message.

    Returns:
        Regions in graph order of their first node; disjoint and convex.

    Raises:
        TargetsMatchNothingError: ``target_paths`` is given but no traced node lies inside any of them.
    """
    if target_paths is None:
        regions = _auto_regions(graph)
    else:
        regions = _target_regions(graph, target_paths)
        if not regions:
            raise TargetsMatchNothingError(format_error(
                f"targets=({target_names})", "no call of these module classes was traced",
                expected="at least one instance called in forward()",
                got=f"{len(target_paths)} instance(s) in the model, none called" if target_paths
                else "no instance in the model",
                fix="Check the classes (a wrapper class is not its wrapped class), or use targets=None to find "
                    "layers automatically.",
            ))
    position = {n: i for i, n in enumerate(graph.order)}
    regions.sort(key=lambda r: position[r.nodes[0]])
    seen: set[str] = set()
    for r in regions:
        if seen & set(r.nodes):
            raise InternalError(f"regions overlap at {sorted(seen & set(r.nodes))}")
        seen.update(r.nodes)
    return regions


def unit_order(order: Sequence[str], inputs: Mapping[str, Sequence[str]],
               region_of: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """The execution order of a graph once each region is collapsed into one call.

    Units are regions (named by ``region_of``) or single nodes. They are emitted in a stable topological order that
    keeps every unit as early as the original ``order`` allows (Kahn's algorithm, ties broken by the position of the
    unit's first node). Shared by the rewrite (which emits this order) and the cost model (which simulates it).

    Args:
        order: node names in graph order.
        inputs: node name -> names of the nodes it reads.
        region_of: node name -> region name, for nodes inside regions.

    Returns:
        ``[(unit, member nodes in graph order), ...]``.

    Raises:
        InternalError: the regions are not convex (collapsing them creates a cycle).
    """
    position = {n: i for i, n in enumerate(order)}
    members: dict[str, list[str]] = {}
    for n in order:
        members.setdefault(region_of.get(n, n), []).append(n)
    deps: dict[str, set[str]] = {u: set() for u in members}
    for u, names in members.items():
        for name in names:
            for i in inputs[name]:
                v = region_of.get(i, i)
                if v != u:
                    deps[u].add(v)
    waiting = {u: len(d) for u, d in deps.items()}
    dependents: dict[str, list[str]] = {u: [] for u in members}
    for u, d in deps.items():
        for v in sorted(d):
            dependents[v].append(u)
    ready = [(position[names[0]], u) for u, names in members.items() if waiting[u] == 0]
    heapq.heapify(ready)
    out: list[tuple[str, list[str]]] = []
    while ready:
        _, u = heapq.heappop(ready)
        out.append((u, members[u]))
        for v in dependents[u]:
            waiting[v] -= 1
            if waiting[v] == 0:
                heapq.heappush(ready, (position[members[v][0]], v))
    if len(out) != len(members):
        raise InternalError("regions are not convex: collapsing them created a cycle")
    return out
