"""Module state: which modules carry state across calls, and how to snapshot and restore it.

A spiking neuron keeps its membrane potential between calls (``self.v``); a BatchNorm layer updates its running
statistics in place. Recomputing a layer in backward must start from the state the layer had when its forward
first ran, and must not advance that state a second time. This module answers three questions for the rest of
fxmemopt, all with plain data:

1. *Which modules are stateful?* Three ways, in this order:
   - declared by the user (``stateful_modules=`` classes);
   - a ``_memories`` dict attribute (the convention of ``fxmemopt.snn`` and of spikingjelly's memory modules);
   - detected by :func:`probe`: one forward on the example inputs records every module whose ``forward``
     *rebinds* an attribute (``self.v = ...``) that is neither a parameter nor a buffer.
2. *Which buffers does a forward mutate?* Also found by :func:`probe` (values and identity), e.g.
   BatchNorm's ``running_mean``/``running_var``/``num_batches_tracked`` in training mode.
3. *How to snapshot and restore?* :class:`StateSnapshot` for one module's state, :class:`ModelState` for
   everything fxmemopt may disturb while it analyses a model (buffers, states, RNG), so :func:`fxmemopt.optimize`
   leaves the caller's model exactly as it found it.
4. *How to start fresh?* A model may come with state from an earlier step (a training step ran, nothing reset it):
   a tensor that references a freed autograd graph, or one of another batch size. :func:`fresh_probe` puts every
   stateful module in its fresh state for as long as optimize runs (each library's own reset, on copies of the
   state: :data:`RESET_CONVENTIONS`, or the module's own ``reset()``), probes it, and puts the caller's state back
   afterwards; a stale state it cannot reset raises :class:`~fxmemopt.errors.StaleStateError`.
5. *Which state does a call overwrite before reading?* snntorch's ``Leaky(x, mem)`` starts with ``self.mem = mem``
   and rebinds ``self.reset`` before reading it: the values those attributes hold when the call starts are never
   used, and a region that kept them for its recomputation would hold one dead tensor per time step.
   :class:`StateWatch` swaps such a state tensor for an alias that notes any use of its values (metadata such as
   its shape does not count); :func:`probe` watches every call (``ProbeResult.entry_dead``), and a checkpoint
   region keeps, for the names found dead, only an :class:`EntryMeta` description unless its own call used them.

Snapshots hold *references*, not copies: neurons rebind their state rather than mutating it, so a reference is
exact and free. Tensors are version-checked (``Tensor._version``) so an in-place mutation is detected instead of
silently corrupting a snapshot.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compat import tree_leaves
from ..errors import FxMemOptError, InvalidInputsError, StaleStateError, first_line, format_error

__all__ = [
    "ProbeResult",
    "StateSnapshot",
    "EntryMeta",
    "StateWatch",
    "ModelState",
    "has_memories",
    "attributes_of",
    "put_back_attributes",
    "probe",
    "ResetConvention",
    "RESET_CONVENTIONS",
    "reset_states",
    "fresh_probe",
    "rng_state",
    "set_rng_state",
]

_MISSING = object()


def get_state(module: nn.Module, name: str) -> Any:
    """A state value by name: a plain attribute, or a buffer the forward rebinds (snntorch keeps ``mem`` in a
    non-persistent buffer); a private MISSING marker when neither exists."""
    if name in module.__dict__:
        return module.__dict__[name]
    return module._buffers.get(name, _MISSING)


def set_state(module: nn.Module, name: str, value: Any) -> None:
    """Put a state value back where :func:`get_state` found it (MISSING removes a plain attribute)."""
    if name in module._buffers:
        module._buffers[name] = None if value is _MISSING else value
    elif value is _MISSING:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = value


def has_memories(m: nn.Module) -> bool:
    """True for modules following the ``_memories`` dict convention (fxmemopt.snn, spikingjelly)."""
    return isinstance(m.__dict__.get("_memories"), dict)


def _is_state_value(v: Any) -> bool:
    # What a neuron's state looks like: a tensor, a Python number (the reset value before first use) or None.
    return v is None or isinstance(v, (torch.Tensor, float, int, bool)) and not isinstance(v, nn.Parameter)


@dataclass(frozen=True)
class EntryMeta:
    """A state tensor at a region's entry whose values the region's call never used (:class:`StateWatch`): what
    recomputation gets instead is a fresh, uninitialized tensor with the same shape, strides, dtype and device
    (the same code path reads its metadata at most, as the forward did)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: torch.Tensor) -> EntryMeta:
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype, t.device)

    def materialize(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)


@functools.cache
def _metadata_only() -> frozenset[Any]:
    """The tensor functions that read metadata, not values (anything else counts as a use of the values: a view
    such as ``t[0]`` or ``t.detach()`` is a plain tensor whose later reads a :class:`StateWatch` would not see).
    Built once (it is read on every torch function a watched tensor takes part in)."""
    T = torch.Tensor
    props = ("shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_sparse", "is_meta", "layout",
             "is_leaf", "grad_fn", "_version", "is_quantized", "is_nested")
    return frozenset([getattr(T, name).__get__ for name in props if hasattr(T, name)] + [
        T.size, T.dim, T.stride, T.numel, T.__len__, T.is_contiguous, T.element_size, T.is_floating_point,
        T.is_complex, T.storage_offset, T.get_device, torch.zeros_like, torch.empty_like, torch.ones_like,
        torch.full_like])


class _Watched(torch.Tensor):
    """An alias of a watched state tensor (:class:`StateWatch`): every torch function on it runs on plain tensors
    and returns plain tensors; one that reads its values tells the watch first."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in _metadata_only():
            for t in tree_leaves((args, kwargs)):
                if type(t) is _Watched:
                    watch = t.__dict__.get("_fxmemopt_watch")
                    if watch is not None:
                        watch.used()
        # torch.Tensor's own handler, as the plain class: it runs ``func`` with subclass dispatch off and leaves
        # its results plain tensors (called for a subclass it would convert them to ``_Watched``)
        return torch.Tensor.__torch_function__(func, (torch.Tensor,), args, kwargs)


class StateWatch:
    """Watches one state tensor of one module over one call: does the call use the values it holds at entry?

    ``StateWatch(module, name)`` puts an alias of the tensor (``Tensor.as_subclass``: same storage, same version
    counter) in the attribute; :meth:`finish`, once the call has returned, puts the tensor itself back if the call
    did not rebind the attribute, and says whether any use of its values was seen. Tensors that require grad are
    not watched (an alias would be a node of autograd's graph, and could change the order in which gradients are
    summed): ``watching`` is False for them and :meth:`finish` reports a use.

    Args:
        module, name: the state (a plain attribute or a rebound buffer, as :func:`get_state` finds it).
        copy_on_use: when a use is seen, copy the entry value first (``copy``): a use may modify it in place.
    """

    def __init__(self, module: nn.Module, name: str, copy_on_use: bool = False) -> None:
        self.module, self.name = module, name
        self.value = get_state(module, name)
        self.seen = False
        self.copy: torch.Tensor | None = None
        self._copy_on_use = copy_on_use
        # a plain tensor (not a Parameter or another subclass) that requires no grad
        self.watching = type(self.value) is torch.Tensor and not self.value.requires_grad
        self.alias: torch.Tensor | None = None
        if self.watching:
            alias = self.value.as_subclass(_Watched)
            alias.__dict__["_fxmemopt_watch"] = self
            self.alias = alias
            set_state(module, name, alias)

    def used(self) -> None:
        if not self.seen:  # (only a watched tensor's alias calls this)
            self.seen = True
            if self._copy_on_use:
                self.copy = self.value.detach().clone()

    def finish(self, out: Any = None) -> bool:
        """Stop watching; True when the call used the entry value (or it could not be watched). ``out``: the
        call's outputs: returning the alias itself counts as a use (it escapes the call)."""
        if not self.watching:
            return True
        assert self.alias is not None
        if get_state(self.module, self.name) is self.alias:
            set_state(self.module, self.name, self.value)
        self.alias.__dict__.pop("_fxmemopt_watch", None)
        if out is not None and any(t is self.alias for t in tree_leaves(out)):
            self.seen = True
        self.alias = None
        return self.seen


@dataclass
class StateSnapshot:
    """The state of one stateful module at one moment, by reference.

    Attributes:
        memories: a shallow copy of ``module._memories`` (or None when the module has no such dict).
        attrs: attribute name -> value (or a private MISSING marker when the attribute did not exist yet).
        versions: ``id(tensor) -> tensor._version`` for every tensor in the snapshot, to detect in-place edits.
    """

    memories: dict[str, Any] | None
    attrs: dict[str, Any]
    versions: dict[int, int] = field(default_factory=dict)

    @classmethod
    def take(cls, module: nn.Module, attr_names: Sequence[str]) -> StateSnapshot:
        mem = module.__dict__.get("_memories")
        memories = dict(mem) if isinstance(mem, dict) else None
        attrs = {n: get_state(module, n) for n in attr_names}
        snap = cls(memories, attrs)
        snap.versions = {id(t): t._version for t in snap.tensors()}
        return snap

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the snapshot refers to."""
        for d in (self.memories or {}, self.attrs):
            for v in d.values():
                if isinstance(v, torch.Tensor):
                    yield v

    def modified_in_place(self) -> list[str]:
        """Names of state tensors whose data changed in place since the snapshot was taken."""
        bad = []
        for d in (self.memories or {}, self.attrs):
            for k, v in d.items():
                if isinstance(v, torch.Tensor) and v._version != self.versions.get(id(v), v._version):
                    bad.append(k)
        return bad

    def restore(self, module: nn.Module) -> None:
        """Put this state back into ``module`` (rebinding attributes; the ``_memories`` dict keeps its identity)."""
        if self.memories is not None:
            mem = module.__dict__["_memories"]
            mem.clear()
            mem.update(self.memories)
        for k, v in self.attrs.items():
            set_state(module, k, v.materialize() if isinstance(v, EntryMeta) else v)

    def copied(self, skip: Iterable[str] = ()) -> StateSnapshot:
        """A copy whose tensors are cloned (``requires_grad`` kept): immune to later in-place edits of the state.
        ``skip``: attribute names kept by reference (a :class:`StateWatch` copies them when they are used)."""
        skip = set(skip)

        def copy(v: Any, name: str = "") -> Any:
            if isinstance(v, torch.Tensor) and name not in skip:
                return v.detach().clone().requires_grad_(v.requires_grad)
            return v

        memories = None if self.memories is None else {k: copy(v) for k, v in self.memories.items()}
        return StateSnapshot(memories, {k: copy(v, k) for k, v in self.attrs.items()})

    def detached(self) -> StateSnapshot:
        """A copy whose tensors are detached aliases keeping ``requires_grad``: what recomputation runs on.

        Recomputation must save the same tensors as the forward did, and autograd decides what to save from
        ``requires_grad``; detaching keeps recomputation from extending the forward's graph.
        """

        def det(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.detach().requires_grad_(v.requires_grad)
            if isinstance(v, EntryMeta):
                return v.materialize()
            return v

        memories = None if self.memories is None else {k: det(v) for k, v in self.memories.items()}
        return StateSnapshot(memories, {k: det(v) for k, v in self.attrs.items()})


def attributes_of(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, dict[str, Any]]]:
    """A shallow copy of each module's ``__dict__``: every attribute it holds now, by reference."""
    return [(m, dict(m.__dict__)) for m in modules]


def put_back_attributes(saved: Sequence[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Rebind every attribute to the object :func:`attributes_of` saw, and drop attributes added since. Covers what
    a module keeps beyond its declared state (an observation tensor, ``v_seq``), whose graph would otherwise keep a
    recomputation alive, or which a trial run would leave changed."""
    for m, attrs in saved:
        d = m.__dict__
        for k in [k for k in d if k not in attrs]:
            del d[k]
        for k, v in attrs.items():
            if d.get(k, _MISSING) is not v:
                d[k] = v


def rng_state(cuda_devices: Sequence[torch.device] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The CPU RNG state and the RNG states of the given CUDA devices."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda_devices]


def set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]], cuda_devices: Sequence[torch.device] = ()) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(cuda_devices, cuda):
        torch.cuda.set_rng_state(s, d)


def _cuda_devices_in_use() -> list[torch.device]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return []


class ModelState:
    """Everything fxmemopt could disturb in a model while analysing it, captured so it can be put back.

    Captures buffer *values* (cloned: analysis runs mutate them in place), every stateful module's state (by
    reference), every module attribute (by reference, so anything a forward rebinds is put back, and for tensors also
    by value, so anything a forward updates in place is put back), parameter ``.grad`` references, training flags
    and the global RNG states. ``restore()`` puts all of it back: buffers are copied back
    in place and rebound to their original objects.

    Example:
        >>> saved = ModelState.capture(model, stateful={})          # doctest: +SKIP
        >>> model(x)                                                # mutates BN stats, neuron states, RNG
        >>> saved.restore()                                         # as if the call never happened
    """

    def __init__(self, model: nn.Module, stateful: dict[str, Sequence[str]]) -> None:
        self.model = model
        self.buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
        for mod in model.modules():
            for name, buf in mod._buffers.items():
                if buf is not None:
                    self.buffers.append((mod, name, buf, buf.detach().clone()))
        self.states: list[tuple[nn.Module, StateSnapshot]] = []
        for path, names in stateful.items():
            mod = model.get_submodule(path)
            self.states.append((mod, StateSnapshot.take(mod, names)))
        self.grads = [(p, p.grad) for p in model.parameters()]
        self.training = [(m, m.training) for m in model.modules()]
        # Every module's attributes by reference: whatever a forward rebinds (a plain-PyTorch neuron's ``self.v``,
        # a counter) is put back, whether or not it was known to be state.
        self.attrs = attributes_of(model.modules())
        # ... and the values of tensors held in attributes (states a forward updates in place, self.v.mul_(...)).
        seen: set[int] = set()
        self.values: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        for m in model.modules():
            mem = m.__dict__.get("_memories")
            held = list(m.__dict__.values()) + (list(mem.values()) if isinstance(mem, dict) else [])
            for v in held:
                if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and id(v) not in seen:
                    seen.add(id(v))
                    self.values.append((v, v._version, v.detach().clone()))
        self.cuda_devices = _cuda_devices_in_use()
        self.rng = rng_state(self.cuda_devices)

    @classmethod
    def capture(cls, model: nn.Module, stateful: dict[str, Sequence[str]]) -> ModelState:
        return cls(model, stateful)

    def restore(self) -> None:
        with torch.no_grad():
            for mod, name, original, value in self.buffers:
                mod._buffers[name] = original
                if not torch.equal(original, value):  # a no-op copy would still bump the version of a tensor
                    original.copy_(value)             # the caller's autograd graph may have saved
        put_back_attributes(self.attrs)
        for mod, snap in self.states:
            snap.restore(mod)
        with torch.no_grad():
            for t, version, value in self.values:
                if t._version != version:
                    t.copy_(value)
        for p, g in self.grads:
            p.grad = g
        for m, training in self.training:
            m.training = training
        set_rng_state(self.rng, self.cuda_devices)

    @contextlib.contextmanager
    def restored_after(self) -> Iterator[None]:
        """Context manager: run the body, then restore, whatever happens."""
        try:
            yield
        finally:
            self.restore()


@dataclass(frozen=True)
class ProbeResult:
    """What one eager forward on the example inputs revealed about module state.

    Attributes:
        stateful: module path -> names of plain attributes its forward rebinds (for ``_memories`` modules, only
            those besides the dict, whose state names are read live from it: usually none). Sorted by path.
        mutated_buffers: (module path, buffer name) pairs the forward mutated in place or rebound.
        call_counts: module path -> number of times the module was called.
        resets: stateful module path -> its state when the forward first calls it (tensors cloned), for modules
            the model's own ``forward`` puts back to that state before using them (a second forward found them
            there again although the first had changed them): ``reset_net(self)`` at the top of ``forward``.
        entry_dead: stateful module path -> names of its state tensors no call of a third forward used the values
            of before rebinding them (:class:`StateWatch`; snntorch's ``mem`` when passed in, and ``reset``).
            Empty where that forward raised (nothing is then assumed dead).
    """

    stateful: dict[str, tuple[str, ...]]
    mutated_buffers: tuple[tuple[str, str], ...]
    call_counts: dict[str, int]
    resets: dict[str, dict[str, Any]] = field(default_factory=dict)
    entry_dead: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _state_values(m: nn.Module) -> dict[str, Any]:
    """A module's state-like values (``_memories`` entries and tensor/number attributes), tensors cloned."""
    mem = m.__dict__.get("_memories")
    items = list(mem.items()) if isinstance(mem, dict) else []
    items += [(k, v) for k, v in m.__dict__.items() if _is_state_value(v) and k != "training"]
    items += [(k, v) for k, v in m._buffers.items() if v is not None]
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in items}


def _same_values(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def probe(model: nn.Module, example_inputs: tuple[Any, ...],
          declared: tuple[type, ...] = ()) -> ProbeResult:
    """Run ``model(*example_inputs)`` once under ``no_grad`` and record which modules carry state.

    The model is left exactly as it was (buffers, states, grads, RNG are restored afterwards).

    Args:
        model: the user's model, in the training mode it will be optimized for.
        example_inputs: a tuple of inputs, as for ``model(*example_inputs)``.
        declared: module classes the user declared stateful; their plain tensor/number attributes are
            treated as state whether or not this forward rebinds them.

    Returns:
        A :class:`ProbeResult`.
    """
    paths = {m: p for p, m in model.named_modules(remove_duplicate=False)}
    before_attrs: dict[nn.Module, dict[str, tuple[int, int]]] = {}
    before_bufs: dict[nn.Module, dict[str, tuple[int, torch.Tensor]]] = {}
    changed_attrs: dict[nn.Module, set[str]] = {}
    changed_bufs: set[tuple[str, str]] = set()
    counts: dict[str, int] = {}
    resets: dict[str, dict[str, Any]] = {}
    entry_dead: dict[nn.Module, tuple[str, ...]] = {}

    first_entry: dict[nn.Module, dict[str, Any]] = {}

    def pre(mod: nn.Module, args: Any) -> None:
        if mod not in first_entry:
            first_entry[mod] = _state_values(mod)
        # Identity and version: a state rebound (self.v = ...) or updated in place (self.v.mul_(...)) both count.
        before_attrs[mod] = {k: (id(v), v._version if isinstance(v, torch.Tensor) else 0)
                             for k, v in mod.__dict__.items() if _is_state_value(v)}
        # Values, not version counters: kernels such as batch_norm update running statistics without bumping them.
        before_bufs[mod] = {k: (id(b), b.detach().clone()) for k, b in mod._buffers.items() if b is not None}

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        path = paths.get(mod, "")
        counts[path] = counts.get(path, 0) + 1
        old = before_attrs.get(mod, {})
        for k, v in mod.__dict__.items():
            now = (id(v), v._version if isinstance(v, torch.Tensor) else 0)
            if _is_state_value(v) and k not in ("training",) and old.get(k) != now:
                changed_attrs.setdefault(mod, set()).add(k)
        for k, (bid, value) in before_bufs.get(mod, {}).items():
            b = mod._buffers.get(k)
            if b is not None and id(b) != bid:
                # Rebound by the forward (snntorch's `self.mem = ...` on a registered buffer): state, carried
                # from call to call by reference like an attribute, not a statistic updated in place.
                changed_attrs.setdefault(mod, set()).add(k)
            elif b is None or not torch.equal(b, value):
                changed_bufs.add((path, k))

    # Stateful by convention, declared classes included, found before the run so their state is restored too.
    conventional = {p: () for p, m in model.named_modules() if has_memories(m) or isinstance(m, declared)}
    saved = ModelState.capture(model, conventional)
    # Attributes rebound by detected modules are restored by hand below (they are not known beforehand).
    attr_backup = {m: dict(m.__dict__) for m in paths}
    handles = []
    try:
        for m in paths:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        with torch.no_grad():
            model(*example_inputs)
        for h in handles:
            h.remove()
        handles = []
        # A second forward tells whether the model's own forward resets stateful modules before using them.
        candidates = [m for m in paths if has_memories(m) or isinstance(m, declared) or m in changed_attrs]
        # Booleans, not the states' clones: holding every neuron's state twice over the second forward (at the
        # user's size) would cost more than the step being optimized keeps.
        changed_by_first = {m: m in first_entry and not _same_values(_state_values(m), first_entry[m])
                            for m in candidates}
        fresh_at_second: dict[nn.Module, bool] = {}
        def entry(mod: nn.Module, args: Any) -> None:
            if mod not in fresh_at_second and mod in first_entry:
                fresh_at_second[mod] = _same_values(_state_values(mod), first_entry[mod])

        for m in candidates:
            handles.append(m.register_forward_pre_hook(entry))
        with torch.no_grad():
            model(*example_inputs)
        resets = {paths[m]: first_entry[m] for m in candidates
                  if changed_by_first[m] and fresh_at_second.get(m, False)}
        for h in handles:
            h.remove()
        handles = []
        entry_dead = _entry_dead(model, example_inputs, {m: changed_attrs[m] for m in candidates
                                                         if m in changed_attrs and not has_memories(m)}, handles)
    finally:
        for h in handles:
            h.remove()
        for m, d in attr_backup.items():
            for k in changed_attrs.get(m, ()):
                if k in d:
                    m.__dict__[k] = d[k]
                else:
                    m.__dict__.pop(k, None)
        saved.restore()

    stateful: dict[str, tuple[str, ...]] = {}
    for p, m in model.named_modules():
        if has_memories(m):
            # its _memories, and any plain attribute its forward rebinds besides (a MemoryModule subclass that
            # keeps a trace in ``self.trace``): both are its state
            stateful[p] = tuple(sorted(changed_attrs.get(m, set())))
        elif isinstance(m, declared):
            names = {k for k, v in m.__dict__.items() if isinstance(v, (torch.Tensor, float)) and k != "training"}
            stateful[p] = tuple(sorted(names | changed_attrs.get(m, set())))
        elif m in changed_attrs:
            stateful[p] = tuple(sorted(changed_attrs[m]))
    state_buffers = {(paths[m], k) for m, ks in changed_attrs.items() for k in ks}
    return ProbeResult(dict(sorted(stateful.items())), tuple(sorted(changed_bufs - state_buffers)), counts,
                       {p: v for p, v in sorted(resets.items()) if p in stateful},
                       {paths[m]: names for m, names in entry_dead.items() if paths[m] in stateful})


def _entry_dead(model: nn.Module, example_inputs: tuple[Any, ...], names: dict[nn.Module, set[str]],
                handles: list[Any]) -> dict[nn.Module, tuple[str, ...]]:
    """One more ``no_grad`` forward with every call of the modules in ``names`` watched (:class:`StateWatch`):
    the state names whose entry values no call used. A forward that raises here finds nothing dead (the watch is
    an optimization: what is not found dead is kept, as before)."""
    if not names:
        return {}
    used: dict[nn.Module, set[str]] = {m: set() for m in names}
    tensors: dict[nn.Module, set[str]] = {m: set() for m in names}
    open_: dict[nn.Module, list[list[StateWatch]]] = {}

    def pre(mod: nn.Module, args: Any) -> None:
        watches = [StateWatch(mod, n) for n in sorted(names[mod]) if isinstance(get_state(mod, n), torch.Tensor)]
        tensors[mod].update(w.name for w in watches)
        open_.setdefault(mod, []).append(watches)

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        for w in open_[mod].pop():
            if w.finish(out):
                used[mod].add(w.name)

    for m in names:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception:
        return {}
    finally:
        for stack in open_.values():  # a forward that raised left its watches open
            for watches in stack:
                for w in watches:
                    w.finish()
    return {m: tuple(sorted(tensors[m] - used[m])) for m in names if tensors[m] - used[m]}


# ---- fresh state: a model that comes with state from an earlier step ------------------------------------------------

def _from_library(m: nn.Module, package: str) -> bool:
    """True when ``m``'s class or one of its bases is defined in ``package`` (no import of it needed)."""
    return any(c.__module__.split(".", 1)[0] == package for c in type(m).__mro__)


@dataclass(frozen=True)
class ResetConvention:
    """How one family of neurons is put back to its fresh state.

    Attributes:
        name: the family, for messages (``"snntorch neuron"``).
        advice: what a user calls to reset a whole model of this family.
        applies: ``module -> bool``.
        reset: ``module -> None``: the family's own per-module reset. It runs on copies of the module's state
            tensors (:func:`reset_states`), so one that writes in place (sinabs's ``buffer.zero_()``,
            ``detach_()``) never touches the caller's tensors.
    """

    name: str
    advice: str
    applies: Callable[[nn.Module], bool]
    reset: Callable[[nn.Module], None]


#: The libraries' own resets, tried in order. Per module, never process-wide: snntorch's ``utils.reset`` and the
#: class-level ``reset_hidden`` reset every instance in ``SpikingNeuron.instances``, other models' included, so the
#: per-neuron ``reset_mem()`` is used (zeros, no autograd history; the forward re-creates a state of another shape).
RESET_CONVENTIONS: tuple[ResetConvention, ...] = (
    ResetConvention("_memories module (spikingjelly, fxmemopt.snn)",
                    "spikingjelly.activation_based.functional.reset_net(model) (fxmemopt.snn.reset_net for "
                    "fxmemopt.snn)",
                    lambda m: has_memories(m) and callable(getattr(m, "reset", None)), lambda m: m.reset()),
    ResetConvention("snntorch neuron", "snntorch.utils.reset(model), or reset_mem() on each neuron",
                    lambda m: _from_library(m, "snntorch") and callable(getattr(m, "reset_mem", None)),
                    lambda m: m.reset_mem()),
    ResetConvention("sinabs stateful layer", "model.reset_states()",
                    lambda m: _from_library(m, "sinabs") and callable(getattr(m, "reset_states", None))
                    and bool(m._buffers), lambda m: m.reset_states()),
)


def convention_of(m: nn.Module) -> ResetConvention | None:
    """The first :data:`RESET_CONVENTIONS` entry that applies to ``m``, or None."""
    return next((c for c in RESET_CONVENTIONS if c.applies(m)), None)


def _own_reset(m: nn.Module) -> Callable[[], Any] | None:
    """A plain stateful module's own zero-argument ``reset()`` (or ``reset_states()``), or None."""
    for name in ("reset", "reset_states"):
        fn = getattr(m, name, None)
        if callable(fn) and not isinstance(fn, nn.Module):
            try:
                inspect.signature(fn).bind()
            except (TypeError, ValueError):
                continue
            return fn
    return None


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(t.requires_grad and t.is_leaf)


def _on_copies(m: nn.Module) -> None:
    """Rebind every state tensor of ``m`` (buffers, ``_memories`` entries, tensor attributes) to a detached copy, so
    a reset that writes in place writes the copies; :class:`ModelState` rebinds the originals afterwards."""
    for name, b in m._buffers.items():
        if b is not None:
            m._buffers[name] = _copy(b)
    mem = m.__dict__.get("_memories")
    if isinstance(mem, dict):
        for k, v in mem.items():
            if isinstance(v, torch.Tensor):
                mem[k] = _copy(v)
    for k, v in list(m.__dict__.items()):
        if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
            m.__dict__[k] = _copy(v)


def reset_states(model: nn.Module) -> list[nn.Module]:
    """Put every module a :data:`RESET_CONVENTIONS` entry covers back to its fresh state; returns those modules.

    The reset runs on copies of the state tensors (the caller's tensors are rebound, never written): take a
    :class:`ModelState` first to put them back.
    """
    done = []
    for m in model.modules():
        convention = convention_of(m)
        if convention is not None:
            _on_copies(m)
            convention.reset(m)
            done.append(m)
    return done


def _tensor_state(m: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """``m``'s state tensors: those named (or, without names, every non-parameter tensor attribute), and its
    ``_memories`` tensors."""
    mem = m.__dict__.get("_memories")
    found = {k: v for k, v in (mem.items() if isinstance(mem, dict) else ()) if isinstance(v, torch.Tensor)}
    if names is None:
        found.update((k, v) for k, v in m.__dict__.items()
                     if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter))
    else:
        found.update((k, v) for k in names for v in [get_state(m, k)] if isinstance(v, torch.Tensor))
    return found


def _shapes(tensors: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}: tensor {list(v.shape)}" + (f" with grad_fn={type(v.grad_fn).__name__}"
                                                       if v.grad_fn is not None else "")
                     for k, v in sorted(tensors.items()))


def _failing_module(error: BaseException, model: nn.Module) -> tuple[str, nn.Module, str] | None:
    """The innermost module of ``model`` whose code is on ``error``'s traceback: (path, module, its tensor arguments'
    shapes there)."""
    paths = {id(m): p for p, m in model.named_modules()}
    hit = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in paths:
            code = frame.f_code
            args = [frame.f_locals.get(n) for n in code.co_varnames[1:code.co_argcount]]
            shapes = ", ".join(str(list(a.shape)) for a in args if isinstance(a, torch.Tensor))
            hit = (paths[id(owner)], owner, shapes)
    return hit


_RESET_FIX = ("Reset the model's state before optimize, as before every new sequence (put {names} back to "
              "its initial value); or give {cls} a reset() method: optimize calls it on a copy of the state and "
              "puts yours back afterwards, as it does with spikingjelly, fxmemopt.snn, snntorch and sinabs neurons.")


def _stale(path: str, m: nn.Module, problem: str, expected: str, got: str) -> StaleStateError:
    names = ", ".join(f"self.{k}" for k in sorted(_tensor_state(m))) or "its state"
    return StaleStateError(format_error(f"{path or 'model'} ({type(m).__name__})", problem, expected=expected,
                                        got=got, fix=_RESET_FIX.format(cls=type(m).__name__, names=names)))


def _probe_fresh(model: nn.Module, inputs: tuple[Any, ...], declared: tuple[type, ...],
                 reset: set[nn.Module]) -> ProbeResult:
    """:func:`probe`, on a model whose library neurons are reset already (``reset``): plain stateful modules
    holding a tensor state are reset with their own ``reset()`` (and the model probed again), or checked for
    staleness the probe can see."""
    for _ in range(sum(1 for _ in model.modules()) + 1):  # each round resets at least one more module
        try:
            found = probe(model, inputs, declared)
        except FxMemOptError:
            raise
        except Exception as e:
            hit = _failing_module(e, model)
            if hit is not None and hit[1] not in reset and _tensor_state(hit[1]):
                path, m, shapes = hit
                own = _own_reset(m)
                if own is not None:  # its own reset, on copies, then probe again
                    _on_copies(m)
                    own()
                    reset.add(m)
                    continue
                raise _stale(path, m, f"holds state from an earlier call, and the forward on the example inputs "
                             f"fails on it ({first_line(e, 200)})", f"a fresh state for its inputs {shapes}",
                             _shapes(_tensor_state(m))) from e
            raise InvalidInputsError(format_error(
                f"{type(model).__name__}(*example_inputs)", f"raised {type(e).__name__}: {e}",
                fix="Check that example_inputs are what the model's forward expects (a tuple of positional "
                    "inputs).")) from e
        again = False
        graphed: list[tuple[str, nn.Module, dict[str, torch.Tensor]]] = []
        for path, names in found.stateful.items():
            m = model.get_submodule(path)
            state = _tensor_state(m, names)
            if m in reset or path in found.resets or not state:
                continue  # reset already, reset by the model's own forward, or no tensor state to be stale
            own = _own_reset(m)
            if own is not None:
                before = _state_values(m)
                _on_copies(m)
                own()
                reset.add(m)
                again = again or not _same_values(before, _state_values(m))
                continue
            history = {k: v for k, v in state.items() if v.grad_fn is not None}
            if history:
                graphed.append((path, m, history))
        if again:
            continue
        for path, m, history in _reached(model, inputs, graphed):
            raise _stale(path, m, "holds state from an earlier step that references that step's autograd "
                         "graph, which a training step from it would backpropagate into (freed by the earlier "
                         "step's backward, or else joined to every step optimize runs)",
                         "a fresh state (no autograd history)", _shapes(history))
        return found
    raise StaleStateError(format_error(type(model).__name__, "its stateful modules' reset() methods do not leave "
                                       "them fresh", fix="Reset the model's state before optimize."))


def _reached(model: nn.Module, inputs: tuple[Any, ...], graphed: list[tuple[str, nn.Module, dict[str, torch.Tensor]]]
             ) -> list[tuple[str, nn.Module, dict[str, torch.Tensor]]]:
    """Those of ``graphed`` (module, its state tensors with autograd history) whose history the outputs' autograd
    graph reaches: one forward with grad (state restored after), its graph walked from the outputs. A state the
    forward overwrites before reading (a cache, an observation) is harmless, however stale."""
    if not graphed:
        return []
    saved = ModelState.capture(model, {p: () for p, m in model.named_modules() if has_memories(m)})
    with saved.restored_after(), torch.enable_grad():
        out = model(*inputs)
    stack = [t.grad_fn for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen: set[int] = set()
    nodes = []  # kept alive while their ids are in `seen`
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        nodes.append(fn)
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return [(p, m, {k: v for k, v in h.items() if id(v.grad_fn) in seen}) for p, m, h in graphed
            if any(id(v.grad_fn) in seen for v in h.values())]


@contextlib.contextmanager
def fresh_probe(model: nn.Module, inputs: tuple[Any, ...], declared: tuple[type, ...] = ()
                ) -> Iterator[ProbeResult]:
    """Put every stateful module in its fresh state, :func:`probe` the model, and keep it fresh until the block ends;
    then put the caller's state back (the same objects, the same values).

    A model may come with state from an earlier step: a training step ran and nothing reset it (its state references
    that step's freed autograd graph), or it ran on another batch size. Everything optimize runs (probe, trace,
    recording, validation, measurement) must see the model as freshly reset, the state a training step starts from.
    Modules are reset by their library's convention (:data:`RESET_CONVENTIONS`), or, for a plain stateful module
    the probe finds, by its own ``reset()``; always on copies of the state tensors.

    Args:
        model: the user's model.
        inputs: checked example inputs.
        declared: module classes declared stateful.

    Yields:
        The :class:`ProbeResult` of the fresh model.

    Raises:
        StaleStateError: a plain stateful module without a ``reset()`` holds a tensor state from an earlier step:
            one with autograd history, or one the forward on the example fails on (another batch size).
        InvalidInputsError: the model fails on the example inputs for another reason.

    Example:
        >>> net(x_small)                                             # doctest: +SKIP
        >>> with fresh_probe(net, (x,)) as found:                    # doctest: +SKIP
        ...     net(x)                                               # runs from the fresh state
        >>> # net's state is x_small's again
    """
    saved = ModelState.capture(model, {p: () for p, m in model.named_modules() if has_memories(m)})
    with saved.restored_after():
        reset = set(reset_states(model))
        yield _probe_fresh(model, inputs, declared, reset)
