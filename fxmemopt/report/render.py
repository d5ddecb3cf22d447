"""See what :func:`fxmemopt.optimize` did: the explain table, the graph dump (text / DOT) and the memory timeline.

Everything here reads plain data (the :class:`~fxmemopt.report.summary.Summary` attached to the optimized module as
``gm.fxmemopt_summary``, its annotated graph and plan, or a saved plan file's report), so it works on a module in
memory and on a plan file alike.

* :func:`explain` -- a table, one row per region: what its inputs cost stored packed vs unpacked, the predicted
  working set of its recomputation, the decision that shaped it and why; then the predicted and measured peaks.
  Like JAX's ``saved_residuals``: what is kept for backward, and why.
* :func:`dump` -- the graph with every region marked (``format="text"``), or Graphviz DOT with one cluster per
  region (``format="dot"``); :func:`render_dot` turns DOT into SVG/PNG with Graphviz's ``dot`` program when it is
  installed.
* :func:`memory_timeline` -- live bytes after every op of one training step, unoptimized and optimized, with the
  start of backward and each region's forward and recomputation marked; saved as CSV or JSON, plotted to PNG with
  matplotlib when it is installed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import FxMemOptError, InvalidOptionError, format_error
from ..planning.plan import Plan
from .summary import Summary, _fmt_bytes, checked_line, resident_line, slices_label

__all__ = ["Explanation", "explain", "dump", "render_dot", "Timeline", "memory_timeline", "MissingDependencyError"]


class MissingDependencyError(FxMemOptError, ImportError):
    """An optional extra (matplotlib, Graphviz) is needed for what was asked and is not installed."""


def _summary_of(obj: Any) -> Summary:
    if isinstance(obj, Summary):
        return obj
    summary = getattr(obj, "fxmemopt_summary", None)
    if isinstance(summary, Summary):
        return summary
    raise InvalidOptionError(format_error(
        type(obj).__name__, "carries no fxmemopt summary",
        expected="a module returned by fxmemopt.optimize, its Summary, or a plan file",
        got=type(obj).__name__, fix="Pass the GraphModule fxmemopt.optimize returned (or return_summary=True)."))


# -- explain ------------------------------------------------------------------------------------------------------
@dataclass
class Explanation:
    """The explain table: ``rows`` (one dict per region, plain values) and ``totals`` (peaks); ``str()`` prints it.

    Row keys: ``region``, ``anchor``, ``nodes``, ``slices`` (time slices; ``+p`` prefix recomputed, ``w`` whole
    region per slice), ``inputs`` (how each input is stored), ``stored_bytes`` (kept for backward),
    ``unpacked_bytes`` (what the same inputs would take unpacked), ``working_set_bytes`` (predicted working set of
    the recomputation; ``None`` without a cost model), ``decision`` and ``reason`` (the last decision of the search
    that shaped the region), ``on_time`` (a decision about it weighed predicted step times: marked ``*``).
    """

    model: str
    rows: list[dict[str, Any]]
    totals: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = ("region", "anchor", "nodes", "slices", "stored", "unpacked", "recompute ws", "decision", "reason")
        table = [head]
        for r in self.rows:
            ws = r["working_set_bytes"]
            table.append((r["region"], r["anchor"], str(r["nodes"]), r["slices"], _fmt_bytes(r["stored_bytes"]),
                          _fmt_bytes(r["unpacked_bytes"]), "-" if ws is None else _fmt_bytes(ws),
                          r["decision"] + ("*" if r.get("on_time") else ""), r["reason"]))
        widths = [max(len(row[k]) for row in table) for k in range(len(head))]
        lines = [f"fxmemopt explain: {self.model}, {len(self.rows)} regions"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(2, "  ".join("-" * w for w in widths))
        if any(r.get("on_time") for r in self.rows):
            lines.append("* decided on measured step times (calibrated per kind of node): another machine, or this "
                         "one under load, may decide otherwise; every other decision is on bytes alone")
        t = self.totals
        stored, unpacked = t["stored_bytes"], t["unpacked_bytes"]
        lines.append(f"kept for backward by region inputs: {_fmt_bytes(stored)} ({_fmt_bytes(unpacked)} unpacked)")
        for what in ("predicted", "measured"):
            before, after = t.get(f"{what}_peak_before"), t.get(f"{what}_peak_after")
            if before and after:
                extra = ""
                if what == "measured" and t.get("prediction_error") is not None:
                    extra = f"; prediction error {t['prediction_error']:.1%}"
                lines.append(f"{what} peak: {_fmt_bytes(before)} -> {_fmt_bytes(after)} "
                             f"({before / after:.2f}x lower){extra}")
        checked = checked_line(t.get("checked_peak_before"), t.get("checked_peak_after"),
                               t.get("predicted_peak_before"), t.get("predicted_peak_after"))
        if checked:
            lines.append(checked)
        whole = resident_line(t.get("resident") or {}, t.get("predicted_peak_before"), t.get("predicted_peak_after"))
        if whole:
            lines.append(whole)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def explain(obj: nn.Module | Summary | str | os.PathLike[str] | dict[str, Any]) -> Explanation:
    """What each region keeps for backward and why, as a table.

    Args:
        obj: the module :func:`fxmemopt.optimize` returned, its :class:`~fxmemopt.report.summary.Summary`, or a plan
        file
            (path or loaded dict) saved with its report (``summary.save_plan`` / ``fxmemopt optimize --save-plan``).

    Returns:
        An :class:`Explanation` (``print`` it, or read ``.rows``).

    Example:
        >>> gm = fxmemopt.optimize(model, (x,))          # doctest: +SKIP
        >>> print(fxmemopt.explain(gm))                  # doctest: +SKIP
    """
    if isinstance(obj, (str, os.PathLike, dict)):
        d = obj if isinstance(obj, dict) else _read_plan_file(obj)
        report = d.get("report")
        if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
            plan = Plan.from_dict(d)
            rows = [{"region": r.name, "anchor": r.anchor, "nodes": len(r.nodes),
                     "slices": slices_label(r.chunks, r.keep_prefix, r.whole_slices, r.recompute), "inputs": [],
                     "stored_bytes": 0, "unpacked_bytes": 0, "working_set_bytes": None, "decision": "wrap",
                     "reason": "from the plan (no report saved)"}
                    for r in plan.regions]
            return Explanation("(plan without report)", rows, {"stored_bytes": 0, "unpacked_bytes": 0},
                               ["this plan file has no report: save it with summary.save_plan() for byte counts"])
        return Explanation(report.get("model", "?"), report["rows"], report.get("totals", {}),
                           list(report.get("notes", [])))
    report = _summary_of(obj).report()
    return Explanation(report["model"], report["rows"], report["totals"], report["notes"])


def _read_plan_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    from ..errors import PlanError

    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise PlanError(format_error(f"plan file {os.fspath(path)!r}", "cannot be read as JSON", got=str(e),
                                     fix="Pass a file written by `fxmemopt optimize --save-plan` or "
                                         "summary.save_plan().")) from e
    Plan.from_dict(d, f"plan file {os.fspath(path)!r}")  # validates
    return d


# -- dump -----------------------------------------------------------------------------------------------------------
def _node_line(info: Any) -> str:
    what = info.target if info.op != "call_module" else f"{info.target} ({info.module_type})"
    shape = f"{list(info.shape)} {info.dtype}" if info.is_tensor and info.shape is not None else ""
    return f"{info.name:<28} {info.op:<14} {what:<40} {shape:<28} {info.value_set}".rstrip()


def dump(obj: nn.Module | Summary, format: str = "text") -> str:  # noqa: A002 (the documented keyword)
    """The optimized graph with every region marked.

    ``format="text"``: one line per node of the traced graph (name, op, target, shape, value set); each region is a
    bracketed block headed by its name, anchor (the module path it is named after), time slices, how each input is
    stored (packed bits and bytes, or kept) and the predicted working set of its recomputation.
    ``format="dot"``: Graphviz DOT, one cluster per region (render it with :func:`render_dot`).

    The optimized module's own ``gm.print_readable()`` / ``gm.code`` show the rewritten graph, in which each region
    is one call of a module named ``ckpt_<module path>``.
    """
    summary = _summary_of(obj)
    graph = summary.graph
    if graph is None:
        raise InvalidOptionError(format_error("dump", "needs the annotated graph, which this summary lacks",
                                              fix="Pass the module fxmemopt.optimize returned."))
    if format not in ("text", "dot"):
        raise InvalidOptionError(format_error("format", "is not a dump format", expected='"text" or "dot"',
                                              got=repr(format)))
    region_of = {n: r for r in summary.regions for n in r.nodes}
    return _dump_text(summary, graph, region_of) if format == "text" else _dump_dot(summary, graph, region_of)


def _region_header(summary: Summary, r: Any) -> list[str]:
    slices = "" if r.chunks == 1 else (f", {r.chunks} time slices" + (", prefix recomputed" if not r.keep_prefix
                                                                       else "") + (", whole region per slice"
                                                                                   if r.whole_slices else ""))
    if not r.recompute:
        slices = ", nothing recomputed: saved spikes packed"
    lines = [f"region {r.name} (anchor {r.anchor}): {len(r.nodes)} nodes{slices}"]
    for i in r.inputs:
        how = f"packed {i.bits} bit, {_fmt_bytes(i.stored_bytes)} of {_fmt_bytes(i.full_bytes)}" if i.bits else (
            "parameter/buffer, not stored" if i.stored_bytes == 0 else f"kept, {_fmt_bytes(i.stored_bytes)}")
        lines.append(f"  input {i.node} {i.value_set}: {how}")
    ws = summary.working_sets.get(r.name)
    if ws is not None:
        lines.append(f"  predicted recompute working set: {_fmt_bytes(ws)}")
    return lines


def _dump_text(summary: Summary, graph: Any, region_of: dict[str, Any]) -> str:
    out = [f"fxmemopt graph of {summary.model}: {len(graph.order)} nodes, {len(summary.regions)} regions"]
    if summary.predicted_peak_before and summary.predicted_peak_after:
        out[0] += (f"; predicted peak {_fmt_bytes(summary.predicted_peak_before)} -> "
                   f"{_fmt_bytes(summary.predicted_peak_after)}")
    current = None
    for n in graph.order:
        r = region_of.get(n)
        if r is not current:
            if current is not None:
                out.append(f"+-- end {current.name} -> {', '.join(current.outputs)}")
            if r is not None:
                header = _region_header(summary, r)
                out.append(f"+-- {header[0]}")
                out += [f"|   {h.strip()}" for h in header[1:]]
            current = r
        out.append(("| " if r is not None else "  ") + _node_line(graph[n]))
    if current is not None:
        out.append(f"+-- end {current.name} -> {', '.join(current.outputs)}")
    return "\n".join(out)


def _dot_id(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dump_dot(summary: Summary, graph: Any, region_of: dict[str, Any]) -> str:
    lines = [f"digraph {_dot_id(summary.model)} {{", "  rankdir=TB;",
             '  node [shape=box, fontname="monospace", fontsize=10];']
    for r in summary.regions:
        label = "\\l".join(h.strip().replace('"', "'") for h in _region_header(summary, r)) + "\\l"
        lines.append(f"  subgraph {_dot_id('cluster_' + r.name)} {{")
        lines.append(f'    label="{label}"; labeljust=l; style="rounded,filled"; fillcolor="#eef4ff";')
        for n in r.nodes:
            lines.append(f"    {_dot_id(n)};")
        lines.append("  }")
    for n in graph.order:
        info = graph[n]
        what = info.target if info.op != "call_module" else f"{info.target} ({info.module_type})"
        label = f"{n}\\n{what}".replace('"', "'")
        shape = ", shape=ellipse" if info.op in ("placeholder", "output") else ""
        color = ', style=filled, fillcolor="#ffe9c6"' if info.stateful else ""
        lines.append(f'  {_dot_id(n)} [label="{label}"{shape}{color}];')
    for n in graph.order:
        for i in graph[n].inputs:
            lines.append(f"  {_dot_id(i)} -> {_dot_id(n)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_dot(dot: str, path: str | os.PathLike[str], timeout_s: float = 60.0) -> str:
    """Render DOT text to ``path`` (the format from its suffix: ``.svg``, ``.png``, ``.pdf``) with Graphviz's
    ``dot`` program. Returns the path.

    Raises:
        MissingDependencyError: Graphviz is not installed.
        FxMemOptError: ``dot`` failed or took longer than ``timeout_s``.
    """
    exe = shutil.which("dot")
    if exe is None:
        raise MissingDependencyError(format_error(
            "render_dot", "needs Graphviz's `dot` program, which is not on PATH",
            fix="Install Graphviz (apt install graphviz, brew install graphviz or conda install graphviz), or "
                "save the DOT text and render it elsewhere."))
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "svg"
    try:
        subprocess.run([exe, f"-T{fmt}", "-o", path], input=dot.encode(), check=True, capture_output=True,
                       timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise FxMemOptError(format_error("render_dot", f"dot took longer than {timeout_s:g} s",
                                         fix="Pass a larger timeout_s, or render the DOT text yourself.")) from e
    except subprocess.CalledProcessError as e:
        raise FxMemOptError(format_error("render_dot", "dot failed", got=e.stderr.decode(errors="replace")[:500],
                                         fix=f"Check that {fmt!r} is an output format dot knows.")) from e
    return path


# -- memory timeline --------------------------------------------------------------------------------------------------
@dataclass
class Timeline:
    """Live bytes after every op of one training step, unoptimized (``baseline``) and optimized.

    Each series is a list of ``(op, live bytes)``; ``markers`` per series are ``(op index, label)`` with labels
    ``backward`` (where backward starts), ``enter:<region>`` / ``exit:<region>`` (a region's forward) and
    ``recompute:<region>`` / ``recompute-end:<region>`` (its recomputation in backward).
    """

    baseline: list[tuple[str, int]]
    optimized: list[tuple[str, int]]
    markers: dict[str, list[tuple[int, str]]]
    model: str = ""

    @staticmethod
    def _split(raw: Sequence[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[tuple[int, str]]]:
        ops, marks = [], []
        for op, live in raw:
            if op.startswith("mark:"):
                marks.append((len(ops), op[len("mark:"):]))
            else:
                ops.append((op, live))
        return ops, marks

    @classmethod
    def from_raw(cls, baseline: Sequence[tuple[str, int]], optimized: Sequence[tuple[str, int]],
                 model: str = "") -> Timeline:
        b, bm = cls._split(baseline)
        o, om = cls._split(optimized)
        return cls(b, o, {"baseline": bm, "optimized": om}, model)

    def peak(self, series: str) -> int:
        return max((live for _, live in getattr(self, series)), default=0)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per op: ``series``, ``index``, ``op``, ``live_bytes``, ``phase`` (forward/backward) and
        ``region`` (the region running then, forward or recomputation; empty outside regions)."""
        out = []
        for series in ("baseline", "optimized"):
            marks = dict((i, []) for i, _ in self.markers[series])
            for i, label in self.markers[series]:
                marks[i].append(label)
            phase, stack = "forward", []
            for i, (op, live) in enumerate(getattr(self, series)):
                for label in marks.get(i, []):
                    kind, _, region = label.partition(":")
                    if kind == "backward":
                        phase = "backward"
                    elif kind in ("enter", "recompute"):
                        stack.append(region)
                    elif kind in ("exit", "recompute-end") and stack:
                        stack.pop()
                out.append({"series": series, "index": i, "op": op, "live_bytes": live, "phase": phase,
                            "region": stack[-1] if stack else ""})
        return out

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """The rows as CSV (written to ``path`` when given); returns the text."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["series", "index", "op", "live_bytes", "phase", "region"],
                           lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows())
        if path is not None:
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(buf.getvalue())
        return buf.getvalue()

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """``{"model", "peaks", "baseline": [[op, bytes]...], "optimized": [...], "markers": {...}}`` as JSON."""
        text = json.dumps({"model": self.model,
                           "peaks": {"baseline": self.peak("baseline"), "optimized": self.peak("optimized")},
                           "baseline": self.baseline, "optimized": self.optimized, "markers": self.markers})
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """Plot both curves (MiB over the step, x = fraction of each step's ops so both span the same width),
        backward starts as dashed lines, each region's recomputation shaded; save to ``path`` (PNG, SVG...) when
        given. Returns the matplotlib ``Figure``.

        Raises:
            MissingDependencyError: matplotlib is not installed (``pip install fxmemopt[plot]``).
        """
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise MissingDependencyError(format_error(
                "Timeline.plot", "needs matplotlib, which is not installed",
                fix="pip install 'fxmemopt[plot]' (or pip install matplotlib); to_csv()/to_json() need nothing.")
            ) from e
        fig, ax = plt.subplots(figsize=(10, 4.5))
        colors = {"baseline": "tab:gray", "optimized": "tab:blue"}
        for series in ("baseline", "optimized"):
            data = getattr(self, series)
            n = max(1, len(data) - 1)
            xs = [i / n for i in range(len(data))]
            ax.plot(xs, [live / 2**20 for _, live in data], color=colors[series], lw=1.2,
                    label=f"{series} (peak {self.peak(series) / 2**20:.1f} MiB)")
            for i, label in self.markers[series]:
                if label == "backward":
                    ax.axvline(i / n, color=colors[series], ls="--", lw=0.8)
            if series == "optimized":
                start = None
                for i, label in self.markers[series]:
                    if label.startswith("recompute:") and start is None:
                        start = i
                    elif label.startswith("recompute-end:") and start is not None:
                        ax.axvspan(start / n, i / n, color=colors[series], alpha=0.12, lw=0)
                        start = None
                enters = [i / n for i, label in self.markers[series] if label.startswith("enter:")]
                if enters:
                    ax.plot(enters, [0] * len(enters), "|", color=colors[series], ms=8,
                            label="region forward starts")
        ax.set_xlabel("position in the training step (fraction of ops; dashed: backward starts; shaded: "
                      "recomputation)")
        ax.set_ylabel("live tensor memory (MiB)")
        ax.set_title(f"fxmemopt memory timeline{': ' + self.model if self.model else ''}")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


def memory_timeline(model: nn.Module, optimized: nn.Module, example_inputs: Sequence[Any], *,
                    loss_fn: Any = None) -> Timeline:
    """Measure one training step of ``model`` and of ``optimized`` op by op (CPU storage tracker).

    Both start from the same state and are restored afterwards (see :func:`fxmemopt.measure_step`). On CUDA only
    peaks are measured (allocator statistics), so this needs CPU tensors.

    Example:
        >>> tl = fxmemopt.memory_timeline(model, gm, (x,))      # doctest: +SKIP
        >>> tl.to_csv("timeline.csv"); tl.plot("timeline.png")  # doctest: +SKIP
    """
    from ..profiling.measure import measure_step

    base = measure_step(model, example_inputs, loss_fn=loss_fn, repeats=0, warmup=0, timeline=True)
    opt = measure_step(optimized, example_inputs, loss_fn=loss_fn, repeats=0, warmup=0, timeline=True)
    if not base.timeline or not opt.timeline:
        raise InvalidOptionError(format_error("memory_timeline", "records op-by-op memory on CPU only",
                                              got=f"device {base.device}", fix="Pass CPU inputs (and a CPU model)."))
    return Timeline.from_raw(base.timeline, opt.timeline, type(model).__name__)
