"""Applying any plan to a model, for tests: the optimize() stages up to the plan, one forced plan per region kind,
the reference Rule 9 defines for whole-region slices, and the state ``compare_training_step`` does not compare.

Not a test file (no ``test_`` prefix): ``tests/test_exactness_property.py`` and ``tests/test_stateful_kinds.py``
import it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fxmemopt.planning.plan import Plan, RegionPlan, checkpoint_all, chunkable, input_bits, sliceable
from fxmemopt.planning.regions import is_metadata, region_io
from fxmemopt.profiling.verify import compare_training_step
from fxmemopt.runtime.checkpoint import CheckpointRegion, ChunkedRegion, PackedRegion, SlicedRegion
from fxmemopt.runtime.rewrite import rewrite

#: the region kinds a plan can ask for (see :func:`forced_plans`)
KINDS = ("checkpoint", "chunked", "chunked-recompute-prefix", "chunked-keep-starts", "whole-slices",
         "packed-saves", "unwrapped")


def pipeline(model: nn.Module, inputs: tuple[Any, ...]):
    """The optimize() stages up to the plan, so a test can apply any plan:
    ``(probe result, stateful, graph, constants, annotated, regions)``."""
    from fxmemopt.analysis.annotate import annotate
    from fxmemopt.analysis.state import probe
    from fxmemopt.analysis.trace import make_graph_module, trace
    from fxmemopt.planning.regions import find_regions

    found = probe(model, inputs)
    stateful = dict(found.stateful)
    cap = trace(model, inputs, stateful_paths=stateful)
    graph, constants = cap.graph, cap.constants
    traced = make_graph_module(model, graph, "M", extra=constants)
    annotated = annotate(traced, inputs, stateful, found.entry_dead)
    return found, stateful, graph, constants, annotated, find_regions(annotated)


def plan_kind(rp: RegionPlan) -> type:
    """The region class the rewrite must build for ``rp``."""
    if not rp.recompute:
        return PackedRegion
    if rp.chunks > 1:
        return SlicedRegion if rp.whole_slices else ChunkedRegion
    return CheckpointRegion


def forced_plans(annotated, regions, steps: int) -> Iterator[tuple[str, Plan]]:
    """One plan per region kind that applies to at least one region: every region that can takes the kind, the
    others are checkpointed whole. Chunks: ``steps`` (one slice per step; exact also for neurons with trainable
    parameters), or 2 for the keep-starts plan (several steps per slice where the neuron allows it)."""
    full = checkpoint_all(regions, annotated, True)
    for kind in KINDS:
        chosen, applied = [], False
        if kind == "packed-saves":
            covered = {n for rp in full.regions for n in rp.nodes}
            for n in annotated.order:
                if n in covered or annotated[n].op not in ("call_module", "call_function", "call_method") or \
                        is_metadata(annotated, n):
                    continue
                bits = tuple(input_bits(annotated, i, True) for i in region_io(annotated, (n,))[0])
                if any(bits):
                    chosen.append(RegionPlan(f"pack_{n}", n, (n,), bits, recompute=False))
                    applied = True
            chosen += list(full.regions)
        elif kind == "unwrapped":
            applied = bool(full.regions)
        else:
            for rp in full.regions:
                last = annotated[rp.nodes[-1]]
                if kind.startswith("chunked") and chunkable(annotated, rp.nodes)[0]:
                    k = steps if last.step_slices_only or kind != "chunked-keep-starts" else 2
                    rp = dataclasses.replace(rp, chunks=k, keep_prefix=kind != "chunked-recompute-prefix",
                                             keep_starts=kind == "chunked-keep-starts")
                    applied = True
                elif kind == "whole-slices" and sliceable(annotated, rp.nodes)[0]:
                    rp = dataclasses.replace(rp, chunks=steps, whole_slices=True)
                    applied = True
                chosen.append(rp)
            applied = applied or kind == "checkpoint" and bool(chosen)
        if applied:
            position = {n: i for i, n in enumerate(annotated.order)}
            yield kind, Plan(tuple(sorted(chosen, key=lambda rp: position[rp.nodes[0]])))


def sliced_plainly(model, graph, constants, annotated, plan: Plan, stateful, mutated_buffers) -> nn.Module:
    """``model`` with the plan's whole-sliced regions (only those) run on their time slices *plainly*: each slice's
    body once, autograd recording as usual, no checkpoint: what Rule 9 defines them to compute."""
    whole = Plan(tuple(rp for rp in plan.regions if rp.whole_slices))
    if not whole.regions:
        return model
    ref, _ = rewrite(model, graph, constants, annotated, whole, stateful, mutated_buffers, "R")
    for m in ref.modules():
        if isinstance(m, SlicedRegion):
            m._needs_checkpoint = lambda args: False
    return ref


def attribute_states(model: nn.Module) -> dict[str, Any]:
    """``path.name -> value`` of the state kept in plain attributes (``compare_training_step`` compares
    ``_memories`` and buffers): ``tests/plain_stateful.py``'s ``v``, ``y``, ``a``, ``out_i`` and ``trace``."""
    names = ("v", "y", "a", "out_i", "trace")
    return {f"{p}.{n}": m.__dict__[n] for p, m in model.named_modules() for n in names if n in m.__dict__}


def assert_same_attribute_states(reference: nn.Module, candidate: nn.Module, what: str) -> None:
    ref, got = attribute_states(reference), attribute_states(candidate)
    assert ref.keys() == got.keys(), what
    for k, a in ref.items():
        b = got[k]
        assert type(a) is type(b) and (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), (k, what)


def check_every_kind(make: Callable[[], tuple[nn.Module, tuple[Any, ...]]], reset: Callable[[nn.Module], None],
                     steps: int, expect: tuple[str, ...] = ("checkpoint",), training_steps: int = 2) -> set[str]:
    """For each region kind that applies to ``make()``'s model, apply it (:func:`forced_plans`) and check
    ``training_steps`` training steps bitwise against the unoptimized model, with ``reset`` on both between steps;
    check that each region was built as planned and checkpointed. Returns the kinds applied; those in ``expect``
    must be among them."""
    model, inputs = make()
    _, _, _, _, annotated0, regions0 = pipeline(copy.deepcopy(model), inputs)
    applied = set()
    for kind, plan in forced_plans(annotated0, regions0, steps):
        m = copy.deepcopy(model)
        found, stateful, graph, constants, annotated, _ = pipeline(m, inputs)
        reference = sliced_plainly(copy.deepcopy(model), graph, constants, annotated, plan, stateful,
                                   found.mutated_buffers)
        gm, stats = rewrite(m, graph, constants, annotated, plan, stateful, found.mutated_buffers, "M")
        for rp in plan.regions:
            assert type(gm.get_submodule(rp.name)) is plan_kind(rp), (kind, rp)
        for step in range(training_steps):
            report = compare_training_step(reference, gm, inputs)
            assert report.ok, f"{kind}, step {step}: {report}\n{plan}"
            assert_same_attribute_states(reference, gm, f"{kind}, step {step}")
            reset(reference)
            reset(gm)
        for rp in plan.regions:
            if rp.recompute:
                assert stats[rp.name].checkpointed_calls >= training_steps, (kind, rp.name, stats[rp.name])
                assert stats[rp.name].recomputations >= training_steps, (kind, rp.name, stats[rp.name])
        applied.add(kind)
    missing = set(expect) - applied
    assert not missing, f"region kinds that did not apply: {sorted(missing)} (applied: {sorted(applied)})"
    return applied
