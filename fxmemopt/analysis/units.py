"""Kept modules (``optimize(keep_modules=...)``): which traced modules stay modules in the optimized result.

Tracing flattens the model: the optimized ``GraphModule`` calls ``blocks.0.conv`` directly and never calls
``blocks.0``. Anything that works through a module's own call then misses it: FSDP2's ``fully_shard(block)``
(its hooks gather the block's parameters), forward hooks, per-block ``torch.compile``, profilers by module. For
each *kept* module the rewrite puts the code traced inside its call into a ``GraphModule`` at the same path, whose
forward the optimized module calls, with the block's regions inside (:mod:`fxmemopt.runtime.hierarchy`); the
planner never lets a region cross a kept module's boundary, so recomputation in backward only touches the
parameters of the module it runs in.

This stage finds, from the trace's ``nn_module_stack`` metadata, the kept modules that enclose each graph node.
A module can be kept when forward calls it exactly once (its code becomes one call); a leaf (a module not traced
into, a neuron) is called as itself already. Others are reported with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import fx, nn

from ..errors import InvalidOptionError, format_error

__all__ = ["Units", "find_units"]


@dataclass(frozen=True)
class Units:
    """The kept modules of one trace.

    Attributes:
        outlined: paths of the modules traced into that become submodules of their own (called once each),
            outermost first.
        leaves: paths of kept modules that the graph calls as they are (not traced into).
        chains: node name -> the outlined paths enclosing the node, outermost first (absent: none).
        skipped: ``(path, why)`` for each requested module that cannot be kept.
    """

    outlined: tuple[str, ...] = ()
    leaves: tuple[str, ...] = ()
    chains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        """Every kept module the optimized module calls: outlined and leaves."""
        return self.outlined + self.leaves

    def unit_of(self) -> dict[str, str]:
        """node name -> the innermost outlined module enclosing it (nodes outside every kept module: absent)."""
        return {n: chain[-1] for n, chain in self.chains.items() if chain}


def _stack_keys(node: fx.Node) -> list[tuple[str, str]]:
    """``(call key, path)`` of the modules whose call encloses ``node``, outermost first (``"b@1"``: b's 2nd call)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(str(k), v[0] if isinstance(v, tuple) else str(v)) for k, v in stack.items()]


def find_units(graph: fx.Graph, model: nn.Module, keep: Sequence[str | type]) -> Units:
    """Resolve ``keep`` (module paths and classes) against the model and the traced ``graph``.

    Raises:
        InvalidOptionError: a path that names no module of the model, or an entry that is neither a path nor a class.
    """
    if not keep:
        return Units()
    paths: dict[str, None] = {}
    named = dict(model.named_modules())
    for k in keep:
        if isinstance(k, type):
            paths.update((p, None) for p, m in named.items() if p and isinstance(m, k))
        elif isinstance(k, str):
            if k not in named or not k:
                near = [p for p in named if p and (p.startswith(k) or k.startswith(p))][:5]
                raise InvalidOptionError(format_error(
                    f"keep_modules entry {k!r}", "names no submodule of the model",
                    expected="a path from model.named_modules() (not the root)",
                    got=f"{k!r}" + (f"; close: {', '.join(near)}" if near else ""),
                    fix="Pass paths such as 'blocks.0', or module classes to keep every instance."))
            paths[k] = None
        else:
            raise InvalidOptionError(format_error(
                "keep_modules", "takes module paths and module classes",
                got=f"{type(k).__name__} {k!r}", fix="Pass e.g. keep_modules=['blocks.0', 'blocks.1'] or (Block,)."))
    calls: dict[str, set[str]] = {}
    leaf_calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            leaf_calls[str(n.target)] = leaf_calls.get(str(n.target), 0) + 1
        for key, path in _stack_keys(n):
            if not (n.op == "call_module" and path == str(n.target)):
                calls.setdefault(path, set()).add(key)
    outlined, leaves, skipped = [], [], []
    for p in paths:
        if p in leaf_calls and p not in calls:
            leaves.append(p)
        elif p not in calls:
            skipped.append((p, "forward never calls it (or only inside another module kept whole)"))
        elif len(calls[p]) > 1:
            skipped.append((p, f"forward calls it {len(calls[p])} times; a kept module must be called once"))
        else:
            outlined.append(p)
    keys = {next(iter(calls[p])): p for p in outlined}
    chains: dict[str, tuple[str, ...]] = {}
    for n in graph.nodes:
        chain = tuple(keys[k] for k, path in _stack_keys(n)
                      if k in keys and not (n.op == "call_module" and path == str(n.target)))
        if chain:
            chains[n.name] = chain
    outlined.sort(key=lambda p: p.count("."))
    return Units(tuple(outlined), tuple(leaves), chains, tuple(skipped))
