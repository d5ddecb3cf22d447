"""Stage 1, *trace* (capture): turn the user's ``nn.Module`` into a ``torch.fx.Graph``, using the example inputs.

Capture is ``torch.fx`` symbolic tracing in which every proxy also carries the *concrete value* the example inputs
give it (each op is run on the real example values as it is recorded, under ``no_grad``; the model's state is
restored by the caller). That lets ordinary Python in the user's ``forward`` trace as it runs:

* control flow on shapes and ranks (``if x.ndim == 4:``, ``assert x.shape[0] == self.T``, ``T, B, *rest = x.shape``,
  ``y.reshape(T, N, *y.shape[1:])``) and loops over time (``for t in range(x.size(0))``) are resolved with the
  example's metadata;
* each such decision becomes a :class:`Guard`: a ``check_guard`` node in the graph that re-evaluates the same
  expression on every call and raises :class:`~fxmemopt.errors.GuardError` if it comes out differently (never a
  silent wrong result). Only what the control flow reads is specialized: an ``x.ndim`` test guards the rank, a
  loop over ``range(x.size(0))`` guards T, a model without such control flow stays shape-generic;
* shapes used as *values* (``x.view(x.shape[0], -1)``) stay symbolic graph nodes, as in plain fx;
* a tensor only ever indexed by distinct constant steps along its first dimension (``x[t]`` in a loop over time,
  shape reads aside) is taken apart with one :func:`~fxmemopt.runtime.steps.unbind_steps`: the same views, one
  stacked gradient in backward instead of a full-size zero-filled tensor per step, bitwise the same gradient.

Control flow on tensor *data* (``if spikes.sum() > 0``, ``.item()``) is not specialized: it would be wrong for the
next batch. A submodule that does it cannot be traced through and is kept whole (see below).

Leaf policy (a leaf is kept as one ``call_module`` node instead of being traced through):

* every stateful module (neurons): their ``forward`` rebinds ``self.v``, which cannot be traced, and their
  state must be snapshotted as a unit;
* torch's own layers (the default ``torch.fx`` rule: ``torch.nn`` modules other than containers);
* modules the user names in ``leaf_modules`` (classes or qualified names);
* **automatically**, any submodule whose ``forward`` still fails to trace (data-dependent Python, calls fx cannot
  proxy). The partial trace of that submodule is rolled back and the submodule becomes a leaf;
  :class:`LeafFallback` records which and why, and the summary reports it. Only a failure in the root module's own
  code raises :class:`~fxmemopt.errors.TraceError`.

Known limitation: a submodule whose failed trace had side effects on its own attributes (assigning a Proxy to
``self.something``) keeps them; such modules are rare and fail loudly when run.
"""

from __future__ import annotations

import inspect
import linecache
import logging
import operator
import os
import re
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches
from torch.fx.proxy import Attribute

from ..compat import bind_function_apply, copy_non_persistent_buffers, original_function_apply, tree_leaves
from ..errors import GuardError, InternalError, TraceError, first_line, format_error
from ..runtime.steps import unbind_steps
from .state import ModelState

__all__ = ["Capture", "Guard", "LeafFallback", "check_guard", "trace"]

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


@dataclass(frozen=True)
class Guard:
    """One assumption the trace specialized on, checked on every call of the optimized module.

    Attributes:
        index: position in the trace's guard list.
        kind: how the traced value was used: ``"bool"`` (an ``if``/``assert``), ``"index"`` (``range(n)``, an
            index), ``"len"`` (unpacking or iterating), ``"int"`` / ``"float"`` (a Python number).
        expression: the expression in terms of the graph's inputs, e.g. ``"x.ndim == 4"``.
        expected: its value on the example inputs.
        where: the user's source line that made the decision (``file:line in function: code``).
        node: the graph node that checks it.
    """

    index: int
    kind: str
    expression: str
    expected: bool | int | float
    where: str
    node: str

    def __str__(self) -> str:
        if self.kind == "bool":
            return f"({self.expression}) is {self.expected}  [{self.where}]"
        shown = f"{self.kind}({self.expression})" if self.kind in ("len", "int", "float") else self.expression
        return f"{shown} == {self.expected!r}  [{self.where}]"


_GUARD_OPS: dict[str, Callable[[Any], Any]] = {"bool": bool, "index": operator.index, "len": len, "int": int,
                                               "float": float}


def check_guard(value: Any, index: int, kind: str, expected: Any, expression: str, where: str) -> None:
    """Raise :class:`~fxmemopt.errors.GuardError` unless ``kind(value) == expected`` (a graph node of the optimized
    module: one Python comparison per guard and call)."""
    got = _GUARD_OPS[kind](value)
    if got != expected or type(got) is not type(expected):
        raise GuardError(format_error(
            f"guard {index} ({expression}, from {where})",
            "this call differs from the example inputs the model was optimized with, and the traced code took "
            "decisions on that value", expected=f"{kind} {expected!r} as traced", got=repr(got),
            fix="Call fxmemopt.optimize again with example inputs shaped like this call's (summary.guards lists "
                "every assumption the trace made)."))


torch.fx.node.has_side_effect(check_guard)

def set_module_state(module: nn.Module, name: str, value: Any) -> Any:
    """``module.name = value`` as a graph node: what traced code assigns to a module (snntorch's ``init_leaky()`` /
    ``utils.reset`` rebinding ``mem`` at the top of ``forward``) happens on every call, not only while tracing.
    Returns ``value``."""
    setattr(module, name, value)
    return value


torch.fx.node.has_side_effect(set_module_state)  # (regions.SIDE_EFFECT_TARGETS names it for planning)


#: the state-reset methods a model's own ``forward`` may call on its neurons (sinabs' ``reset_states()``,
#: spikingjelly's ``reset()`` through ``functional.reset_net(self)``, snntorch's ``reset_mem()``): recorded while
#: tracing as :func:`call_module_method` nodes
RESET_METHODS = ("reset_states", "reset", "reset_mem")


def call_module_method(module: nn.Module, name: str) -> None:
    """``module.name()`` as a graph node: a state reset the traced ``forward`` calls (sinabs' DVS nets reset every
    layer at the top of ``forward``) runs on every call, not only while tracing, where it ran once and left no node
    (the optimized module then carried the last step's state, and its graph, into the next)."""
    getattr(module, name)()


torch.fx.node.has_side_effect(call_module_method)  # (regions.SIDE_EFFECT_TARGETS names it for planning)

#: Tensor attributes and methods that read metadata, not data: values derived from them (and from Python numbers)
#: are safe to specialize under a guard; anything derived from tensor *data* is not.
_META_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_sparse",
                         "is_quantized", "is_meta"})
_META_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "element_size", "is_floating_point",
                           "is_complex", "is_contiguous", "get_device", "stride", "storage_offset", "type"})
#: torch factory functions whose sizes may be traced values (see ``_CaptureTracer.trace``).
_FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange")
_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def _user_frame() -> str:
    """``file:line in function: code`` of the innermost frame outside torch and fxmemopt's tracing code."""
    frame = sys._getframe(1)
    while frame is not None:
        fname = os.path.abspath(frame.f_code.co_filename)
        if not fname.startswith(_TORCH) and not fname.startswith(_HERE + os.sep + "trace.py"):
            code = linecache.getline(fname, frame.f_lineno).strip()
            short = os.sep.join(fname.split(os.sep)[-2:])
            return f"{short}:{frame.f_lineno} in {frame.f_code.co_name}: {code}"
        frame = frame.f_back
    return "unknown location"


_SYMBOLS = {operator.eq: "==", operator.ne: "!=", operator.lt: "<", operator.le: "<=", operator.gt: ">",
            operator.ge: ">=", operator.add: "+", operator.sub: "-", operator.mul: "*", operator.floordiv: "//",
            operator.mod: "%", operator.truediv: "/", operator.and_: "&", operator.or_: "|"}


def _describe(a: Any, depth: int = 0) -> str:
    """A short Python-like expression for a node (what a guard reads), for messages."""
    if not isinstance(a, fx.Node):
        if isinstance(a, slice):
            parts = ["" if v is None else _describe(v, depth + 1) for v in (a.start, a.stop)]
            return ":".join(parts) + ("" if a.step is None else f":{_describe(a.step, depth + 1)}")
        if isinstance(a, (tuple, list)):
            return ", ".join(_describe(v, depth + 1) for v in a)
        return repr(a)
    if depth > 6:
        return a.name
    args = a.args
    if a.op == "placeholder":
        return str(a.target)
    if a.op == "call_function" and a.target is getattr and len(args) == 2:
        return f"{_describe(args[0], depth + 1)}.{args[1]}"
    if a.op == "call_function" and a.target is operator.getitem:
        return f"{_describe(args[0], depth + 1)}[{_describe(args[1], depth + 1)}]"
    if a.op == "call_function" and a.target in _SYMBOLS and len(args) == 2:
        return f"({_describe(args[0], depth + 1)} {_SYMBOLS[a.target]} {_describe(args[1], depth + 1)})" if depth \
            else f"{_describe(args[0], depth + 1)} {_SYMBOLS[a.target]} {_describe(args[1], depth + 1)}"
    if a.op == "call_function" and a.target in (len, operator.not_):
        return f"{getattr(a.target, '__name__', 'fn')}({_describe(args[0], depth + 1)})"
    if a.op == "call_method" and a.target in _META_METHODS:
        rest = ", ".join(_describe(v, depth + 1) for v in args[1:])
        return f"{_describe(args[0], depth + 1)}.{a.target}({rest})"
    if a.op == "call_module":
        return f"<output of {a.target}>"
    return f"<{a.name}>"


class _ValueTable:
    """Node -> its example value, holding tensors only while code can still use them.

    A traced forward at the user's size must not keep every activation alive (the step being optimized may not fit
    in memory; tracing ran out of memory on a model whose optimized step fitted easily): a tensor value is held
    strongly by the proxy the user's code holds (:meth:`_CaptureTracer.create_proxy`), and here only by a weak
    reference, so it is freed when the traced code drops it, as in an untraced ``no_grad`` forward. Reads after
    that (shape questions after tracing: :func:`_unbind_time_steps`) get a ``meta`` tensor of the same shape and
    dtype; other values (numbers, sizes, modules, tuples) are held as they are."""

    def __init__(self) -> None:
        self._strong: dict[fx.Node, Any] = {}
        self._weak: dict[fx.Node, tuple[weakref.ref[torch.Tensor], torch.Size, torch.dtype]] = {}

    def __setitem__(self, node: fx.Node, value: Any) -> None:
        self.pop(node, None)
        if type(value) is torch.Tensor or isinstance(value, nn.Parameter):
            # (shape and dtype, not a meta tensor: a storage tracker around tracing would count its nbytes)
            self._weak[node] = (weakref.ref(value), value.shape, value.dtype)
        else:
            self._strong[node] = value

    def __contains__(self, node: fx.Node) -> bool:
        return node in self._strong or node in self._weak

    def __getitem__(self, node: fx.Node) -> Any:
        if node in self._strong:
            return self._strong[node]
        ref, shape, dtype = self._weak[node]
        value = ref()
        return torch.empty(shape, dtype=dtype, device="meta") if value is None else value

    def live(self, node: fx.Node) -> bool:
        """Whether ``node``'s value is still its example value (not a ``meta`` stand-in)."""
        return node in self._strong or (node in self._weak and self._weak[node][0]() is not None)

    def get(self, node: fx.Node, default: Any = None) -> Any:
        return self[node] if node in self else default

    def pop(self, node: fx.Node, default: Any = None) -> Any:
        value = self.get(node, default)
        self._strong.pop(node, None)
        self._weak.pop(node, None)
        return value

    def clear(self) -> None:
        self._strong.clear()
        self._weak.clear()


class _ConcreteProxy(fx.Proxy):
    """A proxy whose Python conversions (``bool``, ``range``, ``len``, iteration, ``int``) use the example's value
    under a guard, instead of failing as plain fx proxies do."""

    def __getattr__(self, k: str) -> _ConcreteAttribute:
        return _ConcreteAttribute(self, k)

    def __iter__(self) -> Iterator[fx.Proxy]:
        n = self.tracer.specialize(self, "len")  # type: ignore[attr-defined]
        return iter([self[i] for i in range(n)])

    def __len__(self) -> int:
        return self.tracer.specialize(self, "len")  # type: ignore[attr-defined]

    def __index__(self) -> int:
        return self.tracer.specialize(self, "index")  # type: ignore[attr-defined]

    def __int__(self) -> int:
        return self.tracer.specialize(self, "int")  # type: ignore[attr-defined]

    def __float__(self) -> float:
        return self.tracer.specialize(self, "float")  # type: ignore[attr-defined]

    def __setitem__(self, key: Any, value: Any) -> None:
        # `out[t] = v` into a traced tensor: recorded as an operator.setitem call (fx keeps it: a side effect), run
        # on the example values like any call, and kept outside regions, in order (regions.SIDE_EFFECT_TARGETS).
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class _ConcreteAttribute(Attribute, _ConcreteProxy):
    """``proxy.attr`` (fx's lazy attribute proxy) with the same conversions."""


class _CaptureTracer(fx.Tracer):
    """The capture tracer: fx tracing with concrete example values (see the module docstring), stateful and
    requested modules kept whole, and a fallback to a leaf when a submodule cannot be traced."""

    def __init__(self, root: nn.Module, example_inputs: tuple[Any, ...], stateful_paths: Iterable[str],
                 leaf_types: tuple[type, ...], leaf_paths: Iterable[str]):
        super().__init__()
        # Buffers read by traced code are graph reads (get_attr), not the example's tensors baked in: a state kept in
        # a buffer (snntorch's mem) must be read at run time.
        self.proxy_buffer_attributes = True
        self.forced = set(stateful_paths) | set(leaf_paths)
        self.leaf_types = leaf_types
        self.fallbacks: list[LeafFallback] = []
        self.guards: list[Guard] = []
        self._param_cache: dict[str, fx.Proxy] | None = None
        self._evaluating = 0  # inside _evaluate: the real modules run (their own calls are not recorded)
        self._resetting = 0  # inside a recorded reset: the resets it makes of its children are its own
        self._root_module = root
        # Copies: an in-place op in the traced code runs on these, never on the caller's tensors.
        self._examples = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in example_inputs]
        self._placeholders = 0
        self.values = _ValueTable()
        self.meta_only: dict[fx.Node, bool] = {}
        self._guarded: set[tuple[fx.Node, str]] = set()
        # id(value) -> (value, proxy) of what traced code assigned to a module; the value is held, so that its id
        # cannot be reused by another tensor (a freed one's address is: the graph then depended on the GC's timing)
        self._assigned: dict[int, tuple[Any, fx.Proxy]] = {}

    # -- concrete values ---------------------------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     name: str | None = None, type_expr: Any | None = None,
                     proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None) -> fx.Proxy:
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind != "output":
            # the proxy holds its value: alive while the traced code can use it (_ValueTable)
            object.__setattr__(p, "_fxmemopt_value", self._evaluate(p.node))
        return p

    def _value(self, node: fx.Node) -> Any:
        if node not in self.values:
            if node.op != "get_attr":  # created outside create_proxy (fx's tensor constants are get_attr)
                raise TraceError(f"no example value for node {node.name}")
            return self._evaluate(node)
        if not self.values.live(node):
            if node.op == "get_attr":
                return self._evaluate(node)
            else:
                raise InternalError(f"fxmemopt tracing: the example value of {node.format_node()} was freed while "
                                    f"the traced code still used it")
        return self.values[node]

    def _evaluate(self, node: fx.Node) -> Any:
        """Run ``node`` on the example values of its inputs; record its value and whether it is metadata only, and
        return the value (the caller holds it: :class:`_ValueTable` does not)."""
        self._evaluating += 1  # what the real modules call now is theirs, not the traced code's (see trace)
        try:
            return self._evaluate_node(node)
        finally:
            self._evaluating -= 1

    def _evaluate_node(self, node: fx.Node) -> Any:
        args = fx.node.map_arg(node.args, self._value)
        kwargs = fx.node.map_arg(node.kwargs, self._value)
        inputs = node.all_input_nodes
        meta = False
        with _maybe_revert_all_patches(), torch.no_grad():  # run the real modules, not the tracing wrappers
            if node.op == "placeholder":
                if self._placeholders < len(self._examples):
                    value = self._examples[self._placeholders]
                elif node.args:
                    value = node.args[0]  # the parameter's default
                else:
                    raise TraceError(f"forward() takes more positional inputs than example_inputs gives "
                                     f"(no value for {node.target!r})")
                self._placeholders += 1
                meta = True  # a guard on an input's shape or value is a guard on the input
            elif node.op == "get_attr":
                value = _resolve(self._root_module, str(node.target))
            elif node.op == "call_module":
                value = self._root_module.get_submodule(str(node.target))(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
                meta = node.target in _META_METHODS and isinstance(args[0], torch.Tensor)
            else:
                value = node.target(*args, **kwargs)  # type: ignore[operator]
                meta = (node.target is getattr and isinstance(args[0], torch.Tensor) and args[1] in _META_ATTRS) \
                    or (node.target is len and isinstance(args[0], torch.Tensor))
        if not meta and not isinstance(value, torch.Tensor) and node.op not in ("call_module", "get_attr"):
            # Python values computed only from metadata and constants (x.shape[0] * 2) stay metadata.
            meta = all(self.meta_only.get(i, False) for i in inputs) and not any(
                isinstance(v, torch.Tensor) for v in tree_leaves((args, kwargs)))
        self.values[node] = value
        self.meta_only[node] = meta and not isinstance(value, torch.Tensor)
        return value

    def specialize(self, proxy: fx.Proxy, kind: str) -> Any:
        """Use the example value of ``proxy`` as a Python ``kind`` (see :class:`Guard`), under a guard."""
        node = proxy.node
        value = self._value(node)
        if kind == "len" and isinstance(value, (tuple, list)) and not self.meta_only.get(node, False):
            return len(value)  # a module's tuple output (spk, mem): its length is the code's, not the data's
        if not self.meta_only.get(node, False):
            what = "a tensor" if isinstance(value, torch.Tensor) else "a value computed from tensor data"
            raise TraceError(f"Python control flow on {what} ({_describe(node)}, {_user_frame()}) cannot be "
                             f"specialized: it would not hold for other data")
        result = _GUARD_OPS[kind](value)
        if (node, kind) in self._guarded:  # `*x.shape` asks len() and iter(): one guard is enough
            return result
        self._guarded.add((node, kind))
        index, expression, where = len(self.guards), _describe(node), _user_frame()
        guard = self.create_node("call_function", check_guard, (node, index, kind, result, expression, where), {},
                                 name=f"guard_{index}")
        self.guards.append(Guard(index, kind, expression, result, where, guard.name))
        return result

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.specialize(obj, "bool")

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        return iter(obj)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        # Factory functions with a traced size (torch.zeros(x.shape[1], 16), snntorch/norse state initialisation)
        # are not dispatched to proxies by torch's argument parser: record them as calls while tracing.
        originals = {name: getattr(torch, name) for name in _FACTORIES}
        if concrete_args is None and isinstance(root, nn.Module):
            # Parameters the example inputs do not give take their defaults, as in the model's own call
            # (norse's `SequentialState.forward(input, state=None)` tests `state is None`).
            params = list(inspect.signature(root.forward).parameters.values())[len(self._examples):]
            concrete_args = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
                             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} or None

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            def factory(*args: Any, **kwargs: Any) -> Any:
                if any(isinstance(a, fx.Proxy) for a in tree_leaves((args, kwargs))):
                    return self.create_proxy("call_function", fn, args, kwargs)
                return fn(*args, **kwargs)
            return factory

        # A custom autograd.Function (a surrogate spike function) called on proxies would be traced *through*: its
        # forward recorded as plain ops and its backward lost. Inside a submodule, refuse it, so the module calling
        # it stays a leaf (a neuron module, whose state and region the analysis knows). Called by the root's own
        # forward (membranes as local variables, `s = SpikeFn.apply(v - 1)`), there is no module to keep whole:
        # record the call itself, one node whose target is the Function's `apply`, run as it is (its backward too).
        function_apply = original_function_apply()

        def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
            if any(isinstance(a, fx.Proxy) for a in tree_leaves((args, kwargs))):
                if not any(self.module_stack):  # the root's forward
                    return self.create_proxy("call_function", function_call(cls), args, kwargs,
                                             name=f"{_snake(cls.__name__)}_apply")
                raise TraceError(f"custom autograd.Function {cls.__name__}.apply cannot be traced through (its "
                                 f"backward would be lost)")
            return bind_function_apply(function_apply, cls)(*args, **kwargs)

        # Traced code that assigns a traced value to a module (`self.mem = torch.zeros_like(self.mem)`) is recorded
        # as a set_module_state node; the module gets the example value meanwhile, and reading the attribute back
        # gives the assigned proxy (so what follows depends on the assignment, as in Python).
        module_setattr = nn.Module.__setattr__

        def record_setattr(mod: nn.Module, name: str, value: Any) -> None:
            if isinstance(value, fx.Proxy) and mod is not root:  # (the root's own attributes: as plain fx does)
                path = self.path_of_module(mod)
                target = self.create_node("get_attr", path, (), {})
                self.values[target] = mod
                node = self.create_node("call_function", set_module_state, (target, name, value.node), {},
                                        name=f"set_{path.replace('.', '_')}_{name}")
                concrete = self._value(value.node)
                self.values[node] = concrete
                self.meta_only[node] = False
                self._assigned[id(concrete)] = (concrete, self.proxy(node))
                value = concrete
            module_setattr(mod, name, value)

        # A reset the traced code calls on a submodule (`m.reset_states()`, `functional.reset_net(self)`) runs
        # here on the real module and would leave no node: it is recorded as a call_module_method node (and runs).
        # Only calls from the traced code: not those a leaf makes while its example value is computed, nor the
        # resets a recorded reset makes of its children (one node resets them all, as in the model).
        resets = self._recorded_resets(root) if isinstance(root, nn.Module) else []
        try:
            for name, fn in originals.items():
                setattr(torch, name, wrap(fn))
            torch.autograd.Function.apply = classmethod(apply)  # type: ignore[assignment,method-assign]
            nn.Module.__setattr__ = record_setattr  # type: ignore[method-assign]
            for mod, name, wrapper in resets:
                object.__setattr__(mod, name, wrapper)
            return super().trace(root, concrete_args)
        finally:
            for mod, name, _ in resets:
                mod.__dict__.pop(name, None)
            for name, fn in originals.items():
                setattr(torch, name, fn)
            torch.autograd.Function.apply = function_apply  # type: ignore[method-assign]
            nn.Module.__setattr__ = module_setattr  # type: ignore[method-assign]

    def _recorded_resets(self, root: nn.Module) -> list[tuple[nn.Module, str, Callable[[], Any]]]:
        """Per submodule with a :data:`RESET_METHODS` method (and no instance attribute of that name): a wrapper
        that records the call as a graph node when the traced code makes it, then runs it."""
        out = []
        for path, mod in root.named_modules():
            for name in RESET_METHODS:
                method = getattr(type(mod), name, None)
                if not path or not callable(method) or name in mod.__dict__:
                    continue

                def recorded(*args: Any, _mod: nn.Module = mod, _name: str = name, _path: str = path,
                             **kwargs: Any) -> Any:
                    bound = getattr(type(_mod), _name).__get__(_mod)
                    if args or kwargs or self._evaluating or self._resetting:
                        return bound(*args, **kwargs)
                    target = self.create_node("get_attr", _path, (), {})
                    self.values[target] = _mod
                    node = self.create_node("call_function", call_module_method, (target, _name), {},
                                            name=f"{_path.replace('.', '_')}_{_name}")
                    self.values[node] = None
                    self.meta_only[node] = False
                    self._resetting += 1
                    try:
                        return bound()
                    finally:
                        self._resetting -= 1

                out.append((mod, name, recorded))
        return out

    # -- leaves and fallbacks ----------------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.forced or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        self._param_cache = parameter_proxy_cache  # remembered so a rolled-back trace can drop stale proxies
        assigned = self._assigned.get(id(attr_val))
        if assigned is not None and assigned[0] is attr_val:  # a value this trace assigned (set_module_state)
            return assigned[1]
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
        guards = len(self.guards)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # any failure inside this submodule: roll back, keep it whole
            self._rollback(last)
            del self.guards[guards:]
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls.clear()
            self.num_calls.update(calls)
            reason = first_line(e)
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
            self.values.pop(node, None)
            self.meta_only.pop(node, None)
            erased.add(node)
        self._guarded = {g for g in self._guarded if g[0] not in erased}
        self._assigned = {k: vp for k, vp in self._assigned.items() if vp[1].node not in erased}
        if self._param_cache is not None:
            for k in [k for k, p in self._param_cache.items() if p.node in erased]:
                del self._param_cache[k]


@dataclass(frozen=True)
class Capture:
    """What :func:`trace` returns.

    Attributes:
        graph: the graph (``call_module``/``get_attr`` targets are paths in the model or keys of ``constants``).
        constants: tensor constants the graph reads by ``get_attr`` that are not attributes of the model
            (``_tensor_constant0`` ...).
        fallbacks: the submodules that became leaves automatically, in the order met.
        guards: the assumptions the trace specialized on (each checked by a ``check_guard`` node on every call).
    """

    graph: fx.Graph
    constants: dict[str, Any]
    fallbacks: tuple[LeafFallback, ...]
    guards: tuple[Guard, ...]


def trace(model: nn.Module, example_inputs: tuple[Any, ...], *, stateful_paths: Iterable[str] = (),
          leaf_types: tuple[type, ...] = (), leaf_paths: Iterable[str] = ()) -> Capture:
    """Trace ``model`` with the fxmemopt leaf policy, resolving shape control flow with ``example_inputs``.

    The model runs once on the example inputs while it is traced (under ``no_grad``); its state (neuron states,
    buffers, attributes, the RNG) is restored afterwards (:class:`fxmemopt.analysis.state.ModelState`).

    Args:
        model: the module to trace. Not modified (tensor constants torch.fx would attach to it are returned
            instead).
        example_inputs: positional inputs, as for ``model(*example_inputs)``.
        stateful_paths: qualified paths of stateful modules (kept as leaves).
        leaf_types: module classes to keep as leaves.
        leaf_paths: qualified paths to keep as leaves.

    Returns:
        A :class:`Capture`.

    Raises:
        TraceError: the root module's own ``forward`` cannot be traced.

    Example:
        >>> class M(nn.Module):
        ...     def forward(self, x):
        ...         if x.ndim == 4:            # resolved with the example, checked on every call
        ...             x = x.unsqueeze(0)
        ...         return x.relu()
        >>> cap = trace(M(), (torch.rand(2, 3, 4, 4),))
        >>> str(cap.guards[0]).split("  ")[0]
        '(x.ndim == 4) is True'
    """
    stateful_paths = list(stateful_paths)
    tracer = _CaptureTracer(model, tuple(example_inputs), stateful_paths, leaf_types, leaf_paths)
    saved = ModelState.capture(model, {p: () for p in stateful_paths})
    before = set(model.__dict__)
    try:
        graph = tracer.trace(model)
        _unbind_time_steps(graph, tracer.values, tracer.meta_only)
    except Exception as e:
        raise TraceError(format_error(
            f"{type(model).__name__} (the root module)",
            f"its forward() cannot be traced by torch.fx: {first_line(e)}",
            fix="Move the untraceable code (Python `if` on tensor *values*, `.item()`, calls fx cannot record) into "
                "a submodule: submodules that fail to trace are kept whole automatically. Or pass "
                "leaf_modules=(TheClass,) for modules fxmemopt should not trace into.",
        )) from e
    finally:
        # torch.fx stores tensor constants on the root module it traces; move them out of the user's model.
        constants = {k: model.__dict__.pop(k) for k in list(model.__dict__) if k not in before}
        saved.restore()
        tracer.values.clear()  # example values: drop them now rather than with the tracer
    for node in graph.nodes:
        # Under `from __future__ import annotations` fx records type annotations as strings, which GraphModule
        # pickling cannot handle (it tries to import them by name; pytorch/pytorch#167117). They carry no
        # meaning for execution, so drop them here and every GraphModule fxmemopt builds pickles as is.
        if isinstance(node.type, str):
            node.type = None
    graph.lint()
    return Capture(graph, constants, tuple(tracer.fallbacks), tuple(tracer.guards))


def _unbind_time_steps(graph: fx.Graph, values: dict[fx.Node, Any], meta_only: dict[fx.Node, bool]) -> None:
    """Where a tensor is only ever indexed along its first dimension by distinct constant steps (``x[0]``, ...,
    ``x[T-1]``: a loop over time; reads of its shape aside), take it apart with one
    :func:`~fxmemopt.runtime.steps.unbind_steps` instead: the same views in forward, and in backward one stacked
    gradient instead of one zero-filled tensor the size of ``x`` per step (exactly the same gradient: see that
    module)."""
    for node in list(graph.nodes):
        value = values.get(node)
        users = [u for u in node.users if not meta_only.get(u, False)]
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or len(users) < 2:
            continue
        steps = [u.args[1] for u in users
                 if u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2 and not u.kwargs
                 and u.args[0] is node and type(u.args[1]) is int and 0 <= u.args[1] < value.shape[0]]
        if len(steps) != len(users) or len(set(steps)) != len(steps) or any(_written(u) for u in users):
            continue
        with graph.inserting_after(node):
            parts = graph.call_function(unbind_steps, (node,))
        # It belongs to the modules its selects ran in (the time loop's), not to the caller's: a target region
        # (targets=...) holding the loop must hold it too, or the region is not convex.
        stacks = [dict(u.meta.get("nn_module_stack") or {}) for u in users]
        parts.meta["nn_module_stack"] = {k: v for k, v in stacks[0].items() if all(s.get(k) == v for s in stacks)}
        for u in users:
            u.args = (parts, u.args[1])


def _written(node: fx.Node) -> bool:
    """Whether code writes into ``node``'s value in place (``x[t].add_(1)``, ``x[t][0] = 1``): the views an
    autograd Function returns may not be (so such selects are left as they are)."""
    return any((u.op == "call_method" and str(u.target).endswith("_") and not str(u.target).startswith("_"))
               or (u.op == "call_function" and u.target is operator.setitem and u.args[0] is node)
               for u in node.users)


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
    copy_non_persistent_buffers(gm, root)
    for name, value in extra.items():
        setattr(gm, name, value)
    gm.training = root.training
    return gm


_FUNCTION_CALLS: weakref.WeakKeyDictionary[type, Callable[..., Any]] = weakref.WeakKeyDictionary()


def function_call(cls: type) -> Callable[..., Any]:
    """The graph target for calls of the autograd.Function ``cls``: a plain function calling ``cls.apply``, one per
    class, named after it. (``cls.apply`` itself is a bound method of a torch class: fx would write it into the
    generated code by torch's qualified name, ``torch.autograd.function.apply``, which is not it.)"""
    fn = _FUNCTION_CALLS.get(cls)
    if fn is None:
        def fn(*args: Any, **kwargs: Any) -> Any:
            return cls.apply(*args, **kwargs)  # type: ignore[attr-defined]
        fn.__name__ = fn.__qualname__ = f"{cls.__name__}_apply"
        fn.__module__ = cls.__module__ if not cls.__module__.startswith("torch") else __name__
        fn.__wrapped_function__ = cls  # type: ignore[attr-defined]
        _FUNCTION_CALLS[cls] = fn
    return fn


def _snake(name: str) -> str:
    """``SpikeFn`` -> ``spike_fn`` (a readable node name for a recorded autograd.Function call)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
