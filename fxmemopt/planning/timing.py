"""Node times that a busy machine does not reshuffle: the measured forward times, calibrated per kind of node.

The plan search weighs memory against time, and time comes from measuring the unoptimized step node by node
(:mod:`fxmemopt.profiling.record`: the fastest of a few timed forwards). On a machine shared with other work one
node's measurement lands in a burst and another's does not, and a plan built on those times differs from run to
run (issue 28: a norse conv net gave 1.87x with the default in one run and 1.48x in the next).

A load that slows everything alike changes no decision (they compare times with times). What does is noise that
differs from node to node; nodes of one kind (every ``Conv2d``, every ``LIFNode``, every ``add``) take time in
proportion to their work, plus a cost per call, so their measurements can vouch for each other. :func:`steady_times`
fits, per kind, a per-call time and a time per unit of work (Theil-Sen: medians of pairwise slopes, robust to a
few disturbed measurements), and gives each node its kind's fit at its own work:

* work is a node's multiply-accumulates where it multiplies by a weight (:attr:`NodeInfo.macs
  <fxmemopt.analysis.facts.NodeInfo.macs>`: convolutions, linear layers, matmuls) and otherwise the bytes it reads
  and writes (inputs and output), the cost of memory-bound operations;
* a kind is the node's opcode with its module type or target (the calls of one module type share a kind);
* a kind with fewer than :data:`MIN_KIND` measured nodes keeps its measurements (one node cannot vouch for itself);
* the calibrated times are scaled to add up to the measured ones, so the step's total forward does not move.

The measured times stay on the cost graph (``measured_fwd_time_s``) for explain and for tests.

Measured (``python benchmarks/plan_stability.py``, 2026-12-07: every node's measured time times its own log-normal
factor, sigma 0.2, the whole times 1 or 2.5; the plan searched again, 12 draws; same plan as undisturbed):

=================================  ==================  ===========
model, default preset              calibrated (this)   raw times
=================================  ==================  ===========
SEW-ResNet-18 (width 0.25)         9 of 12             1 of 12
SpikingVGG11 (width 0.25)          12 of 12            8 of 12
DeepConvSNN (8 blocks)             10 of 12            11 of 12
sinabs DVS net (3 IAFSqueeze)      3 of 12             4 of 12
=================================  ==================  ===========

``prefer="memory"`` kept its plan in every draw either way; ``prefer="speed"`` too but on DeepConvSNN (0 of 12
either way: its cheapest-first build weighs nearly equal costs). A kind of a node or two (the sinabs net's) has
little to vouch with, and its plan still follows its measurements; explain marks every decision made on time.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

from ..analysis.facts import NodeInfo

__all__ = ["MIN_KIND", "steady_times", "work"]

#: nodes of one kind needed before their median rate replaces each one's own measurement
MIN_KIND = 3


def work(info: NodeInfo, infos: Mapping[str, NodeInfo]) -> int:
    """What ``info``'s forward time scales with: its multiply-accumulates, else the bytes it reads and writes."""
    if info.macs:
        return info.macs
    return info.nbytes + sum(infos[i].nbytes for i in info.inputs if i in infos)


def _kind(info: NodeInfo) -> tuple[str, str]:
    return info.op, info.module_type or info.target


def _fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """``(per-call seconds, seconds per unit of work)`` of a kind's ``(work, measured seconds)`` points, by Theil-Sen
    (the median of the pairwise slopes, then the median intercept): robust to a few disturbed measurements, and
    affine because a call costs time whatever its size (sinabs' per-step Python loop, a kernel launch). ``None``
    where the points cannot say (all of one size, or a negative slope: the measurements disagree)."""
    pts = sorted(points)
    if len(pts) > _MAX_FIT_POINTS:  # evenly spaced over the sizes: the fit stays quadratic in a bounded count
        pts = [pts[i * (len(pts) - 1) // (_MAX_FIT_POINTS - 1)] for i in range(_MAX_FIT_POINTS)]
    slopes = [(t2 - t1) / (w2 - w1) for i, (w1, t1) in enumerate(pts) for w2, t2 in pts[i + 1:] if w2 != w1]
    if not slopes:
        return None
    slope = statistics.median(slopes)
    if slope < 0:
        return None
    intercept = max(0.0, statistics.median(t - slope * w for w, t in pts))
    return intercept, slope


#: at most this many nodes of one kind take part in its fit (the pairwise slopes are quadratic in them)
_MAX_FIT_POINTS = 64


def steady_times(infos: Mapping[str, NodeInfo], measured: Mapping[str, float | None]) -> dict[str, float]:
    """``measured`` (node -> seconds; ``None`` or absent: not measured), calibrated per kind (see the module
    docstring). Nodes not measured are left out; the result's sum equals the measured sum."""
    points: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for name, t in measured.items():
        info = infos.get(name)
        if info is None or t is None or t <= 0 or info.op in ("placeholder", "output", "get_attr"):
            continue
        w = work(info, infos)
        if w > 0:
            points.setdefault(_kind(info), []).append((w, t))
    fits = {k: f for k, v in points.items() if len(v) >= MIN_KIND and (f := _fit(v)) is not None}
    out: dict[str, float] = {}
    for name, t in measured.items():
        if t is None:
            continue
        info = infos.get(name)
        fit = fits.get(_kind(info)) if info is not None else None
        w = work(info, infos) if info is not None else 0
        out[name] = fit[0] + fit[1] * w if fit is not None and t > 0 and w > 0 else t
    total, calibrated = sum(t for t in measured.values() if t), sum(out.values())
    if calibrated > 0 and total > 0:
        out = {n: t * total / calibrated for n, t in out.items()}
    return out
