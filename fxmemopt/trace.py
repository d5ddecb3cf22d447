"""Stage 1, *trace*: turn the user's ``nn.Module`` into a ``torch.fx.Graph``.

Leaf policy (a leaf is kept as one ``call_module`` node instead of being traced through):

* every stateful module (neurons): their ``forward`` rebinds ``self.v``, which cannot be traced, and their
  state must be snapshotted as a unit;
* torch's own layers (the default ``torch.fx`` rule: ``torch.nn`` modules other than containers);
* modules the user names in ``leaf_modules`` (classes or qualified names);
* **automatically**, any submodule whose ``forward`` fails to trace symbolically — shape unpacking such as
  ``y.reshape(T, N, *y.shape[1:])``, data-dependent Python, calls fx cannot proxy. The partial trace of that
  submodule is rolled back and the submodule becomes a leaf; :class:`LeafFallback` records which and why, and
  the summary reports it. Only a failure in the root module's own code raises :class:`~fxmemopt.errors.TraceError`.

Known limitation: a submodule whose failed trace had side effects on its own attributes (assigning a Proxy to
``self.something``) keeps them; such modules are rare and fail loudly when run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from .errors import TraceError, format_error

__all__ = ["LeafFallback", "trace"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeafFallback:
    """A submodule that could not be traced through and was kept whole as a leaf.

    Attributes:
        path: qualified module path (``"layer1.0"``).
        module_type: class name of the module.
        reason: the first line of the tracing error.
    """

    path: str
    module_type: str
    reason: str


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class _LeafFallbackTracer(fx.Tracer):
    """A Tracer that keeps stateful and requested modules whole and falls back to a leaf on trace failure."""

    def __init__(self, stateful_paths: Iterable[str], leaf_types: tuple[type, ...], leaf_paths: Iterable[str]):
        super().__init__()
        self.forced = set(stateful_paths) | set(leaf_paths)
        self.leaf_types = leaf_types
        self.fallbacks: list[LeafFallback] = []
        self._param_cache: dict[str, fx.Proxy] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.forced or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        self._param_cache = parameter_proxy_cache  # remembered so a rolled-back trace can drop stale proxies
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        graph = self.graph
        last = graph._root.prev  # the node after which a failed attempt's nodes start
        stack = list(self.module_stack.items())
        calls = dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # any failure inside this submodule: roll back, keep it whole
            self._rollback(last)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls.clear()
            self.num_calls.update(calls)
            reason = _first_line(e)
            log.info("fxmemopt: %s (%s) cannot be traced through (%s); keeping it as a leaf", path,
                     type(m).__name__, reason)
            self.fallbacks.append(LeafFallback(path, type(m).__name__, reason))
            self.forced.add(path)
            return super().call_module(m, forward, args, kwargs)

    def _rollback(self, last: fx.Node) -> None:
        created = []
        node = last.next
        while node is not self.graph._root:
            created.append(node)
            node = node.next
        erased = set()
        for node in reversed(created):  # users were created after their inputs: erase them first
            self.graph.erase_node(node)
            erased.add(node)
        if self._param_cache is not None:
            for k in [k for k, p in self._param_cache.items() if p.node in erased]:
                del self._param_cache[k]


def trace(model: nn.Module, *, stateful_paths: Iterable[str] = (), leaf_types: tuple[type, ...] = (),
          leaf_paths: Iterable[str] = ()) -> tuple[fx.Graph, dict[str, Any], list[LeafFallback]]:
    """Symbolically trace ``model`` with the fxmemopt leaf policy.

    Args:
        model: the module to trace. Not modified (tensor constants torch.fx would attach to it are returned
            instead).
        stateful_paths: qualified paths of stateful modules (kept as leaves).
        leaf_types: module classes to keep as leaves.
        leaf_paths: qualified paths to keep as leaves.

    Returns:
        ``(graph, constants, fallbacks)``: the graph (``call_module``/``get_attr`` targets are paths in
        ``model``), tensor constants the graph refers to by ``get_attr`` that are not attributes of ``model``
        (``_tensor_constant0`` ...), and the submodules that became leaves automatically, in the order met.

    Raises:
        TraceError: the root module's own ``forward`` cannot be traced.
    """
    tracer = _LeafFallbackTracer(stateful_paths, leaf_types, leaf_paths)
    before = set(model.__dict__)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise TraceError(format_error(
            f"{type(model).__name__} (the root module)",
            f"its forward() cannot be traced symbolically by torch.fx: {_first_line(e)}",
            fix="Move the untraceable code (shape unpacking such as `T, N = x.shape[:2]`, `*x.shape`, Python "
                "`if` on tensor values) into a submodule: submodules that fail to trace are kept whole "
                "automatically. Or pass leaf_modules=(TheClass,) for modules fxmemopt should not trace into.",
        )) from e
    finally:
        # torch.fx stores tensor constants on the root module it traces; move them out of the user's model.
        constants = {k: model.__dict__.pop(k) for k in list(model.__dict__) if k not in before}
    for node in graph.nodes:
        # Under `from __future__ import annotations` fx records type annotations as strings, which GraphModule
        # pickling cannot handle (it tries to import them by name; pytorch/pytorch#167117). They carry no
        # meaning for execution, so drop them here and every GraphModule fxmemopt builds pickles as is.
        if isinstance(node.type, str):
            node.type = None
    graph.lint()
    return graph, constants, tracer.fallbacks


def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def make_graph_module(root: nn.Module, graph: fx.Graph, class_name: str,
                      extra: dict[str, Any] | None = None) -> fx.GraphModule:
    """A GraphModule for ``graph`` whose module tree, parameters and buffers are *exactly* ``root``'s.

    ``torch.fx.GraphModule(root, graph)`` copies only what the graph touches, under new placeholder parents, so
    ``state_dict()`` keys would differ from the model's and unused parameters would vanish. Here every direct child,
    parameter and buffer of ``root`` is re-registered (same objects, same order), so the result shares all
    parameters and buffers with ``root``, ``state_dict()`` keys are equal, and an optimizer built on
    ``root.parameters()`` trains it.

    Args:
        root: the user's model.
        graph: a graph whose ``call_module``/``get_attr`` targets are paths in ``root`` or keys of ``extra``.
        class_name: the generated class's name.
        extra: top-level attributes that are not in ``root`` (checkpoint regions, tensor constants).
    """
    extra = extra or {}
    targets: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            t = str(n.target)
            targets[t] = extra[t] if t in extra else _resolve(root, t)
    gm = fx.GraphModule(targets, graph, class_name=class_name)
    gm._modules.clear()
    gm._modules.update(root._modules)
    gm._parameters.clear()
    gm._parameters.update(root._parameters)
    gm._buffers.clear()
    gm._buffers.update(root._buffers)
    gm._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
    for name, value in extra.items():
        setattr(gm, name, value)
    gm.training = root.training
    return gm
