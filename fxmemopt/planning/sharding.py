"""The predicted peak of one rank when the optimized module is sharded with FSDP2 (``fully_shard`` per kept module,
then the root), from the simulated timeline of the unsharded step.

The cost model predicts a training step on one rank's batch with every parameter whole: parameters exist before
the step (not counted, as the storage tracker does not count them) and every gradient is allocated whole in
backward and kept. Under FSDP2 with ``W`` ranks each rank holds ``1/W`` of every parameter, and:

* a unit's parameters are gathered whole (new storage) when its forward starts, and freed when it ends
  (``reshard_after_forward=True``) or only after its backward (``False``); gathered again for its backward, and
  already when the unit before it in backward order starts its backward (FSDP2 prefetches one unit ahead);
* while a unit runs after an all-gather, the all-gather's own buffer (the unit's parameter bytes again) is still
  held: FSDP2 keeps the last all-gather's result until the next one is copied out;
* the root's own parameters (those in no kept unit) are gathered for the whole step (FSDP2 does not reshard the
  root after forward);
* at the end of a unit's backward its parameters are freed and its gradients reduced to this rank's ``1/W``
  shard; the whole gradients are freed (the reduce-scatter's buffer takes the freed parameters' place, so it adds
  no peak of its own).

:func:`sharded_peak` applies those rules position by position to the simulated timeline and returns the highest
sum. It works on names and numbers only (no torch): the caller (:func:`fxmemopt.distributed.predicted_peak_per_rank`)
reads the units, their parameter bytes and each graph node's enclosing units off the optimized module.
What it does not model: collective temporaries of a backend, explicit forward prefetching
(``set_modules_to_forward_prefetch``), and mixed-precision parameter casts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["sharded_peak"]


def _position(label: str, region_node: Mapping[str, str]) -> tuple[str, str | None]:
    """``(phase, graph node)`` of one timeline label (see ``costgraph._layout``): phase ``fwd``, ``bwd`` or ``loss``."""
    kind, _, what = label.partition(":")
    if kind in ("pack", "enter", "exit"):
        return "fwd", region_node.get(what)
    if kind in ("recompute", "recompute-end"):
        return "bwd", region_node.get(what)
    if kind in ("fwd", "bwd"):
        return kind, what
    return "loss", None


def sharded_peak(timeline: Sequence[tuple[str, int]], region_node: Mapping[str, str],
                 chains: Mapping[str, Sequence[str]], param_bytes: Mapping[str, int], grad_bytes: Mapping[str, int],
                 root_param_bytes: int, world_size: int, reshard_after_forward: bool = True) -> int:
    """The predicted per-rank peak under FSDP2 (see the module docstring).

    Args:
        timeline: ``(label, live bytes)`` of the unsharded step (``simulate(..., with_timeline=True).timeline``).
        region_node: region name -> a graph node of the region (its positions belong to that node's units).
        chains: graph node -> the kept units enclosing it, outermost first (absent or empty: the root's).
        param_bytes: kept unit -> bytes of the parameters it owns (those of no unit nested in it).
        grad_bytes: kept unit -> bytes of the gradients of those parameters (the ones that require grad).
        root_param_bytes: bytes of the parameters in no kept unit.
        world_size: ranks sharing the parameters.
        reshard_after_forward: as given to ``fully_shard`` for the units.

    Returns:
        The highest predicted live bytes of one rank's training step.
    """
    positions = [_position(label, region_node) for label, _ in timeline]
    spans: dict[tuple[str, str], list[int]] = {}  # (unit, phase) -> [first, last] position
    for p, (phase, node) in enumerate(positions):
        if phase == "loss" or node is None:
            continue
        for unit in chains.get(node, ()):
            span = spans.setdefault((unit, phase), [p, p])
            span[1] = p
    end = len(timeline) - 1
    # backward prefetch: a unit is gathered from the start of the previous unit's backward (in backward order)
    in_backward = sorted((span[0], unit) for (unit, phase), span in spans.items() if phase == "bwd")
    gathered_from = {unit: start for start, unit in in_backward}
    for (start, _), (_, unit) in zip(in_backward, in_backward[1:]):
        gathered_from[unit] = start
    # with reshard_after_forward=False nothing is gathered again: the last all-gather's buffer (that of the unit last
    # to start in forward) is held to the end of the step, each earlier one until the next unit starts
    in_forward = sorted((span[0], unit) for (unit, phase), span in spans.items() if phase == "fwd")
    buffer_until = {unit: end for _, unit in in_forward}
    for (_, unit), (start, _) in zip(in_forward, in_forward[1:]):
        buffer_until[unit] = start
    shard_saving = 1.0 - 1.0 / world_size
    peak = 0
    for p, (_, live) in enumerate(timeline):
        extra = root_param_bytes
        for unit, own in param_bytes.items():
            fwd, bwd = spans.get((unit, "fwd")), spans.get((unit, "bwd"))
            if fwd is None and bwd is None:
                continue
            if reshard_after_forward:
                running = any(s is not None and s[0] <= p <= s[1] for s in (fwd, bwd))
                prefetched = bwd is not None and gathered_from[unit] <= p < bwd[0]
                extra += 2 * own if running else own if prefetched else 0
            else:
                kept_whole = (fwd or bwd)[0] <= p <= (bwd[1] if bwd is not None else end)
                buffer_held = fwd is not None and fwd[0] <= p <= buffer_until[unit]
                extra += own * (kept_whole + buffer_held)
            if bwd is not None and p > bwd[1]:
                extra -= grad_bytes.get(unit, 0) * shard_saving  # whole gradients freed, this rank's shard kept
        peak = max(peak, live + int(extra))
    return peak
