"""The memory / time trade-off of a model: the plans from "nothing" to "least memory", each with its prediction.

:func:`tradeoffs` analyses the model once, records one training step for the cost model (at small batches,
extrapolated: :mod:`fxmemopt.profiling.scaled`), and asks the planner for
plans along the way: nothing, every region whole (level 1), the presets, and ``memory_budget`` searches at budgets
spread between the least memory reachable and the unoptimized peak. Each plan is predicted on the same cost graph;
those that another plan beats on both peak and step time are dropped, so what is left is the Pareto front a preset
or a budget picks from. Any point's ``plan`` applies as is: ``fxmemopt.optimize(model, x, plan=point.plan)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..analysis.state import fresh_probe
from ..api import _check_inputs, _check_model, _check_types, _input_grads_kept, _resident, analyze
from ..errors import InvalidInputsError, InvalidOptionError, MemoryBudgetError, format_error
from ..planning.costgraph import build_cost_graph, simulate
from ..planning.plan import Plan, graph_fingerprint, guard_lines, inputs_signature
from ..planning.search import resolve_options, search
from ..profiling.scaled import record_scaled

__all__ = ["Tradeoff", "Tradeoffs", "tradeoffs"]


@dataclass(frozen=True)
class Tradeoff:
    """One plan on the front.

    Attributes:
        label: how the planner was asked for it (``"nothing"``, ``"level 1"``, ``'prefer="memory"'``,
            ``"memory_budget=..."``, a whole-step budget as :func:`fxmemopt.optimize` takes it).
        plan: the plan (stamped for this model and these inputs: pass it to ``optimize(plan=...)``).
        peak_bytes: predicted peak of one training step's own allocations (add :attr:`Tradeoffs.resident_bytes`
            for the whole step).
        step_time_s: predicted time of one training step.
        peak_ratio: unoptimized predicted peak / this one (higher: less memory).
        time_ratio: this step time / the unoptimized one (higher: slower).
    """

    label: str
    plan: Plan
    peak_bytes: int
    step_time_s: float
    peak_ratio: float
    time_ratio: float


@dataclass(frozen=True)
class Tradeoffs:
    """The Pareto front, from "nothing" (the unoptimized step) to the least memory, by decreasing peak.

    Iterate it, index it, print it (a table), or :meth:`pick` the fastest point under a budget.
    ``resident_bytes``: what exists before the step (parameters, buffers, the inputs), which a budget holds too.
    """

    model: str
    points: tuple[Tradeoff, ...]
    baseline_peak_bytes: int
    baseline_step_time_s: float
    resident_bytes: int = 0

    def __iter__(self) -> Iterator[Tradeoff]:
        return iter(self.points)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> Tradeoff:
        return self.points[i]

    def pick(self, memory_budget: int) -> Tradeoff:
        """The fastest point whose predicted whole step (its peak and :attr:`resident_bytes`) fits
        ``memory_budget`` bytes, as :func:`fxmemopt.optimize` reads a budget.

        Raises:
            MemoryBudgetError: no point fits (the message names the smallest peak).
        """
        fits = [p for p in self.points if p.peak_bytes + self.resident_bytes <= memory_budget]
        if not fits:
            least = min(p.peak_bytes for p in self.points) + self.resident_bytes
            raise MemoryBudgetError(format_error(
                "memory_budget", "no plan on the front fits", expected=f"a predicted peak <= {memory_budget} bytes",
                got=f"the smallest predicted whole step is {least} bytes",
                fix=f"Raise memory_budget to at least {least} bytes, or reduce the batch size or T."))
        return min(fits, key=lambda p: (p.step_time_s, p.peak_bytes))

    def __str__(self) -> str:
        head = f"fxmemopt tradeoffs: {self.model}, {len(self.points)} plans (predicted; one training step)"
        rows = [("plan", "regions", "sliced", "peak", "whole step", "lower by", "step time")]
        for p in self.points:
            rows.append((p.label, str(len(p.plan.regions)), str(sum(1 for r in p.plan.regions if r.chunks > 1)),
                         f"{p.peak_bytes / 2**20:.2f} MiB", f"{(p.peak_bytes + self.resident_bytes) / 2**20:.2f} MiB",
                         f"{p.peak_ratio:.2f}x", f"{p.time_ratio:.2f}x"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(2, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def pareto_front(points: Sequence[Tradeoff]) -> tuple[Tradeoff, ...]:
    """The points no other point beats on both peak and time (ties: the first listed), by decreasing peak."""
    ordered = sorted(points, key=lambda p: (p.peak_bytes, p.step_time_s))
    front: list[Tradeoff] = []
    best_time = float("inf")
    for p in ordered:  # increasing peak: keep a point only if it is faster than every lower-peak one
        if p.step_time_s < best_time:
            front.append(p)
            best_time = p.step_time_s
    return tuple(reversed(front))


def tradeoffs(model: nn.Module, example_inputs: tuple[Any, ...], *, targets: Sequence[type] | None = None,
              leaf_modules: Sequence[type | str] = (), stateful_modules: Sequence[type] = (), compress: bool = True,
              exact: bool = True, budgets: int = 6) -> Tradeoffs:
    """The plans from "nothing" to "least memory" for ``model``, each with predicted peak and step time.

    Args:
        model: the network, as for :func:`fxmemopt.optimize` (left as it was).
        example_inputs: a tuple of positional inputs, as for :func:`fxmemopt.optimize`.
        targets, leaf_modules, stateful_modules, compress, exact: as for :func:`fxmemopt.optimize`.
        budgets: how many ``memory_budget`` searches to spread between the least memory and the unoptimized peak.

    Returns:
        The :class:`Tradeoffs` front (its first point is the unoptimized step, its last the least memory).

    Raises:
        InvalidInputsError: the model fails on the example inputs, or a training step on them cannot be recorded.
        StaleStateError: a stateful module holds state from an earlier step that cannot be reset (as
            :func:`fxmemopt.optimize`; every other model is analysed as if freshly reset, its state put back after).
        InvalidOptionError: an option is out of range.

    Example:
        >>> front = fxmemopt.tradeoffs(model, (x,))           # doctest: +SKIP
        >>> print(front)                                       # doctest: +SKIP
        >>> gm = fxmemopt.optimize(model, (x,), plan=front.pick(2 * 2**30).plan)  # doctest: +SKIP
    """
    if isinstance(budgets, bool) or not isinstance(budgets, int) or budgets < 0:
        raise InvalidOptionError(format_error("budgets", "must be an int >= 0", got=repr(budgets)))
    with _input_grads_kept(example_inputs), contextlib.ExitStack() as fresh:
        inputs = _check_inputs(example_inputs)
        _check_model(model)
        declared = _check_types("stateful_modules", stateful_modules)
        # the model as if freshly reset, for the analysis and the recorded step (its state put back after)
        found = fresh.enter_context(fresh_probe(model, inputs, declared))
        an = analyze(model, inputs, targets=_check_types("targets", targets),
                     leaf=_check_types("leaf_modules", leaf_modules, allow_str=True), declared=declared, found=found)
        try:
            cost = build_cost_graph(an.annotated, record_scaled(an.traced, inputs, an.stateful,
                                                                time_steps=an.annotated.time_steps)[0])
        except Exception as e:
            raise InvalidInputsError(format_error(
                f"{type(model).__name__}(*example_inputs)",
                f"a training step on the example inputs could not be recorded ({type(e).__name__}: {e})",
                fix="Check that model(*example_inputs) runs forward and backward (its output must hold a tensor "
                    "that requires grad).")) from e
    stamp = {"graph_fingerprint": graph_fingerprint(an.annotated), "inputs": inputs_signature(inputs),
             "guards": guard_lines(an.captured.guards)}
    regions, splits = list(an.regions), dict(an.splits)
    baseline = simulate(cost, None)
    resident = sum(_resident(model, inputs).values())

    def point(label: str, plan: Plan) -> Tradeoff:
        pred = simulate(cost, plan)
        return Tradeoff(label, dataclasses.replace(plan, **stamp), pred.peak_bytes, pred.step_time_s,
                        baseline.peak_bytes / max(1, pred.peak_bytes),
                        pred.step_time_s / baseline.step_time_s if baseline.step_time_s else 1.0)

    def searched(**kw: Any) -> Plan:
        return search(cost, regions, splits, resolve_options(compress=compress, exact=exact, **kw)).plan

    points = [point("nothing", Plan(()))]
    for label, kw in (("level 1", {"level": 1}), ('prefer="speed"', {"prefer": "speed"}),
                      ('prefer="balanced"', {"prefer": "balanced"}), ('prefer="memory"', {"prefer": "memory"})):
        points.append(point(label, searched(**kw)))
    least = min(p.peak_bytes for p in points)
    for i in range(1, budgets + 1):
        budget = least + (baseline.peak_bytes - least) * i // (budgets + 1)
        try:
            # searched on the step's own peak; labelled with the whole-step budget optimize would take
            points.append(point(f"memory_budget={budget + resident}", searched(memory_budget=budget)))
        except MemoryBudgetError:
            continue  # below what this search reaches
    return Tradeoffs(type(model).__name__, pareto_front(points), baseline.peak_bytes, baseline.step_time_s,
                     resident)
