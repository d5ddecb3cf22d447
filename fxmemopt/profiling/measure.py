"""Measure one training step (forward + backward): peak live tensor bytes and step time.

On CPU, peak memory is counted by :class:`LiveBytesTracker`, a ``TorchDispatchMode`` that sees every tensor an op
returns: each storage is counted once when it first appears and subtracted when it is freed (a
``weakref.finalize`` on the storage). The maximum is what a caching allocator would report as peak allocated
bytes for tensors created during the step; it is deterministic and identical run to run. Storages resized in
place (``UntypedStorage.resize_``: FSDP2 gathers a unit's parameters into storages it keeps at size 0 between
uses) are counted by how much they grow or shrink while tracking, though no op returns them. On CUDA the
allocator's own statistics (``torch.cuda.max_memory_allocated``) are used instead.

Time is wall-clock, median of repeats; compare times only as ratios measured in the same process.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import compat
from ..analysis import state
from ..analysis.state import ModelState, has_memories
from ..compat import TorchDispatchMode, tree_leaves

__all__ = ["LiveBytesTracker", "StepMeasurement", "measure_step", "default_loss", "reset_states"]


class LiveBytesTracker(TorchDispatchMode):
    """Track live bytes of tensor storages created while the mode is active; ``peak`` is the maximum.

    Example:
        >>> with LiveBytesTracker() as tracker:
        ...     y = torch.ones(1000) * 2           # two 4000-byte storages, the first freed at once
        >>> tracker.peak >= 4000
        True
    """

    def __init__(self, timeline: bool = False) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        #: ``(op name, live bytes after it)`` per op, when constructed with ``timeline=True``.
        self.timeline: list[tuple[str, int]] | None = [] if timeline else None

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def _resized(self, storage: torch.UntypedStorage, before: int) -> None:
        """Count an in-place resize: by its growth for a storage already counted (or one that existed before
        tracking, from then on counted for what it grew by), down to what it was when tracking began."""
        key = compat.storage_key(storage)
        delta = storage.nbytes() - before
        if key not in self._sizes:
            self._sizes[key] = 0
            weakref.finalize(storage, self._free, key)
        delta = max(delta, -self._sizes[key])  # never below where tracking found it
        self._sizes[key] += delta
        self.live += delta
        self.peak = max(self.peak, self.live)

    @staticmethod
    def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
            return None

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = self._storage(t)
        if storage is None:
            return
        key = compat.storage_key(storage)
        # Views and in-place results alias an input's storage: nothing new was allocated (and a view of a tensor
        # that existed before tracking, such as a parameter or the model input, must not count).
        if key in self._sizes or key in inputs:
            return
        n = storage.nbytes()
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def mark(self, label: str) -> None:
        """Add a marker ``("mark:<label>", live bytes)`` to the timeline (phase changes, region boundaries)."""
        if self.timeline is not None:
            self.timeline.append((f"mark:{label}", self.live))

    def __enter__(self) -> LiveBytesTracker:
        self._events = contextlib.ExitStack()
        if self.timeline is not None:
            from ..runtime.checkpoint import region_events

            # regions report enter/exit/recompute while the tracker is active (see runtime.region_events)
            self._events.enter_context(region_events(lambda event: self.mark(event.label)))
        self._events.enter_context(self._resizes_counted())
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._events.close()
        super().__exit__(*exc)

    @contextlib.contextmanager
    def _resizes_counted(self) -> Any:
        """While tracking, ``UntypedStorage.resize_`` called from this thread reports to :meth:`_resized` (no
        dispatch mode sees a storage resize)."""
        original = torch.UntypedStorage.resize_
        own = "resize_" in vars(torch.UntypedStorage)  # else inherited: put back by removing the wrapper
        owner = threading.get_ident()
        tracker = self

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            before = storage.nbytes()
            out = original(storage, size)
            if threading.get_ident() == owner and storage.device.type != "meta":
                tracker._resized(storage, before)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        try:
            yield
        finally:
            if own:
                torch.UntypedStorage.resize_ = original  # type: ignore[method-assign]
            else:
                del torch.UntypedStorage.resize_

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = {compat.storage_key(st) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)
                  for st in (self._storage(a),) if st is not None}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        if self.timeline is not None:
            self.timeline.append((str(func), self.live))
        return out


@dataclass(frozen=True)
class StepMeasurement:
    """One training step of a module on given inputs.

    Attributes:
        peak_bytes: peak live bytes of tensors created during the step (CPU tracker or CUDA allocator).
        step_time_s: median wall time of a step.
        times_s: every timed repeat.
        device: "cpu" or the CUDA device.
        method: "cpu-storage-tracker" or "cuda-allocator".
        timeline: ``(op, live bytes)`` per op of the measured step (CPU, when asked for with ``timeline=True``),
            with markers ``("mark:backward", ...)`` where backward starts and ``("mark:enter:<region>", ...)``,
            ``exit:``, ``recompute:`` and ``recompute-end:`` where regions run (see :mod:`fxmemopt.report.render`).
    """

    peak_bytes: int
    step_time_s: float
    times_s: tuple[float, ...]
    device: str
    method: str
    timeline: tuple[tuple[str, int], ...] = field(default=(), repr=False)


def default_loss(out: Any) -> torch.Tensor:
    """Sum of every floating-point tensor in the output (recursing into tuples, lists and dicts)."""
    terms = [t.float().sum() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not terms:
        raise ValueError("default_loss: the output contains no floating-point tensor; pass loss_fn")
    return torch.stack(terms).sum()


def reset_states(module: nn.Module) -> None:
    """Put every neuron in ``module`` back to its fresh state with its library's own per-module reset: ``reset()``
    for the ``_memories`` convention (fxmemopt.snn, spikingjelly), ``reset_mem()`` for snntorch, ``reset_states()``
    for sinabs (:data:`fxmemopt.analysis.state.RESET_CONVENTIONS`).

    The resets run on copies of the state tensors, which are rebound: a reset that writes in place (sinabs's) never
    writes a tensor the caller holds, or one a finished step's autograd graph saved.
    """
    state.reset_states(module)


@contextlib.contextmanager
def gc_paused() -> Any:
    """Python's cyclic garbage collector off for a tracked step. It runs when allocations cross its thresholds, so
    a reference cycle holding tensors (an autograd graph reached from a module attribute, a closure) is freed at a
    different moment from run to run, and the recorded step's lifetimes with it. Paused, every tracked step frees
    what the references free, at the same moments every time. (No ``gc.collect()`` first: with torch 2.14's CUDA
    build loaded one collection took long enough to make the test suite several times slower.)"""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def measure_step(module: nn.Module, inputs: Sequence[Any], *, loss_fn: Callable[[Any], torch.Tensor] | None = None,
                 repeats: int = 3, warmup: int = 1, measure_memory: bool = True, timeline: bool = False,
                 reset: Callable[[nn.Module], None] = reset_states) -> StepMeasurement:
    """Measure peak memory and time of ``loss_fn(module(*inputs)).backward()``.

    Gradients are set to ``None`` and neuron states reset before every step; afterwards the module's buffers,
    gradients, states and the RNG are restored, so measuring has no side effects.

    Args:
        module: the module to measure (unoptimized or optimized).
        inputs: positional inputs.
        loss_fn: output -> scalar loss; default :func:`default_loss`.
        repeats: timed steps (the median is reported).
        warmup: untimed steps first (allocator, thread pools, first-call caches).
        measure_memory: run one extra step under the tracker (CPU) or with allocator statistics (CUDA).
        timeline: also record live bytes after every op of that step (CPU tracker only).
        reset: resets neuron state before each step.

    Returns:
        A :class:`StepMeasurement`.
    """
    loss_fn = loss_fn or default_loss
    params = list(module.parameters())
    device = next((t.device for t in tree_leaves(list(inputs)) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    stateful = {p: () for p, m in module.named_modules() if has_memories(m)}
    saved = ModelState.capture(module, stateful)

    tracker: LiveBytesTracker | None = None

    def step() -> None:
        saved.restore()  # every step starts from the same state (plain neurons' rebound attributes included)
        for p in params:
            p.grad = None
        reset(module)
        loss = loss_fn(module(*inputs))
        if tracker is not None:
            tracker.mark("backward")
        loss.backward()

    with saved.restored_after():
        for _ in range(warmup):
            step()
        peak = 0
        method = "none"
        ops: tuple[tuple[str, int], ...] = ()
        if measure_memory:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                for p in params:
                    p.grad = None
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                step()
                torch.cuda.synchronize(device)
                peak, method = torch.cuda.max_memory_allocated(device) - base, "cuda-allocator"
            else:
                for p in params:
                    p.grad = None
                with gc_paused(), LiveBytesTracker(timeline=timeline) as tracker:
                    step()
                peak, method = tracker.peak, "cpu-storage-tracker"
                ops = tuple(tracker.timeline or ())
                tracker = None
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return StepMeasurement(peak, statistics.median(times) if times else float("nan"), tuple(times), str(device),
                           method, ops)
