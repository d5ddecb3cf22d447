"""The public entry point, :func:`optimize`: one recipe, one commented line per stage."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from .analysis.annotate import AnnotatedGraph, annotate
from .analysis.shapes import at_shapes
from .analysis.state import ModelState, ProbeResult, fresh_probe, has_memories, set_state
from .analysis.trace import make_graph_module, trace
from .analysis.units import Units, find_units
from .compat import check_saved_tensors_hooks_nesting, tree_leaves
from .errors import (
    DoesNotFitError,
    FxMemOptWarning,
    InvalidInputsError,
    InvalidOptionError,
    MemoryBudgetError,
    PlanError,
    RecordingError,
    first_line,
    format_error,
)
from .planning.costgraph import build_cost_graph, peak_over_calls, region_working_sets, simulate
from .planning.plan import Plan, check_plan, graph_fingerprint, guard_lines, inputs_signature
from .planning.regions import Region, find_regions, is_metadata, region_io, split_region
from .planning.search import (
    SPEED_PEAK_FRACTION,
    Decision,
    Options,
    SearchResult,
    applied,
    resolve_options,
    search,
    search_without_cost,
)
from .profiling.available import available_bytes
from .profiling.measure import StepMeasurement, measure_step
from .profiling.optimizer import distinct_storage_bytes, optimizer_state_bytes
from .profiling.scaled import TIMING_FRACTION, Recording, record_scaled, slice_batch
from .profiling.verify import slice_effects
from .profiling.workers import ProfileResult, WorkerPool, make_job, run_in_process
from .report.summary import InputReport, RegionReport, Summary
from .runtime.checkpoint import CheckpointRegion, RegionStats
from .runtime.fingerprint import CPU_BUDGET, sampled_cost_s
from .runtime.fingerprint import MODES as VALUE_CHECK_MODES
from .runtime.hierarchy import UncalledModulesCheck, uncalled_modules
from .runtime.packing import packed_nbytes
from .runtime.rewrite import rewrite

__all__ = ["optimize", "analyze", "Analysis", "Measurer"]

log = logging.getLogger("fxmemopt")


def _check_inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        got = "a Tensor" if isinstance(example_inputs, torch.Tensor) else type(example_inputs).__name__
        raise InvalidInputsError(format_error(
            "example_inputs", "must be a tuple of positional inputs, as for model(*example_inputs)",
            expected="tuple", got=got, fix="Wrap a single tensor: optimize(model, (x,))."))
    if not any(isinstance(a, torch.Tensor) for a in example_inputs):
        raise InvalidInputsError(format_error(
            "example_inputs", "contains no tensor", expected="at least one torch.Tensor",
            got=", ".join(type(a).__name__ for a in example_inputs) or "an empty tuple",
            fix="Pass example tensors shaped like real inputs, e.g. (torch.rand(T, N, C, H, W),)."))
    return tuple(example_inputs)


def _is_meta(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.device.type == "meta"


def _check_sample(inputs: tuple[Any, ...], sample_inputs: Any
                  ) -> tuple[tuple[Any, ...], tuple[Any, ...] | None, tuple[int, int] | None]:
    """``(inputs to run, inputs planned for, (batch dimension, batch))``: the examples themselves and ``None``s,
    or, for example inputs on the meta device, their real sample (:func:`optimize`'s ``sample_inputs``), checked
    to be the same inputs with fewer samples along one dimension."""
    if not any(_is_meta(a) for a in inputs):
        if sample_inputs is not None:
            raise InvalidOptionError(format_error(
                "sample_inputs", "is for example inputs on the meta device (plan for a size that cannot run here)",
                expected="None, with real example inputs", got=f"{len(tuple(sample_inputs))} sample input(s)",
                fix="leave sample_inputs out: real example inputs are sliced and extrapolated already "
                    "(recording='auto')"))
        return inputs, None, None
    where = [i for i, a in enumerate(inputs) if _is_meta(a)]
    if sample_inputs is None:
        raise InvalidInputsError(format_error(
            "example_inputs", f"input(s) {where} are on the meta device: they say the size to plan for, but value "
                              f"sets (spikes or not), node times and the small recordings need real values",
            expected="sample_inputs=(...): real inputs like the examples with a few samples (3 or more) along the "
                     "batch dimension", got="no sample_inputs",
            fix="pass sample_inputs=(x_small,), e.g. the first 4 samples of a real batch"))
    sample = _check_inputs(sample_inputs)
    dims: set[int] = set()
    for i, (a, b) in enumerate(zip(inputs, sample)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a != b:
                raise InvalidInputsError(format_error(
                    f"sample_inputs[{i}]", "is not like the example input at that position",
                    expected=repr(a)[:80], got=repr(b)[:80], fix="pass the same non-tensor arguments in both"))
            continue
        differ = [d for d in range(a.dim()) if a.dim() == b.dim() and a.shape[d] != b.shape[d]]
        if _is_meta(b) or a.dtype != b.dtype or a.dim() != b.dim() or len(differ) > 1 or \
                any(b.shape[d] > a.shape[d] for d in differ):
            raise InvalidInputsError(format_error(
                f"sample_inputs[{i}]", "is not a real sample of the example input at that position",
                expected=f"a real tensor of dtype {a.dtype} shaped {tuple(a.shape)} except fewer samples along one "
                         f"dimension", got=f"{b.device.type} tensor of dtype {b.dtype} shaped {tuple(b.shape)}",
                fix="slice a real batch: x[:, :4] for [T, N, ...] inputs, x[:4] for [N, ...]"))
        dims.update(differ)
    if len(dims) != 1 or len(sample) != len(inputs):
        raise InvalidInputsError(format_error(
            "sample_inputs", "must differ from the meta example inputs along exactly one dimension (the batch)",
            expected="one dimension", got=f"dimensions {sorted(dims)}" if len(sample) == len(inputs)
            else f"{len(sample)} inputs for {len(inputs)}",
            fix="pass the examples' shapes with fewer samples in the batch dimension only"))
    dim = dims.pop()
    batch = next(a.shape[dim] for a in inputs if isinstance(a, torch.Tensor) and a.dim() > dim)
    return sample, inputs, (dim, batch)


#: Module namespaces whose layers are kept whole on purpose: spikingjelly's ``layer.*`` wrappers are per-step
#: operations (their forwards branch on ``step_mode`` and reshape by ``x.shape``), stateless or stateful alike.
LIBRARY_LEAF_MODULES = ("spikingjelly.activation_based.layer",)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(format_error("model", "is not an nn.Module", expected="nn.Module",
                                              got=type(model).__name__))


def _library_leaves(model: nn.Module) -> tuple[type, ...]:
    """The library layer classes kept whole, except containers that hold a neuron (spikingjelly's
    ``OTTTSequential``, the whole feature extractor of its OTTT VGG), with every other instance of their class: kept
    whole, all its neurons would be one region recomputed at once. Its forward is generic, so it is traced into (and
    kept whole only if that fails)."""
    library = [m for m in model.modules() if type(m).__module__.startswith(LIBRARY_LEAF_MODULES) and m is not model]
    holders = {type(m) for m in library if any(has_memories(c) for c in m.modules() if c is not m)}
    return tuple({type(m) for m in library} - holders)


class ResetOnEntry:
    """Forward pre-hook: put stateful modules back to the state the model's own ``forward`` resets them to.

    Tracing records tensor operations only, so a ``reset_net(self)`` at the top of the user's ``forward`` would
    silently disappear from the optimized module; :func:`fxmemopt.analysis.state.probe` finds it, and this hook keeps
    it.
    """

    def __init__(self, resets: dict[str, dict[str, Any]]) -> None:
        self.resets = resets

    def __call__(self, gm: nn.Module, args: Any) -> None:
        for path, values in self.resets.items():
            m = gm.get_submodule(path)
            if has_memories(m) and callable(getattr(m, "reset", None)):
                m.reset()  # the module's own reset (spikingjelly / fxmemopt.snn convention)
                continue
            memories = m.__dict__.get("_memories")
            for k, v in values.items():  # plain modules: the values found at entry (fresh tensor copies)
                value = v.clone() if isinstance(v, torch.Tensor) else v
                if isinstance(memories, dict) and k in memories:
                    memories[k] = value
                else:
                    set_state(m, k, value)


def _keep_resets(gm: nn.Module, resets: dict[str, dict[str, Any]]) -> None:
    if resets:
        gm.register_forward_pre_hook(ResetOnEntry(resets))


def _load_plan(plan: Plan | str | os.PathLike[str] | None) -> tuple[Plan | None, str]:
    """``plan=`` as a Plan (or None) and a name for messages."""
    if plan is None or isinstance(plan, Plan):
        return plan, "plan"
    if isinstance(plan, str) and plan.lstrip().startswith("{"):
        return Plan.from_json(plan, "plan"), "plan"
    if isinstance(plan, (str, os.PathLike)):
        path = os.fspath(plan)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PlanError(format_error(f"plan file {path!r}", "cannot be read", got=str(e),
                                         fix="Pass the path of a file written with --save-plan or "
                                             "summary.save_plan().")) from e
        return Plan.from_json(text, f"plan file {path!r}"), f"plan file {path!r}"
    raise InvalidOptionError(format_error("plan", "has the wrong type", expected="a Plan, JSON text or a path",
                                          got=type(plan).__name__))


def _sig(signature: tuple[tuple[tuple[int, ...] | None, str], ...]) -> str:
    return ", ".join(f"{list(shape)} {dtype}" if shape is not None else dtype for shape, dtype in signature)


@contextlib.contextmanager
def _input_grads_kept(example_inputs: Any) -> Iterator[None]:
    """Put back the ``.grad`` of every example tensor afterwards (examples that require grad get gradients from the
    recorded and measured steps)."""
    tensors = [t for t in (example_inputs if isinstance(example_inputs, (tuple, list)) else ())
               if isinstance(t, torch.Tensor)]
    grads = [(t.grad, None if t.grad is None else t.grad.detach().clone()) for t in tensors]
    try:
        yield
    finally:
        for t, (g, value) in zip(tensors, grads):
            if g is not None:
                with torch.no_grad():
                    g.copy_(value)  # a step accumulates into an existing .grad in place
            t.grad = g


def _check_types(name: str, value: Any, allow_str: bool = False) -> tuple[Any, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, (tuple, list, set)) else (value,)
    for t in items:
        if not (isinstance(t, type) and issubclass(t, nn.Module)) and not (allow_str and isinstance(t, str)):
            raise InvalidOptionError(format_error(
                name, f"contains {t!r}", expected="nn.Module subclasses" + (" or module paths" if allow_str else ""),
                got=type(t).__name__, fix=f"Pass classes, e.g. {name}=(MyBlock,)."))
    return tuple(items)


def _input_report(graph: AnnotatedGraph, node: str, bits: int) -> InputReport:
    info = graph[node]
    if info.op == "get_attr":
        return InputReport(node, info.shape, info.dtype, str(info.value_set), 0, info.nbytes, 0,
                           "parameter or buffer")
    if not info.is_tensor:
        return InputReport(node, None, None, "n/a", 0, info.nbytes, info.nbytes, "not a single tensor: kept as is")
    if bits:
        stored = packed_nbytes(math.prod(info.shape or ()), bits)
        why = f"values in {info.value_set} (static: {info.static}; example: {info.observed})"
        return InputReport(node, info.shape, info.dtype, str(info.value_set), bits, info.nbytes, stored, why)
    why = "real values" if not info.value_set.is_int else "packing disabled (compress=False)"
    return InputReport(node, info.shape, info.dtype, str(info.value_set), 0, info.nbytes, info.nbytes, why)


def _unwraps_overshot(base: ProfileResult, unwrapped: ProfileResult, wrapped: ProfileResult,
                      opts: Options) -> str | None:
    """Why the measured plan after unwrapping must be given up for the plan before it (``None``: keep it).

    Unwraps may raise the peak up to the search's limit: the plan before unwrapping (level 4), half the unoptimized
    peak (``prefer="speed"``), the budget (``memory_budget``). Measured beyond it, the prediction was wrong.
    """
    if not (unwrapped.ok and wrapped.ok):
        return None
    allowed = wrapped.peak_bytes
    if opts.activation_budget is not None:
        allowed = max(allowed, opts.activation_budget)
    elif opts.prefer == "speed" and base.ok:
        allowed = max(allowed, int(base.peak_bytes * SPEED_PEAK_FRACTION))
    if unwrapped.peak_bytes <= allowed:
        return None
    return (f"unwrapping raised the measured peak to {unwrapped.peak_bytes} bytes, above the {allowed} bytes "
            f"allowed (plan before unwrapping: {wrapped.peak_bytes}); kept the plan before it")


@dataclass(frozen=True)
class Analysis:
    """What the analysis stages found, as one frozen value (the input of planning and rewriting).

    Attributes:
        found: the probe's findings (stateful modules, mutated buffers, resets in forward).
        stateful: stateful module path -> state attribute names.
        captured: the trace (graph, constants, leaf fallbacks, guards).
        traced: the traced graph as a GraphModule over the model's modules.
        annotated: the annotated graph (plain data).
        regions: the candidate regions.
        splits: region name -> the per-neuron regions it can be split into.
        units: the modules kept as modules (``keep_modules``).
    """

    found: Any
    stateful: dict[str, tuple[str, ...]]
    captured: Any
    traced: fx.GraphModule
    annotated: AnnotatedGraph
    regions: tuple[Region, ...]
    splits: dict[str, list[Region]]
    units: Units = Units()


def analyze(model: nn.Module, inputs: tuple[Any, ...], *, targets: tuple[type, ...] = (),
            leaf: tuple[type | str, ...] = (), declared: tuple[type, ...] = (), keep: tuple[type | str, ...] = (),
            progress: Callable[[str], None] | None = None, found: ProbeResult | None = None) -> Analysis:
    """The analysis stages: probe, trace, annotate, find regions, on the model in its fresh state. The model is left as
    it was.

    A model that comes with state from an earlier step (a training step ran, or a forward on another batch size,
    and nothing reset it) is analysed as if freshly reset: :func:`~fxmemopt.analysis.state.fresh_probe` resets every
    stateful module for the analysis and puts the caller's state back afterwards.

    Args:
        model: the user's model.
        inputs: checked example inputs.
        targets: module types whose instances are regions (empty: weight-norm-neuron layers).
        leaf: module types or paths to keep whole.
        declared: module types declared stateful.
        keep: module paths or types kept as modules (``keep_modules``): no region crosses their boundaries.
        progress: told the name of each stage as it starts.
        found: the probe of the model, made by the caller's ``fresh_probe`` block (which this call runs inside: the
            stages after analysis run on the same fresh state); ``None``: probe here, fresh, and put the caller's
            state back on return.

    Raises:
        StaleStateError: a stateful module holds state from an earlier step that cannot be reset (the message says
            which, and how to reset it).
        InvalidInputsError: the model fails on the example inputs.
        TraceError, TargetsMatchNothingError: as :func:`optimize`.
    """
    step = progress or (lambda what: None)
    if found is None:
        step("probing stateful modules")
        with fresh_probe(model, inputs, declared) as found:
            return analyze(model, inputs, targets=targets, leaf=leaf, declared=declared, keep=keep,
                           progress=progress, found=found)
    stateful = {p: tuple(n) for p, n in found.stateful.items()}
    # trace: fx graph with neurons and untraceable submodules as leaves
    step("tracing")
    with ModelState.capture(model, stateful).restored_after():  # tracing runs the model on the examples
        captured = trace(model, inputs, stateful_paths=stateful,
                         leaf_types=tuple(t for t in leaf if isinstance(t, type)) + _library_leaves(model),
                         leaf_paths=[p for p in leaf if isinstance(p, str)])
    traced = make_graph_module(model, captured.graph, type(model).__name__, extra=captured.constants)
    # annotate: shapes, bytes, spike value sets, time-chunkable neurons (one no_grad forward, state restored)
    step("annotating shapes and spike value sets")
    annotated = annotate(traced, inputs, stateful, found.entry_dead)
    # regions: weight-norm-neuron layers, or the instances of `targets` (and how those split per neuron)
    # (never across the boundary of a module kept as a module)
    units = find_units(captured.graph, model, keep)
    unit_of = units.unit_of()
    target_paths = {p for p, m in model.named_modules() if isinstance(m, targets)} if targets else None
    regions = find_regions(annotated, target_paths, ", ".join(t.__name__ for t in targets), unit_of)
    used = {r.name for r in regions}
    splits = {r.name: parts for r in regions if len(r.stateful) > 1
              for parts in [split_region(annotated, r, used, unit_of)] if parts}
    return Analysis(found, stateful, captured, traced, annotated, tuple(regions), splits, units)


# ---- the stages after analysis: each takes frozen values and returns frozen values ---------------------------------

#: ``measure=`` may be a function: it is given ``[(name, module), ...]`` ("unoptimized", "optimized", and
#: "before-unwrap" when unwrapping is to be confirmed) and the example inputs, and returns one
#: :class:`~fxmemopt.profiling.workers.ProfileResult` per candidate, in order (a measurement fxmemopt does not
#: know how to make: a CUDA machine, a cluster job; tests inject fixed figures this way).
Measurer = Callable[[list[tuple[str, nn.Module]], tuple[Any, ...]], Sequence[ProfileResult]]


@dataclass(frozen=True)
class Request:
    """What the user asked :func:`optimize` for, checked: the inputs, the resolved options, and how to plan,
    measure and report."""

    inputs: tuple[Any, ...]
    opts: Options
    saved: Plan | None
    source: str
    measure: str | Measurer | None
    measure_timeout_s: float
    predict: bool
    targets: tuple[type, ...]
    leaf: tuple[type | str, ...]
    declared: tuple[type, ...]
    keep: tuple[type | str, ...] = ()
    value_check: str | None = None
    #: how the step behind the cost graph is recorded (:mod:`fxmemopt.profiling.scaled`)
    recording: str = "auto"
    #: the example inputs planned for, where analysis and recordings run on a sample of them (``inputs``): on the
    #: meta device (with the user's ``sample_inputs``), or real and sliced (:func:`_sliced`); ``None``: ``inputs``
    planned_for: tuple[Any, ...] | None = None
    #: ``(batch dimension, batch)`` of ``planned_for``
    planned_batch: tuple[int, int] | None = None

    @property
    def meta(self) -> bool:
        """The examples are on the meta device: no step of their size can run here."""
        return self.planned_for is not None and any(_is_meta(a) for a in self.planned_for)

    @property
    def full(self) -> tuple[Any, ...]:
        """The example inputs, at the size planned for (real or meta)."""
        return self.planned_for if self.planned_for is not None else self.inputs


@dataclass(frozen=True)
class Built:
    """The rewritten module that ran a training step: its region counters, the plan it was built from, and the
    regions left out because they failed that step (``(region, reason)``)."""

    gm: fx.GraphModule
    stats: dict[str, RegionStats]
    plan: Plan
    failed: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    #: regions left out because the measured peak of a step with them was above the unoptimized step's
    over_peak: tuple[tuple[str, str], ...] = ()
    #: the validation step's measurement (CPU: storage tracker, with timeline), when it ran and nothing failed
    step: StepMeasurement | None = None
    #: fingerprints the recompute value check took in the validation step (forward and recomputation)
    fingerprints: int = 0
    #: the recompute value check every region of ``gm`` runs (:func:`_with_value_check`), and the note saying why;
    #: a module rebuilt from another plan (:func:`_rebuilt`) runs the same, so what is measured is what is returned
    value_check: str | None = None
    value_check_note: str = ""
    #: the measured step at the examples' size ran out of memory here (the error's first line; empty: it did not)
    oom: str = ""
    #: the never-worse check's measurements at the examples' size (:func:`_kept_below`; storage tracker): the
    #: unoptimized step's peak and the returned module's, ``None`` where that step was not run
    checked_before: int | None = None
    checked_after: int | None = None


@dataclass(frozen=True)
class Measured:
    """The confirming measurement: the unoptimized and the returned module, where they were measured, the
    candidates rejected, and whether the plan before unwrapping was restored (its measured peak was lower)."""

    before: ProfileResult
    after: ProfileResult
    where: str
    rejected: tuple[tuple[str, str, str], ...]
    reverted: bool


def _stage_logger(started: float, progress: Callable[[str], None] | None) -> Callable[[str], None]:
    """``step(what)``: logs the stage starting (and tells ``progress``), with the time since ``started``."""
    def step(what: str) -> None:
        log.debug("fxmemopt: %.2f s: %s", time.perf_counter() - started, what)
        if progress is not None:
            progress(f"[{time.perf_counter() - started:6.1f} s] {what}")
    return step


def _request(model: Any, example_inputs: Any, plan: Plan | str | os.PathLike[str] | None, measure: Any,
             measure_timeout_s: float, calls_per_step: Any, predict: bool, targets: Any, leaf_modules: Any,
             stateful_modules: Any, keep_modules: Any, opts: Options, value_check: Any = None,
             recording: Any = "auto", sample_inputs: Any = None) -> Request:
    """Check what :func:`optimize` was given (typed errors naming what is wrong) into a :class:`Request`."""
    inputs, planned_for, planned_batch = _check_sample(_check_inputs(example_inputs), sample_inputs)
    _check_model(model)
    if planned_for is not None and measure in ("worker", "in-process"):
        raise InvalidOptionError(format_error(
            "measure", "cannot measure a step on example inputs on the meta device", expected="None, or a function",
            got=repr(measure), fix="measure the result on the training machine (fxmemopt.measure_step), or pass a "
                                   "Measurer function that runs there"))
    if measure not in (None, "worker", "in-process") and not callable(measure):
        raise InvalidOptionError(format_error("measure", "is not a known measuring mode",
                                              expected='None, "worker", "in-process" or a function (see Measurer)',
                                              got=repr(measure)))
    if isinstance(calls_per_step, bool) or not isinstance(calls_per_step, int) or calls_per_step < 1:
        raise InvalidOptionError(format_error("calls_per_step", "must be a positive int", expected=">= 1",
                                              got=repr(calls_per_step),
                                              fix="Pass the number of module calls per training step (T for a "
                                                  "single-step network called once per time step)."))
    if not measure_timeout_s > 0:
        raise InvalidOptionError(format_error("measure_timeout_s", "must be positive", expected="> 0",
                                              got=repr(measure_timeout_s)))
    if value_check is not None and value_check not in VALUE_CHECK_MODES:
        raise InvalidOptionError(format_error("recompute_check", "is not a value-check mode",
                                              expected=f"None (the device's default) or one of {VALUE_CHECK_MODES}",
                                              got=repr(value_check)))
    if recording not in RECORDINGS:
        raise InvalidOptionError(format_error("recording", "is not a recording mode", expected=f"one of {RECORDINGS}",
                                              got=repr(recording)))
    saved, source = _load_plan(plan)
    return Request(inputs, dataclasses.replace(opts, calls_per_step=calls_per_step), saved, source, measure,
                   measure_timeout_s, predict, _check_types("targets", targets),
                   _check_types("leaf_modules", leaf_modules, allow_str=True),
                   _check_types("stateful_modules", stateful_modules),
                   _check_types("keep_modules", keep_modules, allow_str=True), value_check, recording, planned_for,
                   planned_batch)


#: ``optimize(recording=...)``: see :mod:`fxmemopt.profiling.scaled`.
RECORDINGS = ("auto", "full", "reduced")


def _cost_graph(an: Analysis, req: Request, step: Callable[[str], None]
                ) -> tuple[nx.DiGraph | None, list[str], Recording | None]:
    """The cost graph from the recorded unoptimized step (when predicting, or when the search needs it), notes, and
    how the step was recorded: at small batches, extrapolated to the examples' (``recording="auto"``, where the
    batch can be sliced: :mod:`fxmemopt.profiling.scaled`), or at the examples' size.

    Prediction informs; a failure to record never stops an exact rewrite from being returned (the search falls
    back to level 1, and a note says why), except a ``recording="reduced"`` that cannot be had."""
    notes = list(req.opts.notes)
    needed = req.saved is None and (req.opts.level >= 2 or req.opts.memory_budget is not None)
    if not (req.predict or needed):
        return None, notes, None
    step("recording a training step for the cost model")
    try:
        trace, how = record_scaled(an.traced, req.inputs, an.stateful, recording=req.recording,
                                   time_steps=an.annotated.time_steps, planned_for=req.planned_batch, meta=req.meta)
        return build_cost_graph(an.annotated, trace), notes, how
    except RecordingError:
        raise
    except Exception as e:
        log.warning("fxmemopt: could not record a training step to predict memory: %s", e)
        notes.append(f"no prediction: recording a training step on the example inputs failed with "
                     f"{type(e).__name__}: {e}; the search fell back to level 1")
        return None, notes, None


#: Where the examples' batch is at least this, tracing, annotation and the recordings run on their first samples
#: (:func:`_sliced`): 2x the 6 samples that recordings at batch 2, 4 and 6 need.
SLICED_ANALYSIS_MIN_BATCH = 12


def _sliced(req: Request) -> Request:
    """``req`` to analyse on the examples' first samples: where their batch is large (at least
    :data:`SLICED_ANALYSIS_MIN_BATCH`, and ``recording`` is not ``"full"``), ``inputs`` becomes the first quarter
    of the batch (6 samples at least: :data:`~fxmemopt.profiling.scaled.TIMING_FRACTION`, the batch node times
    are measured at) and ``planned_for`` the examples. Nothing then runs at the examples' size before the plan is
    made: a no-grad forward there holds about what the optimized step does (``optimize``'s own peak would be
    above the module it returns).

    The batch dimension is guessed (dimension 1 of a 3- or 5-dimensional ``[T, N, ...]`` input, else 0); a wrong
    guess fails the byte-exact check of the recordings and :func:`_analysed` analyses at full size instead."""
    if req.planned_for is not None or req.recording == "full":
        return req
    first = next((a for a in req.inputs if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
    if first is None:
        return req
    dim = 1 if first.dim() in (3, 5) else 0
    batch = first.shape[dim]
    if batch < SLICED_ANALYSIS_MIN_BATCH:
        return req
    size = min(batch, max(6, -(-batch // TIMING_FRACTION)))
    return dataclasses.replace(req, inputs=slice_batch(req.inputs, dim, size, batch), planned_for=req.inputs,
                               planned_batch=(dim, batch))


def _does_not_fit_fix(on_a_slice: bool) -> str:
    """What to do where analysing the model ran out of memory (:class:`~fxmemopt.errors.DoesNotFitError`)."""
    if on_a_slice:
        return ("This was a slice of the examples' batch already: give optimize the memory of one forward on it, or "
                "pass smaller examples")
    return ("fxmemopt analyses a model on a few samples of its batch where it can (dimension 1 of a 3- or "
            "5-dimensional input, else 0, from 12 samples on); this one ran whole: its batch is small, it fixes its "
            "batch size (sinabs' IAFSqueeze(batch_size=...), a forward that unflattens with a stored batch size), "
            "or its batch is another dimension. Let the model read its batch size from its input, with time-major "
            "[T, N, ...] inputs, or give optimize the memory of one forward at this size")


def _analysed(model: nn.Module, req: Request, found: ProbeResult, step: Callable[[str], None]
              ) -> tuple[Analysis, nx.DiGraph | None, list[str], Recording | None, Request]:
    """Analysis and cost graph: on ``req.inputs``, and where those are a sample of ``req.planned_for``, every node's
    shape and bytes carried to the examples' size (:func:`~fxmemopt.analysis.shapes.at_shapes`) and the step
    extrapolated to their batch. Where real examples were sliced (:func:`_sliced`) and that cannot be had (a model
    fixing its batch size, a wrong batch dimension), analysis runs again at the examples' size; the request
    returned says which inputs were used."""
    def analysis(inputs: tuple[Any, ...], why_whole: str | None = None) -> Analysis:
        try:
            return analyze(model, inputs, targets=req.targets, leaf=req.leaf, declared=req.declared, keep=req.keep,
                           progress=step, found=found)
        except Exception as e:
            if not _is_oom(e):
                raise
            shapes = ", ".join(str(tuple(a.shape)) for a in inputs if isinstance(a, torch.Tensor))
            why = f", since a slice of their batch did not extrapolate ({why_whole})" if why_whole else ""
            raise DoesNotFitError(format_error(
                f"model {type(model).__name__}", f"analysing it (a forward on inputs of {shapes}{why}) ran out of "
                f"memory here: {first_line(e)}",
                fix=_does_not_fit_fix(req.planned_for is not None))) from e

    an = analysis(req.inputs)
    if req.planned_for is not None:
        try:
            step("carrying every node's shape to the examples' batch")
            carried = at_shapes(an.annotated, an.traced, model, an.stateful, req.inputs, *req.planned_batch)
            dim, batch = req.planned_batch
            size = next(a.shape[dim] for a in req.inputs if isinstance(a, torch.Tensor) and a.dim() > dim)
            if not req.meta and dim == 0 and size in an.annotated.time_steps:
                raise RecordingError(f"dimension 0 of {size} samples is a neuron's time steps")  # sliced T, not N
            an = dataclasses.replace(an, annotated=carried)
            cost, notes, recording = _cost_graph(an, req, step)
            return an, cost, notes, recording, req
        except RecordingError as e:
            if req.meta:
                raise
            log.info("fxmemopt: analysing at the examples' size (a slice did not extrapolate: %s)", first_line(e))
            req = dataclasses.replace(req, inputs=req.planned_for, planned_for=None, planned_batch=None)
            an = analysis(req.inputs, why_whole=first_line(e))
    cost, notes, recording = _cost_graph(an, req, step)
    return an, cost, notes, recording, req


def _choose(an: Analysis, cost: nx.DiGraph | None, req: Request, step: Callable[[str], None]) -> SearchResult:
    """The plan: a saved one as is (checked against this graph), or the search's; stamped with the graph's
    fingerprint, the inputs' signature and the trace's guards (what the plan file records)."""
    signature = inputs_signature(req.full)
    if req.saved is not None:
        check_plan(req.saved, an.annotated, req.source, guard_lines(an.captured.guards))
        if req.saved.inputs and req.saved.inputs != signature:
            warnings.warn(f"fxmemopt: {req.source} was made for example inputs {_sig(req.saved.inputs)}, these are "
                          f"{_sig(signature)}; it applies exactly, but its memory predictions were for the "
                          f"other shapes", FxMemOptWarning, stacklevel=4)
        result = applied(req.saved, cost, req.source)
    elif cost is not None:
        step(f"searching plans (level {req.opts.level}, {len(an.regions)} candidate regions)")
        result = search(cost, list(an.regions), dict(an.splits), req.opts, progress=step)
    else:
        result = search_without_cost(list(an.regions), an.annotated, req.opts)
    for note in result.notes:
        warnings.warn(f"fxmemopt: {note}", FxMemOptWarning, stacklevel=4)
    return _stamped(an, req, result)


def _stamped(an: Analysis, req: Request, result: SearchResult) -> SearchResult:
    """``result`` with its plans stamped with the graph's fingerprint, the inputs' signature and the trace's guards
    (what the plan file records)."""
    stamp = {"graph_fingerprint": graph_fingerprint(an.annotated),
             "inputs": inputs_signature(req.full), "guards": guard_lines(an.captured.guards)}
    return dataclasses.replace(
        result, plan=dataclasses.replace(result.plan, **stamp),
        pre_unwrap=dataclasses.replace(result.pre_unwrap, **stamp) if result.pre_unwrap is not None else None)


def _build(model: nn.Module, an: Analysis, plan: Plan) -> tuple[fx.GraphModule, dict[str, RegionStats]]:
    """Rewrite: ``plan``'s checkpoint regions in a new GraphModule sharing the model's modules."""
    gm, stats = rewrite(model, an.captured.graph, an.captured.constants, an.annotated, plan, an.stateful,
                        an.found.mutated_buffers, type(model).__name__, an.units, an.found.entry_dead)
    _keep_resets(gm, an.found.resets)
    uncalled = uncalled_modules(gm)
    if uncalled:  # FSDP2's fully_shard on a block whose code was inlined: a clear error, not a DTensor one
        gm.register_forward_pre_hook(UncalledModulesCheck(uncalled, gm.fxmemopt_units))
    return gm, stats


def _step_error(gm: nn.Module, inputs: tuple[Any, ...], measured: list[StepMeasurement] | None = None
                ) -> BaseException | None:
    """Run one training step of ``gm`` (state, buffers, gradients and RNG restored); its exception, if any. With
    ``measured`` (CPU inputs), the step runs under the storage tracker and its measurement is appended (the step the
    measured never-worse check reads first, :func:`_kept_below`)."""
    try:
        if measured is not None:
            measured.append(measure_step(gm, inputs, repeats=0, warmup=0, timeline=True))
        else:
            measure_step(gm, inputs, repeats=0, warmup=1, measure_memory=False)
    except Exception as e:
        return e
    return None


def _on_cpu(inputs: Sequence[Any]) -> bool:
    return all(t.device.type == "cpu" for t in tree_leaves(list(inputs))
               if isinstance(t, torch.Tensor))


def _regions_in(error: BaseException, names: set[str]) -> set[str]:
    """Regions whose forward or recomputation is on the traceback of ``error``."""
    found: set[str] = set()
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        region = owner if isinstance(owner, CheckpointRegion) else getattr(owner, "region", None)
        if isinstance(region, CheckpointRegion) and region.spec.name in names:
            found.add(region.spec.name)
    return found


def set_value_check(gm: nn.Module, mode: str | None) -> None:
    """Set the recompute value check (NOTE [Checkpoint region invariants], Rule 3) of every region in ``gm``."""
    for m in gm.modules():
        if isinstance(m, CheckpointRegion):
            m.value_check = mode


def _with_value_check(built: Built, result: SearchResult, req: Request) -> Built:
    """Choose the returned module's recompute value check (Rule 3), set it on ``built.gm`` and say which in a note.

    Asked for: as asked. By default ``"sampled"``, except on CPU when its predicted cost (the fingerprints the
    validation step took, at the sampled fingerprint's cost measured in this process) is above
    :data:`~fxmemopt.runtime.fingerprint.CPU_BUDGET` of the predicted step time: there the check stays off (on CPU
    recomputation runs the forward's own kernels; the validation step has checked every value in full).

    Chosen before any measurement of the result (never worse, measured; ``measure=``): the fingerprints a step
    keeps are live bytes too, and the measured peak is the returned module's."""
    mode, note = req.value_check, f"recompute value check: {req.value_check} (asked)"
    if mode is None:
        mode, note = "sampled", "recompute value check: sampled (the default)"
        step = result.prediction.step_time_s if result.prediction is not None else None
        if _on_cpu(req.inputs) and step:
            share = built.fingerprints * sampled_cost_s() / step
            if share > CPU_BUDGET:
                mode = "off"
                note = (f"recompute value check: off, predicted at {share:.1%} of the step time on CPU (over "
                        f"{CPU_BUDGET:.0%}); the validation step checked every value; recompute_check='sampled' turns "
                        f"it on")
            else:
                note = f"recompute value check: sampled, predicted at {share:.1%} of the step time"
    set_value_check(built.gm, mode)
    return dataclasses.replace(built, value_check=mode, value_check_note=note)


def _rebuilt(model: nn.Module, an: Analysis, plan: Plan, like: Built) -> tuple[fx.GraphModule,
                                                                                dict[str, RegionStats]]:
    """:func:`_build` ``plan`` with ``like``'s recompute value check."""
    gm, stats = _build(model, an, plan)
    set_value_check(gm, like.value_check)
    return gm, stats


def _full_check(gm: fx.GraphModule) -> fx.GraphModule:
    set_value_check(gm, "full")
    return gm


def _validation_inputs(inputs: tuple[Any, ...], recording: Recording | None) -> tuple[Any, ...]:
    """What the validation step runs on: where the step was recorded at small batches (it may not fit at the
    examples' size), a slice of ``2s`` samples of the examples (the same T: every region kind, every recomputation
    and state carried, as at full size); else the examples."""
    if recording is None or recording.method != "extrapolated":
        return inputs
    return slice_batch(inputs, recording.batch_dim, recording.sizes[1], recording.sample_batch or recording.batch)


def _validated(model: nn.Module, an: Analysis, plan: Plan, inputs: tuple[Any, ...]) -> Built:
    """Build ``plan`` and run one training step of it (also the warm-up); unwrap every region that fails in it,
    until it runs.

    The step checks every value recomputation reproduces against the forward's, in full (every element of every
    saved tensor: :mod:`fxmemopt.runtime.fingerprint`), whatever the returned module will check per step: a region
    whose recomputation differs (state it does not restore, a nondeterministic kernel) fails here, on the example,
    and keeps its activations instead.
    A region that fails (a recomputation mismatch from a forward that is not a deterministic function of its
    inputs and state, an input kind the runtime cannot keep, a library's own error under checkpointing) is named by
    the traceback, or else by trying each region alone; it is left out of the plan and the step runs again. When
    the model's own training step fails on the examples the same way (nothing requires grad, say), that is not the
    regions' doing: they are kept, and a note says so.
    """
    gm, stats = _build(model, an, plan)
    set_value_check(gm, "full")
    failed: list[tuple[str, str]] = []
    notes: list[str] = []
    measured: list[StepMeasurement] | None = [] if _on_cpu(inputs) else None
    error: BaseException | None = None
    while plan.regions:
        error = _step_error(gm, inputs, measured)
        if error is None:
            break
        if not failed and _step_error(model, inputs) is not None:
            notes.append(f"the validation training step (sum of the outputs, backward) fails on the model itself, "
                         f"unoptimized: {first_line(error, 300)}; the regions were kept (they run exactly as the "
                         f"model does)")
            break
        names = {r.name for r in plan.regions}
        bad = _regions_in(error, names)
        if not bad:  # not on the traceback (raised from autograd's engine): try each region on its own
            bad = {r.name for r in plan.regions if _step_error(_full_check(_build(
                model, an, dataclasses.replace(plan, regions=(r,)))[0]), inputs) is not None}
        bad = bad or names  # the step fails whichever region runs: leave all of them out
        why = first_line(error, 300)
        failed += [(n, why) for n in sorted(bad)]
        log.warning("fxmemopt: region(s) %s failed a training step (%s); left unoptimized", ", ".join(sorted(bad)),
                    why)
        plan = dataclasses.replace(plan, regions=tuple(r for r in plan.regions if r.name not in bad))
        gm, stats = _build(model, an, plan)
        set_value_check(gm, "full")
    set_value_check(gm, None)
    fingerprints = sum(st.fingerprints for st in stats.values())
    for st in stats.values():
        st.reset()
    if failed:
        warnings.warn(f"fxmemopt: {len(failed)} region(s) failed a training step on the example inputs and were "
                      f"left unoptimized: " + "; ".join(f"{n} ({why})" for n, why in failed),
                      FxMemOptWarning, stacklevel=4)
    return Built(gm, stats, plan, tuple(failed), tuple(notes),
                 step=measured[-1] if measured and not failed and error is None else None, fingerprints=fingerprints)


#: Measured never-worse (:func:`_kept_below`): regions taken out one at a time, each followed by a measured step,
#: before the rest are taken out together. Each round is one training step under the storage tracker.
MEASURED_NEVER_WORSE_ROUNDS = 3
#: The recorder's peak is within a few hundred bytes of :func:`fxmemopt.measure_step`'s: a result this far below
#: it (a share of it, and at least :data:`RECORDED_PEAK_SLACK` bytes: on a tiny model a few hundred bytes are more
#: than the share) needs no step of the model to compare with.
RECORDED_PEAK_MARGIN = 0.01
RECORDED_PEAK_SLACK = 4096
#: With an extrapolated recording, the result's step is measured only where its predicted peak is above this share
#: of the unoptimized one: below, never worse holds unless the prediction were off by a third (measured errors stay
#: within about 10%: docs/benchmarks.md), and the measurement would be one more full-size step of optimize.
EXTRAPOLATED_MEASURE_ABOVE = 0.75


def _region_at_peak(timeline: Sequence[tuple[str, int]], names: set[str]) -> str | None:
    """The region whose tensors are the likeliest cause of a step's peak: the last region event (forward entry or
    exit, recomputation start or end) before the op at which live bytes were highest."""
    if not timeline:
        return None
    at = max(range(len(timeline)), key=lambda k: timeline[k][1])
    for label, _ in reversed(timeline[:at + 1]):
        region = label.split(":", 2)[-1] if label.startswith("mark:") else ""
        if region in names:
            return region
    return None


def _kept_below(model: nn.Module, an: Analysis, built: Built, cost: nx.DiGraph | None, req: Request,
                recording: Recording | None = None) -> Built:
    """Never worse, measured: one training step of the result under the storage tracker, against one of the
    unoptimized model (same tracker, same inputs, :func:`fxmemopt.measure_step` both). While its peak is above
    that, the region active at the peak (:func:`_region_at_peak`) is left out and the step measured again; after
    :data:`MEASURED_NEVER_WORSE_ROUNDS` such rounds, or when no region is active at the peak, all the regions left
    are (the unoptimized step: never worse, at a bounded cost).

    The search already leaves out the regions the cost model predicts to raise the peak; this catches what the model
    gets wrong (a recomputation's transient, a packing that fell back). CPU only: on CUDA the allocator's peak is not
    the recorder's quantity, and the prediction stands. Skipped with ``never_worse=False``, without a recording (a
    saved plan), and for a network called several times per step (``calls_per_step``: one call's peak is not the
    step's).

    Where the step was recorded at small batches and extrapolated (``recording``), the unoptimized step is never
    run at the examples' size (it may not fit: that is why fxmemopt was called): its peak is the extrapolated
    recording's, exact to the byte where the check at a third size passed. The result's own step runs at full size
    (its peak is the one the user will train with) where its predicted peak is above
    :data:`EXTRAPOLATED_MEASURE_ABOVE` of the unoptimized one; when even that does not fit here, the prediction
    stands and a note says so."""
    if cost is None or not req.opts.never_worse or not built.plan.regions or req.opts.calls_per_step != 1 or \
            not _on_cpu(req.inputs):
        return built
    if req.meta:  # no step of that size runs here: the search's predicted judgement stands
        return dataclasses.replace(built, notes=built.notes + (
            "never worse: judged on the predicted peaks (the example inputs are on the meta device; no step at "
            "their size ran here: measure the result where it trains, fxmemopt.measure_step)",))
    recorded = int(cost.graph["peak_bytes"])
    extrapolated = recording is not None and recording.method == "extrapolated"
    predicted = simulate(cost, built.plan).peak_bytes if extrapolated else None
    if predicted is not None and predicted <= EXTRAPOLATED_MEASURE_ABOVE * recorded:
        # Far below the unoptimized peak: a prediction error of that size is not expected (docs), unless the
        # validation step, measured on a slice, kept most of the unoptimized peak recorded at that slice's size:
        # then the cost model misses something here, and the result is measured at full size after all.
        kept = _kept_at_validation(built, recording)
        if kept is None or kept <= EXTRAPOLATED_MEASURE_ABOVE:
            return built
        built = dataclasses.replace(built, notes=built.notes + (
            f"never worse, measured: the validation step on a slice kept {kept:.0%} of the unoptimized peak "
            f"recorded at that size, against a predicted {predicted / recorded:.0%} "
            f"at the examples' size: the result's step was measured at the examples' size",))
    base: int | None = recorded if extrapolated else None
    measured_base: int | None = None
    plan, gm, stats, out, oom = built.plan, built.gm, built.stats, [], ""
    final: int | None = None
    notes = list(built.notes)
    for attempt in range(MEASURED_NEVER_WORSE_ROUNDS + 1):
        try:
            peak = built.step if attempt == 0 and built.step is not None and not extrapolated else \
                measure_step(gm, req.full, repeats=0, warmup=0, timeline=True)
        except Exception as e:  # the step fails on the model itself too (the validation's note says so), or does
            if extrapolated:   # not fit in this process's memory: nothing to compare; the prediction stands
                notes.append(f"never worse, measured: the optimized step at the examples' size could not be "
                             f"measured here ({first_line(e, 200)}); the predicted peak stands")
                oom = first_line(e, 200) if _is_oom(e) else ""
            break
        if base is None and peak.peak_bytes > recorded - max(RECORDED_PEAK_MARGIN * recorded, RECORDED_PEAK_SLACK):
            try:  # close to the recorded peak: compare with the same measurement of the model itself
                base = measured_base = measure_step(model, req.full, repeats=0, warmup=0).peak_bytes
            except Exception:
                base = recorded
        if peak.peak_bytes <= (recorded if base is None else base):
            final = peak.peak_bytes
            break
        base = recorded if base is None else base
        names = {r.name for r in plan.regions}
        culprit = _region_at_peak(peak.timeline, names)
        # the last round (or no region at the peak): all of them, which is the unoptimized step
        bad = {culprit} if culprit and attempt < MEASURED_NEVER_WORSE_ROUNDS else names
        why = f"raised the measured peak: {peak.peak_bytes} bytes with it, {base} unoptimized"
        out += [(n, why) for n in sorted(bad)]
        plan = dataclasses.replace(plan, regions=tuple(r for r in plan.regions if r.name not in bad))
        gm, stats = _rebuilt(model, an, plan, built)
        if not plan.regions:
            break
    for st in stats.values():  # the measured steps are not the user's
        st.reset()
    if not plan.regions and out:
        final = measured_base  # every region left out: the returned module is the unoptimized step
    checked = dict(checked_before=measured_base, checked_after=final)
    if not out:
        return dataclasses.replace(built, notes=tuple(notes), oom=oom, **checked)
    warnings.warn(f"fxmemopt: never worse, measured: {len(out)} region(s) left out, a training step with them peaked "
                  f"above the unoptimized step ({'; '.join(f'{n}: {why}' for n, why in out)}); never_worse=False "
                  f"keeps them", FxMemOptWarning, stacklevel=4)
    return dataclasses.replace(built, gm=gm, stats=stats, plan=plan, over_peak=tuple(out), oom=oom, **checked)


def _resident(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, int]:
    """The bytes a training step's peak sits on but the storage tracker does not count (they exist before the step
    starts): the model's parameters and buffers and the example inputs, each storage once."""
    seen: set[Any] = set()
    return {"parameters": distinct_storage_bytes(model.parameters(), seen),
            "buffers": distinct_storage_bytes((b for b in model.buffers() if b is not None), seen),
            "inputs": distinct_storage_bytes((t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)), seen)}


def _budget_for_the_step(model: nn.Module, req: Request, optimizer_state: int | None) -> Request:
    """``req`` with its options told what of ``memory_budget`` exists before the step (:func:`_resident` and the
    optimizer's state: :attr:`Options.budget_resident`), so that the plan's own peak fits in the rest; raises
    :class:`MemoryBudgetError` where those alone fill the budget."""
    if req.opts.memory_budget is None:
        return req
    parts = {**_resident(model, req.full), **({"optimizer state": optimizer_state} if optimizer_state else {})}
    resident = sum(parts.values())
    if resident >= req.opts.memory_budget:
        raise MemoryBudgetError(format_error(
            "memory_budget", "is filled before the step starts",
            expected=f"more than the {resident} bytes that exist before it",
            got=f"{req.opts.memory_budget} bytes; " + ", ".join(f"{k} {v}" for k, v in parts.items()),
            fix="Raise memory_budget (it is the whole step's, as torch.cuda.max_memory_allocated reports it), or "
                "shard the parameters and optimizer state (FSDP)."))
    return dataclasses.replace(req, opts=dataclasses.replace(req.opts, budget_resident=resident))


def _kept_at_validation(built: Built, recording: Recording | None) -> float | None:
    """The validation step's measured peak over the unoptimized step's recorded at the same slice (the second of
    the recorded sizes: :func:`_validation_inputs`); ``None`` where either is missing."""
    if recording is None or built.step is None or len(recording.sample_peaks) < 2 or \
            not recording.sample_peaks[1]:
        return None
    return built.step.peak_bytes / recording.sample_peaks[1]


def _is_oom(e: BaseException) -> bool:
    """An allocation that failed for want of memory: ``MemoryError``, ``torch.OutOfMemoryError`` (CUDA), or the
    CPU allocator's ``RuntimeError`` ("can't allocate memory")."""
    text = str(e).lower()
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text or \
        "out of memory" in text


def _lowest(an: Analysis, cost: nx.DiGraph, req: Request, than: SearchResult) -> SearchResult | None:
    """The plan with the lowest predicted peak (``prefer="memory"``'s search, the user's compress/exact/never
    worse kept), stamped as :func:`_choose` stamps; ``None`` unless its predicted peak is below ``than``'s: a
    fallback is never a higher plan."""
    if req.saved is not None or than.prediction is None:
        return None
    opts = resolve_options(prefer="memory", compress=req.opts.compress, exact=req.opts.exact,
                           never_worse=req.opts.never_worse)
    lower = search(cost, list(an.regions), dict(an.splits), opts)
    if lower.prediction is None or lower.prediction.peak_bytes >= than.prediction.peak_bytes:
        return None
    return _stamped(an, req, lower)


#: A plan fits the memory this process can still allocate where its predicted peak is at most this share of it:
#: predictions may miss by up to 10% (the bound the tests hold them to), and the step's allocator, threads and
#: Python objects need room of their own (a norse SequentialState(LIF) plan predicted at 168.8 MiB ran out of
#: memory under an RLIMIT_AS with 177.7 MiB left: tests/test_memory_limit.py).
FITS_SHARE = 0.9


def _fitting(an: Analysis, cost: nx.DiGraph | None, result: SearchResult, req: Request,
             step: Callable[[str], None]) -> SearchResult:
    """The plan to build: ``result``'s, unless its predicted peak is above :data:`FITS_SHARE` of the memory this
    process can still allocate on the inputs' device (:func:`~fxmemopt.profiling.available.available_bytes`: a
    memory limit, a container, a full GPU), where the plan with the lowest predicted peak is taken if that one is
    lower. Its step would run out of memory here, as the user's training step would; a note says what was done."""
    if cost is None or result.prediction is None:
        return result
    device = next((a.device for a in req.inputs if isinstance(a, torch.Tensor)), torch.device("cpu"))
    free = None if req.meta else available_bytes(device)
    room = None if free is None else int(FITS_SHARE * free)
    if room is None or result.prediction.peak_bytes <= room:
        return result
    step("the chosen plan is predicted above the memory left here: searching the lowest-peak plan")
    lower = _lowest(an, cost, req, result)
    mib = 2 ** 20
    if lower is None:
        warnings.warn(f"fxmemopt: the plan is predicted at {result.prediction.peak_bytes / 2**20:.1f} MiB, above "
                      f"{room / 2**20:.1f} MiB (nine tenths of the {free / 2**20:.1f} MiB this process can still "
                      f"allocate), and no plan is predicted lower",
                      FxMemOptWarning, stacklevel=4)
        return dataclasses.replace(result, notes=result.notes + [
            f"the plan's predicted peak ({result.prediction.peak_bytes / mib:.1f} MiB) is above nine tenths of the "
            f"memory this process can still allocate on {device.type} ({free / mib:.1f} MiB) and no plan is "
            f"predicted lower: its training step may run out of memory here"])
    log.warning("fxmemopt: the plan chosen is predicted above the memory left here; taking the lowest-peak plan")
    return dataclasses.replace(lower, notes=lower.notes + [
        f"the plan first chosen was predicted at {result.prediction.peak_bytes / mib:.1f} MiB, above "
        f"{room / mib:.1f} MiB (nine tenths of the {free / mib:.1f} MiB this process can still allocate on "
        f"{device.type}: room for the allocator and the prediction's error); the plan with the lowest predicted "
        f"peak ({lower.prediction.peak_bytes / mib:.1f} MiB, prefer='memory') was taken instead"])


def _lower_on_oom(model: nn.Module, an: Analysis, built: Built, cost: nx.DiGraph | None, result: SearchResult,
                  req: Request, recording: Recording | None, step: Callable[[str], None]
                  ) -> tuple[Built, SearchResult]:
    """Where the result's measured step ran out of memory at the examples' size (:func:`_kept_below`), the plan
    with the lowest predicted peak instead, validated and measured the same way; never a plan predicted higher.
    When that one runs out of memory too, it stays (nothing lower is known) and the note says so."""
    if not built.oom or cost is None:
        return built, result
    lower = _lowest(an, cost, req, result)
    if lower is None:
        return built, result
    step("the result ran out of memory at the examples' size: the plan with the lowest predicted peak instead")
    again = _kept_below(model, an, _with_value_check(_validated(model, an, lower.plan, _validation_inputs(
        req.inputs, recording)), lower, req), cost, req, recording)
    note = (f"the plan first chosen (predicted {result.prediction.peak_bytes / 2**20:.1f} MiB) ran out of memory in "
            f"its measured step here ({built.oom}); the plan with the lowest predicted peak (prefer='memory', "
            f"{lower.prediction.peak_bytes / 2**20:.1f} MiB) was taken instead"
            + (", and ran out of memory too" if again.oom else ""))
    log.warning("fxmemopt: %s", note)
    return dataclasses.replace(again, notes=again.notes + (note,)), lower


def _measure(candidates: list[tuple[str, nn.Module]], req: Request) -> tuple[list[ProfileResult], str]:
    """Measure candidate modules: in one reused worker, in this process, or with the user's function."""
    w = 1 if req.opts.warmup_in_profile_workers else 0
    if callable(req.measure):
        results = list(req.measure(candidates, req.full))
        names = [n for n, _ in candidates]
        if [getattr(r, "name", None) for r in results] != names or not all(isinstance(r, ProfileResult)
                                                                           for r in results):
            raise InvalidOptionError(format_error(
                "measure", "returned something other than one ProfileResult per candidate, in order",
                expected=f"ProfileResults named {names}", got=repr(results)[:300]))
        return results, getattr(req.measure, "__name__", type(req.measure).__name__)
    if req.measure == "in-process":
        return [run_in_process(m, req.full, name=name, warmup=w) for name, m in candidates], "process"
    with WorkerPool() as pool:
        results = [pool.run(make_job(name, m, req.full, timeout_s=req.measure_timeout_s, warmup=w))
                   for name, m in candidates]
    for r in results:
        if not r.ok:
            log.warning("fxmemopt: profiling %s was rejected (%s): %s", r.name, r.status, r.message)
    return results, "a worker process"


def _confirmed(model: nn.Module, an: Analysis, built: Built, result: SearchResult, req: Request,
               step: Callable[[str], None]) -> tuple[Built, Measured | None]:
    """Measure the unoptimized and the optimized module (and the plan before unwrapping, restored when unwrapping
    raised the measured peak beyond what the search allowed). Nothing when ``measure`` is None."""
    if not req.measure:
        return built, None
    step(f"measuring unoptimized and optimized steps ({req.measure if isinstance(req.measure, str) else 'given'})")
    candidates = [("unoptimized", model), ("optimized", built.gm)]
    pre = result.pre_unwrap if not built.failed else None
    if pre is not None and pre != built.plan:
        pre_gm, pre_stats = _rebuilt(model, an, pre, built)
        candidates.append(("before-unwrap", pre_gm))
    results, where = _measure(candidates, req)
    rejected = [(r.name, r.status, r.message) for r in results if not r.ok]
    reverted = False
    if len(results) == 3:
        base, unwrapped, wrapped = results
        why = _unwraps_overshot(base, unwrapped, wrapped, req.opts)
        if why:
            rejected.append(("optimized", "rejected", why))
            built, unwrapped, reverted = dataclasses.replace(built, gm=pre_gm, stats=pre_stats, plan=pre), wrapped, True
        results = [base, unwrapped]
    return built, Measured(results[0], results[1], where, tuple(rejected), reverted)


def _region_reports(graph: AnnotatedGraph, plan: Plan) -> list[RegionReport]:
    reports = []
    for rp in plan.regions:
        inputs, outputs = region_io(graph, rp.nodes)
        reports.append(RegionReport(
            rp.name, rp.anchor, rp.nodes, tuple(graph[n].target for n in rp.nodes if graph[n].seeds_region),
            tuple(_input_report(graph, i, b) for i, b in zip(inputs, rp.pack_bits) if not is_metadata(graph, i)),
            outputs, rp.chunks, rp.keep_prefix, rp.whole_slices, rp.recompute))
    return reports


def _unit_chains(an: Analysis) -> dict[str, tuple[str, ...]]:
    """Graph node -> the kept modules enclosing it, outermost first; a kept leaf encloses the node that calls it."""
    leaves = set(an.units.leaves)
    chains = {n: tuple(c) for n, c in an.units.chains.items() if c}
    for node in an.captured.graph.nodes:
        if node.op == "call_module" and node.target in leaves:
            chains[node.name] = chains.get(node.name, ()) + (str(node.target),)
    return chains


def _report(model: nn.Module, an: Analysis, cost: nx.DiGraph | None, result: SearchResult, built: Built,
            measured: Measured | None, sliced: dict[str, str], req: Request, notes: list[str],
            started: float, recording: Recording | None = None) -> Summary:
    """The :class:`~fxmemopt.report.summary.Summary`: what was done and why, predicted and measured."""
    decisions = list(result.decisions) + [Decision(n, "unwrap", f"failed in the validation step: {why}")
                                          for n, why in built.failed] + [Decision(n, "unwrap", why)
                                                                         for n, why in built.over_peak]
    if measured is not None and measured.reverted:
        decisions.append(Decision("*", "reject", "unwraps reverted: the measured peak rose"))
    result = dataclasses.replace(result, decisions=decisions,
                                 pre_unwrap=None if built.failed or built.over_peak else result.pre_unwrap)
    how = {p: ("_memories" + (f", updates {', '.join(n)}" if n else "") if has_memories(model.get_submodule(p)) else
               "declared" if isinstance(model.get_submodule(p), req.declared) else f"updates {', '.join(n)}")
           for p, n in an.stateful.items()}
    all_notes = ([] if an.regions else ["no stateful module (spiking neuron) was found, so no region was formed; "
                                        "pass targets=... or stateful_modules=... to say which layers to checkpoint"])
    all_notes += notes + list(result.notes) + list(built.notes)
    if built.plan.regions and built.value_check_note:
        all_notes.append(built.value_check_note)
    if built.gm.fxmemopt_units:
        all_notes.append(f"kept as modules (keep_modules), each called with its regions inside: "
                         f"{', '.join(built.gm.fxmemopt_units)}")
    all_notes += list(built.gm.fxmemopt_unit_notes)
    if built.over_peak:
        all_notes.append(f"never worse, measured: {len(built.over_peak)} region(s) left out because a training step "
                         f"with them peaked above the unoptimized step ({', '.join(n for n, _ in built.over_peak)}; "
                         f"never_worse=False keeps them)")
    if an.found.resets:
        all_notes.append(f"the model's forward resets {', '.join(an.found.resets)} before using them; the optimized "
                         f"module does the same at the start of every call (tracing cannot see it)")
    predicted: dict[str, Any] = {}
    if cost is not None:
        calls = req.opts.calls_per_step
        after = simulate(cost, built.plan, with_timeline=True)
        before_peak = result.baseline.peak_bytes if calls == 1 else \
            peak_over_calls(simulate(cost, Plan(()), with_timeline=True), calls)
        predicted = dict(working_sets=region_working_sets(after.timeline), predicted_peak_before=before_peak,
                         predicted_peak_after=after.peak_bytes if calls == 1 else peak_over_calls(after, calls),
                         predicted_step_time_ratio=after.step_time_s / result.baseline.step_time_s, cost_graph=cost)
    confirmed: dict[str, Any] = {}
    if measured is not None:
        base, opt = measured.before, measured.after
        confirmed = dict(measurement=f"{opt.method or base.method} in {measured.where}",
                         measured_peak_before=base.peak_bytes if base.ok else None,
                         measured_peak_after=opt.peak_bytes if opt.ok else None,
                         measured_step_time_ratio=opt.step_time_s / base.step_time_s
                         if base.ok and opt.ok and base.step_time_s else None,
                         rejected=list(measured.rejected))
    return Summary(type(model).__name__, _region_reports(an.annotated, built.plan), list(an.captured.fallbacks), how,
                   built.plan, all_notes, built.stats, search=result, options=dataclasses.asdict(req.opts),
                   sliced_regions=sliced, graph=an.annotated, guards=an.captured.guards,
                   failed_regions=list(built.failed), calls_per_step=req.opts.calls_per_step,
                   unit_chains=_unit_chains(an), recording=recording.describe() if recording is not None else "",
                   optimize_time_s=time.perf_counter() - started, checked_peak_before=built.checked_before,
                   checked_peak_after=built.checked_after, resident=_resident(model, req.full), **predicted,
                   **confirmed)



def optimize(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    targets: type | tuple[type, ...] | None = None,
    level: int | None = None,
    prefer: str | None = None,
    profile: str | None = None,
    memory_budget: int | float | str | None = None,
    compress: bool = True,
    exact: bool = True,
    never_worse: bool = True,
    recompute_check: str | None = None,
    checkpoint_budget: str | None = None,
    max_gc_wrapped_modules: int | None = None,
    gc_target_budget_ratio: float | None = None,
    temporal_split_factor: int = 2,
    max_split_rounds: int | None = None,
    max_candidates_per_round: int | None = None,
    allow_expensive_profiling: bool | None = None,
    warmup_in_main_process: bool | None = None,
    warmup_in_profile_workers: bool | None = None,
    measure: str | Measurer | None = None,
    measure_timeout_s: float = 300.0,
    leaf_modules: Sequence[type | str] = (),
    stateful_modules: Sequence[type] = (),
    keep_modules: Sequence[type | str] = (),
    predict: bool = True,
    recording: str = "auto",
    sample_inputs: Sequence[Any] | None = None,
    calls_per_step: int = 1,
    plan: Plan | str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    return_summary: bool = False,
) -> fx.GraphModule | tuple[fx.GraphModule, Summary]:
    """Rewrite ``model`` so a training step keeps far less memory for backward, with identical results.

    Every "weight-norm-neuron" layer becomes a checkpoint region that keeps only its inputs for backward,
    bit-packed when they are spikes, and recomputes its interior during backward. Outputs, every gradient,
    BatchNorm statistics, neuron states after the step and dropout masks are bitwise equal to the unoptimized
    model's on CPU (see NOTE [Checkpoint region invariants] in :mod:`fxmemopt.runtime.checkpoint`), for every plan,
    unless
    you pass ``exact=False``.

    Args:
        model: the network (plain PyTorch, :mod:`fxmemopt.snn`, or spikingjelly multi-step modules). It is not
            modified: its state, buffers, gradients and the global RNG are as before the call. It is optimized as if
            freshly reset: neuron state left from an earlier step (a training step, a forward on another batch size)
            is reset for every run ``optimize`` makes (spikingjelly and fxmemopt.snn ``reset()``, snntorch
            ``reset_mem()``, sinabs ``reset_states()``, a stateful module's own ``reset()``) and put back after; the
            returned module shares the model's modules, so it holds that same state until you reset it.
        example_inputs: a tuple of positional inputs shaped like real ones (as for ``torch.export``). One
            ``no_grad`` forward runs on them to find stateful modules, shapes and spike value sets.
        targets: module classes whose instances become regions (like the seed's ``instance``); ``None`` finds
            layers automatically: each neuron with the stateless ops feeding it since the previous neuron.
        level: 0 nothing, 1 checkpoint the layers (default), 2 + split multi-neuron regions, 3 + recompute
            neurons in time slices (exact), 4 + unwrap the most expensive regions while the peak does not rise.
            See :mod:`fxmemopt.planning.search`.
        prefer: ``"speed"`` (the fastest plan found with half the unoptimized peak: level 4 unwrapping while the
            peak stays within half, or spikes saved packed by the operations that save them plus the cheapest
            recomputation, neurons before BatchNorm before convolutions, whichever is predicted faster),
            ``"balanced"`` (level 4, peak never raised), ``"memory"`` (level 3, prefixes recomputed too).
        profile: the seed's presets ``"safe"`` (1), ``"balanced"`` (2), ``"memory"`` (3), ``"exhaustive"`` (4).
        memory_budget: bytes or a string such as ``"2GiB"``: the fastest plan whose predicted *whole* training
            step fits, as ``torch.cuda.max_memory_allocated`` would report it: the step's own peak plus what exists
            before it (parameters, buffers, the inputs, and the optimizer's state when ``optimizer`` is given; see
            ``summary.resident``). No regions when the unoptimized step fits; a typed
            :class:`~fxmemopt.errors.MemoryBudgetError` names the smallest reachable peak when nothing does, or
            what fills the budget before the step starts. :func:`fxmemopt.tools.tradeoffs` shows the whole front
            first.
        compress: pack region inputs that carry spikes (1 bit for {0,1}, 2 bits for {0..3}, 1 byte up to 255).
        exact: ``False`` accepts the seed's approximate temporal split at level 3: a whole region (BatchNorm
            included) runs on each time slice, so only one slice's tensors are ever recomputed at once, but
            anything coupling time steps changes meaning (BatchNorm statistics are per slice and updated once per
            slice). ``summary.semantics_changed`` lists each sliced region whose output differed from the unsliced
            one on the example, by how much. Default ``True``: only exact moves.
        never_worse: leave out the regions whose checkpointing raises the predicted peak (small layers, where the
            kept inputs and the recomputation cost more than they free), most harmful first, and return the model
            without regions when no plan predicts a peak at or below the unoptimized one; both are said in
            ``summary.notes`` and a warning. On CPU the result is then measured against the model (one training step
            each under the storage tracker), and the regions active at a peak above the model's are left out too.
            ``False`` keeps every region the search chose (for experiments and tests of the rewrite).
        recompute_check: how each training step checks that a region's recomputation reproduced the forward's
            values (NOTE [Checkpoint region invariants], Rule 3): ``"sampled"`` fingerprints of every saved tensor,
            ``"full"`` (every element; slower), ``"off"``; ``None`` (default): ``"sampled"`` (README "What exact
            means" has its cost). A difference raises :class:`~fxmemopt.errors.RecomputationValueError` before the
            gradients can be used. Whatever this says, the validation step on the example checks in full, and a
            region that fails there keeps its activations instead.
        checkpoint_budget, max_gc_wrapped_modules, gc_target_budget_ratio: level-1 selection, as in the seed
            ("speed" 50%, "balanced" 75%, "memory" 100% of the regions, largest inputs first).
        temporal_split_factor, max_split_rounds, max_candidates_per_round, allow_expensive_profiling: bound the
            level 2-3 search, as in the seed.
        warmup_in_main_process: run one training step of the result before returning (state restored after).
        warmup_in_profile_workers: one untimed step before each measurement.
        measure: confirm by measurement: ``"worker"`` measures the unoptimized and the optimized module (and the
            plan before unwrapping, which is kept if unwrapping raised the measured peak) in one spawned worker
            process (every wait bounded by ``measure_timeout_s``; a worker that raises, runs out of memory, is
            killed or times out, and a model that cannot be pickled, yield a rejected candidate in
            ``summary.rejected`` and ``optimize`` carries on); ``"in-process"`` measures here, for models that
            cannot travel (no timeout possible); a function measures with your own means (see :data:`Measurer`:
            given ``[(name, module), ...]`` and the inputs, it returns one ``ProfileResult`` per candidate);
            ``None`` (default) measures nothing.
        measure_timeout_s: the longest one measurement may take in a worker.
        leaf_modules: classes or module paths that must not be traced into.
        stateful_modules: classes to treat as stateful beyond those found automatically (modules with a
            ``_memories`` dict, or whose forward rebinds tensor attributes such as ``self.v``).
        keep_modules: module paths (``"blocks.0"``) or classes (every instance) that stay modules in the result:
            the code traced inside each one's call becomes a ``GraphModule`` at the same path, which the optimized
            module calls, with that module's regions inside (no region crosses its boundary). Needed for anything
            that works through a module's own call: FSDP2 per block (``fxmemopt.distributed.fully_shard``),
            forward hooks, per-block ``torch.compile``, profiling by module. A module forward calls more than once
            cannot be kept (``summary.notes`` says which and why). Default: the graph is flat.
        predict: record one instrumented unoptimized training step and predict the peak memory and step time
            before and after (see :mod:`fxmemopt.planning.costgraph`; always done at levels 2-4 and with a memory
            budget, which need it).
        recording: how that step is recorded (:mod:`fxmemopt.profiling.scaled`). ``"auto"`` (default): where the
            examples have a batch dimension of at least 8 samples, at batch sizes 1 and 2 (2 and 4 if those fail),
            every storage checked to the byte at 3 (6), and extrapolated to the examples' batch; node times from a
            no-grad forward at a quarter of the batch, scaled. The unoptimized step never runs at the examples'
            size, so ``optimize`` works where that step does not fit; the validation step runs on a 2-sample slice,
            and the result's own step at full size only where its predicted peak is above 3/4 of the unoptimized
            one. Elsewhere, or when the check fails, at the examples' size (the summary's
            ``recording`` says which, and why). ``"full"``: always at the examples' size (a few unoptimized steps'
            time and memory). ``"reduced"``: extrapolated, or :class:`~fxmemopt.errors.RecordingError`.
        sample_inputs: plan for a size this machine could never run. Pass ``example_inputs`` on the meta device
            (``torch.empty(T, 4096, 2, 128, 128, device="meta")``: only their shapes are read) and here a real
            sample of them: the same shapes with 3 or more samples along the batch dimension (the only dimension
            that may differ). Everything that needs values runs on the sample: tracing, value sets, the recordings
            at batch 1, 2 and 3 extrapolated to the examples' batch, validation on 2 samples; each node's shape
            and bytes at the examples' size are extrapolated the same way (:mod:`fxmemopt.analysis.shapes`). The
            predictions (and ``memory_budget``) are for the examples' size; "never worse" is judged on them, and
            nothing is measured at that size. Save the plan (``summary.save_plan``) and apply it on the training
            machine with ``plan=``. Raises :class:`~fxmemopt.errors.RecordingError` where the step or a shape
            cannot be extrapolated (not affine in the batch): there is no full-size fallback.
        calls_per_step: how many calls of the module make one training step: ``T`` for a single-step network
            (snntorch's ``init_hidden=True`` style, norse cells) called once per time step by your training loop,
            with one backward after the last call. ``example_inputs`` are one call's inputs. The predicted peaks
            (and ``explain``) are for that whole step: each earlier call keeps what its forward keeps for backward
            (a linear model: see :func:`fxmemopt.planning.costgraph.peak_over_calls` for how far off it was measured).
            The plan itself is chosen on one call (regions that lower one call's kept bytes lower every call's).
        plan: apply this saved plan instead of searching (a :class:`~fxmemopt.planning.plan.Plan`, its JSON text, or the
            path of a file written by ``summary.save_plan`` / ``fxmemopt optimize --save-plan``): nothing is
            searched or measured (unless ``measure`` asks), and the search options are ignored. A plan made for
            another architecture raises :class:`~fxmemopt.errors.PlanError`; one made for other input shapes
            applies (exactly) with a warning.
        progress: called with a short line as each stage starts (and during long searches), e.g. ``print``;
            the command line shows these.
        optimizer: the optimizer the training step uses, to count its state in the whole step's peak
            (``summary.resident["optimizer state"]``, in :attr:`~fxmemopt.report.summary.Summary.whole_step_peaks`
            and explain): what it holds if it has stepped, else what torch's optimizer of its kind allocates in its
            first step (Adam: two tensors per parameter). It is not stepped or changed. Planning does not depend on
            it: the state is there before and after, whatever the plan.
        return_summary: also return a :class:`~fxmemopt.report.summary.Summary`.

    Returns:
        A ``torch.fx.GraphModule`` sharing parameters, buffers and submodules with ``model`` (its
        ``state_dict()`` keys equal the model's; an optimizer over ``model.parameters()`` trains it), or
        ``(gm, summary)``.

    Raises:
        InvalidInputsError: ``example_inputs`` is not a tuple with a tensor, or the model fails on it.
        StaleStateError: a plain stateful module without a ``reset()`` holds state from an earlier step (a tensor with
            autograd history, or one the forward on the example fails on): reset the model first.
        InvalidOptionError: an option has the wrong type or is out of range.
        TraceError: the model's own ``forward`` cannot be traced by torch.fx.
        TargetsMatchNothingError: ``targets`` matches no called module.
        MemoryBudgetError: no plan fits ``memory_budget``.
        PlanError: ``plan`` is malformed or does not fit the model.
        DoesNotFitError: analysing the model ran out of memory here (a model that fixes its batch size is analysed
            at the examples' size, not on a slice of their batch).

    Example:
        >>> import torch, fxmemopt
        >>> from fxmemopt.snn import DeepConvSNN, reset_net
        >>> model = DeepConvSNN(num_blocks=2, channels=4)
        >>> x = (torch.rand(2, 2, 3, 8, 8) > 0.5).float()
        >>> gm = fxmemopt.optimize(model, (x,))
        >>> gm(x).sum().backward()       # same gradients as model(x).sum().backward(), less memory
        >>> reset_net(gm)
    """
    started = time.perf_counter()
    step = _stage_logger(started, progress)
    check_saved_tensors_hooks_nesting()  # the torch behaviour regions rely on (fxmemopt.compat)
    optimizer_state = optimizer_state_bytes(optimizer) if optimizer is not None else None
    # analysis steps must not add to the examples' .grad; the model runs fresh until optimize returns (`fresh`)
    with _input_grads_kept(example_inputs), contextlib.ExitStack() as fresh:
        # check: inputs, model and options, resolved into one frozen request (typed errors name what is wrong)
        req = _request(model, example_inputs, plan, measure, measure_timeout_s, calls_per_step, predict, targets,
                       leaf_modules, stateful_modules, keep_modules, resolve_options(
                           level=level, prefer=prefer, profile=profile, checkpoint_budget=checkpoint_budget,
                           max_gc_wrapped_modules=max_gc_wrapped_modules,
                           gc_target_budget_ratio=gc_target_budget_ratio, temporal_split_factor=temporal_split_factor,
                           max_split_rounds=max_split_rounds, max_candidates_per_round=max_candidates_per_round,
                           allow_expensive_profiling=allow_expensive_profiling,
                           warmup_in_main_process=warmup_in_main_process,
                           warmup_in_profile_workers=warmup_in_profile_workers, memory_budget=memory_budget,
                           compress=compress, exact=exact, never_worse=never_worse), recompute_check, recording,
                       sample_inputs)
        # memory_budget is for the whole step: what exists before it (weights, inputs, optimizer state) holds it too
        req = _budget_for_the_step(model, req, optimizer_state)
        # probe: which modules carry state, each put in its fresh state for every run below (a model carrying state
        # from an earlier step is optimized as if reset; the caller's state is put back when this block ends)
        # (on the examples' first samples where the batch is large: no forward at their size, _sliced)
        req = _sliced(req)
        step("probing stateful modules")
        try:
            found = fresh.enter_context(fresh_probe(model, req.inputs, req.declared))
        except InvalidInputsError as e:
            if req.planned_for is None or req.meta:
                raise
            # the model fails on the slice, not on the examples: a batch size fixed in the model (sinabs's
            # ``IAFSqueeze(batch_size=...)``), or the guessed batch dimension is another (time in [N, T, ...])
            log.info("fxmemopt: analysing at the examples' size (the model fails on a slice: %s)", first_line(e))
            req = dataclasses.replace(req, inputs=req.planned_for, planned_for=None, planned_batch=None)
            found = fresh.enter_context(fresh_probe(model, req.inputs, req.declared))
        # trace, annotate, regions: what the model is, as plain data; costgraph: the recorded unoptimized step
        # (small batches, extrapolated, where the batch can be sliced): what the search and the predictions run on
        an, cost, notes, recording, req = _analysed(model, req, found, step)
        # plan + choose: a saved plan as is, or the search on the cost graph (level 1 alone without one)
        result = _choose(an, cost, req, step)
        # fit here: a plan predicted above the memory this process has left gives way to the lowest-peak plan
        result = _fitting(an, cost, result, req, step)
        # rewrite + validate: checkpoint regions in a new GraphModule; one training step of it, failing regions out
        step("rewriting and validating one training step of the result")
        built = _validated(model, an, result.plan, _validation_inputs(req.inputs, recording))
        # value check: what each step checks from now on (Rule 3), chosen before the result is measured
        built = _with_value_check(built, result, req)
        # never worse, measured: one tracked step of the result; regions at a peak above the unoptimized one out
        built = _kept_below(model, an, built, cost, req, recording)
        # out of memory in that step: the plan with the lowest predicted peak, validated and measured the same way
        built, result = _lower_on_oom(model, an, built, cost, result, req, recording, step)
        # profile: confirm by measurement (optional; failures are recorded, never raised)
        built, measured = _confirmed(model, an, built, result, req, step)
        # verify: what whole-region time slices (exact=False) change, each such region run both ways on the example
        sliced = slice_effects(model, built.gm, req.inputs, an.stateful) \
            if any(r.whole_slices for r in built.plan.regions) else {}
        # report: the summary, built once
        summary = _report(model, an, cost, result, built, measured, sliced, req, notes, started, recording)
    if optimizer_state is not None:
        summary.resident["optimizer state"] = optimizer_state
    built.gm.fxmemopt_summary = summary
    log.info("%s", summary)
    return (built.gm, summary) if return_summary else built.gm
