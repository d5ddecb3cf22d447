"""Runtime of a checkpoint region: keep only the inputs (bit-packed), recompute the rest in backward, exactly.

NOTE [Checkpoint region invariants]
A :class:`CheckpointRegion` wraps the GraphModule ``body`` of one region. In a training step (module in training
mode, grad enabled, something requiring grad) its call follows these rules; everywhere else it just calls
``body`` (Rule 7).

Rule 1 (non-reentrant). The forward runs ``body`` once, normally, with autograd recording as usual, inside a
    ``saved_tensors_hooks`` context. Every tensor autograd saves in there is handed to the region's *frame* and
    replaced by a handle; the tensor itself is not kept (only its shape and dtype, to check Rule 3), so only what
    Rule 2 lists stays alive and the region's forward holds no more than an unoptimized forward's temporaries.
    Gradients flow through autograd's own graph: parameters are ordinary leaves, so
    ``torch.autograd.grad(loss, params)``, ``backward(inputs=...)`` and DDP's hooks see each use.
Rule 2 (what is kept). The region's inputs: bit-packed when the plan says they hold spikes and the packer's
    bit-exact check passes, else the tensor itself (no copy; its version counter is recorded). The state of every
    stateful module inside, *as of entry*, by reference (neurons rebind their state, they do not mutate it; see
    Rule 5 for those that do), but for a state the call rebinds before using its values (snntorch's ``Leaky``
    rebinds ``mem`` and ``reset`` first; found by the probe, ``RegionSpec.entry_dead``, and watched in each call
    by :class:`~fxmemopt.analysis.state.StateWatch`): of those only the shape, strides, dtype and device
    (:class:`~fxmemopt.analysis.state.EntryMeta`; recomputation gets a fresh tensor like it). Keeping them
    would hold one dead tensor per call until backward. A call that does use one keeps it, as any other state.
    A clone of every buffer the forward mutates (BatchNorm statistics). The CPU and CUDA RNG states. The autocast
    state. Nothing else.
Rule 3 (recomputation). The first unpack of a handle in backward recomputes ``body`` once: on the unpacked inputs
    (detached, ``requires_grad`` as in forward; an unpacked one as a non-leaf, :func:`_unheld_requiring_grad`, so
    that it dies at its last use as it did in the forward), with every stateful module temporarily holding its entry
    state, every buffer of the region temporarily replaced by a throw-away copy of its entry value (only the
    neuron's own for a replay of a chunked region's neuron alone, Rule 8: the layers before it do not run), the
    RNG and autocast state of the forward, and grad enabled. The tensors it saves are matched one to one, by position,
    with the forward's handles; shapes and dtypes are checked (:class:`~fxmemopt.errors.RecomputationMismatchError`
    lists every mismatch), and so are values: each saved tensor's fingerprint (:mod:`fxmemopt.runtime.fingerprint`;
    sampled by default, every element in :func:`fxmemopt.optimize`'s validation step) is taken when the forward saves
    it and compared when recomputation produces it; a difference raises
    :class:`~fxmemopt.errors.RecomputationValueError` (at once on CPU; when the backward pass ends on an accelerator,
    so the check never waits for the device mid-backward), before the optimizer can use the gradients.
    Recomputation stops as soon as the last tensor backward still needs has been captured (what follows, such
    as a neuron's stacked output, is not rebuilt).
Rule 4 (no side effects). Recomputation restores, afterwards, every module's live state, every live buffer (same
    objects), every other attribute the recomputation rebound (a module that keeps an observation tensor would
    otherwise hold the recomputation's graph and all it saved) and the global RNG. The state a neuron holds after
    the step, BatchNorm's running statistics and ``num_batches_tracked`` are the forward's, updated exactly once.
Rule 5 (in-place state). Entry states that are tensors are also copied at entry; when ``body`` returns, the copy
    is dropped if the state is unmodified (the reference is exact), or kept and used by recomputation if the
    module modified its state in place (counted in ``state_copies``). A by-reference input modified in place
    before backward raises, like autograd's own "modified by an inplace operation" error.
Rule 6 (consumption). A recomputed tensor is dropped as soon as autograd unpacks it, so a region's working set
    shrinks while its backward runs. Tensors saved by autograd nodes that only a stateful module's final state
    depends on (a neuron's last state update) are not recomputed at all when the engine will not run those nodes
    (the usual case: the state is reset, not back-propagated through); those whose saving node is already gone
    (a detached branch inside the region: :class:`_Handle`) are not kept when recomputed; anything recomputed but
    never unpacked is dropped when the backward pass ends. A later backward (``retain_graph=True``) recomputes again.
Rule 8 (temporal chunks). A :class:`ChunkedRegion` is *prefix -> neuron*: its forward runs the prefix over all
    time steps, then the neuron on ``k`` consecutive time slices (``split`` along the neuron's time axis, uneven
    allowed, ``k`` clamped to T: ``[T, ...]``, ``[B, T, ...]``, or batch and time flattened into ``[B * T, ...]``
    as sinabs' ``*Squeeze`` layers take them; :class:`~fxmemopt.runtime.steps.TimeAxis`) with its state carried
    from slice to slice, and concatenates the slices' outputs. The state is
    carried in the neuron's attributes, or, for a neuron that keeps none and returns it (norse's ``LIF``:
    ``z, s = neuron(x, s)``), as a value: each slice is called with the state the previous one returned, the first
    as the model calls it. This is bitwise what the unsplit call computes (same per-step operations, same order),
    and autograd's graph carries the state's gradient from slice to slice. Its *sums* need not come in the same
    order: autograd adds a tensor's gradient contributions as their nodes run, latest-made first, and a slice's own
    nodes that read the state it leaves (its stacked output) are made before the next slice's, where over all steps
    at once the one stack is made last; with three or more contributions from both sides of a boundary (a synapse
    filter's current is its output and its state) the sum is rounded differently. Nothing here can reorder the
    engine's work, so such neurons are never sliced: the annotator reads the sliced graph's structure and, where
    it is in doubt, the gradients on random probes (``NodeInfo.slice_refusal``). The frame records only each slice's
    range of saved tensors and the RNG at the neuron's start: keeping every slice's start state from forward to
    backward would cost (k/T) of a layer's activation per region. In backward, the first slice needed (the last
    one) triggers one recomputation of the prefix, which is copied into one input part per slice (or viewed, when
    the neuron's input is an input the region stores whole: it is alive anyway, a copy would double it), and one no-grad
    replay of the neuron that keeps the start state of every ``m``-th slice (``m = isqrt(k - 1) + 1``) and of the
    last segment; a segment's other start states are replayed from its checkpoint when backward reaches it (about
    ``2 sqrt(k)`` states alive instead of ``k``, for one more no-grad pass of the neuron; with ``keep_starts``,
    chosen where the region's backward is off the predicted peak, ``m = 1``: that one replay keeps them all). Then
    each slice is recomputed on its own when backward first needs it, so only one slice's per-step tensors exist at
    a time, and
    its input part and start state die with it: the input's parts die as fast as its gradient's parts appear. The
    prefix's own saved tensors are either captured during that recomputation and kept (``keep_prefix=True``:
    faster) or recomputed again when the prefix's backward needs them (less memory).
Rule 7 (plain mode). In ``eval()``, under ``no_grad``, or when nothing the region reads requires grad, ``body``
    runs directly: no packing, no snapshots, no overhead.
Rule 9 (whole-region time slices, approximate). A :class:`SlicedRegion` runs its *whole* body on ``k`` consecutive
    time slices of its time-major inputs (the seed's temporal split), each slice a checkpointed call of its own
    (Rules 1-6) that starts from the states the previous slice left, and concatenates the slices' outputs. Only
    one slice's tensors are recomputed at a time, prefix included. This changes the meaning of anything that
    couples time steps (BatchNorm in training computes statistics per slice and updates running statistics once
    per slice; attention or pooling over T sees one slice), so the plan search proposes it only with
    ``optimize(exact=False)``, and :func:`fxmemopt.optimize` reports, per region, whether the sliced output
    equalled the unsliced one on the example. It slices in plain mode too (Rule 7), so the region means the same
    whether or not gradients are recorded.
Rule 10 (torch.compile). A region's forward is excluded from compilation (``torch.compiler.disable``): Dynamo
    cannot keep the contract (it traces saved-tensor hooks, RNG snapshots and state swaps into graphs with other
    semantics; measured: a wrong input gradient with backend="eager", an error with "aot_eager"). So
    ``torch.compile(gm)`` compiles the code *between* regions and neurons, and every region runs eagerly, exactly.
Rule 11 (packed saves, nothing recomputed). A :class:`PackedRegion` runs its body once, normally, inside a
    ``saved_tensors_hooks`` context that stores every saved tensor sharing its storage with a region input planned
    as spikes bit-packed (:func:`~fxmemopt.runtime.packing.try_pack`: the same exact check as Rule 2; a tensor
    that fails it is saved as is), and every other saved tensor as autograd would. Backward unpacks a fresh,
    bitwise-equal tensor (same dtype, shape and strides) for each use. No state, buffer or RNG is snapshotted:
    nothing runs twice. Rule 7 applies (plain mode runs the body directly). Under autocast an operation saves its
    own cast copy of the input, a different storage: that copy is saved as is (exact, no memory won).

Rule 12 (CUDA kernels). On CUDA the forward of a region and each of its recomputations run with cuDNN's benchmark
    mode off (:func:`same_kernels`), so that both take the same convolution algorithm for the same shape although
    they run on different threads (the benchmark cache is per thread); the value check of Rule 3 catches anything
    else that picks kernels differently (a nondeterministic kernel, a workspace-dependent fallback) and raises
    :class:`~fxmemopt.errors.RecomputationValueError` before a wrong gradient is used.

Copies, and the rule each one serves (nothing else is copied; counted on DeepConvSNN, 16 blocks, T=8, one training
step: 1277 copy-like ops against 153 unoptimized, most of them the recomputed neurons' own):
  * the packed payload of each spike input, and the small reused buffers packing works in (Rules 2 and 11);
  * a clone of each buffer the forward mutates, at entry (Rule 2: BatchNorm statistics), and a throw-away copy
    of it for each recomputation that runs its module (Rule 3; not for a chunked region's neuron replays);
  * a copy of each tensor state at entry, dropped at exit unless the module modified it in place (Rule 5; a
    state found rebound before use is copied only if the call does use it, just before that use);
  * each slice's part of a chunked neuron's input, unless the input is one the region stores whole (Rule 8);
  * a fresh tensor from every unpack, which recomputation may modify in place (Rule 3), or autograd's backward
    reads (Rule 11).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .. import compat
from ..analysis.state import (
    EntryMeta,
    StateSnapshot,
    StateWatch,
    attributes_of,
    put_back_attributes,
    rng_state,
    set_rng_state,
)
from ..compat import tree_flatten, tree_leaves, tree_unflatten
from ..errors import RecomputationMismatchError, RecomputationValueError, RegionError, format_error
from ..planning.plan import checkpoint_every
from .fingerprint import fingerprint, resolve_mode
from .packing import PackedTensor, try_pack, unpack
from .steps import TIME_MAJOR, TimeAxis

__all__ = ["RegionSpec", "RegionStats", "CheckpointRegion", "ChunkedRegion", "SlicedRegion", "PackedRegion",
           "region_args", "release_args", "RegionEvent", "region_events"]


@dataclass(frozen=True)
class RegionEvent:
    """What a region tells the listeners of :func:`region_events` as it runs.

    Attributes:
        kind: ``"enter"`` / ``"exit"`` (its checkpointed forward), ``"recompute"`` / ``"recompute-end"`` (a
            recomputation in backward).
        region: the region's name.
    """

    kind: str
    region: str

    @property
    def label(self) -> str:
        """``"<kind>:<region>"``, the memory timeline's marker."""
        return f"{self.kind}:{self.region}"


_listeners: contextvars.ContextVar[tuple[Callable[[RegionEvent], None], ...]] = contextvars.ContextVar(
    "fxmemopt_region_listeners", default=())


@contextlib.contextmanager
def region_events(listener: Callable[[RegionEvent], None]) -> Iterator[None]:
    """Tell ``listener`` a :class:`RegionEvent` each time a region enters, exits or recomputes inside the block.

    Scoped to the block and to the calling context (a ``contextvars`` variable: another thread's regions are not
    reported). Backward on CPU runs in the calling thread, so recomputations are seen; this is what the CPU memory
    timeline (:func:`fxmemopt.memory_timeline`) marks regions with. Without a listener, regions pay one lookup.

    Example:
        >>> with region_events(lambda e: print(e.label)):  # doctest: +SKIP
        ...     gm(x).sum().backward()
    """
    token = _listeners.set((*_listeners.get(), listener))
    try:
        yield
    finally:
        _listeners.reset(token)


def notify(kind: str, region: str) -> None:
    """Tell the listeners of :func:`region_events` (if any) that ``region`` did ``kind``."""
    listeners = _listeners.get()
    if listeners:
        event = RegionEvent(kind, region)
        for listener in listeners:
            listener(event)


def region_args(*args: Any) -> list[Any]:
    """Collect a region's inputs into a list the region's body empties once it has read them.

    A plain call ``region(x)`` would keep ``x`` referenced by the caller until the whole region returns; handing
    over a list that the body clears lets each input die right after its last use inside the body, exactly when
    it would die in the unoptimized model.
    """
    return list(args)


def release_args(args: list[Any]) -> None:
    """Empty the list built by :func:`region_args` (called by a region body after unpacking it)."""
    args.clear()


@dataclass(frozen=True)
class RegionSpec:
    """Everything a region needs at run time, as plain data.

    Attributes:
        name: the region's attribute name in the optimized module.
        anchor: module path the region is named after.
        nodes: interior node names of the original graph.
        inputs: names of the original nodes feeding the region, in argument order.
        pack_bits: per input, 1/2/8 to pack at that width, 0 to keep as is.
        stateful: (module path, state attribute names) of stateful modules inside (names empty: ``_memories``).
        buffers: (module path, buffer name) of every buffer owned by modules inside the region.
        entry_clone: the subset of ``buffers`` the forward mutates; cloned at entry (Rule 2).
        entry_dead: (module path, state names) of the ``stateful`` states the probe found rebound before any use
            of their entry values (``ProbeResult.entry_dead``): watched in each call, and kept only as an
            :class:`~fxmemopt.analysis.state.EntryMeta` where the call did not use them (Rule 2).
    """

    name: str
    anchor: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    pack_bits: tuple[int, ...]
    stateful: tuple[tuple[str, tuple[str, ...]], ...]
    buffers: tuple[tuple[str, str], ...]
    entry_clone: tuple[tuple[str, str], ...]
    entry_dead: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass
class RegionStats:
    """Run-time counters of one region (live: they keep counting after :func:`fxmemopt.optimize` returns).

    Attributes:
        checkpointed_calls: forwards that ran as checkpoints (Rules 1-6; one per time slice under Rule 9).
        plain_calls: forwards that ran plainly (Rule 7).
        recomputations: recomputations in backward.
        packed_bytes: bytes of packed inputs stored by the last checkpointed call (all its time slices).
        kept_bytes: bytes of inputs kept unpacked (by reference) by the last checkpointed call.
        unpacked_fallbacks: planned packings that failed the bit-exact check and were stored unpacked.
        state_copies: calls whose entry state was modified in place and is replayed from its entry copy (Rule 5).
        entry_state_uses: states the probe found rebound before use (``RegionSpec.entry_dead``) that a call used
            after all, and kept (Rule 2).
        value_mismatches: recomputations whose values differed from the forward's (Rule 3's value check; each
            raised :class:`~fxmemopt.errors.RecomputationValueError`).
        fingerprints: fingerprints taken by the value check (forward and recomputation).
    """

    checkpointed_calls: int = 0
    plain_calls: int = 0
    recomputations: int = 0
    packed_bytes: int = 0
    kept_bytes: int = 0
    unpacked_fallbacks: int = 0
    state_copies: int = 0
    entry_state_uses: int = 0
    value_mismatches: int = 0
    fingerprints: int = 0
    warned: set[str] = field(default_factory=set)

    def reset(self) -> None:
        """Zero every counter (``optimize`` does this after its warm-up step, so they count the user's calls)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, set() if f.name == "warned" else 0)


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices]


def _graph_task_id() -> int:
    # Identifies the running backward pass, so a second backward (retain_graph=True) recomputes again.
    return compat.current_graph_task_id()


#: Non-tensor region inputs kept as they are (immutable values).
_CONSTANTS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, slice,
              type(Ellipsis), torch.memory_format, torch.layout)


@dataclass
class _Container:
    """A tuple/list/dict region input: its tensors by reference (with versions), rebuilt for recomputation."""

    spec: Any
    leaves: list[Any]
    versions: list[int | None]
    requires_grad: list[bool]

    def rebuild(self, what: str) -> Any:
        out = []
        for v, version, rg in zip(self.leaves, self.versions, self.requires_grad):
            if isinstance(v, torch.Tensor):
                if v._version != version:
                    raise RuntimeError(format_error(
                        what, "holds a tensor that was modified in place after the region's forward and before "
                              "backward", expected=f"version {version}", got=f"version {v._version}",
                        fix="Use the out-of-place form of the operation (x = x + y instead of x += y)."))
                v = v.detach().requires_grad_(rg) if rg else v.detach()
            out.append(v)
        return tree_unflatten(out, self.spec)


class _Unheld(torch.autograd.Function):
    """``forward(anchor, x)``: ``x`` (same storage) requiring grad as the output of a node that holds nothing of it."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        return None, None  # never run: a recomputation's graph only yields saved tensors (Rule 3)


#: the one leaf :class:`_Unheld` hangs its outputs from (so that they require grad); 0-d, never given a gradient
_ANCHOR = torch.zeros((), requires_grad=True)


def _unheld_requiring_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` requiring grad for a recomputation, as it did in the forward, but not as a leaf.

    A leaf requiring grad is held by its ``AccumulateGrad`` node, which every op on it links to, so an unpacked
    input (a fresh tensor) would live until the whole recomputation's graph dies, long after its last use: norse's
    ``Lift`` reads its unpacked steps first, and 1.75 MiB of a SequentialState(LIFBox) step's peak was that. As the
    output of :class:`_Unheld` it is held only by what saves it, as the previous layer's output was in the forward
    (and, as there, it may be modified in place). Grad mode is on for it: backward runs unpack hooks without."""
    with torch.enable_grad():
        return _Unheld.apply(_ANCHOR, x)


class _Frame:
    """What one checkpointed call of a region keeps for backward (Rule 2) and how it recomputes (Rule 3)."""

    def __init__(self, region: CheckpointRegion, body: fx.GraphModule) -> None:
        self.region = region
        self.body = body
        self.stored: list[Any] = []  # PackedTensor | Tensor | other, one per distinct input
        self.names: list[str] = []  # the graph node each stored input came from (for messages)
        self.arg_slots: list[int] = []  # argument position -> index in stored (dedups repeated tensors)
        self.requires_grad: list[bool] = []
        self.versions: list[int | None] = []
        self.states: list[tuple[nn.Module, StateSnapshot]] = []
        self.buffers: list[tuple[nn.Module, str, torch.Tensor | None, int]] = []
        self.cuda_devices: list[torch.device] = []
        self.rng: Any = None
        self.autocast: list[tuple[str, bool, torch.dtype]] = []
        self.saved: list[torch.Tensor | None] = []
        self.seqs: list[int] = []  # per saved tensor: sequence number of the autograd node that saved it
        self.start_seq = 0
        self.state_only: set[int] = set()  # saved by nodes only the final module state depends on
        # Weak references to the module states at exit: a strong reference (to them or their grad_fn) would close a
        # cycle through C++ autograd nodes (node -> saved handle -> frame -> node) and leak the whole graph.
        self.state_refs: list[weakref.ref[torch.Tensor]] = []
        self.meta: list[tuple[torch.Size, torch.dtype]] = []  # shape and dtype of every saved tensor
        self.check = "off"  # the value check's mode for this call (Rule 3; set at entry)
        self.input_storages: set[int] = set()  # storages of the inputs, whose saved tensors need no fingerprint
        self.prints: list[torch.Tensor | int | None] = []  # fingerprint of every saved tensor (Rule 3)
        self.entry_copies: list[StateSnapshot | None] = []  # Rule 5, while the forward runs
        self.watches: list[list[StateWatch]] = []  # Rule 2, per stateful module, while the forward runs
        self.task = -2
        self.consumed: set[int] = set()
        #: saved tensors whose autograd node is gone (Rule 6): nothing can unpack them, recomputation drops them
        self.dropped: set[int] = set()

    # -- forward -------------------------------------------------------------------------------------------------
    def store_inputs(self, args: tuple[Any, ...], bits: tuple[int, ...], stats: RegionStats) -> None:
        seen: dict[int, int] = {}
        for a, b, name in zip(args, bits, self.region.spec.inputs):
            if isinstance(a, torch.Tensor) and id(a) in seen:
                self.arg_slots.append(seen[id(a)])
                continue
            slot = len(self.stored)
            self.arg_slots.append(slot)
            self.names.append(name)
            if not isinstance(a, torch.Tensor):
                self.stored.append(self._container(a, name))
                self.requires_grad.append(False)
                self.versions.append(None)
                continue
            seen[id(a)] = slot
            packed = try_pack(a, b) if b and (a.is_floating_point() or not self.region.pack_if_binary) else None
            if b and packed is None and not self.region.pack_if_binary:
                stats.unpacked_fallbacks += 1
                self.region._warn_once(
                    "unpacked",
                    f"region {self.region.spec.name!r}: an input planned as {b}-bit spikes holds other values "
                    f"in this call; it is stored unpacked (exact, but no memory saved for it). Counted in "
                    f"summary.runtime[...].unpacked_fallbacks.",
                )
            if packed is not None:
                self.stored.append(packed)
                self.versions.append(None)
                stats.packed_bytes += packed.nbytes
            else:
                self.stored.append(a)
                self.versions.append(a._version)
                stats.kept_bytes += a.numel() * a.element_size()
            self.requires_grad.append(a.requires_grad)

    def _container(self, value: Any, name: str) -> Any:
        """A non-tensor input (Rule 2): constants as they are; tuples, lists and dicts flattened into their tensors
        (each kept by reference with its version, rebuilt detached for recomputation); anything else is refused,
        since the region could not tell whether it changed before backward."""
        leaves, spec = tree_flatten(value)
        if not any(isinstance(v, torch.Tensor) for v in leaves) and all(isinstance(v, _CONSTANTS) for v in leaves):
            return value
        bad = [type(v).__name__ for v in leaves if not isinstance(v, (torch.Tensor, *_CONSTANTS))]
        if bad:
            raise RegionError(format_error(
                f"region {self.region.spec.name!r}, input {name!r}", "is not a tensor, a constant, or a "
                "tuple/list/dict of those", expected="tensors (or containers of tensors and constants)",
                got=f"{type(value).__name__} holding {', '.join(sorted(set(bad)))}",
                fix="Pass tensors between layers, or keep the module that takes this value out of the region "
                    "(leaf_modules=... for a module fxmemopt should not trace into, or leave it out of targets)."))
        return _Container(spec, list(leaves),
                          [v._version if isinstance(v, torch.Tensor) else None for v in leaves],
                          [isinstance(v, torch.Tensor) and v.requires_grad for v in leaves])

    def snapshot(self, args: tuple[Any, ...]) -> None:
        region = self.region
        spec = region.spec
        self.states = [(region._resolve(p), StateSnapshot.take(region._resolve(p), names))
                       for p, names in spec.stateful]
        dead = dict(spec.entry_dead)
        self.watches = [[w for n in dead.get(p, ()) for w in [StateWatch(m, n, copy_on_use=True)] if w.watching]
                        for (p, _), (m, _) in zip(spec.stateful, self.states)]
        self.entry_copies = [snap.copied(w.name for w in watches) if any(True for _ in snap.tensors()) else None
                             for (_, snap), watches in zip(self.states, self.watches)]
        clone = set(spec.entry_clone)
        for path, name in spec.buffers:
            mod = region._resolve(path)
            buf = mod._buffers.get(name)
            if buf is None:
                continue
            entry = buf.detach().clone() if (path, name) in clone else None
            self.buffers.append((mod, name, entry, buf._version))
        self.cuda_devices = sorted({a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda},
                                   key=str)
        self.rng = rng_state(self.cuda_devices)
        self.autocast = _autocast_state()
        self.check = resolve_mode(region.value_check, "cuda" if self.cuda_devices else "cpu")
        self.input_storages = {a.untyped_storage().data_ptr() for a in args
                               if isinstance(a, torch.Tensor) and a.layout == torch.strided}

    def pack_hook(self, t: torch.Tensor) -> tuple[_Frame, int]:
        # Rule 1: the tensor is not kept; recomputation will bring it back.
        self.saved.append(None)
        self.meta.append((t.shape, t.dtype))
        # Parameters and the region's own inputs are not recomputed (the same tensors come back): no fingerprint.
        if self.check == "off" or isinstance(t, nn.Parameter) or t.untyped_storage().data_ptr() in self.input_storages:
            self.prints.append(None)
        else:
            self.prints.append(_print_of(t, self.check))
            self.region.stats.fingerprints += 1
        # The saving node was created just before its tensors are packed: it holds the last sequence number.
        self.seqs.append(compat.autograd_sequence_nr() - 1)
        return _Handle(self, len(self.saved) - 1)

    def _classify(self, out: Any) -> None:
        """Find saved tensors that only the modules' final states need (Rule 6): not reachable from the outputs."""
        reachable: set[int] = set()
        stack = [t.grad_fn for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while stack:
            node = stack.pop()
            seq = compat.node_sequence_nr(node)
            if seq in reachable or seq < self.start_seq or seq >= 2**63:  # before the region, or AccumulateGrad
                continue
            reachable.add(seq)
            stack.extend(n for n, _ in node.next_functions if n is not None)
        self.state_only = {j for j, seq in enumerate(self.seqs) if seq not in reachable}
        if self.state_only:
            self.state_refs = [weakref.ref(t) for (m, _), (_, names) in zip(self.states, self.region.spec.stateful)
                               for t in StateSnapshot.take(m, names).tensors() if t.grad_fn is not None]

    def _states_back_propagated(self) -> bool:
        """Will the running backward go through any of the states this region left in its modules?"""
        for ref in self.state_refs:
            t = ref()
            if t is not None and t.grad_fn is not None and compat.will_engine_execute_node(t.grad_fn):
                return True
        return False

    def unwatch(self, out: Any = None) -> None:
        """Rule 2: stop watching the states found dead at entry; keep only the metadata of those this call did
        not use (their entry copies, if it did: Rule 5). Also called when the forward raised."""
        for (_, snap), copy, watches in zip(self.states, self.entry_copies, self.watches):
            for w in watches:
                if w.finish(out):
                    self.region.stats.entry_state_uses += 1
                    if copy is not None and w.copy is not None:
                        copy.attrs[w.name] = w.copy
                    continue
                meta = EntryMeta.of(w.value)  # type: ignore[arg-type]
                snap.attrs[w.name] = meta
                snap.versions.pop(id(w.value), None)
                if copy is not None:
                    copy.attrs[w.name] = meta
        self.watches = []

    def close(self, stats: RegionStats, out: Any) -> None:
        """Called when the forward of ``body`` returns (Rules 2, 5 and 6)."""
        self.unwatch(out)
        for k, ((m, snap), copy) in enumerate(zip(self.states, self.entry_copies)):
            if copy is not None and snap.modified_in_place():
                self.states[k] = (m, copy)  # the reference was mutated: replay from the entry copy
                stats.state_copies += 1
        self.entry_copies = []
        self._classify(out)

    # -- backward ------------------------------------------------------------------------------------------------
    def get(self, idx: int) -> torch.Tensor:
        task = _graph_task_id()
        if task != self.task:
            self.task, self.consumed = task, set()
        t = self.saved[idx]
        if t is None:
            self.recompute(idx)
            t = self.saved[idx]
        self.saved[idx] = None
        self.consumed.add(idx)
        assert t is not None
        return t

    def _inputs(self) -> list[Any]:
        values: list[Any] = []
        for k, (s, rg) in enumerate(zip(self.stored, self.requires_grad)):
            if isinstance(s, PackedTensor):
                x = unpack(s)
            elif isinstance(s, torch.Tensor):
                if s._version != self.versions[k]:
                    raise RuntimeError(format_error(
                        f"region {self.region.spec.name!r}, input {self.names[k]!r}",
                        "was modified by an in-place operation after the region's forward and before backward",
                        expected=f"version {self.versions[k]}", got=f"version {s._version}",
                        fix="Use the out-of-place form of the operation (x = x + y instead of x += y)."))
                x = s.detach()
            elif isinstance(s, _Container):
                values.append(s.rebuild(f"region {self.region.spec.name!r}, input {self.names[k]!r}"))
                continue
            else:
                values.append(s)
                continue
            if rg and isinstance(s, PackedTensor):
                x = _unheld_requiring_grad(x)
            values.append(x.requires_grad_(rg) if rg else x)
        return [values[slot] for slot in self.arg_slots]  # a fresh list: the body empties it

    @contextlib.contextmanager
    def _replayed_context(self, states: list[tuple[nn.Module, StateSnapshot]] | None = None,
                          rng: Any = None, only: nn.Module | None = None) -> Iterator[None]:
        """Rules 3 and 4: entry state (or ``states``), throw-away buffer copies, the forward's RNG (or ``rng``)
        and autocast, grad enabled; everything live is put back afterwards. ``only``: the replay runs this module
        alone (a chunked region's neuron), so only its own buffers and attributes need swapping and restoring (a
        BatchNorm before it keeps its live statistics untouched: it does not run)."""
        live_states = [(m, StateSnapshot.take(m, names)) for (m, _), (_, names)
                       in zip(self.states, self.region.spec.stateful)]
        inside = None if only is None else {id(m) for m in only.modules()}
        live_attrs = attributes_of(self.region._body_modules() if only is None else only.modules())
        live_buffers = []
        for m, name, entry, version in self.buffers:
            if inside is not None and id(m) not in inside:
                continue
            live = m._buffers[name]
            if entry is None and live._version != version:
                raise RuntimeError(format_error(
                    f"region {self.region.spec.name!r}, buffer {type(m).__name__}.{name}",
                    "was modified in place between the region's forward and its backward",
                    fix="Do not modify buffers between forward and backward."))
            live_buffers.append((m, name, live))
            m._buffers[name] = (entry if entry is not None else live.detach()).clone()
        try:
            for m, snap in self.states if states is None else states:
                snap.detached().restore(m)
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.random.fork_rng(devices=self.cuda_devices))
                set_rng_state(self.rng if rng is None else rng, self.cuda_devices)
                for device, enabled, dtype in self.autocast:
                    stack.enter_context(torch.autocast(device_type=device, dtype=dtype, enabled=enabled))
                stack.enter_context(torch.enable_grad())
                stack.enter_context(same_kernels(self.cuda_devices))
                yield
        finally:
            # Every attribute first (Rule 4): a module may keep more than its declared state, e.g. spikingjelly's
            # save_v_LIFNode sets ``self.v_before_spike`` to a tensor whose graph holds the whole recomputation
            # (measured on spike_dhs: 37 MiB kept alive until the step ended).
            put_back_attributes(live_attrs)
            for m, snap in live_states:
                snap.restore(m)
            for m, name, live in live_buffers:
                m._buffers[name] = live

    def run(self, box: list[Any]) -> Any:
        """The checkpointed forward (Rule 1): ``body`` under the frame's saved-tensor hooks."""
        with compat.saved_tensors_hooks(self.pack_hook, _unpack_hook):
            return self.body(box)

    def _skip(self, need: int) -> set[int]:
        """Saved tensors a recomputation need not keep: already used by this backward, or only needed by final
        states this backward does not go through (Rule 6)."""
        skip: set[int] = self.consumed | self.dropped
        if self.state_only and self.task != -1 and not self._states_back_propagated():
            skip |= self.state_only
        skip.discard(need)
        return skip

    def replay_body(self, box: list[Any]) -> Any:
        """The body's ``forward`` for a recomputation, without ``GraphModule.__call__``'s error wrapper: that wrapper
        extracts the whole traceback (a ``linecache`` stat per frame) from every exception that passes through it,
        and the early stop of Rule 3 is an exception (measured: 0.2 ms per recomputation, 3% of a SEW-ResNet step).
        The body is internal (no hooks on it), so nothing else differs."""
        return self.body.forward(box)

    def _replay(self, fn: Callable[[], Any], lo: int, hi: int, skip: set[int], stop_early: bool,
                **context: Any) -> Any:
        """Run ``fn`` in the replayed context; its saved tensors are the forward's ``lo..hi-1`` (Rule 3).

        Keeps those not in ``skip`` in ``self.saved``; with ``stop_early`` stops once the last needed one is captured.
        Returns ``fn``'s result (``None`` when stopped early).
        """
        needed = [j for j in range(lo, hi) if j not in skip]
        last = needed[-1] if (needed and stop_early) else None
        kept: dict[int, torch.Tensor] = {}
        seen: list[tuple[torch.Size, torch.dtype]] = []
        prints: dict[int, tuple[Any, Any]] = {}  # saved index -> (forward's, recomputed)
        check = self.check

        def capture(t: torch.Tensor) -> None:
            j = lo + len(seen)
            seen.append((t.shape, t.dtype))
            if check != "off" and j < len(self.prints) and self.prints[j] is not None:
                now = _print_of(t, check)
                self.region.stats.fingerprints += 1
                if now is not None:
                    prints[j] = (self.prints[j], now)
            if j not in skip:
                kept[j] = t.detach()  # detached: see pack_hook; lets the recomputation's graph die at once
            if j == last:
                raise _StopRecomputation  # nothing after this is needed

        result = None
        notify("recompute", self.region.spec.name)
        with contextlib.suppress(_StopRecomputation), self._replayed_context(**context), \
                compat.saved_tensors_hooks(capture, lambda _: None):
            result = fn()
        notify("recompute-end", self.region.spec.name)
        expected = (last + 1 - lo) if last is not None else hi - lo
        problems = []
        if len(seen) != expected:
            problems.append(f"forward saved {hi - lo} tensors here, recomputation saved {len(seen)}")
        for j, ((shape, dtype), (fshape, fdtype)) in enumerate(zip(seen, self.meta[lo:hi]), start=lo):
            if shape != fshape or dtype != fdtype:
                problems.append(f"saved tensor {j}: forward {tuple(fshape)} {fdtype}, recomputed {tuple(shape)} "
                                f"{dtype}")
        if problems:
            region = self.region
            raise RecomputationMismatchError(format_error(
                f"region {region.spec.name!r} (nodes {', '.join(region.spec.nodes)})",
                "recomputation in backward did not reproduce the forward: " + "; ".join(problems),
                fix="The region's forward must be a deterministic function of its inputs, parameters, module "
                    "state and RNG. Exclude the offending module with leaf/targets options or report a bug."))
        if prints:
            self._check_values(prints)
        for j, t in kept.items():
            self.saved[j] = t
        return result

    def recompute(self, need: int) -> None:
        self.region.stats.recomputations += 1
        inputs = self._inputs()
        self._replay(lambda: self.replay_body(inputs), 0, len(self.meta), self._skip(need), stop_early=True)
        if self.task != -1:  # inside a backward pass: release what it leaves unused when it ends (Rule 6)
            compat.queue_engine_callback(self._release)

    def _check_values(self, prints: dict[int, tuple[Any, Any]]) -> None:
        """Rule 3's value check: every recomputed saved tensor's fingerprint equals the forward's.

        On CPU at once; on an accelerator the comparison stays on the device and is read when the backward pass
        ends (one host synchronization per recomputation, after the backward's work is queued), so the check never
        stalls the backward it guards. Either way the error ends the backward before the optimizer can use its
        gradients."""
        index = list(prints)
        on_device = [j for j in index if isinstance(prints[j][0], torch.Tensor)]
        if not on_device:  # CPU: Python ints
            self._raise_on_mismatch(index, [k for k, j in enumerate(index) if prints[j][0] != prints[j][1]])
            return
        ours = torch.stack([prints[j][0] for j in on_device])
        theirs = torch.stack([prints[j][1] for j in on_device])

        def read() -> None:
            self._raise_on_mismatch(on_device, (ours != theirs).nonzero().flatten().tolist())

        if self.task == -1:
            read()
        else:
            compat.queue_engine_callback(read)

    def _raise_on_mismatch(self, index: list[int], differ: list[int]) -> None:
        if not differ:
            return
        region = self.region
        region.stats.value_mismatches += 1
        listed = ", ".join(f"{index[k]} ({tuple(self.meta[index[k]][0])} {self.meta[index[k]][1]})"
                           for k in differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise RecomputationValueError(format_error(
            f"region {region.spec.name!r} (nodes {', '.join(region.spec.nodes)})",
            f"recomputation in backward produced other values than the forward saved ({self.check} fingerprints "
            f"of {len(differ)} of {len(index)} saved tensors differ: {listed}); the gradients of this backward "
            f"would be wrong, so it stops here",
            fix="Make the region's computation deterministic: on CUDA torch.backends.cudnn.benchmark = False and "
                "torch.use_deterministic_algorithms(True) (with CUBLAS_WORKSPACE_CONFIG=:4096:8); a module that keeps "
                "state fxmemopt does not see must declare it (stateful_modules=...). Or keep this region's "
                "activations: optimize again, or apply the plan without it. Zero the gradients before the next "
                "step: this backward stopped part way."))

    def _release(self) -> None:
        self.saved = [None] * len(self.saved)


class _ChunkedFrame(_Frame):
    """A frame for :class:`ChunkedRegion` (Rule 8)."""

    def __init__(self, region: CheckpointRegion, body: fx.GraphModule) -> None:
        super().__init__(region, body)
        self.prefix_end = 0
        #: per slice: (first saved index, end saved index, first step, end step, requires_grad of the state tensors)
        self.slices: list[tuple[int, int, int, int, list[bool]]] = []
        self.neuron_rng: Any = None  # RNG when the neuron started (after the prefix)
        #: per slice, during backward only: its part of the neuron's input (a copy of its own, dropped once the
        #: slice is recomputed) and its start state and RNG
        self.x_parts: list[torch.Tensor | None] = []
        self.starts: list[Any] = []
        self.rngs: list[Any] = []
        self.every = 1  # a start state is kept for every `every`-th slice (checkpoints; see recompute)

    def _split(self, y: Any) -> tuple[torch.Tensor, Any]:
        """The prefix's result as (neuron input, state given to the first slice)."""
        region: ChunkedRegion = self.region  # type: ignore[assignment]
        if region.initial_state == "body":
            return y[0], y[1]
        return y, region.state_constant

    def _step(self, xc: torch.Tensor, state: Any, first: bool) -> tuple[torch.Tensor, Any]:
        """Run the neuron on one slice: ``(out, state for the next slice)`` (``None`` for a module's own state)."""
        region: ChunkedRegion = self.region  # type: ignore[assignment]
        neuron = region.__dict__["neuron"]
        with region.time_axis.calling(neuron, region.time_axis.steps(xc)):
            if region.initial_state == "module":
                return neuron(xc), None
            if first and region.initial_state == "absent":
                return neuron(xc)  # as the model calls it: the neuron makes its own initial state
            return neuron(xc, state)

    def _state_flags(self, state: Any) -> list[bool]:
        region: ChunkedRegion = self.region  # type: ignore[assignment]
        if region.initial_state == "module":
            return [t.requires_grad for _, snap in region.neuron_snapshot() for t in snap.tensors()]
        return [t.requires_grad for t in tree_leaves(state) if isinstance(t, torch.Tensor)]

    def run(self, box: list[Any]) -> Any:
        region: ChunkedRegion = self.region  # type: ignore[assignment]
        with compat.saved_tensors_hooks(self.pack_hook, _unpack_hook):
            x, state = self._split(self.body(box))
        self.prefix_end = len(self.saved)
        self.neuron_rng = rng_state(self.cuda_devices)
        outs = []
        t0 = 0
        axis = region.time_axis
        for c, xc in enumerate(axis.split(x, region.chunks)):
            rg = self._state_flags(state)
            lo = len(self.saved)
            with compat.saved_tensors_hooks(self.pack_hook, _unpack_hook):
                out, state = self._step(xc, state, c == 0)
            outs.append(out)
            t1 = t0 + axis.steps(xc)
            self.slices.append((lo, len(self.saved), t0, t1, rg))
            t0 = t1
        del x, xc, out
        joined = axis.cat(outs)
        axis.finish(region.__dict__["neuron"], joined)
        return joined if region.initial_state == "module" else (joined, state)

    def _replay_starts(self, first: int, stop: int, state: Any, keep: Callable[[int], bool]) -> None:
        """Replay the neuron without grad from ``state`` (slice ``first``'s start) to get the start states of slices
        ``first..stop-1``; keep in ``self.starts`` those ``keep`` accepts (every slice's RNG is recorded once)."""
        region: ChunkedRegion = self.region  # type: ignore[assignment]
        neuron = region.__dict__["neuron"]
        module_state = region.initial_state == "module"
        rng = self.neuron_rng if first == 0 else self.rngs[first]
        with self._replayed_context(states=state if module_state and first > 0 else None, rng=rng, only=neuron), \
                torch.no_grad():
            for c in range(first, stop):
                _, _, _, _, rg = self.slices[c]
                if module_state:
                    # Every stateful module at or under the neuron's path (a recurrent container's own memory and
                    # its inner neuron's): one slice's start is all of them.
                    start = [(m, snap.detached()) for m, snap in region.neuron_snapshot()]
                    tensors = [t for _, snap in start for t in snap.tensors()]
                else:
                    leaves, spec = tree_flatten(state)
                    leaves = [t.detach() if isinstance(t, torch.Tensor) else t for t in leaves]
                    start = tree_unflatten(leaves, spec)
                    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
                for t, flag in zip(tensors, rg):
                    t.requires_grad_(flag)  # as in the forward: autograd decides what to save from it
                if len(self.rngs) <= c:
                    self.rngs.append(rng_state(self.cuda_devices))
                if keep(c):
                    self.starts[c] = start
                if c + 1 < stop:
                    state = self._step(self.x_parts[c], start, c == 0)[1]

    def _start_of(self, c: int) -> tuple[Any, Any]:
        """Slice ``c``'s start state and RNG, replaying its segment from the checkpoint before it if needed."""
        if self.starts[c] is None:
            m = self.every
            first = c - c % m  # its checkpoint; the slices after c in this segment are done already
            self._replay_starts(first, c + 1, self.starts[first], lambda j: j > first)
        start, self.starts[c] = self.starts[c], None
        return start, self.rngs[c]

    def recompute(self, need: int) -> None:
        region: ChunkedRegion = self.region  # type: ignore[assignment]
        region.stats.recomputations += 1
        skip = self._skip(need)
        if need < self.prefix_end:  # the prefix's backward (after every slice's)
            inputs = self._inputs()
            self._replay(lambda: self.replay_body(inputs), 0, self.prefix_end, skip, stop_early=True)
            return
        c = next(k for k, sl in enumerate(self.slices) if sl[0] <= need < sl[1])
        if not self.x_parts or self.x_parts[c] is None:  # the first slice backward needs (or a second backward)
            inputs = self._inputs()
            prefix_skip = skip if region.keep_prefix else set(range(self.prefix_end))
            x, state = self._split(self._replay(lambda: self.replay_body(inputs), 0, self.prefix_end, prefix_skip,
                                                stop_early=False))
            grad = x.requires_grad
            # Each slice's input in a storage of its own, so that it dies with its slice: while backward goes from
            # the last slice to the first, the input's parts die as fast as its gradient's parts appear. Unless the
            # input is one the region stores whole (a neuron-only region's real-valued input): it stays alive
            # until the region's backward ends anyway, and copies would only double it; views cost nothing.
            held = {t.untyped_storage().data_ptr() for t in self.stored
                    if isinstance(t, torch.Tensor) and not isinstance(t, PackedTensor)}
            axis = region.time_axis
            if x.untyped_storage().data_ptr() in held:
                self.x_parts = [axis.narrow(x, t0, t1).detach().requires_grad_(grad) for _, _, t0, t1, _ in self.slices]
            else:
                self.x_parts = []
                for _, _, t0, t1, _ in self.slices:
                    part = axis.narrow(x, t0, t1).detach()  # a copy already where the layout cannot view it
                    if part.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                        part = part.clone()
                    self.x_parts.append(part.requires_grad_(grad))
            del x
            # Start states: one replay keeps every `every`-th (checkpoints) and the last segment's; a segment's
            # others are replayed from its checkpoint when backward reaches it (about 2 sqrt(k) states alive).
            k = len(self.slices)
            self.every = checkpoint_every(k, region.keep_starts)
            self.starts, self.rngs = [None] * k, []
            last_first = (k - 1) - (k - 1) % self.every
            self._replay_starts(0, k, state, lambda j: j % self.every == 0 or j >= last_first)
        lo, hi, _, _, _ = self.slices[c]
        (start, rng), xc = self._start_of(c), self.x_parts[c]
        self.x_parts[c] = None
        if region.initial_state == "module":
            self._replay(lambda: self._step(xc, None, c == 0), lo, hi, skip, stop_early=True,
                         states=start, rng=rng, only=region.__dict__["neuron"])
        else:
            self._replay(lambda: self._step(xc, start, c == 0), lo, hi, skip, stop_early=True, rng=rng,
                         only=region.__dict__["neuron"])
        if all(p is None for p in self.x_parts):  # every slice has its tensors back
            self.x_parts, self.starts, self.rngs = [], [], []

    def _release(self) -> None:
        super()._release()
        self.x_parts, self.starts, self.rngs = [], [], []


def time_slices(x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """``x`` split along dim 0 into ``min(k, T)`` consecutive slices, the first ``T % k`` one step longer
    (:meth:`TimeAxis.split` of the time-major layout)."""
    return TIME_MAJOR.split(x, k)


@contextlib.contextmanager
def same_kernels(cuda_devices: list[torch.device]) -> Iterator[None]:
    """Rule 12: on CUDA, a region's forward and its recomputation run with cuDNN's benchmark mode off.

    With ``torch.backends.cudnn.benchmark = True`` cuDNN times candidate algorithms the first time it sees a
    convolution's shape and caches the winner, and PyTorch's cache for cuDNN's v8 API is per thread. The forward
    runs on the caller's thread and the recomputation on autograd's device thread, so the recomputation would time
    the candidates again and may keep another algorithm, whose last bits differ: a spike threshold turns that into
    another spike and another gradient. With benchmark mode off both threads take cuDNN's heuristic choice for the
    shape, the same one. The flag is global; it is set back as soon as the region's forward or recomputation ends
    (the rest of the model keeps the benchmarked algorithms). On CPU nothing changes."""
    if not cuda_devices or not torch.backends.cudnn.benchmark:
        yield
        return
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = True


def _print_of(t: torch.Tensor, mode: str) -> torch.Tensor | int | None:
    """A saved tensor's fingerprint (Rule 3): a Python int on CPU (no tensor kept per saved tensor), a 0-d tensor
    on an accelerator (no host synchronization)."""
    p = fingerprint(t, mode)
    return int(p) if p is not None and p.device.type == "cpu" else p


class _StopRecomputation(Exception):
    """Raised from the capture hook once recomputation has produced everything backward needs."""


class _Handle:
    """What autograd keeps for one tensor a region's forward saved (Rule 1): the frame and the tensor's position.

    Autograd owns it through the saving node, so it dies with that node: a node that no output reaches any more
    (a neuron's detached reset signal, ``spike_fn(v - th).clone().detach()`` in snntorch, saves ``v - th`` and is
    freed at once) tells the frame, and recomputation does not keep that tensor (Rule 6): nothing would unpack it,
    and it would stay until the backward pass ends, one per region."""

    __slots__ = ("frame", "idx")

    def __init__(self, frame: _Frame, idx: int) -> None:
        self.frame, self.idx = frame, idx

    def __del__(self) -> None:
        self.frame.dropped.add(self.idx)


def _unpack_hook(handle: _Handle) -> torch.Tensor:
    return handle.frame.get(handle.idx)


class CheckpointRegion(nn.Module):
    """One checkpoint region of an optimized module: see NOTE [Checkpoint region invariants] in this file.

    The region owns no parameters or buffers: its ``body`` (a GraphModule over the original module objects) is
    held outside the module tree, so ``state_dict()``, ``parameters()`` and ``named_modules()`` of the optimized
    module are exactly the original model's (plus the parameter-free regions themselves).

    Args:
        body: the region's interior as a GraphModule whose submodules are the model's own modules.
        spec: the :class:`RegionSpec`.
        stats: the run-time counters to update.
    """

    _frame_class: type[_Frame] = _Frame
    #: Hand-placed regions (:class:`fxmemopt.tools.manual.Checkpointed`) pack what is binary in each call, quietly;
    #: planned regions warn and count when a planned packing fails.
    pack_if_binary: bool = False
    #: Rule 3's value check: ``"off"``, ``"sampled"`` or ``"full"`` fingerprints of every saved tensor
    #: (:mod:`fxmemopt.runtime.fingerprint`); ``None``: the default for the device the region runs on.
    value_check: str | None = None

    def __init__(self, body: fx.GraphModule, spec: RegionSpec, stats: RegionStats | None = None) -> None:
        super().__init__()
        self.__dict__["body"] = body  # deliberately not a registered submodule (see class docstring)
        self.spec = spec
        self.stats = stats if stats is not None else RegionStats()

    def extra_repr(self) -> str:
        bits = ", ".join(f"{i}:{b}b" if b else f"{i}:kept" for i, b in zip(self.spec.inputs, self.spec.pack_bits))
        return f"anchor={self.spec.anchor!r}, nodes={len(self.spec.nodes)}, inputs=[{bits}]"

    def _warn_once(self, key: str, message: str) -> None:
        from ..errors import FxMemOptWarning

        if key not in self.stats.warned:
            self.stats.warned.add(key)
            warnings.warn(message, FxMemOptWarning, stacklevel=4)

    def _needs_checkpoint(self, args: tuple[Any, ...]) -> bool:
        if not (self.training and torch.is_grad_enabled()):
            return False
        # tree_leaves: a tuple input (the steps a traced time loop unbinds) is read too (Rule 7)
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in tree_leaves(list(args))):
            return True
        if any(p.requires_grad for p in self._parameters_used()):
            return True
        return any(t.requires_grad for p, names in self.spec.stateful
                   for t in StateSnapshot.take(self._resolve(p), names).tensors())

    @compat.compiler_disable
    def forward(self, box: list[Any]) -> Any:
        """Run the region on the inputs in ``box`` (a list from :func:`region_args`; emptied by the body).

        Opaque to ``torch.compile`` (Rule 10): the region always runs eagerly.
        """
        self._check_box(box)
        args = tuple(box)
        if not self._needs_checkpoint(args):
            self.stats.plain_calls += 1
            del args
            return self._plain(box)
        del args  # from here on only the body holds the inputs, and only until their last use
        self.stats.packed_bytes = self.stats.kept_bytes = 0
        notify("enter", self.spec.name)
        out = self._checkpointed(box)
        notify("exit", self.spec.name)
        return out

    def _checkpointed(self, box: list[Any], last: bool = True) -> Any:
        """One checkpointed call on ``box`` (Rules 1-6). ``last=False``: a later call continues from the states
        this one leaves (Rule 9), so none of its saved tensors is classified as needed by final states only."""
        self.stats.checkpointed_calls += 1
        frame = self._frame_class(self, self.__dict__["body"])
        frame.store_inputs(tuple(box), self.spec.pack_bits, self.stats)
        frame.snapshot(tuple(box))
        frame.start_seq = compat.autograd_sequence_nr()
        try:
            with same_kernels(frame.cuda_devices):
                out = frame.run(box)
        except BaseException:
            frame.unwatch()  # the modules hold their own states again
            raise
        frame.close(self.stats, out)
        if not last:
            frame.state_only, frame.state_refs = set(), []
        return out

    def _check_box(self, box: Any) -> None:
        if not isinstance(box, list) or len(box) != len(self.spec.inputs):
            got = f"{len(box)} inputs" if isinstance(box, list) else type(box).__name__
            raise RegionError(format_error(f"region {self.spec.name!r}", "called with the wrong inputs",
                                           expected=f"a list of {len(self.spec.inputs)} inputs", got=got))

    def _plain(self, box: list[Any]) -> Any:
        """Rule 7: the body as is."""
        return self.__dict__["body"](box)

    def _resolve(self, path: str) -> nn.Module:
        """The module at ``path`` (a path in the model) used by this region."""
        return self.__dict__["body"].get_submodule(path)

    def _body_modules(self) -> list[nn.Module]:
        """The model's modules the body calls (and their children), whose attributes recomputation puts back."""
        body = self.__dict__["body"]
        return [m for m in body.modules() if m is not body]

    def _parameters_used(self) -> Iterator[nn.Parameter]:
        """Every parameter the region's computation reads."""
        return self.__dict__["body"].parameters()


class ChunkedRegion(CheckpointRegion):
    """A checkpoint region whose neuron is recomputed in time slices: see Rule 8 of NOTE [Checkpoint region
    invariants] in this file.

    Args:
        body: the *prefix*: the region's interior up to the neuron's input (region inputs -> neuron input; and the
            state the neuron is given, when ``initial_state="body"``).
        neuron: the region's neuron, called last; its output is the region's output.
        neuron_path: its path in the model.
        neuron_states: ``(path below the neuron, state attribute names)`` of every stateful module at or under the
            neuron (``""`` for the neuron itself; names empty for ``_memories`` modules): the state carried from
            slice to slice when ``initial_state="module"``. A recurrent container (spikingjelly's
            ``LinearRecurrentContainer``) keeps its output in its own memory and its inner neuron's membrane in the
            inner module's: a slice's start state is both (empty for a neuron that keeps none).
        chunks: requested number of time slices (clamped to T at run time).
        spec, stats: as for :class:`CheckpointRegion`.
        keep_prefix: keep the prefix's saved tensors from the recomputation that feeds the slices (faster), or
            recompute the prefix again for its own backward (less memory).
        initial_state: where the state carried from slice to slice lives: ``"module"``, in the neuron's
            attributes (``neuron(x) -> out``); otherwise the neuron returns it, ``neuron(x, s) -> (out, s)``, and the
            first slice is called as the model calls it: ``"absent"``, ``neuron(x)``; ``"constant"``,
            ``neuron(x, state_constant)``; ``"body"``, with the state the prefix returns.
        state_constant: the first slice's state for ``initial_state="constant"`` (e.g. ``None``).
        time_axis: where the neuron's input and output keep time (time-major, ``[B, T, ...]`` or batch and time
            flattened; :class:`~fxmemopt.runtime.steps.TimeAxis`), as the annotator found it on the example.
    """

    _frame_class = _ChunkedFrame

    def __init__(self, body: fx.GraphModule, neuron: nn.Module, neuron_path: str,
                 neuron_states: tuple[tuple[str, tuple[str, ...]], ...],
                 chunks: int, spec: RegionSpec, stats: RegionStats | None = None, keep_prefix: bool = True,
                 initial_state: str = "module", state_constant: Any = None, keep_starts: bool = False,
                 time_axis: TimeAxis = TIME_MAJOR) -> None:
        super().__init__(body, spec, stats)
        if initial_state not in ("module", "absent", "constant", "body"):
            raise RegionError(format_error(f"region {spec.name!r}", "has an unknown initial_state",
                                           expected="'module', 'absent', 'constant' or 'body'",
                                           got=repr(initial_state)))
        self.__dict__["neuron"] = neuron  # registered in the optimized module under its own path already
        self.neuron_path = neuron_path
        self.neuron_states = tuple((str(p), tuple(names)) for p, names in neuron_states)
        self.chunks = int(chunks)
        self.keep_prefix = bool(keep_prefix)
        self.keep_starts = bool(keep_starts)
        self.initial_state = initial_state
        self.state_constant = state_constant
        self.time_axis = time_axis

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, chunks={self.chunks}, keep_prefix={self.keep_prefix}"
                + (f", time in {self.time_axis.describe()}" if self.time_axis != TIME_MAJOR else "")
                + (f", state carried as a value ({self.initial_state})" if self.initial_state != "module" else ""))

    def neuron_snapshot(self) -> list[tuple[nn.Module, StateSnapshot]]:
        """The state of the neuron and of every stateful module under it, now, by reference."""
        neuron = self.__dict__["neuron"]
        modules = [(neuron.get_submodule(p) if p else neuron, names) for p, names in self.neuron_states]
        return [(m, StateSnapshot.take(m, names)) for m, names in modules]

    def _plain(self, box: list[Any]) -> Any:
        y = self.__dict__["body"](box)
        neuron = self.__dict__["neuron"]
        if self.initial_state == "module" or self.initial_state == "absent":
            return neuron(y)
        return neuron(y[0], y[1]) if self.initial_state == "body" else neuron(y, self.state_constant)

    def _body_modules(self) -> list[nn.Module]:
        return [*super()._body_modules(), *self.__dict__["neuron"].modules()]

    def _parameters_used(self) -> Iterator[nn.Parameter]:
        yield from super()._parameters_used()
        yield from self.__dict__["neuron"].parameters()

    def _resolve(self, path: str) -> nn.Module:
        if path == self.neuron_path or path.startswith(self.neuron_path + "."):
            sub = path[len(self.neuron_path) + 1:]
            return self.__dict__["neuron"].get_submodule(sub) if sub else self.__dict__["neuron"]
        return super()._resolve(path)


class SlicedRegion(CheckpointRegion):
    """A checkpoint region run on time slices of its inputs, whole (Rule 9 of NOTE [Checkpoint region invariants]).

    Args:
        body: the region's interior, as for :class:`CheckpointRegion`.
        spec: the :class:`RegionSpec`.
        stats: the run-time counters to update.
        chunks: requested number of time slices (clamped to T at run time; uneven slices allowed).
        sliced: per region input, whether it is time-major (sliced along dim 0) or passed whole to every slice.
    """

    def __init__(self, body: fx.GraphModule, spec: RegionSpec, stats: RegionStats | None = None, *, chunks: int,
                 sliced: tuple[bool, ...]) -> None:
        super().__init__(body, spec, stats)
        if len(sliced) != len(spec.inputs) or not any(sliced):
            raise RegionError(format_error(f"region {spec.name!r}", "needs at least one time-major input to slice",
                                           expected=f"{len(spec.inputs)} flags, one True", got=repr(sliced)))
        self.chunks = int(chunks)
        self.sliced = tuple(bool(s) for s in sliced)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunks={self.chunks}, whole-region slices (approximate)"

    def _parts(self, box: list[Any]) -> list[list[Any]]:
        steps = {a.shape[0] for a, s in zip(box, self.sliced) if s and isinstance(a, torch.Tensor) and a.dim() > 0}
        if len(steps) != 1:
            raise RegionError(format_error(
                f"region {self.spec.name!r}", "cannot slice its inputs along time (dim 0)",
                expected="time-major tensors with the same first dimension",
                got=f"first dimensions {sorted(steps)}" if steps else "no tensor to slice",
                fix="Call the optimized model with inputs shaped like the examples, or optimize with exact=True."))
        k = max(1, min(self.chunks, steps.pop()))
        pieces = [time_slices(a, k) if s else (a,) * k for a, s in zip(box, self.sliced)]
        return [[p[c] for p in pieces] for c in range(k)]

    @compat.compiler_disable
    def forward(self, box: list[Any]) -> Any:
        """Run the region on the inputs in ``box``, slice by slice (Rule 9); opaque to ``torch.compile``."""
        self._check_box(box)
        parts = self._parts(box)
        box.clear()
        checkpoint = self._needs_checkpoint(tuple(parts[0]))
        if checkpoint:
            self.stats.packed_bytes = self.stats.kept_bytes = 0
            notify("enter", self.spec.name)
        else:
            self.stats.plain_calls += 1
        outs = []
        for c in range(len(parts)):
            part, parts[c] = parts[c], []  # each slice's inputs die with its call (its body empties the list)
            last = c == len(parts) - 1
            outs.append(self._checkpointed(part, last=last) if checkpoint else self._plain(part))
        if checkpoint:
            notify("exit", self.spec.name)
        if isinstance(outs[0], torch.Tensor):
            return torch.cat(outs, dim=0)
        return tuple(torch.cat([o[j] for o in outs], dim=0) for j in range(len(outs[0])))


class _PackedFrame(_Frame):
    """A frame for :class:`PackedRegion` (Rule 11): nothing is recomputed; each saved tensor that is one of the
    region's spike inputs (or a view of it) is stored packed, everything else as autograd would store it."""

    def __init__(self, region: CheckpointRegion, body: fx.GraphModule) -> None:
        super().__init__(region, body)
        #: storage address -> packing width, for the region's inputs planned as spikes
        self.spikes: dict[int, int] = {}
        #: storage address, shape, strides, offset -> the payload already made (one packing per saved value)
        self.made: dict[tuple[Any, ...], PackedTensor | None] = {}
        self.stats: RegionStats | None = None

    def store_inputs(self, args: tuple[Any, ...], bits: tuple[int, ...], stats: RegionStats) -> None:
        self.stats = stats
        for a, b in zip(args, bits):
            if b and isinstance(a, torch.Tensor) and a.is_floating_point() and a.layout == torch.strided:
                self.spikes[a.untyped_storage().data_ptr()] = b

    def snapshot(self, args: tuple[Any, ...]) -> None:
        pass  # nothing is replayed: no state, buffers or RNG to keep

    def pack_hook(self, t: torch.Tensor) -> Any:  # type: ignore[override]
        # (detached: a saved output holding itself through its grad_fn would be a reference cycle)
        if t.layout != torch.strided or not t.is_floating_point():
            return t.detach()
        bits = self.spikes.get(t.untyped_storage().data_ptr())
        if bits is None:
            return t.detach()  # a weight, a temporary: stored as autograd stores it
        key = (t.untyped_storage().data_ptr(), tuple(t.shape), t.stride(), t.storage_offset(), t.dtype)
        if key not in self.made:
            packed = try_pack(t.detach(), bits)
            assert self.stats is not None
            if packed is None:
                self.stats.unpacked_fallbacks += 1
                self.region._warn_once(
                    "unpacked",
                    f"region {self.region.spec.name!r}: a tensor planned as {bits}-bit spikes holds other values in "
                    f"this call; it is saved unpacked (exact, but no memory saved for it). Counted in "
                    f"summary.runtime[...].unpacked_fallbacks.")
            else:
                self.stats.packed_bytes += packed.nbytes
            self.made[key] = packed
        packed = self.made[key]
        return t.detach() if packed is None else packed

    def run(self, box: list[Any]) -> Any:
        with compat.saved_tensors_hooks(self.pack_hook, _unpack_saved):
            return self.body(box)

    def close(self, stats: RegionStats, out: Any) -> None:
        self.made.clear()  # the payloads live in autograd's saved slots only


def _unpack_saved(saved: Any) -> torch.Tensor:
    """Rule 11: a saved tensor back from what :meth:`_PackedFrame.pack_hook` stored (a fresh tensor per unpack)."""
    return unpack(saved) if isinstance(saved, PackedTensor) else saved


class PackedRegion(CheckpointRegion):
    """A region that stores its spike inputs packed where autograd saves them, and recomputes nothing: Rule 11 of
    NOTE [Checkpoint region invariants] in this file.

    For an operation outside the checkpoint regions that saves a spike tensor for its backward (a convolution's
    input, a max pool's, a matmul's operand in spiking attention): the tensor is kept at 1 bit (or the width the
    plan gives) instead of 32 while the operation's backward waits, for the price of one pack in forward and one
    unpack in backward, no recomputation. Exact: the unpacked tensor is bitwise the saved one (values, dtype,
    shape, strides), and a value that is not a spike is saved unpacked instead (counted, warned once).

    Args:
        body, spec, stats: as for :class:`CheckpointRegion`; ``spec.pack_bits`` marks the inputs to pack.
    """

    _frame_class = _PackedFrame

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, saved spikes packed, nothing recomputed"
