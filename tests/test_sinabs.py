"""sinabs 3.1.3 models written the way its tutorials write them: a DVS conv net of ``IAFSqueeze`` layers (batch and
time flattened into dimension 0, the batch size written into every layer) on ``[N, T, 2, H, W]`` event frames.

The model fixes its batch size, and its 5-dimensional input is batch-major, so the guess that slices a large batch
for analysis (dimension 1 of a 5-dimensional input) slices time, and the model fails on that slice: ``optimize``
analyses at the examples' size instead (issue 28: it reported "the model fails on the example"). For each size and
preset: bitwise equal to the unoptimized step, never above it (measured), predicted within 10%.

The ``*Squeeze`` layers are recomputed in time slices on their flattened layout (``TimeAxis(batch=B)``), told their
batch size or their number of steps, and so are the plain layers on ``[B, T, ...]`` (``TimeAxis(dim=1)``); their
``MultiSpike`` outputs hold ``-0.0`` where the membrane is negative, and are packed all the same (issue 28: 1.06x
before either, 1.8x asked).

Install with ``pip install --no-deps sinabs==3.1.3 pbr``; skipped where absent.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import fxmemopt

sl = pytest.importorskip("sinabs.layers")


class DVSNet(nn.Module):
    """sinabs's DVS tutorial shape: Conv -> IAFSqueeze -> AvgPool, twice, then a spiking readout; the forward
    resets the layers' states, flattens ``[N, T, ...]`` to ``[N*T, ...]`` and sums the readout over time."""

    def __init__(self, batch: int, steps: int, size: int, c1: int, c2: int) -> None:
        super().__init__()
        self.batch, self.steps = batch, steps
        self.seq = nn.Sequential(
            nn.Conv2d(2, c1, 3, padding=1, bias=False), sl.IAFSqueeze(batch_size=batch, min_v_mem=-1.0),
            nn.AvgPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), sl.IAFSqueeze(batch_size=batch, min_v_mem=-1.0),
            nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(c2 * (size // 4) ** 2, 10, bias=False),
            sl.IAFSqueeze(batch_size=batch, min_v_mem=-1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.modules():
            if isinstance(m, sl.StatefulLayer):
                m.reset_states()
        out = self.seq(x.flatten(0, 1))
        return out.unflatten(0, (self.batch, self.steps)).sum(1)


def _dvs_net(batch: int, steps: int, size: int, c1: int, c2: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = DVSNet(batch, steps, size, c1, c2).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(4.0)  # so that every layer fires
    return model, ((torch.rand(batch, steps, 2, size, size) < 0.15).float(),)


SIZES = {"4x16x32x32": (4, 16, 32, 16, 32), "2x12x16x16": (2, 12, 16, 8, 16)}


@pytest.mark.parametrize("preset", [{}, {"prefer": "memory"}], ids=["default", "memory"])
@pytest.mark.parametrize("size", list(SIZES))
def test_sinabs_squeeze_net_that_fixes_its_batch_optimizes_exactly(size, preset):
    model, inputs = _dvs_net(*SIZES[size])
    reference = copy.deepcopy(model)
    base = fxmemopt.measure_step(model, inputs, repeats=0).peak_bytes
    gm, summary = fxmemopt.optimize(model, inputs, return_summary=True, **preset)
    assert summary.recording.startswith("recorded at the examples' size"), summary.recording
    opt = fxmemopt.measure_step(gm, inputs, repeats=0).peak_bytes
    assert opt <= base, f"{size} {preset}: {base} -> {opt} bytes"
    assert abs(summary.predicted_peak_after - opt) <= 0.10 * opt, (summary.predicted_peak_after, opt)
    report = fxmemopt.compare_training_step(reference, gm, inputs)
    assert report.ok, str(report)


@pytest.mark.parametrize("chunks", [6, 7, 8])
def test_uneven_time_slices_of_the_flattened_layout_are_predicted_and_exact(chunks):
    """T=12 in 7 or 8 slices: two-step and one-step slices. Each slice's gradient is cut out of the joined output's
    as a copy (two steps) or a view (one step, on ``[B*T, ...]``); mixed, the views kept the whole gradient alive
    beside the copies: measured 809,652 B against 673,972 B predicted at 8 slices (-16.8%), the plan the default
    picked on some step timings (a flaky CI failure). Every slice's gradient is a copy now: 704,524 B, as 6 slices."""
    model, inputs = _dvs_net(*SIZES["2x12x16x16"])
    reference = copy.deepcopy(model)
    _, found = fxmemopt.optimize(copy.deepcopy(model), inputs, return_summary=True, never_worse=False, level=3)
    by_anchor = {r.anchor: r for r in found.plan.regions}
    plan = fxmemopt.Plan((dataclasses.replace(by_anchor["seq.1"], chunks=chunks, keep_prefix=True, keep_starts=False),
                          dataclasses.replace(by_anchor["seq.4"], chunks=4, keep_prefix=True, keep_starts=False)))
    gm, summary = fxmemopt.optimize(model, inputs, plan=plan, return_summary=True)
    assert [r.chunks for r in summary.plan.regions] == [chunks, 4], summary.plan.regions
    opt = fxmemopt.measure_step(gm, inputs, repeats=0).peak_bytes
    assert abs(summary.predicted_peak_after - opt) <= 0.10 * opt, (summary.predicted_peak_after, opt)
    report = fxmemopt.compare_training_step(reference, gm, inputs)
    assert report.ok, str(report)


@pytest.mark.parametrize("preset,least", [({}, 1.75), ({"prefer": "memory"}, 1.8)], ids=["default", "memory"])
def test_squeeze_net_is_sliced_in_time_and_packed_at_least_1_8x_lower(preset, least):
    """The issue's net (T=16, batch 4, 32x32 frames): the layers' regions run their neurons in time slices, the spikes
    the next one stores are packed (-0.0 and all), and the step's peak is 1.8x lower or more with prefer="memory".
    The default measures 1.86x with 4 slices on the second layer and 1.79x with 2: it slices within a step-time
    budget, and whether 4 slices fit it is decided on measured times (x1.0 of the budget; a loaded machine flips it)."""
    model, inputs = _dvs_net(*SIZES["4x16x32x32"])
    reference = copy.deepcopy(model)
    base = fxmemopt.measure_step(model, inputs, repeats=0).peak_bytes
    gm, summary = fxmemopt.optimize(model, inputs, return_summary=True, **preset)
    opt = fxmemopt.measure_step(gm, inputs, repeats=0).peak_bytes
    assert base / opt >= least, f"{base} -> {opt} bytes: {base / opt:.2f}x\n{fxmemopt.explain(gm)}"
    assert any(r.chunks > 1 for r in summary.regions), summary.regions
    packed = [i for r in summary.regions for i in r.inputs if i.node == "seq_1"]
    assert not packed or all(i.bits and i.stored_bytes < i.full_bytes / 3 for i in packed), packed
    report = fxmemopt.compare_training_step(reference, gm, inputs)
    assert report.ok, str(report)
    for path in ("seq.1", "seq.4", "seq.8"):  # the observation each layer leaves, as the unsliced call leaves it
        a, b = reference.get_submodule(path).firing_rate, gm.get_submodule(path).firing_rate
        assert torch.equal(a, b), (path, a, b)


class LayoutNet(nn.Module):
    """Two linear layers and two sinabs neurons on ``[B, T, 64]``: ``IAFSqueeze(num_timesteps=T)`` on the
    flattened batch and time (``"steps"``), or ``IAF`` on ``[B, T, ...]`` itself (``"batch-first"``)."""

    def __init__(self, kind: str, batch: int, steps: int) -> None:
        super().__init__()
        self.kind, self.batch, self.steps = kind, batch, steps

        def neuron() -> nn.Module:
            if kind == "steps":
                return sl.IAFSqueeze(num_timesteps=steps, min_v_mem=-1.0)
            return sl.IAF(min_v_mem=-1.0)

        self.fc1, self.n1 = nn.Linear(64, 128, bias=False), neuron()
        self.fc2, self.n2 = nn.Linear(128, 128, bias=False), neuron()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.modules():
            if isinstance(m, sl.StatefulLayer):
                m.reset_states()
        if self.kind == "steps":
            return self.n2(self.fc2(self.n1(self.fc1(x.flatten(0, 1))))).unflatten(0, (self.batch, self.steps)).sum(1)
        return self.n2(self.fc2(self.n1(self.fc1(x)))).sum(1)


@pytest.mark.parametrize("kind", ["steps", "batch-first"])
def test_other_sinabs_layouts_are_sliced_in_time_exactly(kind):
    from plan_kinds import pipeline

    from fxmemopt.runtime.steps import TimeAxis

    torch.manual_seed(0)
    model = LayoutNet(kind, 4, 32).train()
    with torch.no_grad():
        for lin in (model.fc1, model.fc2):
            lin.weight.mul_(3.0)
    inputs = ((torch.rand(4, 32, 64) < 0.2).float(),)
    annotated = pipeline(model, inputs)[4]
    expected = TimeAxis(batch=4, steps_attr="num_timesteps") if kind == "steps" else TimeAxis(dim=1)
    for path in ("n1", "n2"):
        info = next(annotated[n] for n in annotated.order
                    if annotated[n].op == "call_module" and annotated[n].target == path)
        node = info.name
        assert info.time_chunkable and info.time_steps == 32, (node, info)
        assert info.time_axis.dim == expected.dim and info.time_axis.batch == expected.batch
        assert info.time_axis.steps_attr == expected.steps_attr
    reference = copy.deepcopy(model)
    base = fxmemopt.measure_step(model, inputs, repeats=0).peak_bytes
    gm, summary = fxmemopt.optimize(model, inputs, return_summary=True, prefer="memory")
    opt = fxmemopt.measure_step(gm, inputs, repeats=0).peak_bytes
    assert opt < base and any(r.chunks > 1 for r in summary.regions), (base, opt, summary.regions)
    assert abs(summary.predicted_peak_after - opt) <= 0.10 * opt, (summary.predicted_peak_after, opt)
    report = fxmemopt.compare_training_step(reference, gm, inputs)
    assert report.ok, str(report)
    assert gm.get_submodule("n1").num_timesteps == model.n1.num_timesteps if kind == "steps" else True


@pytest.mark.parametrize("preset", [{}, {"prefer": "memory"}], ids=["default", "memory"])
def test_optimized_net_resets_its_layers_every_call_as_the_model_does(preset):
    """The model resets its layers at the top of forward. Traced, those calls ran once and left no node, so the
    optimized module carried the last step's state (and its freed graph) into the next: its second training step
    failed ("Trying to backward through the graph a second time"). They are graph nodes now: three steps in a row,
    nothing reset by hand, bitwise equal to the model's."""
    model, inputs = _dvs_net(*SIZES["2x12x16x16"])
    reference = copy.deepcopy(model)
    gm = fxmemopt.optimize(model, inputs, **preset)
    assert sum(1 for n in gm.graph.nodes if n.op == "call_function" and "call_module_method" in str(n.target)) == 3
    for step in range(3):
        for m in (reference, gm):
            for p in m.parameters():
                p.grad = None
        a, b = reference(*inputs), gm(*inputs)
        a.sum().backward()
        b.sum().backward()
        assert torch.equal(a, b), step
        for (name, p), q in zip(reference.named_parameters(), gm.parameters()):
            assert p.grad is None and q.grad is None or torch.equal(p.grad, q.grad), (step, name)
        for path in ("seq.1", "seq.4", "seq.8"):
            assert torch.equal(reference.get_submodule(path).v_mem, gm.get_submodule(path).v_mem), (step, path)


def test_explain_marks_the_regions_decided_on_measured_time():
    """The default slices within a step-time budget: those decisions weighed measured times, and explain says so
    (``*`` after the decision, one legend line); a decision on bytes alone carries no mark."""
    model, inputs = _dvs_net(*SIZES["2x12x16x16"])
    gm, summary = fxmemopt.optimize(model, inputs, return_summary=True)
    timed = {d.region for d in summary.decisions if d.on_time}
    # slicing accepted within the budget or refused by it: either way a decision on time
    assert any(d.action in ("chunk", "reject") and d.on_time for d in summary.decisions), summary.decisions
    text = str(fxmemopt.explain(gm))
    assert "* decided on measured step times" in text
    rows = fxmemopt.explain(gm).rows
    assert rows and all(r["on_time"] == (r["region"] in timed) for r in rows)
    for r in rows:
        line = next(line for line in text.splitlines() if line.startswith(r["region"] + " "))
        assert (r["decision"] + "*" in line) == r["on_time"], line
