"""Stage 6, *choose*: search for the plan to apply, driven by the cost model.

What it searches
    Plans (:class:`~fxmemopt.planning.plan.Plan`) over the candidate regions. Every move is scored by
    :func:`fxmemopt.planning.costgraph.simulate` (predicted peak bytes and step time); nothing here runs the model or
    touches fx, so a search costs milliseconds per candidate and is deterministic.

The levels (the seed's meaning, automated)
    1. *wrap*: checkpoint the candidate regions, all or a budgeted subset (``checkpoint_budget`` "speed" 50%,
       "balanced" 75%, "memory" 100%, or ``max_gc_wrapped_modules`` / ``gc_target_budget_ratio``; the smaller wins),
       preferring regions whose inputs are largest;
    2. *spatial split*: a region holding several neurons (a ``targets`` block) is split into one region per
       neuron, at the spike boundaries (which pack to 1 bit); accepted when the predicted peak is strictly lower;
    3. *temporal split*: the region that sets the peak is recomputed in more time slices (multiplied by
       ``temporal_split_factor`` each round, clamped to T), only where that is exact
       (:func:`~fxmemopt.planning.plan.chunkable`);
       ``prefer="memory"`` also recomputes the prefix instead of keeping it; accepted when strictly lower.
       With ``exact=False``, a region that cannot be sliced exactly (a block of several neurons, a residual
       output) gets the seed's move instead: the *whole* region runs on each slice (Rule 9 of
       :mod:`fxmemopt.runtime.checkpoint`), which may change values (BatchNorm statistics per slice); ``optimize``
       reports
       per region whether it did on the example;
    4. *greedy unwrap*: regions whose recomputation costs the most time are unwrapped when the predicted peak
       does not rise. ``prefer="speed"`` lets it rise up to half the unoptimized peak (which still halves memory)
       and may also *shrink* a region to its neuron: the neuron's per-step tensors are most of a layer's memory
       but cheap to recompute, the convolution before it the opposite. ``prefer="speed"`` also searches the other
       way (:func:`cheapest_first`): from no recomputation, pack the spikes operations save for backward
       (packed-saves regions, nothing recomputed) and recompute the cheapest rungs of each layer (the neuron, then
       BatchNorm, then the convolution), best peak reduction per second first, until the peak is half the
       unoptimized one; the faster of the two plans is kept.

    ``memory_budget`` replaces the goal: the fastest plan whose predicted peak fits, found by unwrapping the most
    expensive regions from the most memory-saving plan while it still fits; or a typed error naming the smallest
    reachable peak.

How it is built
    :func:`search` runs :data:`STAGES` in order: :func:`wrap` (level 1), :func:`split_spatially` (2),
    :func:`slice_in_time` (3), :func:`leave_out_harmful` (never worse), :func:`leave_out_idle` (the default and
    ``prefer="memory"``: no region that does not pay for itself), :func:`give_time_back` (level 4,
    ``prefer="speed"`` and ``memory_budget``), :func:`keep_slice_starts` (time back at the same peak). Each is a
    :data:`Stage`:
    ``stage(plan, prediction, planner) -> (plan, prediction)``, with
    the cost graph, options and candidates in the :class:`Planner`; each does nothing when its option is off.

Every decision is recorded with its reason (:class:`Decision`), so the summary can explain the plan.

What it costs
    A prediction (:func:`~fxmemopt.planning.costgraph.simulate`) is linear in the recorded step, and every stage
    makes a bounded number per candidate region, so a search is about (regions) x (graph size) (issue 27,
    "optimizing is cheap"; ``benchmarks/search_scaling.py``, ``tests/test_search_scaling.py``): levels 2 and 3 take a
    region out of the running once a move on it fails; never worse judges all regions per round and drops every
    harmful one at once (:data:`NEVER_WORSE_ROUNDS` rounds at most); level 4 does not re-predict a move that did not
    fit while nothing suggests it would now (:data:`UNWRAP_MOVES_PER_REGION` accepted moves per region at most);
    ``keep starts`` tries every region away from the peak in one prediction.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import networkx as nx

from ..analysis.facts import AnnotatedGraph
from ..errors import InvalidOptionError, MemoryBudgetError, format_error
from .costgraph import Prediction, facts, peak_over_calls, simulate
from .plan import Plan, RegionPlan, checkpoint_every, chunkable, input_bits, sliceable
from .regions import Region, is_metadata, region_io

__all__ = ["Planner", "Stage", "STAGES", "Options", "Decision", "SearchResult", "PRESETS", "Preset",
           "resolve_options", "search", "search_without_cost", "parse_bytes", "applied", "cheapest_first",
           "saved_inputs", "packed_saves"]


class Preset(NamedTuple):
    """What a ``profile`` sets, as in the seed (explicit arguments still win)."""

    level: int
    max_split_rounds: int | None
    max_candidates_per_round: int | None
    warmup_in_main_process: bool
    warmup_in_profile_workers: bool
    allow_expensive_profiling: bool


#: The seed's presets, by ``profile`` name.
PRESETS: dict[str, Preset] = {
    "safe": Preset(1, 0, 0, False, False, False),
    "balanced": Preset(2, 1, 1, False, False, False),
    "memory": Preset(3, 2, 2, False, True, True),
    "exhaustive": Preset(4, None, None, True, True, True),
}
#: ``prefer`` -> (profile, checkpoint_budget), as in the seed; ours search further within the level.
PREFER: dict[str, tuple[str, str]] = {
    "speed": ("exhaustive", "memory"),
    "balanced": ("exhaustive", "memory"),
    "memory": ("memory", "memory"),
}
# What the presets mean here: "safe" wraps every layer (1); "balanced" also splits blocks per neuron (2);
# "memory" also recomputes neurons in time slices, prefixes included (3); "exhaustive" also unwraps what does not
# raise the peak (4). prefer="speed" is level 4 without time slices, unwrapping while the peak stays within half the
# unoptimized one, or, if faster, the cheapest recomputation and packed saves that reach half (cheapest_first).
#: ``checkpoint_budget`` -> fraction of candidate regions wrapped at level 1.
CHECKPOINT_BUDGETS = {"speed": 0.5, "balanced": 0.75, "memory": 1.0}
#: ``prefer="speed"`` accepts unwraps while the predicted peak stays at or below this fraction of the unoptimized
#: peak: halving memory is what a user who asks for speed still expects from a memory tool.
SPEED_PEAK_FRACTION = 0.5
#: The default (no level, preset or budget given) also slices the region that sets the predicted peak in time (exact
#: slices, prefix kept: neuron replays only), as long as the predicted step time stays within this fraction above
#: the level-1 plan's. A layer whose recomputation sets the peak is what users hope ``optimize(model, x)`` handles.
#: Measured with one thread (interleaved, median of 5), the default's step time rose 3.6% (DeepConvSNN 16x32, T=8,
#: N=8), 5.1% (spiking VGG-11 w0.5, T=10, N=4), 3.9% (Spikformer) over checkpointing alone, for 1.35x, 1.56x, 1.28x
#: lower peaks (2.6% and 7.1% on DeepConvSNN and the full-width VGG-11 on 2026-12-02). The prediction charges a
#: slice's no-grad neuron replay and copies (costgraph.NO_GRAD_REPLAY_COST, copy_s_per_byte).
DEFAULT_SLICE_TIME_BUDGET = 0.15

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """``2147483648``, ``"2GiB"``, ``"1.5 GB"``, ``"512MiB"`` -> bytes.

    Raises:
        InvalidOptionError: not a positive size.
    """
    if isinstance(value, bool):
        raise InvalidOptionError(format_error("memory_budget", "is a bool", expected="bytes or a size string",
                                              got=repr(value)))
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(num):]
        if unit not in _UNITS or not num:
            raise InvalidOptionError(format_error(
                "memory_budget", f"cannot read {value!r} as a size", expected='bytes or e.g. "2GiB", "512MB"',
                got=repr(value)))
        n = float(num) * _UNITS[unit]
    if not math.isfinite(n) or n <= 0:
        raise InvalidOptionError(format_error("memory_budget", "must be a positive size", expected="> 0",
                                              got=repr(value)))
    return int(n)


@dataclass(frozen=True)
class Options:
    """Resolved search options (see :func:`resolve_options` for how the user's arguments map here)."""

    level: int = 1
    prefer: str | None = None
    profile: str | None = None
    checkpoint_budget: str | None = None
    max_gc_wrapped_modules: int | None = None
    gc_target_budget_ratio: float | None = None
    temporal_split_factor: int = 2
    max_split_rounds: int | None = None
    max_candidates_per_round: int | None = None
    allow_expensive_profiling: bool = True
    warmup_in_main_process: bool = True
    warmup_in_profile_workers: bool = True
    memory_budget: int | None = None
    compress: bool = True
    notes: tuple[str, ...] = ()
    exact: bool = True
    never_worse: bool = True
    calls_per_step: int = 1
    #: below level 3: slice the region at the peak while the predicted step time stays within this fraction above
    #: the level-1 plan's (``None``: no slicing below level 3); the default's is :data:`DEFAULT_SLICE_TIME_BUDGET`
    slice_time_budget: float | None = None
    #: bytes that exist before the step and that ``memory_budget`` holds as well (parameters, buffers, the inputs,
    #: the optimizer's state: :func:`fxmemopt.optimize` sets them): the step's own peak must fit in the rest
    budget_resident: int = 0

    @property
    def activation_budget(self) -> int | None:
        """What ``memory_budget`` leaves the step's own allocations (the predicted peak is compared with it):
        the whole-step budget less :attr:`budget_resident`; ``None`` without a budget."""
        return None if self.memory_budget is None else self.memory_budget - self.budget_resident

    def budget_text(self, peak: int) -> str:
        """``peak`` (a step's own predicted peak) as the whole step the budget is about: with the resident bytes."""
        if not self.budget_resident:
            return _mib(peak)
        return f"{_mib(peak + self.budget_resident)} (step {_mib(peak)} + resident {_mib(self.budget_resident)})"


def resolve_options(*, level: int | None = None, prefer: str | None = None, profile: str | None = None,
                    checkpoint_budget: str | None = None, max_gc_wrapped_modules: int | None = None,
                    gc_target_budget_ratio: float | None = None, temporal_split_factor: int = 2,
                    max_split_rounds: int | None = None, max_candidates_per_round: int | None = None,
                    allow_expensive_profiling: bool | None = None, warmup_in_main_process: bool | None = None,
                    warmup_in_profile_workers: bool | None = None, memory_budget: int | float | str | None = None,
                    compress: bool = True, exact: bool = True, never_worse: bool = True) -> Options:
    """Validate the user's options and resolve presets, with the seed's precedence: explicit arguments win over
    ``profile``, which wins over ``prefer``. Without any, the level is 1 (checkpoint every layer). The defaults are
    :func:`fxmemopt.optimize`'s.

    Raises:
        InvalidOptionError: an unknown preset name or an out-of-range value.
    """
    notes = []
    if prefer is not None and prefer not in PREFER:
        raise InvalidOptionError(format_error("prefer", "is not a known preference",
                                              expected=" / ".join(repr(p) for p in PREFER), got=repr(prefer)))
    if prefer is not None:
        p_profile, p_budget = PREFER[prefer]
        if profile is None:
            profile = p_profile
            notes.append(f"prefer:profile={p_profile}")
        if checkpoint_budget is None:
            checkpoint_budget = p_budget
            notes.append(f"prefer:checkpoint_budget={p_budget}")
    if profile is not None and profile not in PRESETS:
        raise InvalidOptionError(format_error("profile", "is not a known preset",
                                              expected=" / ".join(repr(p) for p in PRESETS), got=repr(profile)))
    if checkpoint_budget is not None and checkpoint_budget not in CHECKPOINT_BUDGETS:
        raise InvalidOptionError(format_error("checkpoint_budget", "is not a known budget",
                                              expected=" / ".join(repr(b) for b in CHECKPOINT_BUDGETS),
                                              got=repr(checkpoint_budget)))
    preset = PRESETS.get(profile or "", None)
    # optimize(model, x) with nothing else: the default also slices the region at the peak (DEFAULT_SLICE_TIME_BUDGET)
    is_default = level is None and prefer is None and profile is None and memory_budget is None
    if level is None:
        level = preset.level if preset else 1
    if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 4:
        raise InvalidOptionError(format_error("level", "is out of range", expected="an int in 0..4", got=repr(level)))
    if gc_target_budget_ratio is not None and not 0 < gc_target_budget_ratio <= 1:
        raise InvalidOptionError(format_error("gc_target_budget_ratio", "is out of range", expected="in (0, 1]",
                                              got=repr(gc_target_budget_ratio)))
    if max_gc_wrapped_modules is not None and (not isinstance(max_gc_wrapped_modules, int)
                                               or max_gc_wrapped_modules < 0):
        raise InvalidOptionError(format_error("max_gc_wrapped_modules", "is out of range", expected="an int >= 0",
                                              got=repr(max_gc_wrapped_modules)))
    if not isinstance(temporal_split_factor, int) or temporal_split_factor < 2:
        raise InvalidOptionError(format_error("temporal_split_factor", "is out of range", expected="an int >= 2",
                                              got=repr(temporal_split_factor)))
    for name, v in (("max_split_rounds", max_split_rounds), ("max_candidates_per_round", max_candidates_per_round)):
        if v is not None and (not isinstance(v, int) or v < 0):
            raise InvalidOptionError(format_error(name, "is out of range", expected="None or an int >= 0",
                                                  got=repr(v)))
    if preset:
        # The presets' split-round limits bounded the seed's *profiling* (a process per candidate); candidates are
        # predicted here in milliseconds, so only explicit max_split_rounds / max_candidates_per_round bound the
        # search.
        warmup_in_main_process = preset.warmup_in_main_process if warmup_in_main_process is None \
            else warmup_in_main_process
        warmup_in_profile_workers = preset.warmup_in_profile_workers if warmup_in_profile_workers is None \
            else warmup_in_profile_workers
        allow_expensive_profiling = preset.allow_expensive_profiling if allow_expensive_profiling is None \
            else allow_expensive_profiling
    if allow_expensive_profiling is False and level > 1 and profile is None:
        # The seed's rule: without expensive profiling the split search is tightened to one round, one candidate.
        max_split_rounds, max_candidates_per_round = 1, 1
        warmup_in_profile_workers = False
        notes.append("allow_expensive_profiling=False: max_split_rounds=1, max_candidates_per_round=1")
    for name, flag in (("exact", exact), ("never_worse", never_worse)):
        if not isinstance(flag, bool):
            raise InvalidOptionError(format_error(name, "must be a bool", expected="True or False", got=repr(flag)))
    budget = parse_bytes(memory_budget) if memory_budget is not None else None
    if budget is not None and level < 4:
        notes.append(f"memory_budget: searching every level (requested level {level})")
        level = 4
    return Options(level, prefer, profile, checkpoint_budget, max_gc_wrapped_modules, gc_target_budget_ratio,
                   temporal_split_factor, max_split_rounds, max_candidates_per_round,
                   True if allow_expensive_profiling is None else allow_expensive_profiling,
                   True if warmup_in_main_process is None else warmup_in_main_process,
                   True if warmup_in_profile_workers is None else warmup_in_profile_workers,
                   budget, compress, tuple(notes), exact, never_worse,
                   slice_time_budget=DEFAULT_SLICE_TIME_BUDGET if is_default else None)


@dataclass(frozen=True)
class Decision:
    """One decision of the search: ``action`` on ``region`` and why (predicted bytes/seconds in the reason)."""

    region: str
    action: str  # "wrap", "skip", "split", "chunk", "unwrap", "keep", "keep starts", "reject"
    reason: str
    #: the decision weighed predicted step times (node times measured, calibrated per kind of node by
    #: :mod:`fxmemopt.planning.timing`): another machine, or this one under load, may decide otherwise; explain
    #: marks such regions. Decisions on bytes alone are the same on every run.
    on_time: bool = False


@dataclass
class SearchResult:
    """The chosen plan, its prediction, and what the search did.

    Attributes:
        plan: the chosen plan.
        prediction: its predicted peak and time.
        baseline: the unoptimized prediction.
        decisions: every decision with its reason, in order.
        applied_steps / skipped_steps: the seed's step names (``level1_gc``, ``level3_temporal_split``...).
        candidates: number of candidate regions; selected: names wrapped at level 1; policy / explanation: how
            they were selected.
        evaluated: number of simulated candidate plans.
    """

    plan: Plan
    prediction: Prediction | None
    baseline: Prediction | None
    decisions: list[Decision] = field(default_factory=list)
    applied_steps: list[str] = field(default_factory=list)
    skipped_steps: list[str] = field(default_factory=list)
    candidates: int = 0
    selected: list[str] = field(default_factory=list)
    policy: str = "all_candidates"
    explanation: str = ""
    evaluated: int = 0
    pre_unwrap: Plan | None = None
    #: what the user should hear about (regions left out because they raised the predicted peak)
    notes: list[str] = field(default_factory=list)


def _mib(n: int) -> str:
    # Two decimals: a move the search accepts must read as lower (a strictly lower byte count can round equal).
    return f"{n / 2**20:.2f} MiB"


def _region_plan(r: Region, graph: AnnotatedGraph, compress: bool) -> RegionPlan:
    return RegionPlan(r.name, r.anchor, r.nodes, tuple(input_bits(graph, i, compress) for i in r.inputs))


def _input_bytes(r: Region, graph: AnnotatedGraph) -> int:
    return sum(graph[i].nbytes for i in r.inputs if graph[i].op != "get_attr")


def _select(regions: list[Region], graph: AnnotatedGraph, opts: Options, result: SearchResult) -> list[Region]:
    """Level 1 budget (the seed's semantics): which candidate regions to wrap."""
    n = len(regions)
    limits = []
    if opts.max_gc_wrapped_modules is not None:
        limits.append(opts.max_gc_wrapped_modules)
    ratio = opts.gc_target_budget_ratio
    if ratio is None and opts.max_gc_wrapped_modules is None and opts.checkpoint_budget is not None:
        ratio = CHECKPOINT_BUDGETS[opts.checkpoint_budget]
    if ratio is not None:
        limits.append(max(1, min(n, math.ceil(n * ratio))))
    if not limits:
        result.policy, result.explanation = "all_candidates", f"all {n} candidate regions"
        return regions
    k = min(limits)
    if k >= n:
        result.policy, result.explanation = "budget_covers_all", f"budget {k} covers all {n} candidate regions"
        return regions
    if k <= 0:
        result.policy, result.explanation = "explicit_zero_budget", "budget 0: nothing wrapped"
        return []
    position = {r.name: i for i, r in enumerate(regions)}
    chosen = sorted(regions, key=lambda r: (-_input_bytes(r, graph), position[r.name]))[:k]
    result.policy = "largest_input_activations"
    result.explanation = f"{k} of {n} regions with the largest inputs"
    return sorted(chosen, key=lambda r: position[r.name])


def _peak_region(pred: Prediction, plan: Plan) -> str | None:
    """The region in whose recomputation or backward the predicted peak occurs."""
    names = {r.name for r in plan.regions}
    where = pred.peak_at.split(":", 1)[-1]
    if where in names:
        return where
    for r in plan.regions:
        if where in r.nodes:
            return r.name
    return None


@dataclass
class Planner:
    """What every stage of the search reads, and the result it writes its decisions to: the cost graph and its
    facts, the options, the candidate regions and their per-neuron splits, the unoptimized prediction.

    A stage is a function ``stage(plan, prediction, planner) -> (plan, prediction)`` (:data:`Stage`); it predicts
    plans with :meth:`evaluate` and never touches the model or fx."""

    cost: nx.DiGraph
    graph: AnnotatedGraph
    opts: Options
    regions: list[Region]
    splits: dict[str, list[Region]]
    baseline: Prediction
    result: SearchResult
    progress: Callable[[str], None] | None = None
    #: the level-1 plan (every selected region whole) and its prediction, once wrapped
    level1: tuple[Plan, Prediction] | None = None

    def evaluate(self, plan: Plan) -> Prediction:
        """The predicted peak and time of ``plan`` (counted in ``result.evaluated``)."""
        self.result.evaluated += 1
        if self.progress is not None and self.result.evaluated % 100 == 0:
            self.progress(f"searching: {self.result.evaluated} candidate plans evaluated")
        return simulate(self.cost, plan)

    @property
    def rounds(self) -> int:
        return self.opts.max_split_rounds if self.opts.max_split_rounds is not None else 10**9

    @property
    def per_round(self) -> int:
        return self.opts.max_candidates_per_round if self.opts.max_candidates_per_round is not None else 10**9

    @property
    def speed_target(self) -> int | None:
        """``prefer="speed"``: the peak to reach and then stay within (half the unoptimized one)."""
        return int(self.baseline.peak_bytes * SPEED_PEAK_FRACTION) if self.opts.prefer == "speed" else None

    def logging_to(self, result: SearchResult) -> Planner:
        """The same planner writing its decisions to another result (to try a path and keep it only if better)."""
        return dataclasses.replace(self, result=result)


#: One stage of the search: from a plan and its prediction to a better plan and its prediction.
Stage = Callable[[Plan, Prediction, Planner], tuple[Plan, Prediction]]


def search(cost: nx.DiGraph, regions: list[Region], split_candidates: dict[str, list[Region]],
           opts: Options, progress: Callable[[str], None] | None = None) -> SearchResult:
    """Choose a plan (see the module docstring): the stages, in order, each a :data:`Stage`.

    Args:
        cost: the cost graph (:func:`fxmemopt.planning.costgraph.build_cost_graph`).
        regions: candidate regions (from :func:`fxmemopt.planning.regions.find_regions`).
        split_candidates: region name -> the per-neuron regions it can be split into (level 2).
        opts: resolved options.
        progress: told how many candidate plans have been evaluated, every 100.

    Returns:
        A :class:`SearchResult`.

    Raises:
        MemoryBudgetError: ``memory_budget`` is below the smallest peak any plan reaches.
    """
    baseline = simulate(cost, None)
    result = SearchResult(Plan(()), baseline, baseline, candidates=len(regions))
    if _nothing_to_search(regions, opts, result):
        return result
    planner = Planner(cost, facts(cost), opts, regions, split_candidates, baseline, result, progress)
    plan, pred = Plan(()), baseline
    for stage in STAGES:
        plan, pred = stage(plan, pred, planner)
    result.plan, result.prediction = plan, pred
    return result


def _nothing_to_search(regions: list[Region], opts: Options, result: SearchResult) -> bool:
    """Level 0, or no candidate region: nothing to wrap (recorded in ``result``)."""
    if opts.level == 0 or not regions:
        result.skipped_steps.append("level0:no_optimization" if opts.level == 0 else "level1:no_candidates")
        return True
    return False


def _wrapped(regions: list[Region], graph: AnnotatedGraph, opts: Options, result: SearchResult) -> Plan:
    """The level-1 plan: the selected candidate regions whole (all, or the level-1 budget's share), each decision
    recorded in ``result``."""
    chosen = _select(regions, graph, opts, result)
    result.selected = [r.anchor for r in chosen]
    result.decisions += [Decision(r.name, "wrap" if r in chosen else "skip", result.explanation) for r in regions]
    result.applied_steps.append("level1_gc")
    return Plan(tuple(_region_plan(r, graph, opts.compress) for r in chosen))


def wrap(plan: Plan, pred: Prediction, p: Planner) -> tuple[Plan, Prediction]:
    """Level 1: checkpoint the selected candidate regions (all, or the level-1 budget's share)."""
    plan = _wrapped(p.regions, p.graph, p.opts, p.result)
    pred = p.evaluate(plan)
    p.level1 = (plan, pred)
    return plan, pred


def split_spatially(plan: Plan, pred: Prediction, p: Planner) -> tuple[Plan, Prediction]:
    """Level 2: split multi-neuron regions into their per-neuron regions, hottest first."""
    if p.opts.level < 2:
        return plan, pred

    def propose(rp: RegionPlan, current: Plan) -> _Proposal:
        if len(p.splits.get(rp.name, [])) < 2:
            return None
        parts = [_region_plan(r, p.graph, p.opts.compress) for r in p.splits[rp.name]]
        return (Plan(tuple(x for r in current.regions for x in (parts if r.name == rp.name else [r]))),
                f"split into {len(parts)} per-neuron regions")

    return _improve(plan, pred, "split", propose, p.rounds, p.per_round, p, "2_spatial_split")


def slice_in_time(plan: Plan, pred: Prediction, p: Planner) -> tuple[Plan, Prediction]:
    """Level 3: recompute the neuron of the region at the peak in more time slices (exact regions only); preferring
    speed, only until the peak reaches the speed target (slices add time). Below level 3 with a
    ``slice_time_budget`` (the default), only moves whose predicted step time stays within that budget."""
    target = p.speed_target
    if p.opts.level < 3 and p.opts.slice_time_budget is not None:
        # the default: slices too, within its time budget over the level-1 plan
        return _temporal(plan, pred, p, time_limit=pred.step_time_s * (1 + p.opts.slice_time_budget))
    if p.opts.level < 3 or (target is not None and pred.peak_bytes <= target):
        return plan, pred
    return _temporal(plan, pred, p, target)


def leave_out_harmful(plan: Plan, pred: Prediction, p: Planner) -> tuple[Plan, Prediction]:
    """Never worse (``never_worse=True``): leave out the regions that raise the predicted peak.

    At level 3 and above, once regions are left out the peak may sit where slicing now pays (level 3 slices only
    the region at the peak, and the peak was elsewhere): one more pass of :func:`slice_in_time`, then never worse
    again on what it sliced. Not for the default, whose slices spend a time budget over the plan they start from.
    """
    if not p.opts.never_worse:
        return plan, pred
    kept, kept_pred = _never_worse(plan, pred, p)
    if p.opts.level < 3 or not kept.regions or kept == plan:
        return kept, kept_pred
    sliced, sliced_pred = slice_in_time(kept, kept_pred, p)
    return (kept, kept_pred) if sliced == kept else _never_worse(sliced, sliced_pred, p)


#: The default leaves out the regions that lower its predicted peak by less than this fraction of it together (they
#: cost recomputation and buy about nothing: norse's recurrent cells, one region per call, each keeping its real-valued
#: state; a loop-in-forward MLP cut into per-step pieces). ``prefer="memory"`` leaves out only those that lower it
#: not at all.
IDLE_PEAK_TOLERANCE = 0.01


def leave_out_idle(plan: Plan, pred: Prediction, p: Planner) -> tuple[Plan, Prediction]:
    """The default and ``prefer="memory"``: no region kept that the cost model cannot show pays for itself.

    Each region is left out alone (one prediction each); those whose absence keeps the predicted peak within the
    tolerance (:data:`IDLE_PEAK_TOLERANCE`; none for ``prefer="memory"``) and lowers the predicted step time are
    idle. Together they may matter where alone they do not (the peak is a maximum: two regions can each hide the
    other's effect), so they leave as a batch when the batch keeps the peak within the tolerance, else in halves,
    the ones costing the most time first. Level 4 and ``memory_budget`` give time back with their own, broader
    moves (:func:`give_time_back`); ``never_worse=False`` keeps every region.
    """
    opts, result = p.opts, p.result
    is_default = opts.slice_time_budget is not None
    if not plan.regions or not opts.never_worse or opts.level >= 4 or opts.memory_budget is not None \
            or opts.calls_per_step != 1 or not (is_default or opts.prefer == "memory"):
        return plan, pred
    limit = pred.peak_bytes + (int(IDLE_PEAK_TOLERANCE * pred.peak_bytes) if is_default else 0)

    def without(base: Plan, names: set[str]) -> Plan:
        return Plan(tuple(r for r in base.regions if r.name not in names))

    idle = []
    for k, rp in enumerate(plan.regions):
        alone = p.evaluate(without(plan, {rp.name}))
        if alone.peak_bytes <= limit and alone.step_time_s < pred.step_time_s:
            idle.append((alone.step_time_s, k, rp))
    idle.sort(key=lambda t: (t[0], t[1]))  # the most time given back first
    left_out: list[str] = []
    best, best_pred = plan, pred
    pending = [[rp for _, _, rp in idle]]
    while pending:
        batch = pending.pop(0)
        if not batch:
            continue
        candidate = without(best, {rp.name for rp in batch})
        cand = p.evaluate(candidate)
        if cand.peak_bytes <= limit and cand.step_time_s < best_pred.step_time_s:
            for rp in batch:
                result.decisions.append(Decision(rp.name, "unwrap", f"buys nothing: the predicted peak stays "
                                                 f"{_mib(cand.peak_bytes)} without it (within {_mib(limit)}), and "
                                                 f"its recomputation costs time", on_time=True))
                left_out.append(rp.name)
            best, best_pred = candidate, cand
        elif len(batch) > 1:
            pending[:0] = [batch[:len(batch) // 2], batch[len(batch) // 2:]]
    if left_out:
        result.notes.append(f"{len(left_out)} region(s) left out that lowered the predicted peak by "
                            + (f"less than {IDLE_PEAK_TOLERANCE:.0%}" if is_default else "nothing")
                            + f" ({', '.join(left_out[:8])}{', ...' if len(left_out) > 8 else ''}; their "
                              f"recomputation costs time; never_worse=False keeps them)")
        result.applied_steps.append("leave_out_idle")
    return best, best_pred


def give_time_back(plan: Plan, pred: Prediction, p: Planner) -> tuple[Plan, Prediction]:
    """Level 4 and ``memory_budget``: give recomputation up where it costs the most time, while the predicted peak
    stays within the limit (the plan's own peak, the speed target, or the budget)."""
    opts, result = p.opts, p.result
    budget = opts.activation_budget
    if budget is not None and p.baseline.peak_bytes <= budget:
        # The fastest plan that fits is no plan: nothing is recomputed.
        result.decisions += [Decision(r.name, "unwrap", f"the unoptimized step fits memory_budget (predicted "
                                      f"{opts.budget_text(p.baseline.peak_bytes)} <= {_mib(opts.memory_budget)})")
                             for r in plan.regions]
        result.pre_unwrap = plan
        result.applied_steps.append("budget_fits_unoptimized")
        return Plan(()), p.baseline
    if budget is not None:
        if pred.peak_bytes > budget:
            raise MemoryBudgetError(format_error(
                "memory_budget", "no plan fits",
                expected=f"a predicted whole step <= {_mib(opts.memory_budget)}",
                got=f"the smallest reachable predicted peak is {opts.budget_text(pred.peak_bytes)} (unoptimized "
                    f"{opts.budget_text(p.baseline.peak_bytes)})",
                fix=f"Raise memory_budget to at least {pred.peak_bytes + opts.budget_resident} bytes, reduce the "
                    f"batch size or T, or pass targets=... to checkpoint larger blocks."))
        limit = budget
        result.pre_unwrap = plan
        decided = len(result.decisions)
        best, best_pred = _unwrap(plan, pred, limit, p, shrink=True)
        level1 = p.level1
        if level1 is not None and level1[1].peak_bytes <= limit and level1[0] != result.pre_unwrap:
            # Giving time back from the smallest peak is greedy: the level-1 plan (every region whole, no slices)
            # may fit too and be faster than anything it reaches. Give time back from there as well; keep the faster.
            other = SearchResult(Plan(()), None, p.baseline)
            alt, alt_pred = _unwrap(*level1, limit, p.logging_to(other), shrink=True)
            result.evaluated += other.evaluated
            if alt_pred.step_time_s < best_pred.step_time_s:
                result.decisions[decided:] = [Decision(r.name, "keep", "the level-1 plan fits memory_budget and is "
                                                       "faster than the smallest-peak plan with time given back",
                                                       on_time=True)
                                              for r in alt.regions] + other.decisions
                result.pre_unwrap = level1[0]
                best, best_pred = alt, alt_pred
        return best, best_pred
    if opts.level >= 4:
        target = p.speed_target
        result.pre_unwrap = plan
        decided = len(result.decisions)
        best, best_pred = _unwrap(plan, pred, pred.peak_bytes if target is None else max(pred.peak_bytes, target), p,
                                  shrink=target is not None)
        if target is not None:
            # prefer="speed" also builds up from nothing, cheapest recomputation first; the faster plan that reaches
            # the target wins (or the lower peak, if neither does).
            other = SearchResult(Plan(()), None, p.baseline)
            alt, alt_pred = cheapest_first(p.logging_to(other))
            result.evaluated += other.evaluated
            def rank(pr: Prediction) -> tuple[int, float]:
                return (0, pr.step_time_s) if pr.peak_bytes <= target else (1, pr.peak_bytes)

            if rank(alt_pred) < rank(best_pred):
                result.decisions[decided:] = other.decisions
                result.applied_steps.append("speed_cheapest_first")
                best, best_pred = alt, alt_pred
        return best, best_pred
    return plan, pred


def keep_slice_starts(plan: Plan, pred: Prediction, p: Planner) -> tuple[Plan, Prediction]:
    """Time back at the same peak: a time-sliced region whose backward does not set the predicted peak keeps every
    slice's start state from its one no-grad neuron replay (``keep_starts``), instead of one every
    :func:`~fxmemopt.planning.plan.checkpoint_every` slices and a second replay per segment. Accepted when the
    predicted peak does not rise and the predicted step time falls. Never raises the peak, so it keeps what the
    stages before it reached (a budget, the speed target, never worse).

    First every region but the one at the predicted peak together (one prediction: each region's extra start
    states live only during its own backward, so they rarely add up); if that raises the peak, region by region as
    before. The region at the peak is tried last, alone."""
    hot = _peak_region(pred, plan)
    eligible = [rp for rp in sorted(plan.regions, key=lambda r: (r.name == hot, r.name))
                if rp.chunks >= 2 and not rp.whole_slices and not rp.keep_starts
                and checkpoint_every(rp.chunks) < rp.chunks]
    changed = False

    def keep(rps: list[RegionPlan], plan: Plan, pred: Prediction) -> tuple[Plan, Prediction, bool]:
        names = {rp.name for rp in rps}
        candidate = Plan(tuple(dataclasses.replace(r, keep_starts=True) if r.name in names else r
                               for r in plan.regions))
        cand = p.evaluate(candidate)
        if cand.peak_bytes <= pred.peak_bytes and cand.step_time_s < pred.step_time_s:
            together = f" ({len(rps)} regions together)" if len(rps) > 1 else ""
            p.result.decisions += [Decision(rp.name, "keep starts", (
                f"every slice's start state kept by one replay: predicted step time x"
                f"{pred.step_time_s / p.baseline.step_time_s:.3f} -> x{cand.step_time_s / p.baseline.step_time_s:.3f}"
                f", peak {_mib(cand.peak_bytes)} (not higher){together}"), on_time=True) for rp in rps]
            return candidate, cand, True
        return plan, pred, False

    cold = [rp for rp in eligible if rp.name != hot]
    if len(cold) > 1:
        plan, pred, changed = keep(cold, plan, pred)
    for rp in eligible if not changed else [rp for rp in eligible if rp.name == hot]:
        plan, pred, kept = keep([rp], plan, pred)
        changed |= kept
    if changed:
        p.result.applied_steps.append("keep_slice_starts")
    return plan, pred


#: The search, in order.
STAGES: tuple[Stage, ...] = (wrap, split_spatially, slice_in_time, leave_out_harmful, leave_out_idle,
                             give_time_back, keep_slice_starts)


#: A move's candidate ``(plan, description)``, alternatives in order of preference (a list: the first that lowers the
#: peak is taken), a reason it does not apply (a string), or ``None``.
_Proposal = tuple[Plan, str] | list[tuple[Plan, str]] | str | None


def _improve(best: Plan, pred: Prediction, action: str, propose, rounds: int, per_round: int, p: Planner,
             step: str, stop_at: int | None = None, time_limit: float | None = None) -> tuple[Plan, Prediction]:
    """Rounds of: try regions, the one at the predicted peak first, at most ``per_round`` candidates a round;
    accept the first candidate that strictly lowers the predicted peak (within ``time_limit``, a predicted step time,
    when given); stop after a round without improvement.

    ``propose(region_plan, plan)`` returns ``(candidate plan, description)``, a reason string when the region
    cannot take this move (recorded once), or ``None`` when it simply does not apply.

    Cost: a region whose move fails (or does not apply) is out of the running for the rest of the stage, and a
    round ends at its first accepted move, so a stage predicts at most (accepted moves + regions) x (alternatives
    per move) plans, however many rounds it runs; accepted moves are bounded per region too (one split; one
    doubling of the slices each, up to T).
    """
    blocked: set[str] = set()
    improved_any = False
    done = 0
    while done < rounds and (stop_at is None or pred.peak_bytes > stop_at):
        done += 1
        hot = _peak_region(pred, best)
        tried = 0
        improved = False
        for rp in sorted((r for r in best.regions if r.name not in blocked), key=lambda r: (r.name != hot, r.name)):
            if tried >= per_round:
                break
            proposal = propose(rp, best)
            if not isinstance(proposal, (tuple, list)):
                blocked.add(rp.name)
                if proposal:
                    p.result.decisions.append(Decision(rp.name, "reject", proposal))
                continue
            tried += 1
            # alternatives (a list), in order of preference: the first that lowers the predicted peak
            def fits(c: Prediction, pred: Prediction = pred) -> bool:
                return c.peak_bytes < pred.peak_bytes and (time_limit is None or c.step_time_s <= time_limit)

            for candidate, what in (proposal if isinstance(proposal, list) else [proposal]):  # noqa: B007 (used below)
                cand = p.evaluate(candidate)
                if fits(cand):
                    break
            if fits(cand):
                p.result.decisions.append(Decision(rp.name, action, f"{what}: predicted peak {_mib(pred.peak_bytes)} "
                                                   f"-> {_mib(cand.peak_bytes)}", on_time=time_limit is not None))
                best, pred, improved, improved_any = candidate, cand, True, True
                break
            blocked.add(rp.name)
            if cand.peak_bytes < pred.peak_bytes:
                p.result.decisions.append(Decision(rp.name, "reject", f"{what} would exceed the step-time budget "
                                                   f"(predicted x{cand.step_time_s / time_limit:.2f} of it)",
                                                   on_time=True))
            else:
                p.result.decisions.append(Decision(rp.name, "reject", f"{what} would not lower the predicted peak "
                                                   f"({_mib(cand.peak_bytes)} >= {_mib(pred.peak_bytes)})"))
        if not improved:
            break
    if improved_any:
        p.result.applied_steps.append(f"level{step}")
    else:
        p.result.skipped_steps.append(f"level{step[0]}:no_improving_candidate")
    return best, pred


#: Never worse runs at most this many rounds of per-region trials (one prediction per region each). Its batches drop
#: every region that raised the peak at once, so the rounds are the chains of interaction (a region harmful only
#: once its neighbour is gone): DeepConvSNN up to 128 blocks and the zoo converge in one or two; four bound the
#: search at about 4 x (regions) predictions where dropping one region a round took (harmful regions) x (regions).
NEVER_WORSE_ROUNDS = 4


def _never_worse(best: Plan, pred: Prediction, p: Planner) -> tuple[Plan, Prediction]:
    """Leave out the regions whose checkpointing raises the predicted peak (their kept inputs and recomputation cost
    more than they free: small layers, a layer whose input is kept anyway); if the plan still predicts a higher
    peak than the unoptimized step, return no plan at all.

    Rounds of trials: each region is left out alone (one prediction per region, also for plans already below the
    unoptimized peak: a region that raises the peak is never worth keeping), and every region whose removal
    lowered the peak is dropped at once, the most harmful first: that batch is kept when one prediction shows it
    lowers the peak at least as far as dropping the most harmful region alone (the old one-region-a-round step);
    otherwise its less harmful half is put back, and again, down to the most harmful region alone (already
    predicted). A round without a harmful region tries each left-out region back in (:func:`_put_back`: the one
    lowering the peak the most returns); failing that, it leaves out together the regions that lower nothing
    (their absence keeps the peak), kept only if the next round finds a harmful region or the peak fell (the peak
    is a maximum: two regions can each hide the other's harm). A round that moves nothing ends the search; at most
    :data:`NEVER_WORSE_ROUNDS` rounds run, so the cost is about ``rounds x regions`` predictions (plus ``log2`` of
    each batch; twice per left-out region where put-back also tries it sliced), not ``regions**2``.

    With ``calls`` forward calls per step (a single-step network called once per time step) the peak compared is
    the whole step's (:func:`~fxmemopt.planning.costgraph.peak_over_calls`): what a call keeps for backward counts
    ``calls`` times, so a region can lower it while raising one call's transient peak.
    """
    calls, result, baseline = p.opts.calls_per_step, p.result, p.baseline

    def predict(plan: Plan) -> tuple[int, Prediction]:
        if calls == 1:
            one = p.evaluate(plan)
            return one.peak_bytes, one
        result.evaluated += 1
        one = simulate(p.cost, plan, with_timeline=True)
        return peak_over_calls(one, calls), dataclasses.replace(one, timeline=())

    def without(plan: Plan, names: set[str]) -> Plan:
        return Plan(tuple(r for r in plan.regions if r.name not in names))

    current, current_pred = (pred.peak_bytes, pred) if calls == 1 else predict(best)
    floor = baseline.peak_bytes if calls == 1 else predict(Plan(()))[0]
    out: list[RegionPlan] = []  # the regions left out (in order), to put back where they lower the peak again
    original = best.regions
    tentative: tuple[Plan, int, Prediction] | None = None
    held_out: list[RegionPlan] = []
    for _ in range(NEVER_WORSE_ROUNDS):
        # (regions in plan order break ties: deterministic; with none left, only put-back can move)
        trials = [(predict(without(best, {rp.name})), k, rp) for k, rp in enumerate(best.regions)]
        harmful = sorted(((peak, k, rp, one) for (peak, one), k, rp in trials if peak < current),
                         key=lambda t: (t[0], t[1]))
        if not harmful:
            if tentative:  # the neutral regions left out last round hid nothing: back in (below)
                break
            back = _put_back(best, out, current, predict, original, _put_back_forms(p))
            if back is not None:
                # A region left out in an earlier batch lowers the peak again, now that others are gone (the batch
                # was judged against the plan of its round): back in, one a round, the one lowering it the most.
                rp, best, peak, current_pred = back
                form = next(r for r in best.regions if r.name == rp.name)
                how = f" in {form.chunks} time slices, prefix recomputed" if form != rp else ""
                result.decisions.append(Decision(rp.name, "wrap", f"put back{how}: the predicted peak "
                                                 f"{_mib(current)} without it, {_mib(peak)} with it, once others "
                                                 f"were left out"))
                out.remove(rp)
                current = peak
                continue
            neutral = [rp for (peak, _), _, rp in trials if peak == current]
            held = _leave_out_together(best, neutral, current, predict, without)
            if held is None:
                break
            # No region raises the peak alone, but some lower nothing: the peak is a maximum, and two regions can
            # each hide the other's harm (a region whose kept input is at the peak only while its neighbour's
            # recomputation is). Leave the neutral ones out (the peak stays) and look again; kept only if that
            # finds a harmful region, so a plan that converged stays as it was.
            tentative = (best, current, current_pred)
            held_out = [rp for rp in neutral if rp not in held[0].regions]
            best, current, current_pred = held
            if current < tentative[1]:  # together they raised it: out for good
                _record_neutral(held_out, tentative[1], "together they raised the peak", result, out)
                tentative = None
            continue
        if tentative:
            _record_neutral(held_out, tentative[1], "a region it hid raised the peak", result, out)
            tentative = None
        batch = harmful
        while len(batch) > 1:
            peak, one = predict(without(best, {rp.name for _, _, rp, _ in batch}))
            if peak <= harmful[0][0]:
                break
            batch = batch[:len(batch) // 2]  # the less harmful half back in
        if len(batch) == 1:
            peak, one = harmful[0][0], harmful[0][3]
        for alone, _, rp, _ in batch:
            result.decisions.append(Decision(rp.name, "unwrap", f"raised the predicted peak: {_mib(current)} with "
                                             f"it, {_mib(alone)} without"))
            out.append(rp)
        best, current, current_pred = without(best, {rp.name for _, _, rp, _ in batch}), peak, one
    if tentative:  # rounds or regions ran out before the neutral regions' absence showed anything: back in
        best, current, current_pred = tentative
    if best.regions and current > floor:
        for rp in best.regions:
            result.decisions.append(Decision(rp.name, "unwrap", f"the plan's predicted peak {_mib(current)} is above "
                                             f"the unoptimized {_mib(floor)}: returned unoptimized"))
        result.notes.append(f"never worse: no plan lowers the predicted peak ({_mib(floor)} unoptimized); the model "
                            f"is returned without regions (never_worse=False keeps them)")
        return Plan(()), baseline
    if out:
        result.notes.append(f"never worse: {len(out)} region(s) left out because checkpointing them raised the "
                            f"predicted peak ({', '.join(rp.name for rp in out)}; never_worse=False keeps them)")
        if "never_worse" not in result.applied_steps:  # (run twice at level 3+: once after the second slicing pass)
            result.applied_steps.append("never_worse")
        return best, current_pred
    return best, pred


def _record_neutral(regions: list[RegionPlan], peak: int, why: str, result: SearchResult,
                    out: list[RegionPlan]) -> None:
    """Never worse's decisions for regions left out that lowered nothing alone (see :func:`_never_worse`)."""
    for rp in regions:
        result.decisions.append(Decision(rp.name, "unwrap", f"lowered nothing: {_mib(peak)} with it, the same "
                                         f"without; left out, as {why}"))
        out.append(rp)


def _put_back_forms(p: Planner) -> Callable[[RegionPlan], list[RegionPlan]]:
    """The forms a left-out region is tried back in: as it was, and where the search slices for memory
    (``prefer="memory"``, ``memory_budget``, at level 3) also in one slice per time step, its prefix recomputed
    (a region left out whole while another set the peak can pay for itself sliced once that one is gone, and the
    level-3 stage only slices the region at the peak)."""
    opts, graph = p.opts, p.graph
    if graph is None or opts.level < 3 or not (opts.prefer == "memory" or opts.memory_budget is not None):
        return lambda rp: [rp]

    def forms(rp: RegionPlan) -> list[RegionPlan]:
        if rp.whole_slices or not chunkable(graph, rp.nodes)[0]:
            return [rp]
        steps = graph[rp.nodes[-1]].time_steps
        sliced = dataclasses.replace(rp, chunks=steps, keep_prefix=False)
        return [rp] if sliced == rp else [rp, sliced]
    return forms


def _put_back(plan: Plan, out: list[RegionPlan], peak: int, predict, order: tuple[RegionPlan, ...],
              forms: Callable[[RegionPlan], list[RegionPlan]]) -> tuple[RegionPlan, Plan, int, Prediction] | None:
    """The left-out region (of ``out``, in one of its ``forms``) whose return to ``plan`` (in ``order``, the plan's
    original order) lowers the predicted peak below ``peak`` the most, with that plan and its peak; ``None`` if none
    does (one prediction per form)."""
    found = None
    current = {r.name: r for r in plan.regions}  # (as they are now: one put back earlier may be sliced)
    for rp in out:
        for form in forms(rp):
            candidate = Plan(tuple(form if r.name == rp.name else current[r.name] for r in order
                                   if r.name in current or r.name == rp.name))
            got, one = predict(candidate)
            if got < peak and (found is None or got < found[2]):
                found = (rp, candidate, got, one)
    return found


def _leave_out_together(plan: Plan, batch: list[RegionPlan], peak: int, predict, without) \
        -> tuple[Plan, int, Prediction] | None:
    """``plan`` without as many of ``batch`` as leave its predicted peak at most ``peak``: all of them in one
    prediction, else the first half, and so on (a binary back-off, ``log2`` predictions); ``None`` when not even
    one can leave."""
    while batch:
        candidate = without(plan, {rp.name for rp in batch})
        got, one = predict(candidate)
        if got <= peak:
            return candidate, got, one
        if len(batch) == 1:
            return None
        batch = batch[:len(batch) // 2]
    return None


def _temporal(best: Plan, pred: Prediction, p: Planner, stop_at: int | None = None,
              time_limit: float | None = None) -> tuple[Plan, Prediction]:
    """Level 3: recompute the neuron of the region at the peak in more time slices (exact regions only)."""
    # Recomputing the prefix saves memory at the price of its forward: for prefer="memory", and under a budget
    # (whose search starts from the smallest peak and then buys time back).
    graph, opts = p.graph, p.opts
    keep_prefix = opts.prefer != "memory" and opts.memory_budget is None

    def exact_move(rp: RegionPlan, plan: Plan) -> _Proposal:
        ok, why = chunkable(graph, rp.nodes)
        if not ok:
            return f"not chunked: {why}"
        steps = graph[rp.nodes[-1]].time_steps
        chunks = steps if graph[rp.nodes[-1]].step_slices_only else min(steps, rp.chunks * opts.temporal_split_factor)
        if chunks == rp.chunks:
            return None  # already one slice per time step

        def sliced(k: int) -> tuple[Plan, str]:
            new = dataclasses.replace(rp, chunks=k, keep_prefix=keep_prefix)
            return (Plan(tuple(new if r.name == rp.name else r for r in plan.regions)),
                    f"{k} time slices{'' if keep_prefix else ', prefix recomputed'}")

        # The next multiple, and one slice per step: the peak need not fall step by step (two slices can cost
        # more than they save where one per step does not).
        return [sliced(chunks)] + ([sliced(steps)] if steps != chunks else [])

    def whole_move(rp: RegionPlan, plan: Plan) -> _Proposal:
        # The seed's temporal split: the whole region on each slice (Rule 9); may change values, reported.
        ok, why, _ = sliceable(graph, rp.nodes)
        if not ok:
            return f"not sliced: {why}"
        chunks = min(graph[region_io(graph, rp.nodes)[1][0]].shape[0], rp.chunks * opts.temporal_split_factor)
        if chunks == rp.chunks:
            return None
        new = dataclasses.replace(rp, chunks=chunks, whole_slices=True)
        return (Plan(tuple(new if r.name == rp.name else r for r in plan.regions)),
                f"{chunks} whole-region time slices (exact=False)")

    def propose(rp: RegionPlan, plan: Plan) -> _Proposal:
        # Exact where possible; with exact=False, whole slices only for regions exact slicing cannot handle (a
        # multi-neuron block, a residual output): where both apply, exact slices keep less (whole slices keep every
        # slice's entry state from forward to backward) and change nothing.
        exact = exact_move(rp, plan)
        if opts.exact or not isinstance(exact, str):
            return exact
        whole = whole_move(rp, plan)
        return whole if whole is None or isinstance(whole, tuple) else f"{exact}; {whole}"

    # Without an explicit max_split_rounds, rounds are bounded by the regions times the doublings that fit in T.
    limit = p.rounds if opts.max_split_rounds is not None else 8 * max(1, len(best.regions))
    return _improve(best, pred, "chunk", propose, limit, p.per_round, p, "3_temporal_split", stop_at, time_limit)


#: Level 4 accepts at most this many moves per region of the plan it starts from (unwrap, shrink, keep the prefix,
#: unslice: about four per region; a region re-sliced by another's unwrap+slice can take a few more): a bound on
#: rounds that the searches measured never reach, so a pathological cost graph cannot make the search quadratic.
UNWRAP_MOVES_PER_REGION = 8


def _unwrap(best: Plan, pred: Prediction, limit: int, p: Planner, shrink: bool = False) -> tuple[Plan, Prediction]:
    """Level 4: give up recomputation where it costs the most time, while the predicted peak stays within ``limit``.

    Moves: *unwrap* a region (if that does not fit: unwrap it and slice the other regions in time, their prefixes
    kept, then recomputed); *keep the prefix* of a time-sliced region (its tensors captured by the recomputation
    that feeds the slices, instead of recomputed again); *unslice* it (recompute it whole: no neuron replays, slice
    copies or second prefix forward; estimated at its prefix's forward if recomputed, plus half its neuron's); or
    (with ``shrink``, for speed) *shrink* it to its neuron — the neuron's per-step tensors are
    most of a layer's memory but cheap to recompute, while convolutions are the opposite. Each round takes the move
    with the largest estimated saving (the forward time it stops recomputing) whose predicted peak stays within
    ``limit``.

    Bounded: a move that did not fit is not predicted again while its region is unchanged, unless the plan's
    predicted peak has fallen since (moves give time back, so the peak mostly rises and what did not fit still does
    not); each such move is retried at most once. Candidate plans are built only when predicted. So a search
    predicts about (moves per region) x (regions) plans, where re-predicting every larger-saving move each round
    took (rounds) x (regions); at most :data:`UNWRAP_MOVES_PER_REGION` moves per region are accepted.
    """
    fwd = dict(p.cost.nodes(data="fwd_time_s", default=0.0))
    graph, result = p.graph, p.result
    changed = 0
    # (action, region plan, variant) -> the plan's predicted peak when it did not fit, and whether it was retried
    failed: dict[tuple[str, RegionPlan, int], tuple[int, bool]] = {}
    max_moves = UNWRAP_MOVES_PER_REGION * max(1, len(best.regions))

    while changed < max_moves:
        # Per round, once: each region sliced one slice per step where it can be (the unwrap fallbacks' others)
        finer_all = _sliced_per_step(best.regions, graph)
        leaner_all = _sliced_per_step(best.regions, graph, keep_prefix=False)
        sliceable_names = {r.name for r, f in zip(best.regions, finer_all) if f != r}
        # (saving, region k's plan, action, variant, base, k, replacement): the candidate is ``base`` with region k
        # replaced (or left out: None), built only when predicted
        moves: list[tuple[float, RegionPlan, str, int, tuple[RegionPlan, ...], int, RegionPlan | None]] = []
        for k, rp in enumerate(best.regions):
            nodes_s = sum(fwd.get(n, 0.0) for n in rp.nodes)
            moves.append((nodes_s, rp, "unwrap", 0, best.regions, k, None))
            if sliceable_names - {rp.name}:
                # Its fallback: unwrap it and pay for that with the others' memory: every unsliced region that can
                # be sliced, one slice per step with its prefix kept (a neuron replay each: cheap).
                moves.append((nodes_s, rp, "unwrap+slice", 0, finer_all, k, None))
                # and, if that does not fit either, with their prefixes recomputed (less memory, one prefix
                # forward more each): unwrapping the costlier region can still beat keeping it
                moves.append((nodes_s, rp, "unwrap+slice_lean", 0, leaner_all, k, None))
            if rp.chunks > 1 and not rp.keep_prefix and not rp.whole_slices:
                # keep the prefix's tensors from the recomputation that feeds the slices: one prefix forward less.
                # The kept prefix raises the peak; finer slices (one per step) can win that back, so they are the
                # move's fallback at the same saving.
                steps = graph[rp.nodes[-1]].time_steps
                for v, chunks in enumerate([rp.chunks] + ([steps] if steps and steps > rp.chunks else [])):
                    kept = dataclasses.replace(rp, keep_prefix=True, chunks=chunks)
                    moves.append((sum(fwd.get(n, 0.0) for n in rp.nodes[:-1]), rp, "keep_prefix", v, best.regions,
                                  k, kept))
            if rp.chunks > 1 and not rp.whole_slices:
                # the region whole again: no neuron replays, slice copies or second prefix forward
                whole = dataclasses.replace(rp, chunks=1, keep_prefix=True, keep_starts=False)
                moves.append((sum(fwd.get(n, 0.0) for n in rp.nodes[:-1]) * (0 if rp.keep_prefix else 1)
                              + fwd.get(rp.nodes[-1], 0.0) * 0.5, rp, "unslice", 0, best.regions, k, whole))
            if shrink and len(rp.nodes) > 1 and graph[rp.nodes[-1]].seeds_region:
                nodes = (rp.nodes[-1],)
                bits = tuple(input_bits(graph, i, any(rp.pack_bits)) for i in region_io(graph, nodes)[0])
                small = dataclasses.replace(rp, nodes=nodes, pack_bits=bits, chunks=1, keep_prefix=True,
                                            whole_slices=False)
                moves.append((sum(fwd.get(n, 0.0) for n in rp.nodes[:-1]), rp, "shrink", 0, best.regions, k,
                              small))
        chosen = None
        # (sorted is stable: a move's fallbacks follow it)
        for _, rp, action, variant, base, k, new in sorted(moves, key=lambda m: (-m[0], m[1].name,
                                                                                  m[2].split("+")[0])):
            key = (action, rp, variant)
            if key in failed:
                peak_then, retried = failed[key]
                if retried or pred.peak_bytes >= peak_then:
                    continue  # did not fit, and nothing since suggests it would now
            candidate = Plan(base[:k] + ((new,) if new is not None else ()) + base[k + 1:])
            cand = p.evaluate(candidate)
            if cand.peak_bytes <= limit:
                chosen = (action, rp, candidate, cand)
                break
            failed[key] = (pred.peak_bytes, key in failed)
        if chosen is None:
            break
        action, rp, candidate, cand = chosen
        saved_ms = (pred.step_time_s - cand.step_time_s) * 1e3
        what = {"shrink": "shrunk to its neuron (the prefix is no longer recomputed)", "unwrap": "unwrapped",
                "unslice": "recomputed whole again (no time slices, no neuron replays)",
                "keep_prefix": "prefix kept from the slices' recomputation (not recomputed twice)",
                "unwrap+slice": "unwrapped, the other regions sliced one slice per time step",
                "unwrap+slice_lean": "unwrapped, the other regions sliced one slice per time step, their prefixes "
                                     "recomputed"}[action]
        result.decisions.append(Decision(rp.name, action.split("+")[0], f"{what}: saves ~{saved_ms:.1f} ms per step; "
                                         f"predicted peak {_mib(cand.peak_bytes)} <= {_mib(limit)}", on_time=True))
        best, pred = candidate, cand
        changed += 1
    (result.applied_steps if changed else result.skipped_steps).append(
        "level4_greedy_unwrap" if changed else "level4:no_unwrap_within_peak")
    return best, pred


def saved_inputs(cost: nx.DiGraph) -> dict[str, set[str]]:
    """Per node, the inputs whose values (or views of them) it saves for backward, from the recorded storages."""
    out: dict[str, set[str]] = {}
    for _, records in cost.nodes(data="storages"):
        for st in records or ():
            if st.phase != "fwd" or not st.saved_by:
                continue
            views = st.views or ((st.value_of,) if st.value_of else ())
            for m in st.saved_by:
                info = cost.nodes[m].get("info") if m in cost else None
                hit = [v for v in views if info is not None and v in info.inputs]
                if hit:
                    out.setdefault(m, set()).update(hit)
    return out


def packed_saves(graph: AnnotatedGraph, saved: dict[str, set[str]], covered: set[str],
                 compress: bool = True) -> list[RegionPlan]:
    """Packed-saves regions (Rule 11 of :mod:`fxmemopt.runtime.checkpoint`): one per node outside ``covered`` (the
    recomputed regions) that saves a spike input for backward; that input is stored packed, nothing recomputed."""
    out = []
    for n in graph.order:
        if n in covered or n not in saved or graph[n].op not in ("call_module", "call_function", "call_method"):
            continue
        inputs = region_io(graph, (n,))[0]
        bits = tuple(input_bits(graph, i, compress) if i in saved[n] else 0 for i in inputs)
        if any(bits):
            out.append(RegionPlan(f"pack_{n}", graph[n].target if graph[n].op == "call_module" else n, (n,), bits,
                                  recompute=False))
    return out


def _ladder(r: Region, p: Planner) -> list[tuple[str, ...]]:
    """The ways to recompute candidate region ``r``, cheapest first: the suffixes of its nodes that end in its neuron
    and start at a node that computes something (the neuron alone; BatchNorm and neuron; ...), then all of it."""
    nodes = r.nodes
    if not p.graph[nodes[-1]].seeds_region:
        return [nodes]
    alloc = dict(p.cost.nodes(data="alloc_bytes", default=0))
    starts = [k for k in range(1, len(nodes)) if alloc.get(nodes[k], 0) > 0 and not is_metadata(p.graph, nodes[k])]
    return [nodes[k:] for k in reversed(starts)] + [nodes]


def cheapest_first(p: Planner) -> tuple[Plan, Prediction]:
    """``prefer="speed"``: from the unoptimized step, add what lowers the predicted peak most per second it adds,
    until the peak reaches the speed target (half the unoptimized one) or nothing lowers it.

    Two kinds of move: *pack* the spikes an operation saves for backward (a packed-saves region, Rule 11 of
    :mod:`fxmemopt.runtime.checkpoint`: one pack and one unpack, nothing recomputed), or *recompute* one more rung
    of a candidate region's ladder (:func:`_ladder`; per neuron where level 2 can split the region): the neuron
    alone first (its per-step tensors are most of a layer's memory and cheap to recompute), then BatchNorm and the
    neuron, then the whole layer (a convolution is the opposite). A rung covers the packed-saves regions of its
    nodes: its own input is stored packed when it holds spikes. Moves are ranked lazily (a move's last ratio is
    an estimate until it is re-evaluated against the current plan), a few predictions per move."""
    graph, opts, result = p.graph, p.opts, p.result
    target = p.speed_target if p.speed_target is not None else 0
    saved = saved_inputs(p.cost)
    position = {n: i for i, n in enumerate(graph.order)}
    bases = [part for r in p.regions for part in (p.splits.get(r.name) or [r])]
    ladders = [_ladder(b, p) for b in bases]
    packable = [r.nodes[0] for r in packed_saves(graph, saved, set(), opts.compress)]

    def build(level: list[int], packed: frozenset[str]) -> Plan:
        regions = [RegionPlan(b.name, b.anchor, lad[j - 1],
                              tuple(input_bits(graph, i, opts.compress) for i in region_io(graph, lad[j - 1])[0]))
                   for b, lad, j in zip(bases, ladders, level) if j]
        covered = {n for r in regions for n in r.nodes}
        regions += packed_saves(graph, {n: saved[n] for n in packed}, covered, opts.compress)
        return Plan(tuple(sorted(regions, key=lambda r: position[r.nodes[0]])))

    level, packed = [0] * len(bases), frozenset()
    plan = Plan(())
    pred = p.baseline
    version = 0
    moves = len(bases) + len(packable)  # move k < len(bases): climb ladder k; else: pack packable[k - len(bases)]
    heap = [(-math.inf, k, -1) for k in range(moves)]  # (-ratio, move, plan version its ratio was measured at)
    idle: list[tuple[float, int, int]] = []  # moves that lower nothing against the current plan
    while pred.peak_bytes > target and heap:
        _, k, seen = heapq.heappop(heap)
        if k < len(bases):
            if level[k] >= len(ladders[k]):
                continue
            trial, trial_packed = level.copy(), packed
            trial[k] += 1
        else:
            node = packable[k - len(bases)]
            if node in packed or any(node in lad[j - 1] for lad, j in zip(ladders, level) if j):
                continue
            trial, trial_packed = level, packed | {node}
        cand_plan = build(trial, trial_packed)
        cand = p.evaluate(cand_plan)
        gain = pred.peak_bytes - cand.peak_bytes
        ratio = gain / max(cand.step_time_s - pred.step_time_s, 1e-9)
        if seen != version and heap and ratio < -heap[0][0]:
            heapq.heappush(heap, (-ratio, k, version))  # stale: another move may now be better
            continue
        if gain <= 0:
            idle.append((-ratio, k, version))  # lowers nothing now; reconsidered once the plan changes
            continue
        added_ms = (cand.step_time_s - pred.step_time_s) * 1e3
        change = f"predicted peak {_mib(pred.peak_bytes)} -> {_mib(cand.peak_bytes)} for {added_ms:+.1f} ms"
        if k < len(bases):
            rung = ladders[k][trial[k] - 1]
            what = "recompute all of it" if len(rung) == len(bases[k].nodes) else f"recompute from {rung[0]} on"
            result.decisions.append(Decision(bases[k].name, "recompute", f"{what}: {change}", on_time=True))
        else:
            result.decisions.append(Decision(f"pack_{node}", "pack", f"the spikes it saves for backward stored "
                                             f"packed, nothing recomputed: {change}", on_time=True))
        level, packed, plan, pred = trial, trial_packed, cand_plan, cand
        version += 1
        heap += idle + [(-ratio, k, version - 1)]
        heapq.heapify(heap)
        idle = []
    # (the heap runs empty when every move, measured against the current plan, lowers nothing)
    return plan, pred


def _sliced_per_step(regions: tuple[RegionPlan, ...], graph: AnnotatedGraph,
                     keep_prefix: bool = True) -> tuple[RegionPlan, ...]:
    """``regions`` with every unsliced region that exact time slicing can take sliced one slice per time step, its
    prefix kept (or recomputed)."""
    def finer(rp: RegionPlan) -> RegionPlan:
        if rp.chunks > 1 or rp.whole_slices or not chunkable(graph, rp.nodes)[0]:
            return rp
        return dataclasses.replace(rp, chunks=graph[rp.nodes[-1]].time_steps, keep_prefix=keep_prefix)
    return tuple(finer(rp) for rp in regions)


def applied(plan: Plan, cost: nx.DiGraph | None, source: str = "plan") -> SearchResult:
    """The result of applying a saved plan as is (no search): its prediction when a cost graph exists."""
    baseline = simulate(cost, None) if cost is not None else None
    prediction = simulate(cost, plan) if cost is not None else None
    result = SearchResult(plan, prediction, baseline, candidates=len(plan.regions),
                          selected=[r.anchor for r in plan.regions], policy="saved_plan",
                          explanation=f"applied {source} as saved; nothing was searched or measured")
    result.decisions = [Decision(r.name, "wrap", f"from {source}") for r in plan.regions]
    result.applied_steps.append("saved_plan")
    return result


def search_without_cost(regions: list[Region], graph: AnnotatedGraph, opts: Options) -> SearchResult:
    """Level 1 only (budgeted wrap), for when no cost model could be built; levels 2-4 need predictions."""
    result = SearchResult(Plan(()), None, None, candidates=len(regions))
    if _nothing_to_search(regions, opts, result):
        return result
    result.plan = _wrapped(regions, graph, opts, result)
    if opts.level > 1:
        result.skipped_steps.append(f"level{opts.level}:no_cost_model")
    return result
