"""Stage 10, *report*: what :func:`fxmemopt.optimize` did, as plain data you can print, test and save.

:class:`Summary` lists every checkpoint region (named after module paths), how each region input is stored for
backward (packed bits or kept), the submodules that could not be traced and became leaves (with the reason),
the stateful modules found, and live run-time counters (calls, recomputations, packing fallbacks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..analysis.trace import Guard, LeafFallback
from ..planning.plan import Plan
from ..runtime.checkpoint import RegionStats

__all__ = ["InputReport", "RegionReport", "Summary", "SeedSummaryFields"]


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def slices_label(chunks: int, keep_prefix: bool, whole_slices: bool, recompute: bool = True) -> str:
    """How a region is sliced in time, for tables: the slice count, ``+p`` when the prefix is recomputed again,
    ``w`` when the whole region runs per slice (``exact=False``); ``saves`` for a packed-saves region (nothing
    recomputed: the spikes its operations save are stored packed)."""
    if not recompute:
        return "saves"
    return str(chunks) + ("" if keep_prefix or chunks == 1 else "+p") + ("w" if whole_slices else "")


@dataclass(frozen=True)
class InputReport:
    """How one region input is stored for backward.

    Attributes:
        node: the graph node feeding the region.
        shape, dtype: of the example value (``None`` for non-tensors).
        value_set: decided value set (``{0,1}``, ``{0..2}``, ``real``...).
        bits: packing width (0 = kept as is).
        full_bytes: bytes of the tensor itself.
        stored_bytes: bytes stored for backward (packed size, the full size, or 0 for parameters/buffers which
            live anyway).
        reason: why it is stored this way.
    """

    node: str
    shape: tuple[int, ...] | None
    dtype: str | None
    value_set: str
    bits: int
    full_bytes: int
    stored_bytes: int
    reason: str


@dataclass(frozen=True)
class RegionReport:
    """One checkpoint region: its nodes, stateful modules and inputs."""

    name: str
    anchor: str
    nodes: tuple[str, ...]
    stateful_modules: tuple[str, ...]
    inputs: tuple[InputReport, ...]
    outputs: tuple[str, ...]
    chunks: int = 1
    keep_prefix: bool = True
    whole_slices: bool = False
    recompute: bool = True

    @property
    def stored_bytes(self) -> int:
        return sum(i.stored_bytes for i in self.inputs)

    @property
    def full_bytes(self) -> int:
        return sum(i.full_bytes for i in self.inputs if i.reason != "parameter or buffer")


class SeedSummaryFields:
    """The fields of spikingjelly memopt's ``MemOptSummary`` (``gc_wrap_count``, ``applied_steps``,
    ``bit_compressor_count``...), for users porting code from it (docs/api_mapping.md): each is computed from the
    :class:`Summary`'s own data (its options, search result and regions) and holds nothing itself."""

    options: dict[str, Any]
    search: Any
    regions: list[RegionReport]
    measurement: str | None

    @property
    def requested_level(self) -> int:
        return int(self.options.get("level", 1))

    @property
    def applied_level(self) -> int:
        """Highest level whose step changed the plan (1 when only wrapping happened, 0 when nothing did)."""
        steps = self.applied_steps
        for level, step in ((4, "level4_greedy_unwrap"), (3, "level3_temporal_split"), (2, "level2_spatial_split")):
            if step in steps:
                return level
        return 1 if self.regions or "level1_gc" in steps else 0

    @property
    def profile(self) -> str | None:
        return self.options.get("profile")

    @property
    def prefer(self) -> str | None:
        return self.options.get("prefer")

    @property
    def checkpoint_budget(self) -> str | None:
        return self.options.get("checkpoint_budget")

    @property
    def compress_x(self) -> bool:
        return bool(self.options.get("compress", True))

    @property
    def allow_expensive_profiling(self) -> bool:
        return bool(self.options.get("allow_expensive_profiling", True))

    @property
    def device(self) -> str:
        return self.measurement or "cpu"

    @property
    def applied_steps(self) -> list[str]:
        return list(self.search.applied_steps) if self.search is not None else []

    @property
    def skipped_steps(self) -> list[str]:
        return list(self.search.skipped_steps) if self.search is not None else []

    @property
    def decisions(self) -> list[Any]:
        """Every search decision with its reason (:class:`fxmemopt.planning.search.Decision`)."""
        return list(self.search.decisions) if self.search is not None else []

    @property
    def gc_wrap_count(self) -> int:
        return sum(1 for r in self.regions if r.recompute)  # packed-saves regions checkpoint nothing

    @property
    def gc_container_count(self) -> int:
        return sum(1 for r in self.regions if r.recompute)

    @property
    def tcgc_container_count(self) -> int:
        return sum(1 for r in self.regions if r.chunks > 1)

    @property
    def manual_compressor_count(self) -> int:
        return 0  # value sets are inferred; there are no manual compressors

    @property
    def bit_compressor_count(self) -> int:
        return sum(1 for r in self.regions for i in r.inputs if i.bits == 1)

    @property
    def null_compressor_count(self) -> int:
        return sum(1 for r in self.regions for i in r.inputs if not i.bits and i.reason != "parameter or buffer")

    @property
    def spatial_split_count(self) -> int:
        return sum(1 for d in self.decisions if d.action == "split")

    @property
    def temporal_split_count(self) -> int:
        return sum(1 for d in self.decisions if d.action == "chunk")

    @property
    def unwrap_count(self) -> int:
        return sum(1 for d in self.decisions if d.action == "unwrap")

    @property
    def gc_candidate_count(self) -> int:
        return self.search.candidates if self.search is not None else len(self.regions)

    @property
    def gc_selected_count(self) -> int:
        return len(self.search.selected) if self.search is not None else len(self.regions)

    @property
    def gc_selected_modules(self) -> list[str]:
        return list(self.search.selected) if self.search is not None else [r.anchor for r in self.regions]

    @property
    def gc_selection_policy(self) -> str:
        return self.search.policy if self.search is not None else "all_candidates"

    @property
    def gc_selection_explanation(self) -> str:
        return self.search.explanation if self.search is not None else ""


@dataclass
class Summary(SeedSummaryFields):
    """What :func:`fxmemopt.optimize` did.

    Attributes:
        model: class name of the optimized model.
        regions: the checkpoint regions, in graph order.
        leaf_fallbacks: submodules kept whole because tracing through them failed, with the reason.
        stateful_modules: module paths found to carry state across calls (neurons), with how they were found.
        plan: the applied :class:`~fxmemopt.planning.plan.Plan`.
        notes: other remarks.
        runtime: region name -> live :class:`~fxmemopt.runtime.checkpoint.RegionStats` (they keep counting).
    """

    model: str
    regions: list[RegionReport]
    leaf_fallbacks: list[LeafFallback]
    stateful_modules: dict[str, str]
    plan: Plan
    notes: list[str] = field(default_factory=list)
    runtime: dict[str, RegionStats] = field(default_factory=dict)
    #: How the step behind the predictions was recorded (:class:`fxmemopt.profiling.scaled.Recording`): at the
    #: examples' size, or at small batches and extrapolated; empty without a prediction.
    recording: str = ""
    #: Predicted peak bytes of a training step (cost model), unoptimized and with the plan.
    predicted_peak_before: int | None = None
    predicted_peak_after: int | None = None
    #: Predicted step time of the plan divided by the unoptimized step time.
    predicted_step_time_ratio: float | None = None
    #: Measured peak bytes (profiling), unoptimized and optimized; ``None`` when not profiled.
    measured_peak_before: int | None = None
    measured_peak_after: int | None = None
    measured_step_time_ratio: float | None = None
    #: How peaks were measured ("cpu-storage-tracker" / "cuda-allocator") and where ("worker" / "in-process").
    measurement: str | None = None
    #: The never-worse check's measured peaks (CPU storage tracker, one training step at the examples' size, in
    #: process): the returned module's, and the unoptimized step's where it was run (it is not where the step was
    #: recorded at small batches, or where the result is far below the predicted unoptimized peak). ``None``: not
    #: measured (``never_worse=False``, a saved plan, CUDA, meta inputs, or the step did not fit here).
    checked_peak_before: int | None = None
    checked_peak_after: int | None = None
    #: What the peaks above do not count (they exist before the step: the storage tracker sees only what the step
    #: allocates): bytes of the model's ``parameters``, ``buffers`` and the example ``inputs``, and the
    #: ``optimizer state`` where ``optimize(..., optimizer=...)`` was given one. An allocator's
    #: peak (``torch.cuda.max_memory_allocated``) is about a peak above plus their sum (:attr:`whole_step_peaks`).
    resident: dict[str, int] = field(default_factory=dict)
    #: Profiling runs that failed or were rejected: ``(candidate, status, message)``.
    rejected: list[tuple[str, str, str]] = field(default_factory=list)
    #: The networkx cost graph (see :mod:`fxmemopt.planning.costgraph`), for inspection and re-simulation.
    cost_graph: Any = field(default=None, repr=False)
    #: What the plan search did (:class:`fxmemopt.planning.search.SearchResult`): decisions with reasons, steps.
    search: Any = field(default=None, repr=False)
    #: The resolved options (seed names), as a dict.
    options: dict[str, Any] = field(default_factory=dict)
    #: Wall time of :func:`fxmemopt.optimize`.
    optimize_time_s: float = 0.0
    #: Regions run whole on time slices (``exact=False``) -> ``"equal"`` when their output on the example was
    #: bitwise the unsliced one, else how it differed (see :func:`fxmemopt.profiling.verify.slice_effects`).
    sliced_regions: dict[str, str] = field(default_factory=dict)
    #: Region -> predicted working set of its recomputation in backward (bytes; from the cost model).
    working_sets: dict[str, int] = field(default_factory=dict)
    #: The annotated traced graph (:class:`fxmemopt.analysis.annotate.AnnotatedGraph`, plain data), for
    #: :func:`fxmemopt.dump`.
    graph: Any = field(default=None, repr=False)
    #: What the trace specialized on (:class:`fxmemopt.analysis.trace.Guard`: Python control flow on shapes resolved
    #: with the
    #: example inputs). The optimized module checks each on every call and raises
    #: :class:`~fxmemopt.errors.GuardError` when a call differs; empty: the module is as shape-generic as the model.
    guards: tuple[Guard, ...] = ()
    #: Regions that failed the validation training step on the example and were left unoptimized:
    #: ``(region, reason)``.
    failed_regions: list[tuple[str, str]] = field(default_factory=list)
    #: Calls of the module that make one training step (``optimize(calls_per_step=T)`` for a single-step network
    #: called once per time step); predictions are for that many calls and one backward.
    calls_per_step: int = 1
    #: Graph node -> the kept modules (``keep_modules``) enclosing it, outermost first: what
    #: :func:`fxmemopt.distributed.predicted_peak_per_rank` reads to place FSDP2's gathers on the predicted timeline.
    unit_chains: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    def save_plan(self, path: str | os.PathLike[str]) -> str:
        """Write the plan as JSON, with the explain report alongside (for ``fxmemopt explain``), to ``path``.

        Apply it later with ``fxmemopt.optimize(model, example_inputs, plan=path)``: no search, no measurement.
        """
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.plan.to_json(report=self.report()))
        return os.fspath(path)

    def report(self) -> dict[str, Any]:
        """The plain-data report stored in plan files (what :func:`explain` needs)."""
        last: dict[str, Any] = {}  # the last move that shaped each region (rejected alternatives are not shown)
        for d in self.decisions:
            if d.action != "reject" or d.region not in last:
                last[d.region] = d
        timed = {d.region for d in self.decisions if getattr(d, "on_time", False)}
        rows = []
        for r in self.regions:
            d = last.get(r.name)
            slices = slices_label(r.chunks, r.keep_prefix, r.whole_slices, r.recompute)
            rows.append({
                "region": r.name, "anchor": r.anchor, "nodes": len(r.nodes), "slices": slices,
                "inputs": [{"node": i.node, "value_set": i.value_set, "bits": i.bits, "full_bytes": i.full_bytes,
                            "stored_bytes": i.stored_bytes, "reason": i.reason} for i in r.inputs],
                "stored_bytes": r.stored_bytes, "unpacked_bytes": r.full_bytes,
                "working_set_bytes": self.working_sets.get(r.name),
                "decision": d.action if d else "wrap", "reason": d.reason if d else "",
                "on_time": r.name in timed,
            })
        totals = {"stored_bytes": self.stored_bytes, "unpacked_bytes": sum(r.full_bytes for r in self.regions),
                  "predicted_peak_before": self.predicted_peak_before, "recording": self.recording,
                  "predicted_peak_after": self.predicted_peak_after,
                  "measured_peak_before": self.measured_peak_before,
                  "measured_peak_after": self.measured_peak_after,
                  "checked_peak_before": self.checked_peak_before,
                  "checked_peak_after": self.checked_peak_after,
                  "resident": dict(self.resident),
                  "prediction_error": self.prediction_error,
                  "predicted_step_time_ratio": self.predicted_step_time_ratio,
                  "measured_step_time_ratio": self.measured_step_time_ratio}
        notes = [f"semantics changed (exact=False) in {r}: {what}" for r, what in self.semantics_changed]
        notes += self.capture_notes()
        return {"model": self.model, "rows": rows, "totals": totals, "notes": notes}

    @property
    def semantics_changed(self) -> list[tuple[str, str]]:
        """``(region, what changed)`` for every region whose meaning ``exact=False`` changed (empty when exact)."""
        return [(r, what) for r, what in self.sliced_regions.items() if what != "equal"]

    @property
    def whole_step_peaks(self) -> tuple[int, int] | None:
        """The predicted peaks with what exists before the step added (:attr:`resident`): about what an allocator
        reports for one training step, ``(unoptimized, optimized)``; ``None`` without a prediction."""
        if self.predicted_peak_before is None or self.predicted_peak_after is None:
            return None
        extra = sum(self.resident.values())
        return self.predicted_peak_before + extra, self.predicted_peak_after + extra

    @property
    def recommendation(self) -> str:
        """One line on what to try next."""
        if not self.regions:
            return "no region was formed: pass targets=(YourBlock,) or stateful_modules=(YourNeuron,)"
        if self.requested_level < 3:
            return 'for less memory try prefer="memory" (time slices); for speed try prefer="speed"'
        if self.measured_peak_after is None:
            return 'pass measure="worker" to confirm the predicted peak by measurement'
        return "plan confirmed by measurement"

    @property
    def region_count(self) -> int:
        """Number of checkpoint regions (the seed's ``gc_wrap_count``)."""
        return len(self.regions)

    @property
    def packed_input_count(self) -> int:
        """Region inputs stored bit-packed (the seed's ``bit_compressor_count`` counts 1-bit ones only)."""
        return sum(1 for r in self.regions for i in r.inputs if i.bits)

    @property
    def stored_bytes(self) -> int:
        """Bytes all regions keep for backward on the example inputs (packed inputs at their packed size)."""
        return sum(r.stored_bytes for r in self.regions)

    @property
    def unpacked_fallbacks(self) -> int:
        """Run-time count of planned packings that failed the exact check and were stored unpacked."""
        return sum(s.unpacked_fallbacks for s in self.runtime.values())

    @property
    def prediction_error(self) -> float | None:
        """Relative error of the predicted optimized peak against the measured one (``None`` if not measured)."""
        if self.predicted_peak_after is None or not self.measured_peak_after:
            return None
        return abs(self.predicted_peak_after - self.measured_peak_after) / self.measured_peak_after

    @property
    def prediction_error_before(self) -> float | None:
        """Relative error of the predicted unoptimized peak against the measured one."""
        if self.predicted_peak_before is None or not self.measured_peak_before:
            return None
        return abs(self.predicted_peak_before - self.measured_peak_before) / self.measured_peak_before

    def table(self) -> str:
        """A fixed-width table: one row per region with its inputs' storage."""
        rows = [("region", "anchor", "nodes", "slices", "inputs (value set -> storage)", "kept for backward")]
        for r in self.regions:
            ins = ", ".join(
                f"{i.node}:{i.value_set}->{str(i.bits) + 'b' if i.bits else ('ref' if i.stored_bytes == 0 else 'full')}"
                for i in r.inputs)
            slices = slices_label(r.chunks, r.keep_prefix, r.whole_slices, r.recompute)
            rows.append((r.name, r.anchor, str(len(r.nodes)), slices, ins, _fmt_bytes(r.stored_bytes)))
        widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def capture_notes(self, guards: bool = True) -> list[str]:
        """Lines about the step definition, regions left out by the validation step, and (``guards``) each guard:
        the summary and :func:`fxmemopt.explain` both show them."""
        lines = []
        if self.calls_per_step > 1:
            lines.append(f"one training step = {self.calls_per_step} calls of the module (calls_per_step), then "
                         f"one backward: predictions are for that step")
        lines += [f"left unoptimized {r}: failed the validation training step: {why}" for r, why in self.failed_regions]
        return lines + ([f"guard: {g}" for g in self.guards] if guards else [])

    def __str__(self) -> str:
        parts = [f"fxmemopt summary for {self.model}: {self.region_count} checkpoint regions, "
                 f"{self.packed_input_count} packed inputs, {_fmt_bytes(self.stored_bytes)} kept for backward by "
                 f"region inputs on the example", self.table()]
        if self.predicted_peak_before is not None and self.predicted_peak_after:
            parts.append(f"predicted peak: {_fmt_bytes(self.predicted_peak_before)} -> "
                         f"{_fmt_bytes(self.predicted_peak_after)} "
                         f"({self.predicted_peak_before / self.predicted_peak_after:.2f}x lower), step time "
                         f"x{self.predicted_step_time_ratio:.2f}")
        if self.recording:
            parts.append(f"cost model: {self.recording}")
        checked = checked_line(self.checked_peak_before, self.checked_peak_after, self.predicted_peak_before,
                               self.predicted_peak_after)
        if checked:
            parts.append(checked)
        whole = resident_line(self.resident, self.predicted_peak_before, self.predicted_peak_after)
        if whole:
            parts.append(whole)
        if self.measured_peak_before and self.measured_peak_after:
            parts.append(f"measured peak ({self.measurement}): {_fmt_bytes(self.measured_peak_before)} -> "
                         f"{_fmt_bytes(self.measured_peak_after)} "
                         f"({self.measured_peak_before / self.measured_peak_after:.2f}x lower), step time "
                         f"x{self.measured_step_time_ratio:.2f}; prediction error {self.prediction_error:.1%}")
        parts += self.capture_notes(guards=False)  # the guards are listed in full below
        parts += [f"rejected {c}: {st}: {msg}" for c, st, msg in self.rejected]
        parts += [f"SEMANTICS CHANGED (exact=False) in {r}: {what}" for r, what in self.semantics_changed]
        changes = [d for d in self.decisions if d.action in ("split", "chunk", "unwrap", "reject")]
        parts += [f"{d.action} {d.region}: {d.reason}" for d in changes]
        if self.leaf_fallbacks:
            parts.append("submodules kept whole (not traceable):")
            parts += [f"  {f.path} ({f.module_type}): {f.reason}" for f in self.leaf_fallbacks]
        if self.guards:
            parts.append(f"guards ({len(self.guards)}; checked on every call, GuardError when a call differs):")
            parts += [f"  {g}" for g in self.guards]
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)


def checked_line(before: int | None, after: int | None, predicted_before: int | None,
                 predicted_after: int | None) -> str:
    """The never-worse check's measured figures beside the predicted ones, one line (empty when not measured)."""
    if after is None:
        return ""
    err = f", predicted {_fmt_bytes(predicted_after)} ({(predicted_after - after) / after:+.1%})" \
        if predicted_after and after else ""
    if before:
        base = f"unoptimized {_fmt_bytes(before)} -> {_fmt_bytes(after)} ({before / after:.2f}x lower)"
    else:
        base = f"{_fmt_bytes(after)} (the unoptimized step was not run here" + \
            (f"; predicted {_fmt_bytes(predicted_before)})" if predicted_before else ")")
    return f"measured peak (never-worse check, one step at the examples' size, CPU storage tracker): {base}{err}"


def resident_line(resident: dict[str, int], predicted_before: int | None, predicted_after: int | None) -> str:
    """What the peaks do not count, and the whole step's predicted peaks with it, one line (empty without them)."""
    if not resident or predicted_before is None or predicted_after is None:
        return ""
    extra = sum(resident.values())
    parts = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in resident.items())
    return (f"peaks count what the step allocates; not counted: {parts}; with them (what an allocator reports): "
            f"{_fmt_bytes(predicted_before + extra)} -> {_fmt_bytes(predicted_after + extra)}"
            f" ({(predicted_before + extra) / max(1, predicted_after + extra):.2f}x lower)")
