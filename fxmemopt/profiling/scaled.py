"""Record a training step that does not fit: small batches recorded, the examples' batch extrapolated.

fxmemopt exists for the training step that runs out of memory, so the step the cost model reads (a
:class:`~fxmemopt.planning.costgraph.StepTrace`) must be had without running that step. It is recorded at batch
sizes ``s``, ``2s`` and ``3s`` (slices of the example inputs along their batch dimension; ``s`` = 1, or 2 where a
model refuses one sample) and extrapolated:

* **Memory, exactly.** A training step allocates the same storages, in the same order, at every batch size; each
  is either independent of the batch (parameter gradients, per-channel BatchNorm statistics, the loss) or
  proportional to it (activations, their gradients, per-sample state). So every storage's size is
  ``a + b * batch``: fitted on ``s`` and ``2s``, *checked to the byte* at ``3s``, then evaluated at the examples'
  batch. (An empty batch would check at no cost in memory, but BatchNorm dispatches other ops on one.) Live bytes
  at every event, and so the peak, follow from the storages' sizes and lifetimes (:func:`peak_of`), with the
  recorder's own counting rule. Anything else (a different op sequence at another batch size, a size that is not
  affine in the batch, a model that fixes its batch size) fails the check, and the step is recorded at full size
  instead, with the reason in the summary.
* **Time, by ratio.** The nodes' forward times are measured without grad at a quarter of the examples' batch
  (:data:`TIMING_FRACTION`; without grad a forward keeps only the values still to be used) and scaled linearly to
  the batch; the step's and the with-grad forward's times are that forward's times the ratios measured at
  ``3s``. Times are estimates (the docs show their errors); memory is exact.

Recording at small sizes is also what keeps ``optimize`` cheap: its largest unoptimized step is ``3s`` samples,
and its largest forward a quarter of the batch.

When a batch dimension is found (:func:`find_batch_dim`) and the batch is at least :data:`MIN_BATCH` samples,
``recording="auto"`` (the default) extrapolates; ``"full"`` always records at the examples' size (the behaviour
before this module); ``"reduced"`` extrapolates or raises :class:`~fxmemopt.errors.RecordingError` saying why
it cannot.

Known limits: models whose batch size is written into their code (sinabs' ``IAFSqueeze(batch_size=...)``) or whose
batch and time share one flattened dimension cannot be sliced and are recorded at full size; the slices are the
first ``3s`` samples, so value-dependent control flow (none in the libraries' models) could differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..planning.costgraph import StepTrace
from .record import forward_node_times, record_step

__all__ = ["MIN_BATCH", "Recording", "find_batch_dim", "peak_of", "record_scaled", "slice_batch"]

#: The smallest batch extrapolated: below it the three small recordings (1 + 2 + 3 samples) cost about what one
#: full-size recording does, and the full size is recorded.
MIN_BATCH = 8
#: Node times are measured at ``1 / TIMING_FRACTION`` of the batch (at least ``3s``) and scaled to it linearly:
#: large enough that per-op overheads do not dominate, small enough that the forward stays below the optimized
#: step's peak.
TIMING_FRACTION = 4
#: Timed steps at ``3s`` (the step-to-forward ratios): one, after the warm-up step every recording runs.
SMALL_TIMING_REPEATS = 1


@dataclass(frozen=True)
class Recording:
    """How the step behind the cost graph was recorded: what :func:`fxmemopt.explain` reports.

    Attributes:
        method: ``"full"`` (one step at the examples' size) or ``"extrapolated"`` (small batches, this module).
        batch_dim: the inputs' batch dimension (``None``: none found).
        batch: the examples' batch size along it.
        sizes: the batch sizes recorded (extrapolated: fitted on the first two, checked on the third).
        why: why the step was recorded at full size (empty when it was not, or when asked to).
    """

    method: str
    batch_dim: int | None = None
    batch: int | None = None
    sizes: tuple[int, ...] = ()
    why: str = ""
    #: the batch the node times were measured at (extrapolated: scaled linearly to ``batch``)
    timing_batch: int | None = None
    #: the batch of the sample everything ran on (``None``: the examples' own slices, analysis at full size):
    #: the examples' first samples, or the user's sample of inputs on the meta device
    sample_batch: int | None = None
    #: the examples are on the meta device (their size never ran here)
    meta: bool = False
    #: extrapolated: the unoptimized step's recorded peak at each of ``sizes`` (the validation step runs at the
    #: second: what its measured peak is compared with, ``fxmemopt.api._kept_below``)
    sample_peaks: tuple[int, ...] = ()

    def describe(self) -> str:
        if self.method == "extrapolated":
            of = "" if self.sample_batch is None else f" of a {self.sample_batch}-sample slice" if not self.meta \
                else f" of the {self.sample_batch}-sample real sample"
            text = (f"recorded at batch {', '.join(map(str, self.sizes[:2]))}{of} (dimension {self.batch_dim}) "
                    f"and extrapolated to {self.batch}, every storage checked to the byte at batch "
                    f"{self.sizes[2]}; node times measured at batch {self.timing_batch} without grad, scaled to "
                    f"{self.batch}")
            if self.meta:
                text += ("; the examples are on the meta device: node shapes extrapolated the same way, no step ran "
                         "at their size here")
            elif self.sample_batch is not None:
                text += "; traced and annotated on the slice, node shapes extrapolated the same way"
            return text
        return "recorded at the examples' size" + (f" ({self.why})" if self.why else "")


def _tensors(inputs: Sequence[Any]) -> list[torch.Tensor]:
    return [a for a in inputs if isinstance(a, torch.Tensor)]


def find_batch_dim(inputs: Sequence[Any], time_steps: Collection[int] = ()) -> int | None:
    """The batch dimension of the example inputs: dimension 1 of a ``[T, N, ...]`` input whose first size is the
    time steps of a multi-step neuron (spikingjelly's and fxmemopt.snn's layout), else dimension 0; ``None`` for
    no tensor of two or more dimensions.

    A guess, checked by :func:`record_scaled` (a wrong dimension changes the op sequence or makes the sizes
    non-affine, and the step is recorded at full size)."""
    tensors = [t for t in _tensors(inputs) if t.dim() >= 2]
    if not tensors:
        return None
    x = tensors[0]
    return 1 if x.dim() >= 3 and x.shape[0] in set(time_steps) else 0


def slice_batch(inputs: Sequence[Any], dim: int, size: int, batch: int) -> tuple[Any, ...]:
    """The first ``size`` samples of every tensor input whose dimension ``dim`` is ``batch`` long (others as they
    are): contiguous copies (a strided view would make the step copy it, an allocation the full step has not),
    with ``requires_grad`` as the example's."""
    out = []
    for a in inputs:
        if isinstance(a, torch.Tensor) and a.dim() > dim and a.shape[dim] == batch:
            a = a.detach().narrow(dim, 0, size).clone().requires_grad_(a.requires_grad)
        out.append(a)
    return tuple(out)


def peak_of(trace: StepTrace) -> int:
    """Peak live bytes of ``trace``'s storages, by the recorder's rule: a storage counts from the event that
    allocated it until the event after which it was freed (``None``: to the end), allocations of one event
    together, frees reported at event ``f`` before the allocations of event ``f + 1``."""
    n = len(trace.events) + 1
    delta = [0] * (n + 1)
    for s in trace.storages:
        delta[s.alloc] += s.nbytes
        if s.free is not None:
            delta[s.free + 1] -= s.nbytes
    live = peak = 0
    for d in delta:
        live += d
        peak = max(peak, live)
    return peak


def _mismatch(a: StepTrace, b: StepTrace) -> str:
    """Why two recordings at different batch sizes are not the same step (empty: they are)."""
    if a.events != b.events:
        return f"the op sequence differs ({len(a.events)} vs {len(b.events)} dispatched ops)"
    if a.node_events != b.node_events or len(a.storages) != len(b.storages):
        return f"the storages differ ({len(a.storages)} vs {len(b.storages)})"
    for x, y in zip(a.storages, b.storages):
        if dataclasses.replace(x, nbytes=0) != dataclasses.replace(y, nbytes=0):
            return f"a storage of {x.node} ({x.phase}) lives differently"
    return ""


def extrapolate(traces: Sequence[StepTrace], sizes: Sequence[int], batch: int) -> tuple[StepTrace | None, str]:
    """The step at ``batch`` from recordings at ``sizes`` (``s, 2s, 3s``), or ``None`` and why not.

    Each storage's size is fitted as ``a + b * size`` on the first two and must equal the fit at the third to the
    byte; times are left to the caller."""
    (t1, t2, t3), (s1, s2, s3) = traces, sizes
    for other in (t2, t3):
        why = _mismatch(t1, other)
        if why:
            return None, f"batch {s1} and {sizes[traces.index(other)]}: {why}"
    storages = []
    for a, b, c in zip(t1.storages, t2.storages, t3.storages):
        slope, rem = divmod((b.nbytes - a.nbytes), s2 - s1)
        if rem or a.nbytes + slope * (s3 - s1) != c.nbytes:
            return None, (f"a storage of {a.node} ({a.phase}) is not affine in the batch ({a.nbytes}, {b.nbytes}, "
                          f"{c.nbytes} bytes at batch {s1}, {s2}, {s3})")
        storages.append(dataclasses.replace(a, nbytes=a.nbytes + slope * (batch - s1)))
    full = dataclasses.replace(t3, storages=tuple(storages))
    return dataclasses.replace(full, peak_bytes=peak_of(full)), ""


def record_scaled(gm: fx.GraphModule, inputs: Sequence[Any], stateful: dict[str, Sequence[str]], *,
                  recording: str = "auto", time_steps: Collection[int] = (), timing_repeats: int = 2,
                  planned_for: tuple[int, int] | None = None, meta: bool = False) -> tuple[StepTrace, Recording]:
    """The unoptimized training step of ``gm`` on ``inputs`` for the cost graph, and how it was had (see the module
    docstring). Side effects as :func:`~fxmemopt.profiling.record.record_step`'s: none.

    Args:
        gm: the traced, unoptimized GraphModule.
        inputs: the example inputs (the size predicted for).
        stateful: stateful module paths -> state attribute names.
        recording: ``"auto"``, ``"full"`` or ``"reduced"``.
        time_steps: the multi-step neurons' time steps (for :func:`find_batch_dim`).
        timing_repeats: as for ``record_step``, for a recording at the examples' size.
        planned_for: ``(batch_dim, batch)`` where ``inputs`` are a sample of the example inputs (their first
            samples, or the user's sample of inputs on the meta device): the step is recorded on slices of the
            sample and extrapolated to ``batch`` samples along ``batch_dim``; there is no full-size fallback.
        meta: the example inputs are on the meta device (for :class:`Recording`).

    Raises:
        RecordingError: ``recording="reduced"``, or ``planned_for`` given, and the step cannot be extrapolated (the
            message says why).
    """
    from ..errors import RecordingError, format_error

    def full(why: str) -> tuple[StepTrace, Recording]:
        if planned_for is not None:
            raise RecordingError(format_error(
                "sample_inputs" if meta else "example_inputs",
                f"cannot be extrapolated from a sample to the examples' batch of {planned_for[1]}: {why}",
                expected="a model whose training step at batch s, 2s and 3s of the sample is the same step, "
                         "each storage affine in the batch",
                got=f"sample {[tuple(t.shape) for t in _tensors(inputs)]}",
                fix="plan with real example inputs at the training size on a machine where they fit"))
        if recording == "reduced":
            raise RecordingError(format_error(
                "recording='reduced'", f"cannot extrapolate the training step from small batches: {why}",
                expected="inputs with a batch dimension the model does not fix, at least "
                         f"{MIN_BATCH} samples",
                got=f"inputs {[tuple(t.shape) for t in _tensors(inputs)]}",
                fix="pass recording='full' (the step at the examples' size must then fit), or smaller example "
                     "inputs and memory_budget for the real size"))
        return record_step(gm, inputs, stateful, timing_repeats=timing_repeats), Recording(
            "full", dim, batch, why="" if recording == "full" else why)

    if recording == "full" and planned_for is None:
        dim, batch = None, None
        return full("")
    guess = find_batch_dim(inputs, time_steps) if planned_for is None else planned_for[0]
    if guess is None:
        dim, batch = None, None
        return full("no batch dimension found")
    # the guess first, then the other leading dimension: the byte-exact check is what makes a dimension right
    # (a multi-step neuron that cannot be time-sliced gives no T to tell [T, N, ...] from [N, ...])
    first = next(t for t in _tensors(inputs) if t.dim() > guess)
    if planned_for is not None:
        dims = [guess]
    else:
        dims = [d for d in (guess, 1 - guess) if d < first.dim() and first.shape[d] >= MIN_BATCH]
    dim, batch = guess, first.shape[guess]
    if not dims:
        return full(f"batch {batch} is below {MIN_BATCH}")
    why = ""
    for dim, s in [(d, s) for d in dims for s in (1, 2)]:
        have = first.shape[dim]  # the samples there are to slice: the examples', or the sample's
        batch = have if planned_for is None else planned_for[1]
        sizes = (s, 2 * s, 3 * s)
        # slices well below the batch (else one full-size step costs less); of a sample, any three that fit in it
        if (3 * s * 2 > batch) if planned_for is None else (3 * s > have):
            if planned_for is not None:
                why = why or f"the sample has {have} samples along dimension {dim}, fewer than {3 * s}"
            continue
        try:
            traces = [record_step(gm, slice_batch(inputs, dim, n, have), stateful,
                                  timing_repeats=SMALL_TIMING_REPEATS if n == sizes[-1] else 0) for n in sizes]
        except Exception as e:  # the model fixes its batch size, or refuses one sample: try the next, then full size
            why = f"a step at batch {s} (dimension {dim}) failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        trace, why = extrapolate(traces, sizes, batch)
        if trace is None:
            why = f"dimension {dim}: {why}"
            continue
        # times: the nodes' without grad at a quarter of the batch, scaled to the batch (a forward at the full
        # batch, even without grad, holds more than the optimized step: optimize's own peak would be above it);
        # the step's and the with-grad forward's by the ratios measured at 3s
        small = traces[-1]
        at = min(have, max(3 * s, -(-batch // TIMING_FRACTION)))
        nograd = forward_node_times(gm, slice_batch(inputs, dim, at, have), stateful, repeats=1, warmup=0)
        nograd = {k: v * batch / at for k, v in nograd.items()}
        small_nograd = sum(small.fwd_nograd_time_s.values())
        ratio_step = small.step_time_s / small_nograd if small_nograd > 0 else 1.0
        ratio_fwd = sum(small.fwd_time_s.values()) / small_nograd if small_nograd > 0 else 1.0
        ratio_fwd = min(2.0, max(1.0, ratio_fwd))
        trace = dataclasses.replace(trace, fwd_nograd_time_s=nograd,
                                    fwd_time_s={k: v * ratio_fwd for k, v in nograd.items()},
                                    step_time_s=sum(nograd.values()) * ratio_step)
        return trace, Recording("extrapolated", dim, batch, sizes, timing_batch=at,
                                sample_batch=have if planned_for is not None else None, meta=meta,
                                sample_peaks=tuple(t.peak_bytes for t in traces))
    return full(why or f"batch {batch} is too small to slice")
