"""prefer="speed" and packed-saves regions (Rule 11 of fxmemopt.runtime.checkpoint): exact, predicted, cheapest
recomputation first."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import fxmemopt
from fxmemopt.api import analyze
from fxmemopt.errors import FxMemOptWarning, PlanError
from fxmemopt.planning.costgraph import build_cost_graph, simulate
from fxmemopt.planning.plan import Plan, RegionPlan, check_plan
from fxmemopt.planning.search import resolve_options, search
from fxmemopt.profiling.record import record_step
from fxmemopt.profiling.verify import compare_training_step
from fxmemopt.snn import DeepConvSNN, reset_net


def _dcs():
    torch.manual_seed(0)
    return DeepConvSNN(num_blocks=4, channels=8), torch.rand(4, 4, 3, 16, 16)


def _fixed_cost_graph(model, x):
    """The analysis and the cost graph of a recorded step whose times are all fixed: convolutions cost 10x a neuron,
    so the search's choices depend on bytes and these times, not on this machine's load or torch's kernels."""
    an = analyze(model, (x,))
    cost = build_cost_graph(an.annotated, record_step(an.traced, (x,), an.stateful))
    for n in cost.graph["order"]:
        cost.nodes[n]["fwd_time_s"] = 1e-2 if n.endswith("conv_0") else 1e-3 if n.endswith(("sn", "conv_1")) else 0.0
        cost.nodes[n]["fwd_nograd_time_s"] = None
    cost.graph["pack_s_per_value"] = 1e-9
    cost.graph["pack_s_per_value_by_bits"] = {}
    cost.graph["step_time_s"] = 1.0
    # the per-region overhead and the copy rate are measured on this machine too (under load, a region's overhead
    # alone outweighed a convolution): "not measured"
    cost.graph["region_overhead_s"] = 0.0
    cost.graph["copy_s_per_byte"] = 0.0
    return an, cost


def _speed_plan(model, x):
    """The speed search on a recorded step whose forward times are fixed (:func:`_fixed_cost_graph`)."""
    an, cost = _fixed_cost_graph(model, x)
    return cost, search(cost, list(an.regions), dict(an.splits), resolve_options(prefer="speed"))


def test_speed_search_packs_saved_spikes_and_recomputes_neurons_before_convolutions():
    model, x = _dcs()
    cost, result = _speed_plan(model, x)
    plan = result.plan
    packed = [r for r in plan.regions if not r.recompute]
    recomputed = [r for r in plan.regions if r.recompute]
    assert packed and all(r.pack_bits == (1,) and len(r.nodes) == 1 for r in packed)
    # the convolutions (10x a neuron) are not recomputed: their spike inputs are packed where they save them
    assert not any(n.endswith("conv_0") for r in recomputed for n in r.nodes)
    assert {r.nodes[0] for r in packed} >= {f"blocks_{i}_conv_0" for i in range(4)}
    assert result.prediction.peak_bytes <= result.baseline.peak_bytes // 2
    assert "speed_cheapest_first" in result.applied_steps
    assert any(d.action == "pack" for d in result.decisions) and any(d.action == "recompute" for d in
                                                                      result.decisions)


def test_packed_saves_and_partial_regions_are_exact_and_predicted():
    model, x = _dcs()
    cost, result = _speed_plan(model, x)
    reference = copy.deepcopy(model)
    gm, summary = fxmemopt.optimize(model, (x,), plan=result.plan, return_summary=True, measure=None)
    report = compare_training_step(reference, gm, (x,))
    assert report.ok, report.mismatches
    base = fxmemopt.measure_step(reference, (x,), repeats=0).peak_bytes
    opt = fxmemopt.measure_step(gm, (x,), repeats=0).peak_bytes
    predicted = simulate(cost, result.plan).peak_bytes
    assert opt <= base // 2 * 1.02 and abs(opt - predicted) / opt < 0.03, (base, opt, predicted)
    # nothing is recomputed in a packed-saves region; its payload is counted
    packs = [r.name for r in result.plan.regions if not r.recompute]
    reset_net(gm)
    gm(x).sum().backward()
    for name in packs:
        stats = summary.runtime[name]
        assert stats.recomputations == 0 and stats.packed_bytes > 0 and stats.checkpointed_calls >= 1


def test_a_packed_save_that_is_not_spikes_is_saved_as_is_and_counted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4))
    spikes = (torch.rand(8, 16) > 0.5).float()
    plan = Plan((RegionPlan("pack_fc", "0", ("_0",), (1,), recompute=False),))
    gm = fxmemopt.optimize(model, (spikes,), plan=plan, measure=None, never_worse=False)
    reference = copy.deepcopy(model)
    x = torch.rand(8, 16)  # not spikes: saved unpacked, exact
    with pytest.warns(FxMemOptWarning, match="saved unpacked"):
        report = compare_training_step(reference, gm, (x,))
    assert report.ok, report.mismatches
    assert gm.pack_fc.stats.unpacked_fallbacks == 1
    report = compare_training_step(reference, gm, (spikes,))
    assert report.ok and gm.pack_fc.stats.packed_bytes == 16


def test_packed_saves_regions_round_trip_through_plan_files_and_are_checked():
    model, x = _dcs()
    _, result = _speed_plan(model, x)
    plan = result.plan
    assert Plan.from_json(plan.to_json()) == plan
    d = plan.to_dict()
    for r in d["regions"]:
        del r["recompute"]  # a plan saved before packed-saves regions existed
    assert all(r.recompute for r in Plan.from_dict(d).regions)
    graph = analyze(model, (x,)).annotated
    bad = next(r for r in plan.regions if not r.recompute)
    with pytest.raises(PlanError, match="packed-saves region"):
        check_plan(dataclasses.replace(plan, regions=(dataclasses.replace(bad, chunks=2),)), graph)


def test_kept_slice_start_states_are_exact_replay_less_and_predicted():
    """``keep_starts`` (one no-grad replay keeps every slice's start state): bitwise the same step, the neuron
    stepped through fewer slices (7 instead of 11 replayed at 8 slices), ``k`` states alive instead of about
    ``2 sqrt(k)`` (the prediction charges them), round-trips through plan files, and is refused without slices."""
    from fxmemopt.planning.costgraph import _replays
    from fxmemopt.planning.costgraph import facts as cost_facts
    from fxmemopt.snn.neuron import LIFNode

    torch.manual_seed(0)
    model, x = DeepConvSNN(num_blocks=2, channels=8), torch.rand(8, 2, 3, 16, 16)
    an = analyze(model, (x,))
    cost = build_cost_graph(an.annotated, record_step(an.traced, (x,), an.stateful))
    base = fxmemopt.optimize(copy.deepcopy(model), (x,), return_summary=True, measure=None, never_worse=False,
                             level=1)[1].plan
    sliced = Plan(tuple(dataclasses.replace(r, chunks=8) for r in base.regions), base.graph_fingerprint,
                  base.inputs, base.guards)
    kept = Plan(tuple(dataclasses.replace(r, keep_starts=True) for r in sliced.regions), base.graph_fingerprint,
                base.inputs, base.guards)
    calls = {}
    for name, plan in (("sliced", sliced), ("kept", kept)):
        reference = copy.deepcopy(model)
        gm = fxmemopt.optimize(copy.deepcopy(model), (x,), plan=plan, measure=None, never_worse=False)
        counter = [0]

        def count(*_, counter: list[int] = counter) -> None:
            counter[0] += 1

        hooks = [m.register_forward_hook(count) for m in gm.modules() if isinstance(m, LIFNode)]
        report = compare_training_step(reference, gm, (x,))
        assert report.ok, (name, report.mismatches)
        calls[name] = counter[0]
        for h in hooks:
            h.remove()
    regions = len(base.regions)
    # forward 8 + recomputation 8 per region; replays 11 (every 3rd state kept) or 7 (every state kept)
    assert calls["sliced"] - calls["kept"] == 4 * regions, calls
    annotated = cost_facts(cost)
    ne = {n: e for n, e in cost.nodes(data="fwd_events") if e is not None}
    for plan, replayed in ((sliced, 11), (kept, 7)):
        slicing = _replays(annotated, plan.regions, ne, cost.graph["events"]).slicing
        assert {sl.replayed_slices for sl in slicing.values()} == {replayed}
    a, b = simulate(cost, sliced), simulate(cost, kept)
    assert b.peak_bytes >= a.peak_bytes and b.step_time_s < a.step_time_s
    assert Plan.from_json(kept.to_json()) == kept
    with pytest.raises(PlanError, match="keep_starts"):
        check_plan(dataclasses.replace(base, regions=(dataclasses.replace(base.regions[0], keep_starts=True),)),
                   an.annotated)


def test_slice_start_states_are_kept_only_where_the_peak_does_not_rise():
    """The search's last stage never raises the predicted peak and only ever lowers the predicted time."""
    # Fixed times: with measured ones, how finely the default slices (within its time budget) follows the machine's
    # load, and a region sliced in 2 has no start state to keep (one segment), so "keep starts" came and went.
    model, x = _dcs()
    an, cost = _fixed_cost_graph(model, x)
    for opts, some in ((resolve_options(), True), (resolve_options(prefer="memory"), False)):
        result = search(cost, list(an.regions), dict(an.splits), opts)
        without = Plan(tuple(dataclasses.replace(r, keep_starts=False) for r in result.plan.regions))
        before = simulate(cost, without)
        assert result.prediction.peak_bytes <= before.peak_bytes
        assert result.prediction.step_time_s <= before.step_time_s
        kept = [d for d in result.decisions if d.action == "keep starts"]
        assert len(kept) == sum(r.keep_starts for r in result.plan.regions)
        # the default slices this model's regions in 4 with memory to spare at their backward; prefer="memory"
        # slices more finely and every region's backward is at the peak
        assert bool(kept) == some, result.decisions
