"""The public entry point, :func:`optimize`: one recipe, one commented line per stage."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from .annotate import AnnotatedGraph, annotate
from .costmodel import build_cost_graph, record_step, simulate
from .errors import FxMemOptError, InvalidInputsError, InvalidOptionError, format_error
from .packing import packed_nbytes
from .plan import Plan, checkpoint_all
from .regions import Region, find_regions
from .rewrite import rewrite
from .runtime import RegionStats
from .state import has_memories, probe
from .summary import InputReport, RegionReport, Summary
from .trace import LeafFallback, make_graph_module, trace
from .workers import ProfileResult, WorkerPool, make_job, run_in_process

__all__ = ["optimize"]

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


def _summary(model: nn.Module, graph: AnnotatedGraph, regions: list[Region], plan: Plan,
             fallbacks: list[LeafFallback], stateful: dict[str, str], stats: dict[str, RegionStats]) -> Summary:
    reports = []
    for r, rp in zip(regions, plan.regions):
        reports.append(RegionReport(
            r.name, r.anchor, r.nodes, tuple(graph[n].target for n in r.stateful),
            tuple(_input_report(graph, i, b) for i, b in zip(r.inputs, rp.pack_bits)), r.outputs))
    notes = []
    if not regions:
        notes.append("no stateful module (spiking neuron) was found, so no region was formed; pass targets=... "
                     "or stateful_modules=... to say which layers to checkpoint")
    return Summary(type(model).__name__, reports, list(fallbacks), stateful, plan, notes, stats)


def _profile(model: nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...], mode: str,
             timeout_s: float) -> tuple[list[ProfileResult], str]:
    """Measure the unoptimized model and the optimized module: in one reused worker, or in this process."""
    candidates = [("unoptimized", model), ("optimized", gm)]
    if mode == "in-process":
        return [run_in_process(m, inputs, name=name) for name, m in candidates], "process"
    with WorkerPool() as pool:
        results = [pool.run(make_job(name, m, inputs, timeout_s=timeout_s)) for name, m in candidates]
    for r in results:
        if not r.ok:
            log.warning("fxmemopt: profiling %s was rejected (%s): %s", r.name, r.status, r.message)
    return results, "a worker process"


def optimize(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    targets: type | tuple[type, ...] | None = None,
    compress: bool = True,
    leaf_modules: Sequence[type | str] = (),
    stateful_modules: Sequence[type] = (),
    predict: bool = True,
    profile: str | None = None,
    profile_timeout_s: float = 300.0,
    return_summary: bool = False,
) -> fx.GraphModule | tuple[fx.GraphModule, Summary]:
    """Rewrite ``model`` so a training step keeps far less memory for backward, with identical results.

    Every "weight-norm-neuron" layer becomes a checkpoint region that keeps only its inputs for backward,
    bit-packed when they are spikes, and recomputes its interior during backward. Outputs, every gradient,
    BatchNorm statistics, neuron states after the step and dropout masks are bitwise equal to the unoptimized
    model's on CPU (see NOTE [Checkpoint region invariants] in :mod:`fxmemopt.runtime`).

    Args:
        model: the network (plain PyTorch, :mod:`fxmemopt.snn`, or spikingjelly multi-step modules). It is not
            modified: its state, buffers, gradients and the global RNG are as before the call.
        example_inputs: a tuple of positional inputs shaped like real ones (as for ``torch.export``). One
            ``no_grad`` forward runs on them to find stateful modules, shapes and spike value sets.
        targets: module classes whose instances become regions (like the seed's ``instance``); ``None`` finds
            layers automatically: each neuron with the stateless ops feeding it since the previous neuron.
        compress: pack region inputs that carry spikes (1 bit for {0,1}, 2 bits for {0..3}, 1 byte up to 255).
        leaf_modules: classes or module paths that must not be traced into.
        stateful_modules: classes to treat as stateful beyond those found automatically (modules with a
            ``_memories`` dict, or whose forward rebinds tensor attributes such as ``self.v``).
        predict: record one instrumented unoptimized training step on the example inputs and predict the peak
            memory and step time before and after (summary ``predicted_*`` fields; see :mod:`fxmemopt.costmodel`).
            The recording costs a few unoptimized steps' time and the unoptimized step's memory.
        profile: confirm by measurement: ``"worker"`` measures the unoptimized and the optimized module in a spawned
            worker process (reused; every wait bounded by ``profile_timeout_s``; a worker that raises, runs out of
            memory, is killed or times out, and a model that cannot be pickled, yield a rejected candidate in
            ``summary.rejected`` and ``optimize`` carries on); ``"in-process"`` measures here, for models that cannot
            travel (no timeout possible); ``None`` (default) measures nothing.
        profile_timeout_s: the longest one profiling run may take in a worker.
        return_summary: also return a :class:`~fxmemopt.summary.Summary`.

    Returns:
        A ``torch.fx.GraphModule`` sharing parameters, buffers and submodules with ``model`` (its
        ``state_dict()`` keys equal the model's; an optimizer over ``model.parameters()`` trains it), or
        ``(gm, summary)``.

    Raises:
        InvalidInputsError: ``example_inputs`` is not a tuple with a tensor, or the model fails on it.
        InvalidOptionError: an option has the wrong type.
        TraceError: the model's own ``forward`` cannot be traced by torch.fx.
        TargetsMatchNothingError: ``targets`` matches no called module.

    Example:
        >>> import torch, fxmemopt
        >>> from fxmemopt.snn import DeepConvSNN, reset_net
        >>> model = DeepConvSNN(num_blocks=2, channels=4)
        >>> x = (torch.rand(2, 2, 3, 8, 8) > 0.5).float()
        >>> gm = fxmemopt.optimize(model, (x,))
        >>> gm(x).sum().backward()       # same gradients as model(x).sum().backward(), less memory
        >>> reset_net(gm)
    """
    inputs = _check_inputs(example_inputs)
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(format_error("model", "is not an nn.Module", expected="nn.Module",
                                              got=type(model).__name__))
    if profile not in (None, "worker", "in-process"):
        raise InvalidOptionError(format_error("profile", "is not a known profiling mode",
                                              expected='None, "worker" or "in-process"', got=repr(profile)))
    if not profile_timeout_s > 0:
        raise InvalidOptionError(format_error("profile_timeout_s", "must be positive", expected="> 0",
                                              got=repr(profile_timeout_s)))
    target_types = _check_types("targets", targets)
    leaf = _check_types("leaf_modules", leaf_modules, allow_str=True)
    declared = _check_types("stateful_modules", stateful_modules)

    # probe: which modules carry state across calls, which buffers a forward mutates (model left untouched)
    try:
        found = probe(model, inputs, declared)
    except FxMemOptError:
        raise
    except Exception as e:
        raise InvalidInputsError(format_error(
            f"{type(model).__name__}(*example_inputs)", f"raised {type(e).__name__}: {e}",
            fix="Check that example_inputs are what the model's forward expects (a tuple of positional inputs).",
        )) from e
    stateful = dict(found.stateful)
    # trace: fx graph with neurons and untraceable submodules as leaves
    graph, constants, fallbacks = trace(
        model, stateful_paths=stateful, leaf_types=tuple(t for t in leaf if isinstance(t, type)),
        leaf_paths=[p for p in leaf if isinstance(p, str)])
    traced = make_graph_module(model, graph, type(model).__name__, extra=constants)
    # annotate: shapes, bytes and spike value sets of every node (one no_grad forward, state restored)
    annotated = annotate(traced, inputs, stateful)
    # regions: weight-norm-neuron layers, or the instances of `targets`
    target_paths = None
    if target_types:
        target_paths = {p for p, m in model.named_modules() if isinstance(m, target_types)}
    regions = find_regions(annotated, target_paths, ", ".join(t.__name__ for t in target_types))
    # plan: checkpoint every region, pack spike inputs
    plan = checkpoint_all(regions, annotated, compress)
    # costgraph: one recorded unoptimized step; predict peak memory and compute of the plan
    cost = before = after = None
    notes = []
    if predict:
        try:
            cost = build_cost_graph(annotated, record_step(traced, inputs, stateful))
            before, after = simulate(cost, None), simulate(cost, plan)
        except Exception as e:  # prediction informs; it must never stop an exact rewrite from being returned
            log.warning("fxmemopt: could not record a training step to predict memory: %s", e)
            notes.append(f"no prediction: recording a training step on the example inputs failed with "
                         f"{type(e).__name__}: {e}")
    # rewrite: checkpoint regions with packed inputs, in a new GraphModule sharing the model's modules
    gm, stats = rewrite(model, graph, constants, annotated, plan, stateful, found.mutated_buffers,
                        type(model).__name__)
    # profile: confirm by measurement (never required; failures are recorded, not raised)
    measured = _profile(model, gm, inputs, profile, profile_timeout_s) if profile else None
    # report
    how = {p: ("_memories" if has_memories(model.get_submodule(p)) else
               "declared" if isinstance(model.get_submodule(p), declared) else f"rebinds {', '.join(n)}")
           for p, n in stateful.items()}
    summary = _summary(model, annotated, regions, plan, fallbacks, how, stats)
    summary.notes += notes
    if before is not None and after is not None:
        summary.predicted_peak_before, summary.predicted_peak_after = before.peak_bytes, after.peak_bytes
        summary.predicted_step_time_ratio = after.step_time_s / before.step_time_s
        summary.cost_graph = cost
    if measured is not None:
        results, where = measured
        base, opt = results
        summary.measurement = f"{opt.method or base.method} in {where}"
        summary.rejected = [(r.name, r.status, r.message) for r in results if not r.ok]
        summary.measured_peak_before = base.peak_bytes if base.ok else None
        summary.measured_peak_after = opt.peak_bytes if opt.ok else None
        if base.ok and opt.ok and base.step_time_s:
            summary.measured_step_time_ratio = opt.step_time_s / base.step_time_s
    gm.fxmemopt_summary = summary
    log.info("%s", summary)
    return (gm, summary) if return_summary else gm
