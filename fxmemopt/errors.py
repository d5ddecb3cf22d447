"""Typed errors and warnings raised by fxmemopt.

Two families, kept apart on purpose:

* :class:`FxMemOptError` and its subclasses are for *users*: something about the model, the inputs or the
  options is not what fxmemopt can work with. Every message names the object (a module path or a graph
  node), says what is wrong, what was expected versus what was found, and what to do next.
* :class:`InternalError` is for *our* bugs: an invariant of fxmemopt itself did not hold. Its message asks
  for a bug report and carries enough context to reproduce.

Warnings use :class:`FxMemOptWarning` so users can filter them (``warnings.filterwarnings("ignore",
category=fxmemopt.FxMemOptWarning)``).
"""

from __future__ import annotations

__all__ = [
    "FxMemOptError",
    "TraceError",
    "InvalidInputsError",
    "InvalidOptionError",
    "TargetsMatchNothingError",
    "RegionError",
    "ShardingError",
    "UnsupportedTorchError",
    "RecomputationMismatchError",
    "RecomputationValueError",
    "MemoryBudgetError",
    "PlanError",
    "RecordingError",
    "DoesNotFitError",
    "GuardError",
    "StaleStateError",
    "InternalError",
    "FxMemOptWarning",
    "format_error",
    "first_line",
]


def format_error(obj: str, problem: str, *, expected: str | None = None, got: str | None = None,
                 fix: str | None = None) -> str:
    """Build the one house style for error messages: ``<object>: <problem> (expected X, got Y). <fix>``.

    Example:
        >>> format_error("features.3", "cannot be traced", fix="Declare it a leaf.")
        'features.3: cannot be traced. Declare it a leaf.'
    """
    msg = f"{obj}: {problem}"
    if expected is not None or got is not None:
        msg += f" (expected {expected}, got {got})"
    msg += "."
    if fix:
        msg += f" {fix}"
    return msg


def first_line(e: BaseException, limit: int | None = None) -> str:
    """``"ErrorType: first line of the message"`` (cut to ``limit`` characters): an exception in one line."""
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(e).__name__}: {line[:limit] if limit else line}"


class FxMemOptError(Exception):
    """Base class of every error fxmemopt raises because of its input (model, example inputs, options)."""


class TraceError(FxMemOptError):
    """The model cannot be symbolically traced at its top level.

    Submodules that fail to trace become opaque leaves automatically; only a failure in the root module's own
    ``forward`` (or in an explicitly required submodule) raises this.
    """


class InvalidInputsError(FxMemOptError, TypeError):
    """``example_inputs`` (or run-time inputs) are not what the optimized module needs."""


class InvalidOptionError(FxMemOptError, ValueError):
    """An option passed to :func:`fxmemopt.optimize` is out of range or unknown."""


class TargetsMatchNothingError(FxMemOptError, ValueError):
    """``targets`` named module classes of which the traced model calls no instance."""


class RegionError(FxMemOptError):
    """A checkpoint region cannot be formed or run as asked (for example non-tensor inputs)."""


class RecomputationMismatchError(FxMemOptError, RuntimeError):
    """Recomputing a region in backward did not reproduce what the forward saved.

    This happens when a region's forward is not a deterministic function of its inputs, parameters, module
    state and RNG state (for example it reads a global counter or the wall clock). The message lists every
    mismatch.
    """


class RecomputationValueError(RecomputationMismatchError):
    """Recomputing a region in backward produced other *values* than the forward saved (same shapes and dtypes).

    Every saved tensor's fingerprint is taken in forward and compared after recomputation (NOTE [Checkpoint
    region invariants], Rule 3): a difference means the backward would compute a wrong gradient, so it is stopped.
    Causes: a kernel that is not deterministic or picks another algorithm on recomputation (on CUDA, cuDNN's
    benchmark mode or nondeterministic algorithms), or state the region does not restore. :func:`fxmemopt.optimize`
    catches it in its validation step and keeps that region's activations instead.
    """


class MemoryBudgetError(FxMemOptError, ValueError):
    """``memory_budget`` is below the smallest peak any plan reaches; the message says that smallest peak."""


class RecordingError(FxMemOptError, RuntimeError):
    """The training step the cost model needs cannot be recorded as asked (``recording="reduced"`` on inputs whose
    batch cannot be sliced: :mod:`fxmemopt.profiling.scaled`); the message says why and what to pass instead."""


class DoesNotFitError(FxMemOptError, MemoryError):
    """What ``optimize`` must run at the examples' size (analysing a model it cannot analyse on a slice of the
    batch) ran out of memory here; the message says why it ran at that size and what to change."""


class PlanError(FxMemOptError, ValueError):
    """A saved plan is malformed, or does not fit the model it is applied to."""


class GuardError(FxMemOptError, RuntimeError):
    """A call of an optimized module breaks an assumption its trace specialized on (a *guard*).

    Python control flow on shapes (``if x.ndim == 4``, ``for t in range(x.size(0))``) was resolved with the
    example inputs when the model was traced; the optimized module checks each such decision on every call and
    raises this, naming the guard, the value traced and the value of this call, instead of running code that was
    specialized for other inputs. Optimize again with example inputs like this call's.
    """


class StaleStateError(FxMemOptError, RuntimeError):
    """A stateful module holds state from an earlier call that :func:`fxmemopt.optimize` cannot put back to fresh.

    ``optimize`` runs the model as if freshly reset, and puts the caller's state back afterwards: it resets
    spikingjelly and :mod:`fxmemopt.snn` neurons (``reset()``), snntorch neurons (``reset_mem()``), sinabs layers
    (``reset_states()``) and any stateful module with a ``reset()`` of its own, always on copies of the state. A
    plain module that keeps its state in an attribute (``self.v = ...``) and has no such method cannot be reset
    generically; when its state is a tensor from an earlier step (one that still references that step's autograd
    graph, or that the forward on the example inputs fails on, e.g. another batch size), this error names the module,
    the attribute and its shape. Reset the model before calling ``optimize``, or give the class a ``reset()``.
    """


class ShardingError(FxMemOptError, RuntimeError):
    """A module of an optimized module was sharded (FSDP2 ``fully_shard``) that the optimized module never calls:
    its code was traced into its parent, so FSDP2's hooks on it would never run and its parameters would stay
    sharded. Keep it as a module (``optimize(..., keep_modules=[path])``) and shard with
    :func:`fxmemopt.distributed.fully_shard`.
    """


class UnsupportedTorchError(FxMemOptError, RuntimeError):
    """The installed torch lacks, or changed, an API fxmemopt needs (see :mod:`fxmemopt.compat`); the message names
    it and the supported torch range."""


class InternalError(RuntimeError):
    """An invariant of fxmemopt itself did not hold: a bug in fxmemopt, please report it."""

    def __init__(self, message: str) -> None:
        super().__init__(
            f"{message}. This is a bug in fxmemopt; please report it with the model definition and the "
            f"example input shapes."
        )


class FxMemOptWarning(UserWarning):
    """Something was handled losslessly but differently from the plan (e.g. a tensor stored unpacked)."""
