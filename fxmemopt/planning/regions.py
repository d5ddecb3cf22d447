"""Stage 3, *regions*: which nodes form the checkpoint regions ("weight-norm-neuron" layers).

A region is a set of graph nodes whose forward is recomputed in backward from the region's inputs alone. This
stage only chooses node sets; it works on :class:`~fxmemopt.analysis.annotate.AnnotatedGraph` (names and numbers) and
never touches fx.

Two ways to find regions:

* **automatic** (``targets=None``): every neuron call (a module that keeps state or turns real values into spikes,
  see :attr:`~fxmemopt.analysis.annotate.NodeInfo.seeds_region`) seeds one region,
  together with the stateless nodes that feed it since the previous layer boundary. The walk goes backwards
  from the neuron through node inputs and stops at placeholders, parameter reads (``get_attr``), other stateful
  calls and nodes an earlier region already claimed. Seeds are taken in graph order, which keeps every region
  *convex* (no path leaves a region and comes back), so collapsing a region into one call keeps the graph acyclic.
  Nodes that feed no neuron (the classifier head) stay outside regions. Where a grown region computes a value also
  read outside it (membrane-shortcut blocks: the previous residual sum, which is also the next shortcut), the nodes
  behind that value are cut out: the neuron's region starts at the value (one output, sliceable in time), and the
  layers cut out form regions without a neuron (:func:`_side_outputs_cut`).
* **by module class** (``targets=(VGGBlock,)``): every call of a module whose class is a target forms one region
  of all nodes traced inside that call (the outermost target wins when targets nest). A leaf module that is a
  target forms a one-node region.

Both modes then tidy the *metadata* nodes (Python values that hold no tensor: ``x.shape``, ``x.size(0)``, ``T * N``,
and the capture's ``check_guard`` nodes): those computed from a region's inputs alone are moved out in front of it
(they become cheap int inputs, available to later regions too, instead of extra outputs), and those that read the
region's interior and are used only by guards move in (so a guard does not make the region output an interior
tensor). A region then has one output in the usual case, which time slicing needs.

Region names come from module paths (``ckpt_features_3_lif``), so ``gm.code`` stays readable.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import networkx as nx

from ..analysis.facts import AnnotatedGraph
from ..errors import InternalError, RegionError, TargetsMatchNothingError, format_error

#: Graph nodes with side effects: assignments to module state (``fxmemopt.analysis.trace.set_module_state``; named
#: here, not
#: imported: planning never imports the tracer) and item assignments into a tensor (``out[t] = v``, norse's ConvNet
#: writing each step's voltages into a preallocated tensor). Never inside a region, ordered after every unit before
#: them that reads what they write, and before every unit that follows them.
SIDE_EFFECT_TARGETS = frozenset({"fxmemopt.analysis.trace.set_module_state",
                                 "fxmemopt.analysis.trace.call_module_method", "_operator.setitem"})

__all__ = ["Region", "find_regions", "region_io", "check_convex", "convex_violations", "unit_order", "split_region",
           "metadata_closure", "is_metadata", "side_effects"]

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
    """Outside nodes on a path from the set back into it, that feed the set (empty when the set is convex); see
    :func:`convex_violations`."""
    return convex_violations(graph.digraph, graph.order, nodes)


def convex_violations(digraph: nx.DiGraph, order: Sequence[Hashable], nodes: Iterable[Hashable]) -> list[Hashable]:
    """Outside nodes on a path from ``nodes`` back into them, that feed them (empty when the set is convex), in a
    DAG whose topological ``order`` is given: the nodes both reachable from the set and reaching it (networkx
    ``bfs_layers`` forward and backward), restricted to the graph up to the set's last member (no path back into
    the set goes further). Works on any node type (names here, fx nodes in :mod:`fxmemopt.runtime.hierarchy`)."""
    members = set(nodes)
    position = {n: i for i, n in enumerate(order)}
    last = max(position[n] for n in members)
    upto = digraph.subgraph(order[:last + 1])
    after = {n for layer in nx.bfs_layers(upto, members) for n in layer} - members
    before = {n for layer in nx.bfs_layers(upto.reverse(copy=False), members) for n in layer} - members
    return sorted((n for n in after & before if any(u in members for u in digraph.successors(n))),
                  key=position.__getitem__)


def _picks_from_neuron(graph: AnnotatedGraph, name: str) -> bool:
    """``z, state = neuron(x)``: the ``getitem`` that picks the spikes (or the state) out of a neuron's tuple output.
    It stays outside the next region, whose input is then the spike tensor itself (packable), not the tuple."""
    info = graph[name]
    return info.op == "call_function" and info.target.endswith("getitem") and len(info.inputs) == 1 \
        and graph[info.inputs[0]].seeds_region


def is_metadata(graph: AnnotatedGraph, name: str) -> bool:
    """A node that computes a Python value holding no tensor (a shape, an int, a guard): free to move."""
    info = graph[name]
    return info.op in ("call_function", "call_method") and not info.is_tensor and info.nbytes == 0 \
        and not info.stateful and info.target not in SIDE_EFFECT_TARGETS


def metadata_closure(graph: AnnotatedGraph, nodes: Sequence[str]) -> tuple[str, ...]:
    """``nodes`` plus the metadata chains that compute their metadata inputs from their tensor inputs.

    A region whose body runs on time slices (Rule 9 of :mod:`fxmemopt.runtime.checkpoint`) must recompute
    ``x.shape[0]`` from
    the slice, not receive it from outside: this is the node set such a body is built from. Chains that read a
    tensor the region does not already read are left as inputs.
    """
    members = set(nodes)
    ordered_inputs = region_io(graph, nodes)[0]
    inputs = set(ordered_inputs)
    extra: set[str] = set()

    def chain(n: str, seen: set[str]) -> bool:
        if n in members or n in extra or n in seen:
            return True
        if not is_metadata(graph, n):
            return n in inputs or graph[n].op == "get_attr"
        seen.add(n)
        return all(chain(i, seen) for i in graph[n].inputs)

    for i in ordered_inputs:
        seen: set[str] = set()
        if is_metadata(graph, i) and chain(i, seen):
            extra |= seen
    position = {n: k for k, n in enumerate(graph.order)}
    return tuple(sorted(members | extra, key=position.__getitem__))


def _tidy(graph: AnnotatedGraph, members: list[str], free: set[str]) -> list[str]:
    """Move metadata nodes out of (hoist) and into (absorb) one region's node set (see the module docstring).

    Args:
        graph: the annotated graph.
        members: the region's nodes.
        free: nodes outside every region that may be absorbed (they are removed from it when they are).
    """
    position = {n: i for i, n in enumerate(graph.order)}
    inside = set(members)
    changed = True
    while changed:  # hoist: metadata computed from outside values only (chains such as x.shape -> [0] -> * N)
        changed = False
        for n in sorted(inside, key=position.__getitem__):
            if is_metadata(graph, n) and not any(i in inside for i in graph[n].inputs) and len(inside) > 1:
                inside.discard(n)
                changed = True
    # absorb: metadata that reads the interior and is used, transitively, only inside the region (guards)
    downstream: set[str] = set()  # outside nodes that depend on the region: reading one would break convexity
    stack = [u for n in inside for u in graph.users[n] if u not in inside]
    while stack:
        n = stack.pop()
        if n not in downstream:
            downstream.add(n)
            stack.extend(u for u in graph.users[n] if u not in inside)

    def readable(i: str) -> bool:  # what an absorbed node may read without adding a tensor input to the region
        return i in inside or i in added_set or graph[i].op == "get_attr" or (
            not graph[i].is_tensor and graph[i].nbytes == 0 and i not in downstream)

    # Reading only what the region outputs anyway (a neuron's spikes) needs no absorbing: leaving such a guard outside
    # keeps the neuron the region's last node, so it can still be sliced in time. A node read outside only by
    # metadata (norse's Lift: `T = x.shape[0]` of a stacked interior value) is not an output: its guard is absorbed.
    outputs = {n for n in inside if any(u not in inside and not is_metadata(graph, u) for u in graph.users[n])}
    added: list[str] = []
    added_set: set[str] = set()
    for n in graph.order:
        ins = graph[n].inputs
        if n in free and is_metadata(graph, n) and any(i in inside and i not in outputs or i in added_set
                                                        for i in ins) and all(readable(i) for i in ins):
            added.append(n)
            added_set.add(n)
    keep = set(added)
    changed = True
    while changed:
        changed = False
        for n in list(keep):
            # used outside, or reading a candidate that was itself dropped (it would read the region from outside)
            if any(u not in inside and u not in keep for u in graph.users[n]) or \
                    any(i in added_set and i not in keep for i in graph[n].inputs):
                keep.discard(n)
                changed = True
    for n in keep:
        free.discard(n)
    return [n for n in graph.order if n in inside or n in keep]


def _tidy_all(graph: AnnotatedGraph, regions: list[Region], within: Iterable[str] | None = None) -> list[Region]:
    """:func:`_tidy` every region (names kept); only nodes of ``within`` (default: all) may be absorbed."""
    claimed = {n for r in regions for n in r.nodes}
    free = {n for n in (graph.order if within is None else within) if n not in claimed}
    out = []
    for r in regions:
        nodes = _tidy(graph, list(r.nodes), free)
        out.append(r if tuple(nodes) == r.nodes else dataclasses.replace(_make(graph, r.anchor, nodes, set()),
                                                                         name=r.name))
    return out


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
    stateful = tuple(n for n in ordered if graph[n].seeds_region)
    return Region(name, anchor, ordered, inputs, outputs, stateful)


def _auto_regions(graph: AnnotatedGraph, within: set[str] | None = None,
                  used: set[str] | None = None, unit_of: Mapping[str, str] | None = None) -> list[Region]:
    claimed: set[str] = set() if within is None else {n for n in graph.order if n not in within}
    unit_of = unit_of or {}
    regions: list[Region] = []
    used = set() if used is None else used
    for seed in graph.order:
        info = graph[seed]
        if not info.seeds_region or seed in claimed:
            continue

        def grows(n: str, seed: str = seed) -> bool:
            """May the region seeded at ``seed`` take ``n``: not another region's, not a boundary (placeholders,
            constants, output), not another neuron or the pick of its tuple output, not a state assignment (which
            runs once, outside any region), not in another kept module (``keep_modules``)."""
            ni = graph[n]
            return n == seed or not (n in claimed or ni.op in _BOUNDARY_OPS or ni.seeds_region
                                     or _picks_from_neuron(graph, n) or ni.target in SIDE_EFFECT_TARGETS
                                     or unit_of.get(n, "") != unit_of.get(seed, ""))

        # the neuron and what feeds it back to the boundaries: its ancestors in the graph of nodes it may take
        members = {seed} | nx.ancestors(nx.subgraph_view(graph.digraph, filter_node=grows), seed)
        cut, chains = _side_outputs_cut(graph, seed, members)
        # what was cut stays claimed: a later neuron growing back through a free residual sum would take the
        # whole residual stream before it, and its region would both feed and follow this one
        claimed.update(members)
        regions.append(_make(graph, info.target, list(members - cut), used))
        for chain in chains:
            anchor = graph[max((n for n in chain if graph[n].op == "call_module"), key=graph.order.index)].target
            regions.append(_make(graph, anchor, list(chain), used))
    return regions


def _side_outputs_cut(graph: AnnotatedGraph, seed: str, members: set[str]) -> tuple[set[str], list[set[str]]]:
    """Cut a grown region where a value it computes is also read outside it; returns ``(nodes cut, chains)``.

    Membrane-shortcut and pre-activation blocks (MS-ResNet: ``x + bn(conv(sn(x)))``) put the neuron first: growing
    back from the neuron takes the previous block's residual sum, whose value is also the next block's shortcut.
    Such a region has two outputs: it cannot be sliced in time, and it keeps the sum's operands while the sum
    itself stays alive anyway. The nodes that compute a side output (with everything in the region that feeds them)
    leave the neuron's region, which then starts at the side output: one input that is needed anyway, one output
    (the spikes), sliceable. Of the nodes cut, the layers (module calls) that feed the side output form a region of
    their own without a neuron (``conv -> bn`` of a shortcut or of a block's last layer, stem layers): it keeps its
    input, usually spikes or a value stored anyway, and recomputes the layers' intermediates. Element-wise nodes at
    its end (the residual sum) stay outside: they save nothing for backward, and taking them would store their
    other operands; so do pass-through layers at its end (``nn.Identity``, ``nn.Flatten``:
    :attr:`~fxmemopt.analysis.facts.NodeInfo.passes_through`), and a piece whose only layers pass through forms no
    region: it would keep its input and have nothing to recompute (found by the property run: a time loop's
    ``stack`` and the empty ``nn.Identity`` after it, read by a residual block's shortcut). The search leaves either
    region out where it does not lower the peak.
    """
    side = [n for n in members if n != seed and any(
        u not in members and not is_metadata(graph, u) for u in graph.users[n])]
    if not side:
        return set(), []
    cut = set(side)
    for n in side:
        cut |= nx.ancestors(graph.digraph, n) & members
    def computes(n: str) -> bool:  # a layer whose output is not its input: it may save something for backward
        return graph[n].op == "call_module" and not graph[n].passes_through

    chain = set(cut)
    changed = True
    while changed:  # strip trailing element-wise nodes and pass-through layers: they save nothing, and element-wise
        changed = False  # ones would store their other operands
        for n in list(chain):
            if not computes(n) and not any(u in chain for u in graph.users[n]):
                chain.discard(n)
                changed = True
    # One region per connected piece (a block's last layers and its shortcut's layers are separate chains), if it
    # has a layer and an interior value (a layer alone would keep only its input, which it saves anyway).
    pieces = nx.weakly_connected_components(graph.digraph.subgraph(chain))
    return cut, [p for p in pieces if any(computes(n) for n in p) and any(
        i in p for n in p for i in graph[n].inputs)]


def split_region(graph: AnnotatedGraph, region: Region, used: set[str],
                 unit_of: Mapping[str, str] | None = None) -> list[Region]:
    """Split a multi-neuron region (a ``targets`` block) into one weight-norm-neuron region per neuron.

    The walk of the automatic mode runs inside the block only; nodes after the last neuron (a residual add) join
    the last part. Returns ``[]`` when the block has fewer than two neurons or a part would not be convex.
    """
    parts = _auto_regions(graph, within=set(region.nodes), used=used, unit_of=unit_of)
    if len(parts) < 2:
        return []
    covered = {n for p in parts for n in p.nodes}
    rest = [n for n in region.nodes if n not in covered]
    if rest:
        parts = _tidy_all(graph, parts, within=rest)
        rest = [n for n in rest if not any(n in p.nodes for p in parts)]
    if rest:
        last = parts[-1]
        parts[-1] = dataclasses.replace(_make(graph, last.anchor, list(last.nodes) + rest, set()), name=last.name)
    if any(check_convex(graph, p.nodes) for p in parts):
        return []
    return parts


def _target_regions(graph: AnnotatedGraph, target_paths: set[str], unit_of: Mapping[str, str]) -> list[Region]:
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
        units = sorted({unit_of.get(n, "") for n in members})
        if len(units) > 1:
            raise RegionError(format_error(
                f"module {anchors[key]!r}", "would be one region across modules kept with keep_modules",
                expected="a target inside one kept module (or enclosing none)",
                got=f"nodes in {', '.join(repr(u or '<root>') for u in units)}",
                fix="Keep the target itself, or modules that enclose it whole, or pass targets=None."))
        regions.append(_make(graph, anchors[key], members, used))
    return regions


def find_regions(graph: AnnotatedGraph, target_paths: set[str] | None = None,
                 target_names: str = "", unit_of: Mapping[str, str] | None = None) -> list[Region]:
    """Find the candidate checkpoint regions of an annotated graph.

    Args:
        graph: the annotated graph.
        target_paths: module paths of target instances (``None``: automatic weight-norm-neuron regions).
        target_names: the target class names, for the error message.
        unit_of: node name -> the innermost module kept with ``keep_modules`` that encloses it: no region takes
            nodes of two kept modules (or of one and of none).

    Returns:
        Regions in graph order of their first node; disjoint and convex.

    Raises:
        TargetsMatchNothingError: ``target_paths`` is given but no traced node lies inside any of them.
    """
    if target_paths is None:
        regions = _auto_regions(graph, unit_of=unit_of)
    else:
        regions = _target_regions(graph, target_paths, unit_of or {})
        if not regions:
            raise TargetsMatchNothingError(format_error(
                f"targets=({target_names})", "no call of these module classes was traced",
                expected="at least one instance called in forward()",
                got=f"{len(target_paths)} instance(s) in the model, none called" if target_paths
                else "no instance in the model",
                fix="Check the classes (a wrapper class is not its wrapped class), or use targets=None to find "
                    "layers automatically.",
            ))
    regions = _tidy_all(graph, regions)
    position = {n: i for i, n in enumerate(graph.order)}
    regions.sort(key=lambda r: position[r.nodes[0]])
    seen: set[str] = set()
    for r in regions:
        if seen & set(r.nodes):
            raise InternalError(f"regions overlap at {sorted(seen & set(r.nodes))}")
        seen.update(r.nodes)
    return regions


def side_effects(graph: AnnotatedGraph) -> tuple[list[str], dict[str, str]]:
    """The graph's side-effect nodes (:data:`SIDE_EFFECT_TARGETS`), in order, and for each item assignment the node
    whose value it writes into: the ``barriers`` and ``writes`` of :func:`unit_order`."""
    barriers = [n for n in graph.order if graph[n].target in SIDE_EFFECT_TARGETS]
    writes = {n: graph[n].inputs[0] for n in barriers if graph[n].target == "_operator.setitem"}
    return barriers, writes


def _walk_in_order(members: dict[str, list[str]], key: Mapping[str, int], inputs: Mapping[str, Sequence[str]],
                   region_of: Mapping[str, str]) -> list[tuple[str, list[str]]] | None:
    """:func:`unit_order` without barriers, walking the units in the order of their first nodes: a unit whose
    dependencies are all emitted when the walk reaches it is emitted there (every unit it has not reached has a
    larger key, every unit it deferred a smaller one, and those that became ready were emitted first); a unit
    waiting on another waits in a heap, emitted as soon as its last dependency is. Kahn's algorithm with the same
    ties, in time linear in the graph. ``None`` where a node reads something that is not a unit (the general path
    raises)."""
    done: set[str] = set()
    waiting: dict[str, int] = {}
    users: dict[str, list[str]] = {}
    ready: list[tuple[int, str]] = []
    emitted: list[tuple[str, list[str]]] = []

    def emit(u: str) -> None:
        emitted.append((u, members[u]))
        done.add(u)
        for w in users.pop(u, ()):
            waiting[w] -= 1
            if waiting[w] == 0:
                heapq.heappush(ready, (key[w], w))

    for u, names in members.items():
        while ready:  # deferred units that became ready: all before u
            emit(heapq.heappop(ready)[1])
        unmet = {v for name in names for i in inputs[name] if (v := region_of.get(i, i)) != u and v not in done}
        if not unmet:
            emit(u)
            continue
        if not unmet <= key.keys():
            return None
        waiting[u] = len(unmet)
        for v in unmet:
            users.setdefault(v, []).append(u)
    while ready:
        emit(heapq.heappop(ready)[1])
    if len(emitted) != len(members):
        raise InternalError("regions are not convex: collapsing them created a cycle")
    return emitted


def unit_order(order: Sequence[str], inputs: Mapping[str, Sequence[str]],
               region_of: Mapping[str, str], barriers: Iterable[str] = (),
               writes: Mapping[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """The execution order of a graph once each region is collapsed into one call.

    Units are regions (named by ``region_of``) or single nodes. They are emitted in a stable topological order that
    keeps every unit as early as the original ``order`` allows (what networkx's ``lexicographical_topological_sort``
    gives on the collapsed graph: Kahn's algorithm, ties broken by the position of the unit's first node; computed
    here without building that graph, in time linear in the graph plus a heap). Shared by the rewrite (which emits
    this order) and the cost model (which simulates it, once per plan).

    Args:
        order: node names in graph order.
        inputs: node name -> names of the nodes it reads.
        region_of: node name -> region name, for nodes inside regions.
        barriers: nodes with side effects (outside regions): every unit whose first node comes after a barrier in
            ``order`` runs after it, although no data flows between them.
        writes: barrier -> the node whose value it writes into (``out[t] = v``): every unit before the barrier
            that reads that value runs before it (it must see the value as it was then).

    Returns:
        ``[(unit, member nodes in graph order), ...]``.

    Raises:
        InternalError: the regions are not convex (collapsing them creates a cycle).
    """
    position = {n: i for i, n in enumerate(order)}
    members: dict[str, list[str]] = {}
    for n in order:
        members.setdefault(region_of.get(n, n), []).append(n)
    key = {u: position[names[0]] for u, names in members.items()}
    barriers = list(barriers)
    if not barriers and not writes:
        walked = _walk_in_order(members, key, inputs, region_of)
        if walked is not None:
            return walked
    deps: dict[str, set[str]] = {u: set() for u in members}
    for u, names in members.items():
        for name in names:
            for i in inputs[name]:
                v = region_of.get(i, i)
                if v != u:
                    deps[u].add(v)
    readers: dict[str, set[str]] = {}
    for n in order:
        for i in inputs[n]:
            readers.setdefault(i, set()).add(region_of.get(n, n))
    for b in barriers:
        for u, names in members.items():
            if position[names[0]] > position[b]:
                deps[u].add(b)
    for b, target in (writes or {}).items():  # what the barrier writes into is read, before it, as it was then
        for u in readers.get(target, ()):
            if u != b and position[members[u][0]] < position[b]:
                deps[b].add(u)
    # Kahn's algorithm with ties broken by each unit's first node in the original order: the order networkx's
    # lexicographical_topological_sort gives on the collapsed graph (tests/test_search_scaling.py checks it against
    # networkx), without building that graph (the cost model orders the units once per simulated plan).
    users: dict[str, list[str]] = {u: [] for u in members}
    waiting = {u: len(d) for u, d in deps.items()}
    for u, d in deps.items():
        for v in d:
            users[v].append(u)
    ready = [(key[u], u) for u, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    emitted: list[tuple[str, list[str]]] = []
    while ready:
        _, u = heapq.heappop(ready)
        emitted.append((u, members[u]))
        for w in users[u]:
            waiting[w] -= 1
            if waiting[w] == 0:
                heapq.heappush(ready, (key[w], w))
    if len(emitted) == len(members):
        return emitted
    raise InternalError("regions are not convex: collapsing them created a cycle")
