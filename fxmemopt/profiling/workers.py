"""Profile candidate modules in a reusable worker process that can never hang the caller.

Choosing between candidate rewrites means measuring each one (:func:`fxmemopt.profiling.measure.measure_step`).
Measuring in
a separate process keeps a candidate that crashes, leaks, hangs or runs out of memory from taking the search down
with it. The reference tool did this with a fresh process per candidate and no timeout, so one failing worker hung
the parent forever. Here:

* :class:`WorkerPool` owns **one** worker process, started lazily (``spawn``: never ``fork``, which is unsafe in a
  process that already runs torch's thread pools) and **reused** across jobs, so a search pays the interpreter and
  ``import torch`` start-up once, not per candidate.
* Every wait is bounded: the worker's start by ``start_timeout_s``, each job by its ``timeout_s``, every ``join``
  and ``send`` by a timeout, and ``recv`` is only called once ``poll`` reports data. While waiting, the parent polls
  the pipe in short slices (:data:`POLL_INTERVAL_S`) and checks the worker is alive, so a dead worker is noticed
  within a fraction of a second rather than at the timeout (usually at once: the parent holds no copy of the
  worker's end of the pipe, so the worker's death makes the pipe readable with EOF).
* Failures come back as values, never as exceptions: :class:`ProfileResult` carries a ``status`` ("ok", "error",
  "oom", "timeout", "crashed", "unpicklable") and a message in the house style of :func:`fxmemopt.errors.format_error`.
  An exception raised by the job leaves the worker alive for the next job; after a timeout or a crash the worker is
  stopped (SIGTERM, then SIGKILL) and reaped, and the next job starts a fresh one.

How a module travels to the worker (the job's ``payload``), two routes:

1. **Pickled module** (:func:`pack_module`, :func:`make_job` with an ``nn.Module``): the module object itself is
   pickled, parameters and buffers included. ``torch.fx.GraphModule``\\ s produced by :func:`fxmemopt.optimize`
   pickle fine. The model's class (and
   everything it holds) must be importable by name in a fresh interpreter: defined at module top level, no lambdas
   or local classes. Otherwise :func:`make_job` returns a ready "unpicklable" result and nothing is sent.
2. **Factory** (:class:`FactorySpec`): an import path ``"package.module:callable"``, its keyword arguments, an
   optional state dict and optional :func:`fxmemopt.optimize` keyword arguments. The worker imports the factory,
   builds the model, loads the state dict and, when ``optimize_kwargs`` is not ``None``, optimizes the model there
   on the job's inputs and measures the result. Only plain data crosses the process boundary.

Models that can take neither route can be measured in the calling process with :func:`run_in_process` (same
measurement, errors as values, but no timeout and no protection against crashes).

Example:
    >>> import torch, fxmemopt
    >>> from fxmemopt.snn import DeepConvSNN
    >>> from fxmemopt.profiling.workers import WorkerPool, make_job
    >>> model, x = DeepConvSNN(num_blocks=2, channels=4), torch.rand(2, 2, 3, 8, 8)
    >>> gm = fxmemopt.optimize(model, (x,))
    >>> with WorkerPool() as pool:  # doctest: +SKIP
    ...     plain, optimized = pool.run_many([make_job("plain", model, (x,)), make_job("optimized", gm, (x,))])
    >>> optimized.peak_bytes < plain.peak_bytes  # doctest: +SKIP
    True

Inside the worker:

* The environment variable ``FXMEMOPT_WORKER`` is set to ``"1"`` (:data:`WORKER_ENV_VAR`), so a model, factory or
  test can tell it is running in a profiling worker.
* SIGINT is ignored: on Ctrl-C the parent receives ``KeyboardInterrupt``, kills the worker and re-raises, instead of
  both processes printing tracebacks.
* torch's thread count is left at its default (all cores), like in the parent, so step times measured in a worker
  compare with those measured in process. Run at most one pool per machine when timings matter.
* A job that raises ``SystemExit`` (calls ``sys.exit``) ends the worker; the parent reports "crashed" with the exit
  code, like any other exit.
* After answering a job the worker runs a full garbage collection (freeing the candidate's reference cycles) and
  ``gc.freeze()``\\ s what survived, so each collection costs well under a millisecond instead of ~60 ms with torch
  loaded.
* Nothing is configured for logging: records of level WARNING and above reach stderr through logging's last-resort
  handler; the parent logs every job at INFO on ``logging.getLogger("fxmemopt.profiling.workers")``.

Limitations:

* The worker is a daemonic process: a job cannot start processes of its own (e.g. ``DataLoader`` workers).
* With the ``spawn`` start method the main script is re-imported in the worker, so it must guard its top level with
  ``if __name__ == "__main__":``; otherwise the worker dies during start-up and the job reports "crashed".
* Only the default loss of :func:`~fxmemopt.profiling.measure.measure_step` (the sum of the floating-point outputs) is
used.
* On CUDA the worker empties the allocator's cache after every job, but its CUDA context (hundreds of MB) lives as
  long as the worker; peaks are relative to what is allocated at the start of each step, so this does not skew them.
* A worker stopped by a debugger or SIGSTOP while reading its job makes the parent's send time out: it is then
  killed like any timed-out worker.
* The pool runs one job at a time; ``run`` calls from several threads are serialized by a lock.
"""

from __future__ import annotations

import gc
import importlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch
from torch import nn

from ..errors import FxMemOptError, InternalError, InvalidInputsError, InvalidOptionError, format_error
from .measure import measure_step

__all__ = [
    "ProfileJob",
    "ProfileResult",
    "FactorySpec",
    "WorkerPool",
    "WorkerPoolClosedError",
    "pack_module",
    "make_job",
    "run_in_process",
    "STATUSES",
    "WORKER_ENV_VAR",
]

log = logging.getLogger("fxmemopt.profiling.workers")

#: Every value :attr:`ProfileResult.status` can take.
STATUSES = ("ok", "error", "timeout", "crashed", "oom", "unpicklable")

#: Set to "1" in the worker's environment, so code can tell it runs inside a profiling worker.
WORKER_ENV_VAR = "FXMEMOPT_WORKER"

#: How long one ``poll`` on the pipe lasts before the parent checks that the worker is still alive. It bounds how
#: late a dead worker is noticed; an answer is received as soon as it arrives whatever the value, and the check
#: (one ``waitpid``) costs microseconds.
POLL_INTERVAL_S = 0.1

#: After SIGTERM, how long a worker may take to exit before SIGKILL. Python has no SIGTERM handler by default, so a
#: worker normally dies at once; the grace only matters for a job that installed one.
KILL_GRACE_S = 1.0

#: How long to wait for the kernel to reap a worker after SIGKILL, or after the worker closed its end of the pipe.
REAP_TIMEOUT_S = 5.0

#: How long :meth:`WorkerPool.close` lets an idle worker leave its loop after the stop message before killing it.
STOP_TIMEOUT_S = 5.0

_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL

# Where the remedy for a model that cannot travel is spelled out once.
_TRAVEL_FIX = (
    "Define the model class (and everything it holds: functions instead of lambdas, no classes defined inside "
    "functions) at module top level so it can be imported by name, send a FactorySpec instead, or measure in the "
    'calling process (profile="in-process", fxmemopt.profiling.workers.run_in_process).'
)


class WorkerPoolClosedError(FxMemOptError, RuntimeError):
    """A :class:`WorkerPool` was used after :meth:`~WorkerPool.close` (or after its ``with`` block ended)."""


# --------------------------------------------------------------------------------------------------------------------
# Plain-data values
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileJob:
    """What to measure: one candidate module on one set of inputs. Plain data, sent to the worker as bytes.

    Build it with :func:`make_job`, which pickles the module and inputs and turns a pickling failure into an
    "unpicklable" :class:`ProfileResult` instead of raising.

    Attributes:
        name: the candidate's label, repeated in the result and in messages.
        payload: the pickled module (an ``nn.Module``, see :func:`pack_module`) or :class:`FactorySpec`.
        inputs: the pickled tuple of positional inputs.
        repeats: timed steps (the median is reported), as in :func:`~fxmemopt.profiling.measure.measure_step`.
        warmup: untimed steps first.
        measure_memory: also measure peak memory (one extra step).
        timeout_s: how long the parent waits for this job's answer (the worker's start-up is bounded separately
            by :attr:`WorkerPool.start_timeout_s`).

    Raises:
        InvalidOptionError: a count is negative or the timeout is not positive.
    """

    name: str
    payload: bytes = field(repr=False)
    inputs: bytes = field(repr=False)
    repeats: int = 3
    warmup: int = 1
    measure_memory: bool = True
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for option in ("repeats", "warmup"):
            value = getattr(self, option)
            if not isinstance(value, int) or value < 0:
                raise InvalidOptionError(format_error(f"ProfileJob({self.name!r}).{option}", "is out of range",
                                                      expected="an int >= 0", got=repr(value)))
        if not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise InvalidOptionError(format_error(f"ProfileJob({self.name!r}).timeout_s", "is out of range",
                                                  expected="a number of seconds > 0", got=repr(self.timeout_s)))


@dataclass(frozen=True)
class ProfileResult:
    """The outcome of one :class:`ProfileJob`: numbers when it worked, a status and a message when it did not.

    Attributes:
        name: the job's name.
        status: one of :data:`STATUSES`:

            * ``"ok"``: measured; ``peak_bytes``, ``step_time_s`` and ``method`` are set.
            * ``"error"``: the job raised; ``message`` has the exception type and text.
            * ``"oom"``: the job ran out of memory (``MemoryError``, ``torch.cuda.OutOfMemoryError``, or torch's CPU
              allocator failing).
            * ``"timeout"``: no answer within the job's ``timeout_s`` (or the worker did not start within
              ``start_timeout_s``); the worker was killed.
            * ``"crashed"``: the worker died during the job; ``message`` has the exit code or signal ("killed
              (possibly out of memory)" for SIGKILL, which is what the kernel's OOM killer sends).
            * ``"unpicklable"``: the module or inputs could not be pickled in the parent, or not be unpickled in the
              worker; ``message`` names the object and the error and says what to do.
        peak_bytes: peak live bytes of a training step (see :func:`~fxmemopt.profiling.measure.measure_step`); ``None``
        unless
            ok (0 when ``measure_memory`` was off).
        step_time_s: median wall time of a step; ``None`` unless ok (NaN when ``repeats`` was 0).
        method: how memory was measured ("cpu-storage-tracker", "cuda-allocator", "none"); ``None`` unless ok.
        wall_s: seconds the caller spent on the job, worker start-up and transfers included.
        message: why the job did not succeed; empty when ok.
    """

    name: str
    status: str
    peak_bytes: int | None
    step_time_s: float | None
    method: str | None
    wall_s: float
    message: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise InvalidOptionError(format_error(f"ProfileResult({self.name!r}).status", "is unknown",
                                                  expected=" or ".join(STATUSES), got=repr(self.status)))

    @property
    def ok(self) -> bool:
        """Whether the job was measured (``status == "ok"``)."""
        return self.status == "ok"


@dataclass(frozen=True)
class FactorySpec:
    """Build a model in the worker from plain data: a factory's import path, its arguments and a state dict.

    Use it when the model object itself cannot be pickled, or to send only weights. In the worker (or in
    :meth:`build`): import ``factory``, call it with ``kwargs``, load ``state_dict`` (strictly) if given, and, if
    ``optimize_kwargs`` is not ``None``, return ``fxmemopt.optimize(model, inputs, **optimize_kwargs)`` so the
    optimized module is built where it is measured.

    Attributes:
        factory: ``"package.module:callable"``; the callable may be a dotted attribute path
            (``"pkg.mod:Class.from_config"``). It must return an ``nn.Module``.
        kwargs: keyword arguments of the factory.
        state_dict: loaded into the built model with ``strict=True``; ``None`` keeps the factory's initialization.
        optimize_kwargs: keyword arguments of :func:`fxmemopt.optimize` (``{}`` for the defaults); ``None`` measures
            the built model as is. ``return_summary`` is accepted; only the module is measured.
        optimize_with: ``"module:function"`` called as ``function(model, inputs, **optimize_kwargs)``; default
            :func:`fxmemopt.optimize`.

    Raises:
        InvalidOptionError: ``factory`` is not of the form ``"package.module:callable"``.

    Example:
        >>> spec = FactorySpec("fxmemopt.snn.models:DeepConvSNN", {"num_blocks": 2, "channels": 4})
        >>> type(spec.build()).__name__
        'DeepConvSNN'
    """

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    optimize_kwargs: dict[str, Any] | None = None
    # an import path (data, not an import: this module does not depend on the pipeline that uses it)
    optimize_with: str = "fxmemopt:optimize"

    def __post_init__(self) -> None:
        module, _, attr = self.factory.partition(":") if isinstance(self.factory, str) else ("", "", "")
        if not module or not attr:
            raise InvalidOptionError(format_error(
                "FactorySpec.factory", "is not an import path", expected='"package.module:callable"',
                got=repr(self.factory), fix='For example FactorySpec("fxmemopt.snn.models:DeepConvSNN", {...}).'))

    def resolve(self, path: str | None = None) -> Any:
        """Import and return the factory callable (or the object at another ``"module:attr"`` ``path``).

        Raises:
            InvalidOptionError: the module cannot be imported or has no such attribute.
        """
        path = self.factory if path is None else path
        module_name, _, attr_path = path.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as e:
            raise InvalidOptionError(format_error(
                f"FactorySpec({path!r})", f"cannot import module {module_name!r} ({type(e).__name__}: {e})",
                fix="The module must be importable in a fresh interpreter (installed, or on sys.path).")) from e
        for part in attr_path.split("."):
            if not hasattr(obj, part):
                raise InvalidOptionError(format_error(
                    f"FactorySpec({path!r})", f"{getattr(obj, '__name__', obj)!r} has no attribute {part!r}",
                    fix="Check the spelling of the part after the colon."))
            obj = getattr(obj, part)
        return obj

    def build(self, inputs: Sequence[Any] | None = None) -> nn.Module:
        """Build the model (and optimize it when ``optimize_kwargs`` is not ``None``).

        Args:
            inputs: example inputs for :func:`fxmemopt.optimize`; required when ``optimize_kwargs`` is not ``None``.

        Returns:
            The module to measure.

        Raises:
            InvalidOptionError: the factory cannot be imported or does not return an ``nn.Module``.
            InvalidInputsError: ``optimize_kwargs`` is set but no inputs were given.
            Exception: whatever the factory, ``load_state_dict`` or ``optimize`` raise.
        """
        model = self.resolve()(**self.kwargs)
        if not isinstance(model, nn.Module):
            raise InvalidOptionError(format_error(f"FactorySpec({self.factory!r})", "did not return a module",
                                                  expected="nn.Module", got=type(model).__name__))
        if self.state_dict is not None:
            model.load_state_dict(self.state_dict, strict=True)
        if self.optimize_kwargs is None:
            return model
        if inputs is None:
            raise InvalidInputsError(format_error(
                f"FactorySpec({self.factory!r}).build", "needs example inputs to optimize the model",
                fix="Pass inputs=..., or set optimize_kwargs=None to measure the model unoptimized."))
        out = self.resolve(self.optimize_with)(model, tuple(inputs), **self.optimize_kwargs)
        return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------------------------------------------------
# Packing jobs
# --------------------------------------------------------------------------------------------------------------------


def pack_module(module: nn.Module | FactorySpec) -> bytes:
    """Pickle a module (route 1) or a :class:`FactorySpec` (route 2) into a job payload.

    GraphModules returned by :func:`fxmemopt.optimize` pickle as they are (tracing drops the string type
    annotations torch.fx cannot pickle).

    Args:
        module: the module to measure, or a factory spec.

    Returns:
        The pickle, protocol :data:`pickle.HIGHEST_PROTOCOL`.

    Raises:
        InvalidOptionError: ``module`` is neither an ``nn.Module`` nor a :class:`FactorySpec`.
        Exception: whatever pickling raises (``PicklingError``, ``AttributeError``, ``TypeError``); :func:`make_job`
            turns it into an "unpicklable" result.
    """
    if not isinstance(module, (nn.Module, FactorySpec)):
        raise InvalidOptionError(format_error("module", "cannot be profiled", expected="nn.Module or FactorySpec",
                                              got=type(module).__name__))
    return pickle.dumps(module, protocol=_PICKLE_PROTOCOL)


def _unpicklable(name: str, what: str, problem: str, exc: BaseException, wall_s: float) -> ProfileResult:
    message = format_error(what, f"{problem} ({type(exc).__name__}: {exc})", fix=_TRAVEL_FIX)
    log.info("job %r: unpicklable: %s", name, message)
    return ProfileResult(name, "unpicklable", None, None, None, wall_s, message)


def make_job(name: str, module: nn.Module | FactorySpec, inputs: Sequence[Any], *, repeats: int = 3,
             warmup: int = 1, measure_memory: bool = True, timeout_s: float = 120.0) -> ProfileJob | ProfileResult:
    """Pickle a module (or factory spec) and its inputs into a :class:`ProfileJob`.

    A pickling failure is returned as a ready "unpicklable" :class:`ProfileResult` (no worker is involved);
    :meth:`WorkerPool.run` passes such a result through unchanged, so ``pool.run(make_job(...))`` always works.

    Args:
        name: the candidate's label.
        module: the module to measure (route 1) or a :class:`FactorySpec` (route 2).
        inputs: a tuple (or list) of positional inputs, as for ``module(*inputs)``.
        repeats, warmup, measure_memory, timeout_s: see :class:`ProfileJob`.

    Returns:
        The job, or an "unpicklable" result naming the object that could not be pickled.

    Raises:
        InvalidInputsError: ``inputs`` is not a tuple or list.
        InvalidOptionError: ``module`` has the wrong type, or an option is out of range.
    """
    if isinstance(inputs, torch.Tensor) or not isinstance(inputs, (tuple, list)):
        raise InvalidInputsError(format_error(
            f"make_job({name!r}).inputs", "must be a tuple of positional inputs, as for module(*inputs)",
            expected="tuple", got=type(inputs).__name__, fix="Wrap a single tensor: make_job(name, module, (x,))."))
    t0 = time.perf_counter()
    try:
        payload = pack_module(module)
    except InvalidOptionError:
        raise
    except Exception as e:  # pickling reports failures as PicklingError, AttributeError or TypeError
        return _unpicklable(name, f"module {type(module).__name__} of job {name!r}", "cannot be pickled to send it "
                            "to a worker process", e, time.perf_counter() - t0)
    try:
        packed_inputs = pickle.dumps(tuple(inputs), protocol=_PICKLE_PROTOCOL)
    except Exception as e:
        return _unpicklable(name, f"inputs of job {name!r}", "cannot be pickled to send them to a worker process", e,
                            time.perf_counter() - t0)
    return ProfileJob(name, payload, packed_inputs, repeats=repeats, warmup=warmup, measure_memory=measure_memory,
                      timeout_s=timeout_s)


# --------------------------------------------------------------------------------------------------------------------
# Running one job (shared by the worker and run_in_process)
# --------------------------------------------------------------------------------------------------------------------


def _is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means "out of memory": MemoryError, CUDA OOM, or torch's CPU allocator failing."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    # The CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory: ...").
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _where(exc: BaseException) -> str:
    """`` (at file:line in func)`` for the innermost frame of ``exc``'s traceback, or an empty string."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name})"


def _measure(name: str, target: nn.Module | FactorySpec, inputs: Sequence[Any], repeats: int, warmup: int,
             measure_memory: bool) -> dict[str, Any]:
    """Build (for a factory) and measure ``target``; every exception becomes a status.

    Returns:
        The fields of a :class:`ProfileResult` except ``name`` and ``wall_s``, as plain data.

    Raises:
        KeyboardInterrupt, SystemExit: never turned into values, so Ctrl-C and ``sys.exit`` keep their meaning.
    """
    try:
        module = target.build(inputs) if isinstance(target, FactorySpec) else target
        m = measure_step(module, inputs, repeats=repeats, warmup=warmup, measure_memory=measure_memory)
        return {"status": "ok", "peak_bytes": m.peak_bytes, "step_time_s": m.step_time_s, "method": m.method,
                "message": ""}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a job must never take the worker's loop down; see the docstring
        oom = _is_oom(e)
        log.debug("job %r raised", name, exc_info=True)
        problem = "ran out of memory" if oom else "raised"
        fix = ("Measure a smaller configuration, or give the process more memory." if oom else
               "Check that the module trains on these inputs (module(*inputs), then backward) outside the profiler.")
        message = format_error(f"job {name!r}", f"{problem} {type(e).__name__}: {e}{_where(e)}", fix=fix)
        failed = {"status": "oom" if oom else "error", "peak_bytes": None, "step_time_s": None, "method": None,
                  "message": message}
    # Out of the handler, the exception is gone; a collection frees the frames its traceback kept in cycles, with the
    # step's tensors (after an OOM, before anything else is tried). Only on failure: with torch loaded a full
    # collection costs tens of milliseconds.
    gc.collect()
    return failed


def _execute(job: ProfileJob) -> dict[str, Any]:
    """Unpickle and measure one job (in the worker or in process); never raises except KeyboardInterrupt/SystemExit."""
    try:
        target = pickle.loads(job.payload)
        inputs = pickle.loads(job.inputs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # anything a foreign __setstate__ raises
        # Pickled fine in the parent but cannot be rebuilt here: typically a class defined in a notebook's or
        # script's __main__, which a fresh interpreter cannot import. Same remedy as a pickling failure.
        message = format_error(f"module or inputs of job {job.name!r}",
                               f"cannot be unpickled in the worker process ({type(e).__name__}: {e})", fix=_TRAVEL_FIX)
        return {"status": "unpicklable", "peak_bytes": None, "step_time_s": None, "method": None, "message": message}
    return _measure(job.name, target, inputs, job.repeats, job.warmup, job.measure_memory)


def run_in_process(job_or_module: ProfileJob | nn.Module | FactorySpec, inputs: Sequence[Any] | None = None, *,
                   name: str | None = None, repeats: int = 3, warmup: int = 1,
                   measure_memory: bool = True) -> ProfileResult:
    """Measure in the calling process: the fallback for models that cannot travel to a worker.

    The measurement is the worker's (:func:`~fxmemopt.profiling.measure.measure_step`), and exceptions are returned as
    statuses ("error", "oom", "unpicklable" for a job whose payload does not unpickle) just as from a worker. But
    nothing bounds it: there is **no timeout** (a hanging model hangs the caller), and a crash or the OOM killer takes
    the caller down. ``KeyboardInterrupt`` and ``SystemExit`` propagate.

    Args:
        job_or_module: a :class:`ProfileJob` (then ``inputs`` and the options must not be given: the job has them),
            an ``nn.Module`` or a :class:`FactorySpec`.
        inputs: positional inputs for a module or factory spec.
        name: label of the result (default: the job's name, or the module's class name).
        repeats, warmup, measure_memory: see :class:`ProfileJob`.

    Returns:
        A :class:`ProfileResult`.

    Raises:
        InvalidInputsError: ``inputs`` is missing for a module, or given with a job.
        InvalidOptionError: ``job_or_module`` has the wrong type.
    """
    t0 = time.perf_counter()
    if isinstance(job_or_module, ProfileJob):
        if inputs is not None:
            raise InvalidInputsError(format_error(f"run_in_process({job_or_module.name!r})", "got inputs with a job",
                                                  fix="A ProfileJob carries its inputs; pass only the job."))
        job_name = name or job_or_module.name
        fields = _execute(job_or_module)
    elif isinstance(job_or_module, (nn.Module, FactorySpec)):
        job_name = name or type(job_or_module).__name__
        if isinstance(inputs, torch.Tensor) or not isinstance(inputs, (tuple, list)):
            raise InvalidInputsError(format_error(
                f"run_in_process({job_name!r}).inputs", "must be a tuple of positional inputs",
                expected="tuple", got=type(inputs).__name__, fix="Wrap a single tensor: (x,)."))
        fields = _measure(job_name, job_or_module, tuple(inputs), repeats, warmup, measure_memory)
    else:
        raise InvalidOptionError(format_error("run_in_process", "cannot profile this object",
                                              expected="ProfileJob, nn.Module or FactorySpec",
                                              got=type(job_or_module).__name__))
    result = ProfileResult(name=job_name, wall_s=time.perf_counter() - t0, **fields)
    log.info("job %r (in process): %s", job_name, _describe(result))
    return result


def _describe(result: ProfileResult) -> str:
    if result.ok:
        return f"ok, peak {result.peak_bytes} B, step {result.step_time_s:.4g} s, wall {result.wall_s:.3g} s"
    return f"{result.status} after {result.wall_s:.3g} s: {result.message}"


# --------------------------------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------------------------------

# Messages are pickled tuples. Parent -> worker: ("job", job_id, ProfileJob) | ("stop",).
# Worker -> parent: ("ready", pid) once after start-up | ("result", job_id, fields of ProfileResult).


def _tidy_worker() -> None:
    """Between jobs: free the last candidate's reference cycles and cached CUDA memory, then freeze the survivors.

    A full collection with torch loaded scans millions of objects (about 60 ms); ``gc.freeze()`` moves what survived
    (imported modules, caches) out of the collector's view, so the next collection scans only the next job's objects
    (well under a millisecond). Frozen objects are still freed by reference counting.
    """
    gc.collect()
    gc.freeze()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _serve(raw: bytes) -> tuple[int | None, dict[str, Any]] | None:
    """Handle one message from the parent: ``None`` for "stop", else ``(job_id, result fields)``.

    A function of its own so the job's objects are unreferenced when it returns, before :func:`_tidy_worker`.
    """
    job_id = None
    try:
        message = pickle.loads(raw)
        if message[0] == "stop":
            return None
        _, job_id, job = message
        return job_id, _execute(job)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a malformed message must not kill the loop
        return job_id, {"status": "error", "peak_bytes": None, "step_time_s": None, "method": None,
                        "message": f"worker could not handle the message ({type(e).__name__}: {e}). This is a bug in "
                                   f"fxmemopt; please report it."}


def _worker_main(conn: Connection) -> None:
    """The worker's loop: receive a job, measure it, send the result as plain data; until "stop" or EOF.

    Never raises out of the loop for a job's exception (those become statuses in :func:`_measure`); a broken pipe
    means the parent is gone, and the worker exits.
    """
    os.environ[WORKER_ENV_VAR] = "1"
    # Ctrl-C reaches the whole process group: let the parent handle it (it kills this worker) instead of both
    # processes unwinding and printing tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # Everything imported so far (torch, fxmemopt) lives as long as the worker: keep it out of collections.
        gc.freeze()
        conn.send_bytes(pickle.dumps(("ready", os.getpid()), protocol=_PICKLE_PROTOCOL))
        while True:
            try:
                raw = conn.recv_bytes()
            except (EOFError, OSError):
                return  # the parent closed its end or died: nothing left to do
            answer = _serve(raw)
            del raw
            if answer is None:
                return
            try:
                conn.send_bytes(pickle.dumps(("result", *answer), protocol=_PICKLE_PROTOCOL))
            except (EOFError, OSError):
                return
            # After answering, so the parent does not wait for it.
            _tidy_worker()
    finally:
        conn.close()


class _Outcome:
    """Why a wait ended without an answer (sentinels with a readable repr)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return f"<{self.what}>"


_TIMED_OUT = _Outcome("timed out")
_DIED = _Outcome("worker died")


def _exit_description(exitcode: int | None) -> str:
    """Say how a process ended, from ``Process.exitcode`` (negative: killed by that signal)."""
    if exitcode is None:
        return "closed its pipe but could not be reaped"
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        sig = signal.Signals(-exitcode).name
    except ValueError:
        sig = f"signal {-exitcode}"
    if -exitcode == signal.SIGKILL:
        # SIGKILL is what the kernel's OOM killer sends (also `kill -9` and container memory limits).
        return f"was killed (possibly out of memory) by {sig}"
    return f"was terminated by {sig}"


class WorkerPool:
    """One reusable worker process that measures :class:`ProfileJob`\\ s and can never hang the caller.

    The worker is started lazily by the first :meth:`run` and reused by the following ones; after a timeout or a
    crash it is stopped, and the next job starts a fresh one. Use the pool as a context manager, or call
    :meth:`close`; a closed pool cannot be used again (:meth:`run` raises :class:`WorkerPoolClosedError`): create a
    new one. Jobs run one at a time.

    Args:
        start_timeout_s: how long a fresh worker may take to start (a new interpreter importing torch and
            fxmemopt: typically 1-5 s) before its job is reported as "timeout".
        context: the multiprocessing start method, "spawn" (default) or "forkserver". "fork" is refused: forking a
            process that already runs torch's thread pools can deadlock the child.

    Raises:
        InvalidOptionError: ``start_timeout_s`` is not positive or ``context`` is not allowed.

    Example:
        >>> with WorkerPool() as pool:  # doctest: +SKIP
        ...     result = pool.run(make_job("candidate", model, (x,), timeout_s=60))
        >>> result.status, result.peak_bytes  # doctest: +SKIP
        ('ok', 123456)
    """

    def __init__(self, start_timeout_s: float = 120.0, context: str = "spawn") -> None:
        if not isinstance(start_timeout_s, (int, float)) or not start_timeout_s > 0:
            raise InvalidOptionError(format_error("WorkerPool.start_timeout_s", "is out of range",
                                                  expected="a number of seconds > 0", got=repr(start_timeout_s)))
        allowed = [m for m in ("spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]
        if context not in allowed:
            raise InvalidOptionError(format_error(
                "WorkerPool.context", "is not an allowed start method", expected=" or ".join(allowed),
                got=repr(context), fix="'fork' is refused: forking a process that runs torch threads can deadlock."))
        self.start_timeout_s = float(start_timeout_s)
        self.context = context
        self._ctx = multiprocessing.get_context(context)
        self._process: BaseProcess | None = None  # the current worker, if one was started and not yet reaped
        self._conn: Connection | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._next_job_id = 0
        self._last_start_s: float | None = None

    # -- properties ----------------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The current worker's process id, or ``None`` when no worker is running."""
        proc = self._process
        return proc.pid if proc is not None and proc.is_alive() else None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def last_start_s(self) -> float | None:
        """Seconds the most recently started worker took from ``start()`` to ready; ``None`` before the first."""
        return self._last_start_s

    # -- running jobs --------------------------------------------------------------------------------------------

    def run(self, job: ProfileJob | ProfileResult) -> ProfileResult:
        """Measure one job in the worker; every failure is returned as a status, never raised.

        Args:
            job: a :class:`ProfileJob`, or a :class:`ProfileResult` (what :func:`make_job` returns for an
                unpicklable model), which is returned unchanged without touching the worker.

        Returns:
            The :class:`ProfileResult`. Its ``wall_s`` includes the worker's start-up when one was started.

        Raises:
            WorkerPoolClosedError: the pool was closed.
            InvalidOptionError: ``job`` is neither a job nor a result.
            KeyboardInterrupt: while waiting; the worker is killed first (its state is unknown).
            InternalError: the worker answered out of protocol (a bug in fxmemopt); the worker is killed first.
        """
        if isinstance(job, ProfileResult):
            return job
        if not isinstance(job, ProfileJob):
            raise InvalidOptionError(format_error("WorkerPool.run", "cannot run this object",
                                                  expected="ProfileJob (see make_job)", got=type(job).__name__))
        with self._lock:
            if self._closed:
                raise WorkerPoolClosedError(format_error(
                    "WorkerPool", f"is closed and cannot run job {job.name!r}",
                    fix="Create a new WorkerPool (or keep every run() inside the pool's with block)."))
            t0 = time.perf_counter()
            try:
                result = self._run_locked(job, t0)
            except BaseException:
                # KeyboardInterrupt (or a bug) mid-job: the worker's state is unknown, so it must not be reused.
                self._stop_worker(graceful=False)
                raise
        log.info("job %r: %s", job.name, _describe(result))
        return result

    def run_many(self, jobs: Iterable[ProfileJob | ProfileResult]) -> list[ProfileResult]:
        """Run jobs one after the other in the same worker (restarted after a timeout or crash).

        Args:
            jobs: jobs, or ready results from :func:`make_job`, which are passed through.

        Returns:
            One result per job, in order.
        """
        return [self.run(job) for job in jobs]

    def _result(self, job: ProfileJob, t0: float, status: str, message: str) -> ProfileResult:
        return ProfileResult(job.name, status, None, None, None, time.perf_counter() - t0, message)

    def _run_locked(self, job: ProfileJob, t0: float) -> ProfileResult:
        if self.pid is None:
            self._stop_worker(graceful=False)  # reap a dead predecessor, if any
            failure = self._start_worker()
            if failure is not None:
                status, message = failure
                return self._result(job, t0, status, format_error(f"job {job.name!r}", message))
        proc, conn = self._process, self._conn
        assert proc is not None and conn is not None  # _start_worker succeeded
        pid = proc.pid
        self._next_job_id += 1
        job_id = self._next_job_id
        data = pickle.dumps(("job", job_id, job), protocol=_PICKLE_PROTOCOL)
        # The job's timeout starts once its worker is ready: start-up has its own bound (start_timeout_s).
        deadline = time.perf_counter() + job.timeout_s
        log.debug("job %r: sending %d bytes to worker %d", job.name, len(data), pid)
        answer = self._send(data, deadline)
        if answer is None:
            answer = self._wait(deadline)
        if answer is _TIMED_OUT:
            self._stop_worker(graceful=False)
            return self._result(job, t0, "timeout", format_error(
                f"job {job.name!r}", f"did not finish within timeout_s={job.timeout_s:g} s; worker {pid} was killed",
                fix="The next job starts a fresh worker. Raise timeout_s if the candidate is just slow."))
        if answer is _DIED:
            how = _exit_description(self._reap())
            return self._result(job, t0, "crashed", format_error(
                f"job {job.name!r}", f"the worker process {pid} {how} while running the job",
                fix="The job was not measured; the next job starts a fresh worker."))
        assert isinstance(answer, bytes)
        kind, answer_id, fields = pickle.loads(answer)
        if kind != "result" or answer_id != job_id:
            raise InternalError(f"worker {pid} answered job {job_id} ({job.name!r}) with {kind!r} for job {answer_id}")
        return ProfileResult(name=job.name, wall_s=time.perf_counter() - t0, **fields)

    # -- process management ----------------------------------------------------------------------------------

    def _start_worker(self) -> tuple[str, str] | None:
        """Start a worker and wait (at most ``start_timeout_s``) for its "ready" message.

        Returns:
            ``None`` when the worker is ready, else ``(status, message)`` for the job that needed it.
        """
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        # daemon: multiprocessing kills the worker when the parent exits, so an abandoned pool leaves no orphan.
        proc = self._ctx.Process(target=_worker_main, args=(child_conn,), name="fxmemopt-worker", daemon=True)
        t0 = time.perf_counter()
        proc.start()
        # Drop our copy of the worker's end: then the worker's death closes the pipe and our poll sees EOF at once.
        child_conn.close()
        self._process, self._conn = proc, parent_conn
        log.debug("started worker %d (%s)", proc.pid, self.context)
        answer = self._wait(t0 + self.start_timeout_s)
        if answer is _TIMED_OUT:
            pid = proc.pid
            self._stop_worker(graceful=False)
            return "timeout", (f"the worker process {pid} did not start within start_timeout_s="
                               f"{self.start_timeout_s:g} s and was killed (a fresh interpreter importing torch "
                               f"usually takes 1-5 s; raise start_timeout_s on a loaded machine)")
        if answer is _DIED:
            how = _exit_description(self._reap())
            return "crashed", (f"the worker process {how} during start-up (see its stderr). With the "
                               f"{self.context!r} start method the main script is imported again in the worker, so "
                               f"its top level must be guarded by `if __name__ == \"__main__\":`")
        assert isinstance(answer, bytes)
        kind, _pid = pickle.loads(answer)
        if kind != "ready":
            raise InternalError(f"worker {proc.pid} sent {kind!r} instead of 'ready'")
        self._last_start_s = time.perf_counter() - t0
        log.info("worker %d ready in %.2f s", proc.pid, self._last_start_s)
        return None

    def _send(self, data: bytes, deadline: float) -> _Outcome | None:
        """Send ``data`` to the worker, giving up at ``deadline``.

        A send blocks once the pipe's buffer is full until the worker reads; an idle worker always reads, but a
        stopped one would not, so the send runs in a thread whose wait is bounded. On timeout the caller kills the
        worker, which breaks the pipe and ends the thread.

        Returns:
            ``None`` when sent, :data:`_TIMED_OUT`, or :data:`_DIED` (broken pipe).
        """
        conn = self._conn
        assert conn is not None
        errors: list[BaseException] = []

        def send() -> None:
            try:
                conn.send_bytes(data)
            except BaseException as e:  # reported to the caller's thread below
                errors.append(e)

        sender = threading.Thread(target=send, name="fxmemopt-worker-send", daemon=True)
        sender.start()
        sender.join(max(0.0, deadline - time.perf_counter()))
        if sender.is_alive():
            return _TIMED_OUT
        if errors:
            if isinstance(errors[0], (OSError, EOFError)):
                return _DIED
            raise errors[0]
        return None

    def _wait(self, deadline: float) -> bytes | _Outcome:
        """Wait for the worker's next message until ``deadline``, noticing its death within :data:`POLL_INTERVAL_S`.

        Returns:
            The message's bytes, :data:`_TIMED_OUT` or :data:`_DIED`.
        """
        proc, conn = self._process, self._conn
        assert proc is not None and conn is not None
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return _TIMED_OUT
            try:
                # Messages are small and written in one piece, so once poll() says readable, recv returns at once
                # (or raises EOFError if the worker died mid-write).
                if conn.poll(min(POLL_INTERVAL_S, remaining)):
                    return conn.recv_bytes()
            except (EOFError, OSError):
                return _DIED
            if not proc.is_alive():
                # It may have answered just before exiting: take the answer if it is there.
                try:
                    if conn.poll(0):
                        return conn.recv_bytes()
                except (EOFError, OSError):
                    pass
                return _DIED

    def _reap(self) -> int | None:
        """After the worker died (or closed its pipe): reap it, forget it, and return its exit code."""
        proc = self._process
        exitcode = None
        if proc is not None:
            proc.join(REAP_TIMEOUT_S)
            exitcode = proc.exitcode
        self._stop_worker(graceful=False)  # kills it if it closed the pipe but lingers; no-op otherwise
        return exitcode

    def _stop_worker(self, graceful: bool) -> None:
        """Stop the current worker, if any, and reap it: a stop message if ``graceful``, then SIGTERM, then SIGKILL.

        Every join is bounded; a process that survives SIGKILL (stuck in the kernel) is logged and abandoned.
        """
        proc, conn = self._process, self._conn
        self._process = self._conn = None
        if proc is None:
            return
        try:
            if graceful and proc.is_alive() and conn is not None:
                try:
                    # Tiny message to an idle worker blocked in recv: cannot block on a full pipe.
                    conn.send_bytes(pickle.dumps(("stop",), protocol=_PICKLE_PROTOCOL))
                    proc.join(STOP_TIMEOUT_S)
                except (EOFError, OSError):
                    pass
            if proc.is_alive():
                proc.terminate()
                proc.join(KILL_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join(REAP_TIMEOUT_S)
            if proc.is_alive():
                log.warning("worker %d survived SIGKILL for %.0f s; abandoning it", proc.pid, REAP_TIMEOUT_S)
            else:
                log.debug("worker %d stopped (exit code %s)", proc.pid, proc.exitcode)
                proc.close()  # release the sentinel and the Popen object now rather than at garbage collection
        finally:
            if conn is not None:
                conn.close()

    def close(self) -> None:
        """Stop the worker (stop message, bounded join, then SIGTERM/SIGKILL) and mark the pool closed.

        Idempotent. Waits for a job running in another thread to finish (bounded by its timeout) first.
        """
        with self._lock:
            self._closed = True
            self._stop_worker(graceful=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort for a pool that was never closed: kill without waiting for a stop message and without the
        # lock (a finalizer must not block). Daemonic workers are also killed when the interpreter exits.
        try:
            if getattr(self, "_process", None) is not None:
                self._closed = True
                self._stop_worker(graceful=False)
        except Exception:  # modules may already be torn down at interpreter exit
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else (f"worker {self.pid}" if self.pid is not None else "idle")
        return f"WorkerPool({self.context}, {state})"
