"""Stage 2, *annotate*: record what every graph node produces, as plain data.

For each node this stage writes one :class:`NodeInfo` into ``node.meta["fxmemopt"]`` and returns the same
records as an :class:`AnnotatedGraph` keyed by node name, which is all later stages see (they never touch fx).

The interesting field is the **value set**: which values a tensor can hold. Spikes are {0, 1}; the sum of two
spike tensors (a SEW-ResNet ADD connection) is {0, 1, 2}; a convolution's output is real. Region inputs whose
value set is a small integer range are stored bit-packed (see :mod:`fxmemopt.runtime.packing`). Value sets come from
two sources that must agree:

* *static inference* over the graph (:data:`VALUE_RULES`): neuron outputs are binary; reshapes, permutes,
  indexing, max-pooling and concatenation keep the set; ``a + b`` of small-integer sets adds the bounds;
  ``c - s`` with a constant ``c >= max(s)`` stays in ``{0..c}``; everything else is real. Leaves fxmemopt knows
  nothing about are *unknown*;
* *observation* on the example inputs (one ``no_grad`` forward; the model's state is restored afterwards).

A static small-integer claim is used only if the example confirms it; an unknown is resolved by the example;
a static "real" is never upgraded (an all-zero example must not make a convolution output look binary).
Whatever is decided, the packer re-checks every tensor bit for bit at run time, so a wrong guess costs memory,
never correctness.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import compat
from ..compat import tree_flatten
from ..runtime.packing import _INT_VIEW, _as_small_uint8
from ..runtime.steps import BATCH_ATTRIBUTES, DERIVED, STEPS_ATTRIBUTES, TIME_MAJOR, TimeAxis, unbind_steps
from .facts import BINARY, MAX_INT_SET, REAL, UNKNOWN, AnnotatedGraph, NodeInfo, ValueSet, _int_set  # noqa: F401 (re-exported)
from .shapes import output_bytes
from .state import ModelState, StateSnapshot, attributes_of, put_back_attributes

__all__ = ["ValueSet", "NodeInfo", "AnnotatedGraph", "annotate", "VALUE_RULES", "observe_value_set"]


# ---------------------------------------------------------------------------------------------------------------
# Static value-set rules
# ---------------------------------------------------------------------------------------------------------------

#: A rule maps (node, value set of an argument) to the node's value set.
_Rule = Callable[["fx.Node", Callable[[Any], ValueSet]], ValueSet]


def _arg(node: fx.Node, i: int, key: str | None = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key) if key else None


def _keep(node: fx.Node, S: Callable[[Any], ValueSet]) -> ValueSet:
    return S(node.args[0]) if node.args else REAL


def _seq(node: fx.Node, S: Callable[[Any], ValueSet]) -> ValueSet:
    # cat/stack: the join of the tensors in the first argument; `dim` is not a value.
    items = _arg(node, 0, "tensors")
    if not isinstance(items, (list, tuple)) or not items:
        return REAL
    out = S(items[0])
    for a in items[1:]:
        out = out.join(S(a))
    return out


def _join2(node: fx.Node, S: Callable[[Any], ValueSet]) -> ValueSet:
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    return S(a).join(S(b)) if a is not None and b is not None else REAL


def _max(node: fx.Node, S: Callable[[Any], ValueSet]) -> ValueSet:
    # torch.max(x) keeps x's values; max(x, y) is elementwise; max(x, dim) also returns indices: unknown.
    if len(node.args) == 1 and not node.kwargs:
        return S(node.args[0])
    if len(node.args) == 2 and isinstance(node.args[1], fx.Node):
        return _join2(node, S)
    return UNKNOWN


def _add(node: fx.Node, S: Callable[[Any], ValueSet]) -> ValueSet:
    a, b = S(_arg(node, 0, "input")), S(_arg(node, 1, "other"))
    alpha = _arg(node, 2, "alpha")
    alpha = 1 if alpha is None else alpha
    if a.is_int and b.is_int and isinstance(alpha, int) and not isinstance(alpha, bool) and alpha >= 0:
        # -0.0 + -0.0 is -0.0; -0.0 + 0.0 is +0.0
        return _int_set(a.hi + alpha * b.hi, negzero=a.negzero and (b.negzero or alpha == 0))
    return REAL


def _mul(node: fx.Node, S: Callable[[Any], ValueSet]) -> ValueSet:
    a, b = S(_arg(node, 0, "input")), S(_arg(node, 1, "other"))
    return _int_set(a.hi * b.hi, negzero=a.negzero or b.negzero) if a.is_int and b.is_int else REAL  # 1 * -0.0


def _sub(node: fx.Node, S: Callable[[Any], ValueSet]) -> ValueSet:
    # c - s stays in {0..c} when s is in {0..c} and c is a constant (e.g. the SEW IAND's 1 - s).
    c, b = _arg(node, 0, "input"), S(_arg(node, 1, "other"))
    if _arg(node, 2, "alpha") is None and _is_nonneg_int(c) and b.is_int and b.hi <= c:
        return _int_set(c)
    return REAL


def _rsub(node: fx.Node, S: Callable[[Any], ValueSet]) -> ValueSet:  # rsub(x, c) == x.__rsub__(c) == c - x
    x, c = S(_arg(node, 0, "input")), _arg(node, 1, "other")
    if _arg(node, 2, "alpha") is None and _is_nonneg_int(c) and x.is_int and x.hi <= c:
        return _int_set(c)
    return REAL


def _is_nonneg_int(c: Any) -> bool:
    return isinstance(c, int) and not isinstance(c, bool) and c >= 0


_KEEP_METHODS = (
    "view reshape flatten unflatten permute transpose contiguous squeeze unsqueeze expand expand_as repeat clone "
    "detach flip roll chunk split unbind narrow select t view_as reshape_as __getitem__ to float half bfloat16 "
    "double type relu movedim swapaxes tensor_split"
).split()

_KEEP_FUNCTIONS: list[Any] = [
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.clone,
    torch.detach, torch.flip, torch.roll, torch.chunk, torch.split, torch.unbind, torch.narrow, torch.select,
    torch.movedim, torch.swapaxes, torch.tensor_split, torch.relu, F.relu, operator.getitem, torch.unflatten,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
]

#: Static rules: call_function target / call_method name -> rule(node, value set of an argument) -> ValueSet.
VALUE_RULES: dict[Any, _Rule] = {
    **{f: _keep for f in _KEEP_FUNCTIONS},
    **{m: _keep for m in _KEEP_METHODS},
    torch.cat: _seq, torch.stack: _seq, torch.concat: _seq,
    torch.maximum: _join2, torch.max: _max, "max": _max,
    operator.add: _add, torch.add: _add, "add": _add, "__add__": _add, "__radd__": _add,
    operator.mul: _mul, torch.mul: _mul, "mul": _mul, "__mul__": _mul, "__rmul__": _mul,
    operator.and_: _mul, torch.logical_and: _mul,
    operator.sub: _sub, torch.sub: _sub, torch.rsub: _rsub, "__rsub__": _rsub,
}

#: Leaf module classes whose output keeps the value set of their input.
KEEP_MODULES: tuple[type, ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ReLU,
)


def _is_spiking_neuron(m: nn.Module) -> bool:
    """Spiking neurons (fxmemopt.snn, spikingjelly) expose a firing threshold; their outputs are binary."""
    return hasattr(m, "v_threshold")


def _const_set(a: Any) -> ValueSet:
    if isinstance(a, bool):
        return ValueSet(int(a))
    if isinstance(a, int):
        return _int_set(a) if a >= 0 else REAL
    if isinstance(a, float) and a >= 0 and a.is_integer():
        return _int_set(int(a))
    return REAL


def static_value_set(node: fx.Node, arg_sets: Callable[[Any], ValueSet], module: nn.Module | None,
                     stateful: bool) -> ValueSet:
    """Apply the rule for ``node`` (see :data:`VALUE_RULES`); ``arg_sets`` maps an fx argument to its set."""
    if node.op == "placeholder":
        return UNKNOWN  # decided by dtype and the example: integer/bool inputs may pack, floats never do
    if node.op == "get_attr":
        return REAL
    if node.op == "call_module":
        if module is not None and stateful:
            return BINARY if _is_spiking_neuron(module) else UNKNOWN
        if isinstance(module, KEEP_MODULES):
            return arg_sets(node.args[0]) if node.args else REAL
        return REAL
    if node.op in ("call_function", "call_method"):
        rule = VALUE_RULES.get(node.target)
        return rule(node, arg_sets) if rule is not None else REAL
    return REAL


def observe_value_set(value: Any) -> ValueSet:
    """The value set a concrete example value shows: ``{0..max}`` if every element is an exact small integer."""
    tensors = [t for t in _flat_tensors(value)]
    if not tensors:
        return REAL
    hi, negzero = 0, False
    for t in tensors:
        flat = t.detach().reshape(-1)
        u = _as_small_uint8(flat, MAX_INT_SET)
        if u is None and flat.is_floating_point():
            u = _as_small_uint8(flat + 0.0, MAX_INT_SET)  # -0.0 + 0.0 is +0.0: integers but for their -0.0
            negzero = negzero or u is not None
        if u is None:
            return REAL
        if u.numel():
            hi = max(hi, int(u.max()))
    return ValueSet(hi, negzero=negzero)


def _decide(static: ValueSet, observed: ValueSet) -> ValueSet:
    if static.unknown:
        # An example of all zeros (a neuron that did not fire, the dropout after it) says nothing about the values
        # training will see: packing it at 1 bit would fall back to full storage at the first spike, and the plan's
        # prediction with it.
        return observed if observed.is_int and observed.hi else REAL
    if static.is_int and observed.is_int and observed.hi <= static.hi and (static.negzero or not observed.negzero):
        return static
    return REAL


def _grad_edges(roots: list[torch.Tensor]) -> list[tuple[Any, Any, int]]:
    """Every edge of the autograd graph behind ``roots``: ``(consumer node, producer node, output_nr)``."""
    edges: list[tuple[Any, Any, int]] = []
    seen: set[int] = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for nxt, nr in node.next_functions:
            if nxt is not None:
                edges.append((node, nxt, nr))
                stack.append(nxt)
    return edges


@dataclass
class _SlicedCall:
    """How to call one neuron on time slices, its state carried (as the runtime does, Rule 8 of
    :mod:`fxmemopt.runtime.checkpoint`), from the entry state ``before``."""

    module: nn.Module
    before: list[tuple[nn.Module, StateSnapshot]]
    owners: list[tuple[nn.Module, tuple[str, ...]]]
    stateful: bool  # the state lives in the modules; else it is a value: ``neuron(x[, s]) -> (out, s)``
    state0: Any  # the first slice's state (value-carried neurons called with two arguments)
    first_plain: bool  # the first slice is called ``neuron(x)`` (value-carried)
    axis: TimeAxis = TIME_MAJOR  # where the input and the output keep time
    last_state: Any = None  # the state the last run left (value-carried neurons)

    def run(self, x: torch.Tensor, pieces: int) -> tuple[torch.Tensor, list[tuple[list[torch.Tensor], int]]]:
        """``(output, per slice: (its end state's tensors that have a grad_fn, the sequence number the next slice's
        nodes start from))``; ``pieces=1``: the whole call."""
        for m, snap in self.before:
            # detached: an entry state from an earlier step may still reference that step's (freed) graph
            snap.detached().restore(m)
        outs, carried, state = [], [], self.state0
        for k, xc in enumerate(self.axis.split(x, pieces) if pieces > 1 else (x,)):
            with self.axis.calling(self.module, self.axis.steps(xc)):
                if self.stateful:
                    outs.append(self.module(xc))
                    leaves = [t for m, names in self.owners for t in StateSnapshot.take(m, names).tensors()]
                else:
                    o, state = self.module(xc) if k == 0 and self.first_plain else self.module(xc, state)
                    outs.append(o)
                    leaves = [t for t in tree_flatten(state)[0] if isinstance(t, torch.Tensor)]
            carried.append(([t for t in leaves if t.grad_fn is not None], compat.autograd_sequence_nr()))
        self.last_state = state
        return self.axis.cat(outs) if pieces > 1 else outs[0], carried


def _candidate_axes(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[TimeAxis]:
    """The time layouts ``module``'s call on ``x`` (giving ``out``) may have, most likely first: the input's and
    the output's time dimensions must agree and hold two steps or more (see :class:`TimeAxis`)."""
    axes = []
    for attr in BATCH_ATTRIBUTES:  # a batch size the module was told: batch and time flattened
        b = getattr(module, attr, None)
        if isinstance(b, int) and b > 0 and x.dim() >= 1 and out.dim() >= 1 and x.shape[0] % b == 0 \
                and x.shape[0] // b >= 2 and out.shape[0] == x.shape[0]:
            axes.append(TimeAxis(batch=b))
    for attr in STEPS_ATTRIBUTES:  # a number of steps it was told: batch and time flattened, T set per slice
        t = getattr(module, attr, None)
        if isinstance(t, int) and t >= 2 and x.dim() >= 1 and out.dim() >= 1 and x.shape[0] % t == 0 \
                and out.shape[0] == x.shape[0]:
            axes.append(TimeAxis(batch=x.shape[0] // t, steps_attr=attr))
    if x.dim() >= 1 and out.dim() >= 1 and x.shape[0] >= 2 and out.shape[0] == x.shape[0]:
        axes.append(TIME_MAJOR)
    if x.dim() >= 3 and out.dim() >= 2 and x.shape[1] >= 2 and out.shape[:2] == x.shape[:2]:
        axes.append(TimeAxis(dim=1))  # [B, T, features...]: not [B, features] (a batch cut is no time slice)
    return axes


def _order_suspects(call: _SlicedCall, x: torch.Tensor, pieces: int) -> list[str]:
    """Where the gradients of ``call`` on ``pieces`` time slices may be summed in another order than over all steps
    at once, read from the autograd graph's structure (not from values).

    * A carried state tensor that slice ``c`` leaves (a membrane, or a filter's current, which is also its output)
      whose gradient gets contributions from nodes of slice ``c`` made after it (the slice's stacked output) *and*
      from later slices (the next step's update), three or more in all. Autograd's engine runs the ready node made
      last first: over all steps at once the one stack is made last and its contribution arrives first; on slices,
      slice ``c``'s stack is made before slice ``c + 1`` exists, and slice ``c + 1``'s chain usually delivers first.
      ``(a + b) + c`` is not ``(b + c) + a`` in floating point (two contributions commute: exact). The runtime
      cannot reorder the engine's work: nodes are ordered by when they were made.
    * A trainable parameter whose gradient arrives over another number of edges (a parameter transformed once per
      call, ``tau = w.sigmoid()``: its contributions are summed before the transform's backward over all steps, after
      it per slice).
    """
    xi = x.detach().requires_grad_(x.is_floating_point())
    params = [(name, p) for name, p in call.module.named_parameters() if p.requires_grad]
    suspects = []
    # Only the graphs' shape is read: nothing is saved for a backward that never runs (no memory for it).
    with torch.enable_grad(), compat.saved_tensors_hooks(lambda t: None, lambda h: None):
        out, _ = call.run(xi, 1)
        whole = _grad_edges([out])
        fan_in = [sum(1 for _, q, _ in whole if getattr(q, "variable", None) is p) for _, p in params]
        del out, whole  # one graph alive at a time
        out, carried = call.run(xi, pieces)
        sliced = _grad_edges([out, *carried[-1][0]])
    for tensors, boundary in carried[:-1]:
        for t in tensors:
            own = [compat.node_sequence_nr(u) < boundary for u, q, nr in sliced if q is t.grad_fn and nr == t.output_nr]
            if any(own) and not all(own) and len(own) >= 3:
                suspects.append(f"a state tensor carried to the next time slice gets {len(own)} gradient "
                                f"contributions, {sum(own)} from its own slice and {len(own) - sum(own)} from "
                                f"later ones")
    for (name, p), edges in zip(params, fan_in):
        on_slices = sum(1 for _, q, _ in sliced if getattr(q, "variable", None) is p)
        if edges != on_slices:
            suspects.append(f"parameter {name!r} gets its gradient over {edges} edges over all steps, "
                            f"{on_slices} on slices")
    return list(dict.fromkeys(suspects))


#: random probes per slicing when the order of a neuron's gradient sums is in doubt: enough that the probes hold
#: this many output elements in all (each element whose sums are ordered differently differs with probability
#: about 1/2 or more), at least ``_PROBES[1]`` and at most ``_PROBES[2]`` probes
_PROBES = (2048, 2, 16)


def _same_sliced_grads(call: _SlicedCall, x: torch.Tensor, slicings: list[int]) -> bool:
    """Do the input's and the trainable parameters' gradients of ``call`` on each slicing equal, bitwise, those over
    all steps at once? On the example and on random probes near it, with random output gradients (own generator:
    the global RNG is not touched), from the same entry state."""
    params = [p for p in call.module.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    probes = max(_PROBES[1], min(_PROBES[2], -(-_PROBES[0] // max(1, x.numel()))))
    scale = float(x.detach().abs().max()) if x.is_floating_point() and x.numel() else 0.0
    with torch.enable_grad():
        for k in range(probes):
            xk = x.detach()
            if k and x.is_floating_point():
                noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
                xk = xk + (noise * max(scale, 1.0) / 2).to(x)
            grads = []
            for pieces in [1, *slicings]:
                xi = xk.clone().requires_grad_(x.is_floating_point())
                out, _ = call.run(xi, pieces)
                if not isinstance(out, torch.Tensor) or not out.requires_grad:
                    return not params and not xi.requires_grad
                go = torch.randn(out.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64).to(out)
                wrt = [*params, xi] if xi.requires_grad else list(params)
                grads.append(torch.autograd.grad(out, wrt, go, allow_unused=True))
            for other in grads[1:]:
                if not all(a is None and b is None or a is not None and b is not None and _bitwise_equal(a, b)
                           for a, b in zip(grads[0], other)):
                    return False
    return True


def _same_tensor_attrs(attrs: list[tuple[nn.Module, dict[str, Any]]]) -> bool:
    """Do the modules' tensor attributes now equal, bitwise, those in ``attrs`` (taken after the whole call)?"""
    for m, saved in attrs:
        now = {k: v for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)}
        if now.keys() != {k for k, v in saved.items() if isinstance(v, torch.Tensor)}:
            return False
        if not all(_bitwise_equal(v, saved[k]) for k, v in now.items()):
            return False
    return True


#: functions whose multiply-accumulates are ``output elements x the first input's last dimension``
_MATMULS = {torch.matmul, torch.mm, torch.bmm, operator.matmul, F.linear, "matmul", "mm", "bmm", "__matmul__"}
#: functions whose multiply-accumulates are ``output elements x (the weight's elements per output channel)``
_CONVS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}


def _macs(n: fx.Node, module: nn.Module | None, env: dict[fx.Node, Any], result: Any) -> int:
    """Multiply-accumulates of a node that multiplies by a weight (a convolution, a linear layer, a matmul): the
    work its time scales with (:mod:`fxmemopt.planning.timing`); 0 for every other node."""
    if not isinstance(result, torch.Tensor):
        return 0
    out = result.numel()
    if module is not None:
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            return out * (w[0].numel() if isinstance(module, nn.modules.conv._ConvNd) else w.shape[-1])
        return 0
    args = [env.get(a) if isinstance(a, fx.Node) else a for a in n.args]
    if n.target in _MATMULS and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
        return out * args[0].shape[-1]
    if n.target in _CONVS and len(args) >= 2 and isinstance(args[1], torch.Tensor) and args[1].dim() >= 2:
        return out * args[1][0].numel()
    return 0


def _derived_observations(module: nn.Module, attrs: list[tuple[nn.Module, dict[str, Any]]],
                          joined: torch.Tensor) -> tuple[tuple[str, str], ...]:
    """The tensor attributes of ``module`` whose value after its slices differs from the whole call's (in
    ``attrs``) but which one of :data:`~fxmemopt.runtime.steps.DERIVED` reproduces, bitwise, from the slices'
    ``joined`` output (sinabs' ``firing_rate``, the mean of the call's spikes); each is set to that value."""
    saved = next((d for m, d in attrs if m is module), {})
    found = []
    for name, now in list(module.__dict__.items()):
        ref = saved.get(name)
        if not (isinstance(now, torch.Tensor) and isinstance(ref, torch.Tensor)) or _bitwise_equal(now, ref):
            continue
        for how, fn in DERIVED.items():
            with torch.no_grad():
                value = fn(joined)
            if _bitwise_equal(value, ref):
                setattr(module, name, value)
                found.append((name, how))
                break
    return tuple(found)


def _is_value_state_result(result: Any) -> bool:
    """``(out, state)``: what a neuron that returns its state (norse) gives back."""
    return type(result) is tuple and len(result) == 2 and isinstance(result[0], torch.Tensor)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = _INT_VIEW.get(a.dtype)
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view)) if view else torch.equal(a, b)


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat_tensors(v)]
    return []


def _makes_spikes(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> bool:
    """Real floating values in, a floating tensor of small non-negative integers (spikes) out."""
    real_in = any(t.is_floating_point() and t.numel() and not observe_value_set(t).is_int for t in inputs)
    return real_in and any(t.is_floating_point() and t.numel() and observe_value_set(t).is_int for t in outputs)


def _passes_through(inputs: list[tuple[torch.Tensor, int]], result: Any) -> bool:
    """``result`` is one of ``inputs`` (tensors with their versions before the call), or a view of all of one
    (same storage, first element and number of elements), and the call wrote none of them (versions unchanged: an
    in-place ``relu_`` also returns its input, but computes, and saves its result)."""
    if not isinstance(result, torch.Tensor) or any(t._version != v for t, v in inputs):
        return False
    key = compat.storage_key(result.untyped_storage())
    return any(compat.storage_key(t.untyped_storage()) == key and t.data_ptr() == result.data_ptr()
               and t.numel() == result.numel() and t.dtype == result.dtype for t, _ in inputs)


#: Calls that take a tensor apart along its leading dimension into a tuple of steps (its items are per-step).
_UNBINDS = (unbind_steps, torch.unbind, "unbind")
#: Calls that join values along the leading dimension: of per-step values, a time-major one again.
_JOINS = (torch.stack, torch.cat, torch.concat, "stack", "cat")


def _takes_a_step(n: fx.Node, env: dict[fx.Node, Any]) -> bool:
    """``n`` takes one step out of the leading dimension: ``x[t]`` or ``x.select(0, t)`` on a tensor, or item ``t``
    of an ``unbind`` (``unbind_steps``, the tracer's form of ``x[t]`` in a loop over time)."""
    def step_index(a: Any) -> bool:
        return isinstance(a, int) and not isinstance(a, bool)

    if n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2 and step_index(n.args[1]):
        src = n.args[0]
        if not isinstance(src, fx.Node):
            return False
        return isinstance(env.get(src), torch.Tensor) or src.op in ("call_function", "call_method") and \
            src.target in _UNBINDS and (len(src.args) < 2 or src.args[1] == 0) and not src.kwargs
    if n.op in ("call_function", "call_method") and n.target in (torch.select, "select"):
        return len(n.args) == 3 and n.args[1] == 0 and step_index(n.args[2])
    return False


def _builtin_layer(module: nn.Module | None) -> bool:
    """A torch.nn layer (or a library's subclass of one: spikingjelly's multi-step ``layer.BatchNorm2d``): never a
    neuron, whatever its output holds on the example. A BatchNorm whose weight starts at zero (MS-ResNet's last one
    in each block) outputs all zeros from real input, which the value test alone would take for a silent neuron."""
    return module is not None and any(c is not nn.Module and c.__module__.startswith("torch.nn.modules.")
                                      for c in type(module).__mro__)


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    return f"{mod}.{getattr(t, '__qualname__', getattr(t, '__name__', repr(t)))}".lstrip(".")


def _module_stack(node: fx.Node) -> tuple[str, ...]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for v in stack.values():
        path = v[0] if isinstance(v, tuple) else str(v)
        if path and path not in paths:
            paths.append(path)
    if node.op == "call_module" and str(node.target) not in paths:
        paths.append(str(node.target))
    return tuple(paths)


class _Annotator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, stateful: dict[str, Sequence[str]],
                 entry_dead: Mapping[str, Sequence[str]] | None = None):
        super().__init__(gm)
        self.stateful = stateful
        self.entry_dead = {gm.get_submodule(p): set(n) for p, n in (entry_dead or {}).items()}
        self.stateful_paths = set(stateful)
        self.infos: dict[str, NodeInfo] = {}
        self.sets: dict[str, ValueSet] = {}
        self.refusals: dict[str, str] = {}  # node -> why time slices would not be exact (see _time_chunkable)

    def _arg_set(self, a: Any) -> ValueSet:
        if isinstance(a, fx.Node):
            return self.sets.get(a.name, REAL)
        return _const_set(a)

    def _contains_state(self, path: str) -> bool:
        prefix = path + "."
        return any(p == path or p.startswith(prefix) for p in self.stateful_paths)

    def _states_under(self, path: str) -> list[tuple[nn.Module, tuple[str, ...]]]:
        """Stateful modules at or below ``path``, with their state attribute names."""
        prefix = path + "."
        return [(self.module.get_submodule(p), tuple(names)) for p, names in self.stateful.items()
                if p == path or p.startswith(prefix)]

    def _entry_kept(self, before: list[tuple[nn.Module, StateSnapshot]]) -> list[torch.Tensor]:
        """The state tensors of the called modules as the call found them (``before``), but for those the probe
        found rebound before any use."""
        kept: list[torch.Tensor] = []
        for m, snap in before:
            dead = self.entry_dead.get(m, set())
            kept += [t for name, t in snap.attrs.items() if isinstance(t, torch.Tensor) and name not in dead]
            kept += [t for name, t in (snap.memories or {}).items() if isinstance(t, torch.Tensor) and name not in dead]
        return kept

    def _time_chunkable(self, n: fx.Node, module: nn.Module, before: list[tuple[nn.Module, StateSnapshot]],
                        result: Any, stateful: bool) -> TimeAxis | None:
        """The time layout on which calling ``module`` on time slices, state carried, reproduces ``result`` (and
        the final state, and the gradients); ``None`` if there is none.

        Two ways of carrying the state are tried: in the module's own attributes (``stateful``: spikingjelly,
        snntorch, sinabs), or as a value (a stateless neuron called ``neuron(x)`` or ``neuron(x, s)`` that returns
        ``(out, s)``: norse's multi-step ``LIF``), where each slice is called with the state the last one returned.
        The layouts are those :func:`_candidate_axes` proposes, tried in turn: time-major ``[T, ...]``, batch first
        ``[B, T, ...]`` (sinabs' ``LIF``), batch and time flattened ``[B * T, ...]`` (sinabs' ``IAFSqueeze``).
        """
        trainable = [p for p in module.parameters() if p.requires_grad]
        if trainable and not stateful:
            return None
        if n.kwargs or not n.args or not isinstance(n.args[0], fx.Node):
            return None
        args = [self.env[a] if isinstance(a, fx.Node) else a for a in n.args]
        x = args[0]
        out = result if stateful else (result[0] if _is_value_state_result(result) else None)
        if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)):
            return None
        if stateful and len(args) != 1 or not stateful and len(args) > 2:
            return None
        owners = self._states_under(str(n.target))
        after = [(m, StateSnapshot.take(m, names)) for m, names in owners]
        # Every other attribute too: a neuron that keeps an observation (spikingjelly's ``v_seq`` with
        # ``store_v_seq=True``, a mean of the input) would keep only the last slice's, where the model keeps all T.
        attrs = attributes_of(module.modules())
        state0 = None if stateful else (args[1] if len(args) == 2 else None)
        try:
            for axis in _candidate_axes(module, x, out):
                call = _SlicedCall(module, before, owners, stateful, state0, len(args) == 1, axis)
                try:
                    if self._slices_reproduce(n, call, x, result, out, after, attrs, trainable):
                        return call.axis  # with the derived observations it found
                except Exception:  # a module that cannot be called on these slices is not chunkable on them
                    pass
                finally:
                    put_back_attributes(attrs)  # as the whole call left them
            return None
        finally:
            for m, snap in after:
                snap.restore(m)

    def _slices_reproduce(self, n: fx.Node, call: _SlicedCall, x: torch.Tensor, result: Any, out: torch.Tensor,
                          after: list[tuple[nn.Module, StateSnapshot]], attrs: list[tuple[nn.Module, dict[str, Any]]],
                          trainable: list[nn.Parameter]) -> bool:
        """Does ``call`` on time slices of ``x`` reproduce the whole call's ``result``, state and gradients?"""
        steps = call.axis.steps(x)
        # A neuron with trainable parameters (spikingjelly's ParametricLIFNode.w): in slices of several steps
        # its parameters' gradient is summed per slice, then over slices, another order than over all steps
        # at once (often bitwise equal on an example, not always: measured on a PLIF [4, 2, 4, 32, 32], 1 of 3
        # seeds 2.4e-4 apart). In one-step slices each step's contribution arrives on its own, as unsliced
        # (40 of 40 cases equal): only those, verified with the gradients too.
        count = steps if trainable else min(3, steps)
        sliced, _ = call.run(x, count)
        derived = _derived_observations(call.module, attrs, sliced)
        if derived:
            call.axis = dataclasses.replace(call.axis, derived=derived)
        if call.stateful:
            now = [StateSnapshot.take(m, names) for m, names in call.owners]
            same = _bitwise_equal(sliced, result) and all(
                _bitwise_equal(a, b) for snap, (_, ref) in zip(now, after)
                for a, b in zip(snap.tensors(), ref.tensors())) and _same_tensor_attrs(attrs)
        else:
            state = call.last_state
            final, ref = tree_flatten(state), tree_flatten(result[1])
            same = _bitwise_equal(sliced, out) and final[1] == ref[1] and all(
                isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _bitwise_equal(a, b)
                or not isinstance(a, torch.Tensor) and a == b for a, b in zip(final[0], ref[0])) and \
                _same_tensor_attrs(attrs)
        if not same:
            return False
        # The values agree; the gradients must too, on any values, so the order autograd sums them in must
        # agree. Read from the graph's structure where it can differ (a state carried across a slice boundary
        # with contributions from both sides, a parameter transformed once per call); where it can, and always
        # for trainable parameters, decided by the gradients on the example and on random probes: over all
        # steps at once an element's contributions arrive in the same order for every value, so a reordered
        # sum shows on about every other element (found by the property test: a synapse filter on a
        # one-element example agreed, 7 of 20 random output gradients agree there, and training differed).
        suspects = _order_suspects(call, x, count)
        slicings = [count] if trainable else sorted({2, count, steps})
        if (suspects or trainable) and not _same_sliced_grads(call, x, slicings):
            where = f" ({'; '.join(suspects)})" if suspects else ""
            self.refusals[n.name] = (
                "on time slices autograd would sum its gradients in another order than over all steps at "
                f"once{where}: the gradients differed on random probes, not exact")
            return False
        self.refusals.pop(n.name, None)
        return True

    def run_node(self, n: fx.Node) -> Any:
        module = self.module.get_submodule(str(n.target)) if n.op == "call_module" else None
        stateful = n.op == "call_module" and self._contains_state(str(n.target))
        before = [(m, StateSnapshot.take(m, names)) for m, names in self._states_under(str(n.target))] \
            if stateful else []
        in_tensors = [t for a in n.all_input_nodes for t in _flat_tensors(self.env.get(a))]
        versions = [(t, t._version) for t in in_tensors]
        result = super().run_node(n)
        tensors = _flat_tensors(result)
        spiking = _makes_spikes(in_tensors, tensors) and (
            n.op == "call_module" and not _builtin_layer(module)
            # a custom autograd.Function called by the root's forward (its spike, with a surrogate backward, of a
            # neuron written inline: `s = SpikeFn.apply(v - 1)`), recognized by what it computed on the example
            or n.op == "call_function" and hasattr(n.target, "__wrapped_function__"))
        axis = self._time_chunkable(n, module, before, result, stateful) \
            if (stateful or spiking) and module is not None else None
        chunkable = axis is not None
        # A neuron fxmemopt has no rule for (norse, snntorch): the example decides, the packer re-checks every call.
        static = UNKNOWN if spiking and not stateful else static_value_set(n, self._arg_set, module, stateful)
        observed = observe_value_set(result) if tensors else REAL
        single = isinstance(result, torch.Tensor)
        dtype = result.dtype if single else None
        if n.op == "placeholder" and single and dtype.is_floating_point:
            value_set = REAL  # a float input is data, whatever the example happens to hold
        else:
            value_set = _decide(static, observed)
        # what `z, s = neuron(x)` (norse) or `spk, mem = lif(x, mem)` (snntorch) picks out is decided element by
        # element on the example (spikes binary, the state real); the packer re-checks every call
        self.sets[n.name] = UNKNOWN if spiking and not single else value_set
        nbytes = output_bytes(tensors)  # per distinct storage (views of one add up, capped at its size)
        # what a region snapshots at entry and keeps until its backward: the states the call reads (snntorch's
        # init_hidden membrane, one per call of a loop in forward; not those rebound before any use)
        entry_kept = self._entry_kept(before)
        inputs = tuple(dict.fromkeys(a.name for a in n.all_input_nodes))
        self.infos[n.name] = NodeInfo(
            name=n.name, op=n.op, target=_target_name(n), inputs=inputs,
            module_type=type(module).__name__ if module is not None else None,
            module_stack=_module_stack(n), is_tensor=single,
            shape=tuple(result.shape) if single else None, dtype=str(dtype).replace("torch.", "") if single else None,
            nbytes=nbytes, static=static, observed=observed, value_set=value_set, stateful=stateful,
            time_chunkable=chunkable, spiking=spiking,
            time_steps=axis.steps(self.env[n.args[0]]) if axis is not None else 0,
            time_axis=axis if axis is not None else TIME_MAJOR,
            step_slices_only=bool(chunkable) and any(p.requires_grad for p in module.parameters()),
            slice_refusal=self.refusals.get(n.name, ""), passes_through=_passes_through(versions, result),
            entry_state_bytes=output_bytes(entry_kept), macs=_macs(n, module, self.env, result),
            per_step=_takes_a_step(n, self.env) or n.op != "output" and n.target not in _JOINS and any(
                self.infos[a.name].per_step for a in n.all_input_nodes),
        )
        n.meta["fxmemopt"] = self.infos[n.name]
        return result


def annotate(gm: fx.GraphModule, example_inputs: Sequence[Any], stateful: dict[str, Sequence[str]],
             entry_dead: Mapping[str, Sequence[str]] | None = None) -> AnnotatedGraph:
    """Run ``gm`` once on ``example_inputs`` (``no_grad``) and annotate every node.

    The module's buffers, neuron states and RNG are restored afterwards, so annotating has no side effects.

    Args:
        gm: the traced module (shares modules with the user's model).
        example_inputs: positional inputs.
        stateful: stateful module paths -> state attribute names (from :func:`fxmemopt.analysis.state.probe`).
        entry_dead: stateful module path -> the state names its calls rebind before reading them
            (``ProbeResult.entry_dead``): not counted in :attr:`NodeInfo.entry_state_bytes`.

    Returns:
        The :class:`AnnotatedGraph`; the same records are in ``node.meta["fxmemopt"]``.
    """
    annotator = _Annotator(gm, stateful, entry_dead)
    saved = ModelState.capture(gm, stateful)
    with saved.restored_after(), torch.no_grad():
        annotator.run(*example_inputs)
    order = tuple(n.name for n in gm.graph.nodes)
    position = {name: i for i, name in enumerate(order)}
    users = {n.name: tuple(sorted((u.name for u in n.users), key=position.__getitem__)) for n in gm.graph.nodes}
    return AnnotatedGraph(order, annotator.infos, users)

