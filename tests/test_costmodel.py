"""The cost model: trace replay is exact for the unoptimized step, plans are predicted within tolerance, and the
simulator's lifetime rules hold on a hand-built trace."""

from __future__ import annotations

import pickle

import networkx as nx
import pytest
import torch

import fxmemopt
from fxmemopt.analysis.annotate import AnnotatedGraph, NodeInfo, ValueSet
from fxmemopt.planning.costgraph import StepTrace, StorageRecord, build_cost_graph, facts, simulate
from fxmemopt.planning.plan import Plan, RegionPlan
from fxmemopt.snn import DeepConvSNN, SEWResNet18, Spikformer, SpikingVGG11

MODELS = [
    ("DeepConvSNN", lambda: DeepConvSNN(num_blocks=6, channels=8), (4, 4, 3, 16, 16)),
    ("SpikingVGG11", lambda: SpikingVGG11(width=0.125, dropout=0.2), (4, 2, 2, 48, 48)),
    ("SEWResNet18", lambda: SEWResNet18(width=0.125), (2, 2, 3, 64, 64)),
    ("Spikformer", lambda: Spikformer(embed_dim=32, num_heads=2, depth=2), (4, 2, 3, 32, 32)),
]


@pytest.mark.parametrize("name, factory, shape", MODELS, ids=[m[0] for m in MODELS])
def test_predicted_peaks_match_measured(name, factory, shape):
    torch.manual_seed(0)
    model = factory()
    x = torch.rand(shape)
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    base = fxmemopt.measure_step(model, (x,), repeats=0).peak_bytes
    opt = fxmemopt.measure_step(gm, (x,), repeats=0).peak_bytes
    # The unoptimized step replays its own recording: equal up to the loss bookkeeping.
    assert abs(summary.predicted_peak_before - base) / base < 0.001
    # Plans are simulated: the promise is 10%. (These models are usually within 3%, but the default's plan depends
    # on predicted times, which a loaded machine moves: measured 5.1% off for another DeepConvSNN plan under load.)
    assert abs(summary.predicted_peak_after - opt) / opt < 0.10, (summary.predicted_peak_after, opt)
    assert summary.predicted_step_time_ratio > 1.0
    assert isinstance(summary.cost_graph, nx.DiGraph)


def test_cost_graph_is_plain_picklable_and_keyed_by_node_names():
    model = DeepConvSNN(num_blocks=2, channels=4)
    gm, summary = fxmemopt.optimize(model, (torch.rand(2, 2, 3, 8, 8),), return_summary=True)
    g = summary.cost_graph
    assert set(g.graph["order"]) <= set(g.nodes) <= set(g.graph["order"]) | {"<loss>"}
    assert all(g.nodes[n]["info"].name == n for n in g.graph["order"])
    assert g.nodes["blocks_0_sn"]["saved_bytes"] > 0 and g.nodes["blocks_0_sn"]["fwd_time_s"] >= 0
    assert ("blocks_0_conv_1", "unflatten_2") in g.edges or g.in_degree("blocks_0_sn") == 1
    g2 = pickle.loads(pickle.dumps(g))
    assert simulate(g2, summary.plan).peak_bytes == simulate(g, summary.plan).peak_bytes


def test_prediction_failure_is_a_note_not_an_error():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return x.detach() * 2  # nothing to backprop: recording skips backward, still predicts

    gm, summary = fxmemopt.optimize(Odd(), (torch.rand(3),), return_summary=True)
    assert summary.predicted_peak_before is not None and summary.notes[0].startswith("no stateful")


# ---- hand-built trace: pins the simulator's lifetime rules -------------------------------------------------------

def _info(name, op, inputs, nbytes=400, shape=(100,), vs=None):
    vs = vs or ValueSet(None)
    return NodeInfo(name=name, op=op, target=name, inputs=tuple(inputs), module_type=None, module_stack=(),
                    is_tensor=True, shape=shape, dtype="float32", nbytes=nbytes, static=vs, observed=vs,
                    value_set=vs, stateful=op == "call_module")


def _chain():
    """x -> a (allocates 400 B, saves a temp of 800 B) -> s (neuron: spikes, saves 400 B) -> out (head)."""
    binary = ValueSet(1)
    nodes = {
        "x": _info("x", "placeholder", []),
        "a": _info("a", "call_function", ["x"]),
        "s": _info("s", "call_module", ["a"], vs=binary),
        "out": _info("out", "call_function", ["s"]),
        "output": _info("output", "output", ["out"]),
    }
    order = ("x", "a", "s", "out", "output")
    users = {"x": ("a",), "a": ("s",), "s": ("out",), "out": ("output",), "output": ()}
    annotated = AnnotatedGraph(order, nodes, users)
    # events: x:0-1, a:2-4, s:5-7, out:8-9, output:10-11, loss:12, bwd:13(out) 14(s) 15(a) 16(<loss>)
    events = ([("fwd", "x")] * 2 + [("fwd", "a")] * 3 + [("fwd", "s")] * 3 + [("fwd", "out")] * 2
              + [("fwd", "output")] * 2 + [("loss", "<loss>")] + [("bwd", "out"), ("bwd", "s"), ("bwd", "a"),
                                                                  ("bwd", "<loss>")])
    node_events = {"x": (0, 1), "a": (2, 4), "s": (5, 7), "out": (8, 9), "output": (10, 11)}
    storages = (
        StorageRecord(400, 2, 7, "a", "fwd", (), "a"),           # a's output, freed after s used it
        StorageRecord(800, 3, 15, "a", "fwd", ("a",), None, 15),     # a's saved temp, unpacked by a's backward
        StorageRecord(400, 5, 14, "s", "fwd", ("s",), None, 14),     # s's saved internal
        StorageRecord(400, 6, 16, "s", "fwd", ("out",), "s", 13),    # spikes, saved by the head
        StorageRecord(400, 13, None, "out", "bwd", (), None),    # a gradient
    )
    trace = StepTrace(tuple(events), storages, node_events, {"a": 0.01, "s": 0.02}, 0.1, 0)
    return annotated, trace


def test_simulated_baseline_replays_the_trace():
    annotated, trace = _chain()
    g = build_cost_graph(annotated, trace)
    p = simulate(g, None, with_timeline=True)
    # at event 6 (s allocates spikes): a-out 400 + temp 800 + s internal 400 + spikes 400
    assert p.peak_bytes == 2000
    assert p.extra_compute_s == 0 and p.step_time_s == 0.1


def test_simulated_region_frees_at_exit_and_recomputes_in_backward():
    annotated, trace = _chain()
    g = build_cost_graph(annotated, trace)
    plan = Plan((RegionPlan("r", "s", ("a", "s"), (0,)),))
    p = simulate(g, plan, with_timeline=True)
    labels = [label for label, _ in p.timeline]
    live = dict(enumerate(b for _, b in p.timeline))
    exit_pos = labels.index("exit:r")
    # after the region's forward only the spikes (saved by the head, outside the region) are alive
    assert live[exit_pos + 1] == 400
    # recomputation brings back the region's saved tensors (temp 800 + internal 400) plus its temporaries
    rc = [i for i, label in enumerate(labels) if label == "recompute:r"]
    assert max(live[i] for i in rc) >= 400 + 800 + 400
    # peak inside recomputation: spikes (held by the head) + the head's gradient + replayed a-out + temp +
    # internal; recomputation stops after the internal (the last saved tensor), so the spikes are not rebuilt
    assert p.peak_bytes == 2400 and p.peak_at == "recompute:r"
    assert live[labels.index("recompute-end:r")] == 2000 and live[labels.index("bwd:a")] == 1600
    assert p.extra_compute_s == pytest.approx(0.03)


def test_a_cost_graph_built_by_hand_from_its_documented_attributes_simulates_the_same():
    # The cost graph is the planner's whole input: nodes with `info`, `storages`, `fwd_events`, `fwd_time_s`; data
    # edges; graph attributes `order`, `events`, `step_time_s`. Built with add_node/add_edge alone (no StepTrace),
    # it predicts what build_cost_graph's does, and survives pickling.
    annotated, trace = _chain()
    g = nx.DiGraph(order=annotated.order, events=trace.events, step_time_s=0.1, peak_bytes=0)
    for name in annotated.order:
        g.add_node(name, info=annotated[name], storages=tuple(s for s in trace.storages if s.node == name),
                   fwd_events=trace.node_events[name], fwd_time_s={"a": 0.01, "s": 0.02}.get(name, 0.0))
        g.add_edges_from((i, name) for i in annotated[name].inputs)
    assert facts(g) == annotated
    built = build_cost_graph(annotated, trace)
    for plan in (None, Plan((RegionPlan("r", "s", ("a", "s"), (0,)),)), Plan((RegionPlan("r", "s", ("out",), (1,)),))):
        assert simulate(g, plan, with_timeline=True) == simulate(built, plan, with_timeline=True)
        assert simulate(pickle.loads(pickle.dumps(g)), plan) == simulate(g, plan)
    # the search reads the same graph: on this chain, prefer="memory" makes the one region and predicts its peak
    from fxmemopt.planning.regions import Region
    from fxmemopt.planning.search import resolve_options, search
    region = Region("r", "s", ("a", "s"), ("x",), ("s",), ("s",))
    chosen = search(g, [region], {}, resolve_options(prefer="memory", never_worse=False))
    assert [r.nodes for r in chosen.plan.regions] == [("a", "s")]
    assert chosen.prediction == simulate(g, chosen.plan)


def test_packed_inputs_are_charged_from_entry_to_the_end_of_the_regions_backward():
    annotated, trace = _chain()
    g = build_cost_graph(annotated, trace)
    plan = Plan((RegionPlan("r", "s", ("out",), (1,)),))  # the head as a region with a 1-bit input
    p = simulate(g, plan, with_timeline=True)
    labels = [label for label, _ in p.timeline]
    live = [b for _, b in p.timeline]
    entry = labels.index("enter:r")
    pack = labels.index("pack:r")
    # before the region: a's saved temp 800, s's internal 400, spikes 400 (a's output died with s's last event)
    assert live[pack] == 1600 + 100 * (1 + 4)  # transient: uint8 copy + round-trip check in the input's dtype
    assert live[entry] == 1600 + 13  # ceil(100 / 8) bytes of payload
    # in the head's backward: temp 800 + internal 400 + the unpacked spikes the head saved again + its gradient
    # + the payload
    assert live[labels.index("bwd:out")] == 800 + 400 + 400 + 400 + 13


def test_packed_saves_keep_the_payload_until_backward_reads_it_and_free_the_spikes():
    # Rule 11: the head saves the spikes packed; nothing is recomputed.
    annotated, trace = _chain()
    g = build_cost_graph(annotated, trace)
    plan = Plan((RegionPlan("pack_out", "out", ("out",), (1,), recompute=False),))
    p = simulate(g, plan, with_timeline=True)
    labels = [label for label, _ in p.timeline]
    live = [b for _, b in p.timeline]
    out_end = len(labels) - 1 - labels[::-1].index("fwd:out")
    # at the head's last forward event: temp 800 + internal 400 + spikes 400 + payload 13 + the packing's transient
    assert live[out_end] == 800 + 400 + 400 + 13 + 100 * 5
    # then the spikes die (nothing else keeps them): only the 13-byte payload stays
    assert live[labels.index("loss:<loss>")] == 800 + 400 + 13
    # the head's backward unpacks a transient copy of the spikes, beside its gradient
    assert live[labels.index("bwd:out")] == 800 + 400 + 13 + 400 + 400
    assert p.peak_bytes == 2000 - 400 + 13 + 500 and p.extra_compute_s == 0
    # the packing's time is charged per value packed (pack_s_per_value, measured when recording)
    g.graph["pack_s_per_value"] = 1e-6
    assert simulate(g, plan).extra_compute_s == pytest.approx(100 * 1e-6)


def test_sharded_peak_on_a_hand_built_timeline():
    """FSDP2's rules on a timeline of two units, a and b (forward a then b, backward b then a): parameters 100 bytes
    each (gradients too), 10 at the root. Live bytes (the unsharded prediction) are put at one position at a time
    to read what the sharding adds there."""
    from fxmemopt.planning.sharding import sharded_peak

    labels = ["fwd:a1", "fwd:b1", "loss:x", "recompute:rb", "bwd:b1", "bwd:a1", "bwd:head"]

    def peak(at: int, live: int, world: int = 2, reshard: bool = True) -> int:
        timeline = [(label, live if p == at else 0) for p, label in enumerate(labels)]
        return sharded_peak(timeline, {"rb": "b1"}, {"a1": ("a",), "b1": ("b",)}, {"a": 100, "b": 100},
                            {"a": 100, "b": 100}, 10, world, reshard_after_forward=reshard)

    # resharded: a running unit holds its parameters and the all-gather's buffer (200); in b's backward a is
    # prefetched (100): 10 + 200 + 100
    assert peak(0, 0) == 310
    assert peak(1, 1000) == 1000 + 10 + 200  # forward: only b
    assert peak(4, 1000) == 1000 + 10 + 200 + 100  # backward of b, a prefetched
    assert peak(5, 1000) == 1000 + 10 + 200 - 50  # backward of a; b's gradients sharded (100 -> 50)
    assert peak(6, 1000) == 1000 + 10 - 50 - 50  # both units done: gradients sharded, parameters freed
    assert peak(6, 1000, world=4) == 1000 + 10 - 75 - 75
    # kept from forward: at b's forward both units are whole (200), with a's buffer (its all-gather's, until b's
    # is copied out) and b's (held to the end: nothing is gathered after it)
    assert peak(1, 1000, reshard=False) == 1000 + 10 + 200 + 200
    assert peak(4, 1000, reshard=False) == 1000 + 10 + 200 + 100  # a and b whole, b's buffer
    assert peak(5, 1000, reshard=False) == 1000 + 10 + 100 + 100 - 50  # b freed after its backward


def test_predicted_peak_per_rank_needs_an_optimized_module():
    with pytest.raises(fxmemopt.FxMemOptError, match=r"predicted_peak_per_rank\(Linear\).*no cost model"):
        fxmemopt.distributed.predicted_peak_per_rank(torch.nn.Linear(2, 2), 2)


def test_sliced_region_with_a_pooling_prefix_is_predicted_within_10_percent():
    """conv -> BatchNorm -> MaxPool -> LIF, the neuron in time slices and its prefix recomputed ('2+p'): the pool's
    recomputed input lives until its backward has allocated the input's gradient (it was predicted freed at the
    unpack, 18% below the measured peak; found on spikingjelly's Spikformer stem at training batch)."""
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron, surrogate
    torch.manual_seed(0)

    def lif():
        return neuron.LIFNode(surrogate_function=surrogate.ATan(), detach_reset=True)

    model = torch.nn.Sequential(
        layer.Conv2d(3, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4), layer.MaxPool2d(2), lif(),
        layer.Conv2d(4, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), lif(),
        layer.Flatten(), layer.Linear(8 * 8 * 8, 10))
    functional.set_step_mode(model, "m")
    x = torch.rand(4, 8, 3, 16, 16)
    functional.reset_net(model)
    gm, s = fxmemopt.optimize(model, (x,), prefer="memory", return_summary=True)
    functional.reset_net(gm)
    measured = fxmemopt.measure_step(gm, (x,), repeats=0, warmup=0).peak_bytes
    if not any(r.chunks > 1 and not r.keep_prefix for r in s.plan.regions):
        pytest.fail(f"no time-sliced region with its prefix recomputed in {s.plan.regions}")
    assert abs(s.predicted_peak_after - measured) <= 0.10 * measured


class _DropsItsFinalState(torch.nn.Module):
    """A loop over time whose last state update nothing uses (a neuron returning ``(out, state)`` whose caller
    keeps only ``out``): ``v * (1 - s)`` makes the final membrane and saves ``1 - s`` for a backward that never
    comes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, out = torch.zeros_like(x[0]), []
        for t in range(4):
            v = v * 0.5 + self.fc(x[t])
            s = torch.sigmoid(4 * (v - 1))
            out.append(s)
            v = v * (1 - s)
        return torch.stack(out)


def test_a_value_nothing_uses_dies_in_the_recording_as_soon_as_it_is_made():
    """The GraphModule's code drops a value nothing uses right after making it (and with it what its graph saved);
    fx's Interpreter kept it to the end of the forward, so the recording charged it to every plan (norse's Lift:
    0.75 MiB of a SequentialState(LIFBox) step, predicted 7.7% above the measured peak)."""
    from fxmemopt.profiling.record import record_step

    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_DropsItsFinalState())
    unused = [n.name for n in gm.graph.nodes if not n.users and n.op == "call_function"]
    assert unused, gm.code
    rec = record_step(gm, (torch.rand(4, 8, 64),), {}, timing_repeats=0)
    for name in unused:
        first, last = rec.node_events[name]
        made = [s for s in rec.storages if s.value_of == name]
        assert made and all(s.free is not None and s.free <= last for s in made), (name, made, (first, last))
