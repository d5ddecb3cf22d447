"""The product's promise, as a property: on random spiking networks, a training step of the optimized module is
bitwise identical to the unoptimized model's — outputs, every parameter gradient, the input gradient, BatchNorm
running statistics and counters, neuron states after the step, dropout masks (RNG replayed) — and the regions
really recompute."""

from __future__ import annotations

import copy

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from strategies import ConvLayer, LayerSpec, ResLayer, SNNSpec, build, snn_specs

import fxmemopt
from fxmemopt.profiling.verify import compare_training_step

_DEGENERATE_T1_N1_RES = SNNSpec(layers=(LayerSpec("res", 2, True, "none", 0.0),), neuron="lif", hard_reset=True,
                      detach_reset=False, surrogate="atan", T=1, N=1, in_channels=1, size=2, spike_input=True, seed=0)


@settings(max_examples=200)
@given(spec=snn_specs(), mode=st.sampled_from(["auto", "auto", "targets"]), compress=st.booleans())
@example(spec=_DEGENERATE_T1_N1_RES, mode="auto", compress=True)
def test_training_step_is_bitwise_exact(spec: SNNSpec, mode: str, compress: bool) -> None:
    model, x = build(spec)
    reference = copy.deepcopy(model)
    x_before = x.clone()
    has_blocks = any(isinstance(m, (ConvLayer, ResLayer)) for m in model.modules())
    targets = (ConvLayer, ResLayer) if mode == "targets" and has_blocks else None
    # never_worse=False: every region stays, even where the prediction says it does not pay on a model this small
    gm, summary = fxmemopt.optimize(model, (x,), targets=targets, compress=compress, return_summary=True,
                                    never_worse=False)

    report = compare_training_step(reference, gm, (x,), between=lambda: torch.rand(5))

    assert report.ok, f"{spec}\n{report}"
    assert report.checked >= 3
    # every region ran as a checkpoint and recomputed in backward (a time-sliced one once per slice at least: the
    # default slices the region at the peak)
    assert summary.region_count >= 1
    chunks = {r.name: r.chunks for r in summary.regions}
    for name, stats in summary.runtime.items():
        assert stats.checkpointed_calls == 1, name
        assert stats.recomputations == 1 if chunks[name] == 1 else stats.recomputations >= chunks[name], name
        assert stats.unpacked_fallbacks == 0, name
    # the caller's example tensor is untouched
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None
    # packing follows the value sets: never when compress=False
    assert compress or summary.packed_input_count == 0


def _pipeline(model, x):
    """The optimize() stages up to the plan, so a test can apply any plan."""
    from fxmemopt.analysis.annotate import annotate
    from fxmemopt.analysis.state import probe
    from fxmemopt.analysis.trace import make_graph_module, trace
    from fxmemopt.planning.regions import find_regions

    found = probe(model, (x,))
    stateful = dict(found.stateful)
    cap = trace(model, (x,), stateful_paths=stateful)
    graph, constants = cap.graph, cap.constants
    traced = make_graph_module(model, graph, "M", extra=constants)
    annotated = annotate(traced, (x,), stateful)
    return found, stateful, graph, constants, annotated, find_regions(annotated)


@settings(max_examples=100)
@given(spec=snn_specs(max_T=5), data=st.data())
def test_every_plan_is_bitwise_exact(spec: SNNSpec, data) -> None:
    """Any plan the search can produce — a subset of regions (unwraps), any packing, time slices with either prefix
    policy on every chunkable region, a region's suffix in place of an unwrapped region (prefer="speed"'s rungs),
    packed-saves regions on operations outside the regions that read spikes — trains exactly like the unoptimized
    model."""
    import dataclasses

    from fxmemopt.planning.plan import Plan, RegionPlan, checkpoint_all, chunkable, input_bits
    from fxmemopt.planning.regions import is_metadata, region_io
    from fxmemopt.runtime.rewrite import rewrite

    model, x = build(spec)
    reference = copy.deepcopy(model)
    found, stateful, graph, constants, annotated, regions = _pipeline(model, x)
    compress = data.draw(st.booleans(), label="compress")
    full = checkpoint_all(regions, annotated, compress)
    keep = data.draw(st.lists(st.booleans(), min_size=len(full.regions), max_size=len(full.regions)),
                     label="keep region")
    chosen = []
    for rp, k in zip(full.regions, keep):
        if not k:
            # unwrapped, or only its last nodes recomputed (a suffix ending in the neuron)
            start = data.draw(st.integers(1, len(rp.nodes)), label=f"suffix of {rp.name}")
            nodes = rp.nodes[start:]
            if nodes and not is_metadata(annotated, nodes[0]):
                bits = tuple(input_bits(annotated, i, compress) for i in region_io(annotated, nodes)[0])
                chosen.append(RegionPlan(rp.name, rp.anchor, nodes, bits))
            continue
        if chunkable(annotated, rp.nodes)[0]:
            chunks = data.draw(st.integers(1, spec.T + 1), label=f"chunks {rp.name}")
            rp = dataclasses.replace(rp, chunks=chunks, keep_prefix=data.draw(st.booleans(), label="keep_prefix"),
                                     keep_starts=chunks > 1 and data.draw(st.booleans(), label="keep_starts"))
        chosen.append(rp)
    covered = {n for rp in chosen for n in rp.nodes}
    position = {n: i for i, n in enumerate(annotated.order)}
    for n in annotated.order:  # packed saves on operations outside the regions that read spikes
        if n in covered or annotated[n].op not in ("call_module", "call_function", "call_method") or \
                is_metadata(annotated, n):
            continue
        bits = tuple(input_bits(annotated, i, True) for i in region_io(annotated, (n,))[0])
        if any(bits) and data.draw(st.booleans(), label=f"pack saves of {n}"):
            chosen.append(RegionPlan(f"pack_{n}", n, (n,), bits, recompute=False))
    chosen.sort(key=lambda rp: position[rp.nodes[0]])
    gm, stats = rewrite(model, graph, constants, annotated, Plan(tuple(chosen)), stateful, found.mutated_buffers,
                        "M")

    report = compare_training_step(reference, gm, (x,), between=lambda: torch.rand(5))

    assert report.ok, f"{spec}\n{chosen}\n{report}"
    for rp in chosen:
        if rp.recompute:
            assert stats[rp.name].checkpointed_calls == 1 and stats[rp.name].recomputations >= 1
        else:  # plain when nothing it reads requires grad (Rule 7); never recomputed (Rule 11)
            assert stats[rp.name].checkpointed_calls + stats[rp.name].plain_calls == 1
            assert stats[rp.name].recomputations == 0


@settings(max_examples=40)
@given(spec=snn_specs(max_depth=3), preset=st.sampled_from([
    {"prefer": "memory"}, {"prefer": "speed"}, {"prefer": "balanced"}, {"level": 2}, {"level": 4},
    {"checkpoint_budget": "speed"}]), blocks=st.booleans())
def test_search_presets_are_bitwise_exact(spec: SNNSpec, preset: dict, blocks: bool) -> None:
    """Whatever the search chooses (splits of residual blocks into per-neuron regions, time slices, unwraps)."""
    model, x = build(spec)
    reference = copy.deepcopy(model)
    has_blocks = any(isinstance(m, (ConvLayer, ResLayer)) for m in model.modules())
    targets = (ConvLayer, ResLayer) if blocks and has_blocks else None
    gm, summary = fxmemopt.optimize(model, (x,), targets=targets, return_summary=True, **preset)
    report = compare_training_step(reference, gm, (x,), between=lambda: torch.rand(5))
    assert report.ok, f"{spec}\n{preset}\n{report}"
    # never worse: no preset predicts a higher peak than the unoptimized step
    assert summary.predicted_peak_after <= summary.predicted_peak_before, f"{spec}\n{preset}\n{summary}"
