"""snntorch 1.0.0 and norse 1.1.0 models written the way their tutorials write them (``tests/other_libs.py``):
exact over the whole BPTT sequence, and at least 2x lower peak with ``prefer="memory"`` where activations dominate.

Install with ``pip install --no-deps snntorch==1.0.0 norse==1.1.0 "nir<=1.0.4" nirtorch`` (their declared
dependencies pull other torch builds); skipped where absent.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxmemopt

pytest.importorskip("snntorch")
pytest.importorskip("norse")
import other_libs  # noqa: E402  (pytest puts tests/ on sys.path)

SEQUENCE_MODELS = ["snntorch_loop_in_forward_net", "snntorch_init_hidden_loop_in_forward", "norse_lif_multistep",
                   "norse_lif_multistep_module", "norse_sequential_state", "norse_sequential_state_readme",
                   "norse_lifcell_loop_in_forward"]


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_sequence_model_is_exact_and_regions_form(name):
    model, inputs = other_libs.FACTORIES[name]()
    reference = copy.deepcopy(model)
    gm, summary = fxmemopt.optimize(model, inputs, prefer="memory", return_summary=True)
    assert summary.regions and not summary.failed_regions, str(summary)
    report = fxmemopt.compare_training_step(reference, gm, inputs)
    assert report.ok, f"{name}: {report}"
    if name == "snntorch_init_hidden_loop_in_forward":
        # utils.reset in its forward resets snntorch's class-level list of neurons, which a deepcopy is not in: the
        # reference cannot take a second step. The optimized module's second step must repeat its first.
        first = gm(*inputs)
        second = gm(*inputs)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    else:  # the forward resets its state: a second step is the first again, on both
        report = fxmemopt.compare_training_step(reference, gm, inputs)
        assert report.ok, f"{name}, second step: {report}"


@pytest.mark.parametrize("name", ["snntorch_loop_in_forward_net", "snntorch_init_hidden_loop_in_forward",
                                  "norse_lif_multistep_module"])
def test_sequence_model_peak_at_least_halved(name):
    model, inputs = other_libs.FACTORIES[name]()
    base = fxmemopt.measure_step(model, inputs, repeats=0).peak_bytes
    gm = fxmemopt.optimize(model, inputs, prefer="memory")
    opt = fxmemopt.measure_step(gm, inputs, repeats=0).peak_bytes
    assert base / opt >= 2.0, f"{name}: {base} -> {opt} bytes ({base / opt:.2f}x)"


@pytest.mark.parametrize(("name", "at_least"), [("snntorch_bn_event_net", 1.8), ("snntorch_bn_event_net_small", 1.5)])
def test_snntorch_leaky_regions_keep_no_dead_state(name, at_least):
    """snntorch's ``Leaky(x, mem)`` rebinds ``mem`` and ``reset`` before reading them: regions keep only their
    metadata (``ProbeResult.entry_dead``), and the tensor its detached reset signal saved is not kept when
    recomputed (checkpoint Rules 2 and 6). Before: the default measured 22.8 MiB against 25.6 MiB unoptimized
    (predicted 13.8 MiB); now 13.8 MiB, the prediction within 1%. (The small one's weights and gradients are a
    third of its peak: 1.57x.)"""
    model, inputs = other_libs.FACTORIES[name]()
    reference = copy.deepcopy(model)
    base = fxmemopt.measure_step(model, inputs, repeats=0).peak_bytes
    gm, summary = fxmemopt.optimize(model, inputs, return_summary=True)
    regions = [m for _, m in gm.named_children() if hasattr(m, "spec")]
    assert regions and all(dict(r.spec.entry_dead).get(r.spec.anchor) == ("mem", "reset") for r in regions
                           if r.spec.stateful), [r.spec.entry_dead for r in regions]
    opt = fxmemopt.measure_step(gm, inputs, repeats=0).peak_bytes
    assert base / opt >= at_least, f"{name}: {base} -> {opt} bytes ({base / opt:.2f}x)"
    assert abs(summary.predicted_peak_after - opt) <= 0.10 * opt, (summary.predicted_peak_after, opt)
    # the never-worse check measured the same step, and explain prints it beside the prediction
    assert summary.checked_peak_after == opt, (summary.checked_peak_after, opt)
    assert "measured peak (never-worse check" in str(fxmemopt.explain(gm)) and "never-worse check" in str(summary)
    # what the tracker's peaks leave out (it exists before the step), and the whole step with it
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert summary.resident["parameters"] == params and summary.resident["inputs"] == inputs[0].numel() * 4
    assert summary.whole_step_peaks == (summary.predicted_peak_before + sum(summary.resident.values()),
                                        summary.predicted_peak_after + sum(summary.resident.values()))
    assert "not counted: parameters" in str(fxmemopt.explain(gm))
    report = fxmemopt.compare_training_step(reference, gm, inputs)
    assert report.ok, f"{name}: {report}"


@pytest.mark.parametrize("name", ["norse_recurrent_speech_net", "norse_recurrent_speech_net_small"])
def test_norse_recurrent_cell_state_container_is_counted(name):
    """Each call of the ``LIFRecurrentCell`` is a region whose input is the ``LIFState`` container (``z``, ``v``,
    ``i``), kept as it is: the cost model used to leave containers out (T=80, batch 16: predicted 1.04 MiB,
    measured 2.28 MiB against 2.27 unoptimized, which the never-worse check, skipped where the prediction is far
    below the unoptimized peak, did not see). Counted, both presets are predicted within 10%, never worse, exact."""
    for preset in ({}, {"prefer": "memory"}):
        model, inputs = other_libs.FACTORIES[name]()
        base = fxmemopt.measure_step(model, inputs, repeats=0).peak_bytes
        # the reference is built again, not deep-copied: norse zeroes the recurrent weights' diagonal gradient with
        # a tensor hook (autapses=False), and ``copy.deepcopy`` drops tensor hooks
        reference, _ = other_libs.FACTORIES[name]()
        gm, summary = fxmemopt.optimize(model, inputs, return_summary=True, **preset)
        opt = fxmemopt.measure_step(gm, inputs, repeats=0).peak_bytes
        assert opt <= base, (preset, base, opt)
        assert abs(summary.predicted_peak_after - opt) <= 0.10 * opt, (preset, summary.predicted_peak_after, opt)
        report = fxmemopt.compare_training_step(reference, gm, inputs)
        assert report.ok, f"{name} {preset}: {report}"


def test_compare_training_step_says_a_deep_copied_reference_lost_the_gradient_hooks():
    model, inputs = other_libs.norse_recurrent_speech_net_small()
    report = fxmemopt.compare_training_step(copy.deepcopy(model), model, inputs)
    assert not report.ok
    assert any(w == "grads:cell.recurrent_weights" and "copy.deepcopy drops tensor hooks" in d
               for w, d in report.mismatches), str(report)
    model, inputs = other_libs.norse_recurrent_speech_net_small()  # (its gradients above would add up)
    rebuilt, _ = other_libs.norse_recurrent_speech_net_small()
    assert fxmemopt.compare_training_step(rebuilt, model, inputs).ok


def test_never_worse_measures_at_full_size_when_the_validation_slice_contradicts_the_prediction(monkeypatch):
    """With a recording extrapolated from small batches, the result's full-size step is measured only where its
    predicted peak is close to the unoptimized one. A cost model that misses what the regions keep (here: the
    container inputs, as it did before, monkeypatched back) predicted 0.46x and the step measured 1.00x, never
    checked. The validation step on the slice shows it (it keeps about all of the unoptimized peak recorded at that
    size): the result is then measured at full size, and the regions that raise the measured peak are left out."""
    from fxmemopt.planning import costgraph

    original = costgraph._region_inputs

    def without_containers(rec, r):
        by_ref, packed = original(rec, r)
        return [i for i in by_ref if rec.annotated[i].is_tensor], packed

    monkeypatch.setattr(costgraph, "_region_inputs", without_containers)
    model, inputs = other_libs.norse_recurrent_speech_net(t=32, n=16)
    base = fxmemopt.measure_step(model, inputs, repeats=0).peak_bytes
    reference, _ = other_libs.norse_recurrent_speech_net(t=32, n=16)
    gm, summary = fxmemopt.optimize(model, inputs, return_summary=True)
    assert "extrapolated" in summary.recording, summary.recording
    assert summary.predicted_peak_after < 0.75 * summary.predicted_peak_before  # the wrong prediction
    assert any("validation step on a slice kept" in n for n in summary.notes), summary.notes
    assert fxmemopt.measure_step(gm, inputs, repeats=0).peak_bytes <= base
    report = fxmemopt.compare_training_step(reference, gm, inputs)
    assert report.ok, str(report)


def test_a_state_used_after_the_probe_found_it_dead_is_kept_exactly():
    """The probe runs without grad; this neuron reads its entry ``reset`` only with grad enabled (a data- or
    mode-dependent path the probe did not take). The region's watch sees the use in the training step and keeps
    the state (``entry_state_uses``): still bitwise."""
    import snntorch as snn

    class Sneaky(snn.Leaky):
        def forward(self, input_, mem=None):
            reset = self.__dict__.get("reset")
            if torch.is_grad_enabled() and isinstance(reset, torch.Tensor) and reset.shape == input_.shape:
                input_ = input_ + 0.25 * reset
            return super().forward(input_, mem)

    model, inputs = other_libs.snntorch_bn_event_net_small()
    model.lif2 = Sneaky(beta=0.9, spike_grad=model.lif2.spike_grad)
    reference = copy.deepcopy(model)
    gm = fxmemopt.optimize(model, inputs, never_worse=False)
    regions = {n: m for n, m in gm.named_children() if hasattr(m, "spec") and m.spec.anchor == "lif2"}
    assert regions and all(dict(r.spec.entry_dead).get("lif2") == ("mem", "reset") for r in regions.values())
    for r in regions.values():
        r.stats.reset()
    report = fxmemopt.compare_training_step(reference, gm, inputs)
    assert report.ok, str(report)
    assert sum(r.stats.entry_state_uses for r in regions.values()) > 0


def test_snntorch_single_step_net_over_an_outer_time_loop():
    """Tutorial 7: the net is called once per time step by the training loop (``calls_per_step=T``)."""
    net, (x0,) = other_libs.snntorch_single_step_net()
    x_seq = other_libs.snntorch_example_sequence()
    reference = copy.deepcopy(net)
    gm, summary = fxmemopt.optimize(net, (x0,), prefer="memory", calls_per_step=x_seq.shape[0], return_summary=True)
    assert len(summary.regions) == 3 and not summary.failed_regions
    assert summary.predicted_peak_before / summary.predicted_peak_after >= 2.0

    def step(m):
        for mod in m.modules():  # utils.reset's class-level list does not hold a deepcopy: reset each neuron
            if hasattr(mod, "reset_mem"):
                mod.reset_mem()
        spk, mem = torch.zeros(0), torch.zeros(0)
        outs = []
        for t in range(x_seq.shape[0]):
            spk, mem = m(x_seq[t])
            outs.append(spk)
        out = torch.stack(outs)
        (out.sum() + mem.sum()).backward()
        return out, mem

    a, ma = step(reference)
    b, mb = step(gm)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    for (n, p), q in zip(reference.named_parameters(), net.parameters()):
        assert torch.equal(p.grad, q.grad), n


@pytest.mark.parametrize("name", ["norse_lif_multistep", "norse_lif_multistep_module", "norse_sequential_state"])
def test_norse_multistep_lif_is_sliced_in_time_with_its_state_as_a_value(name):
    """norse's ``LIF`` keeps nothing: ``prefer="memory"`` slices it in time all the same, each slice called with the
    state the previous one returned (``neuron(x)`` first, or ``neuron(x, None)`` inside ``SequentialState``)."""
    model, inputs = other_libs.FACTORIES[name]()
    gm, summary = fxmemopt.optimize(model, inputs, prefer="memory", return_summary=True)
    sliced = [m for n, m in gm.named_children() if n.startswith("ckpt_") and getattr(m, "chunks", 1) > 1]
    assert sliced and all(m.initial_state in ("absent", "constant") for m in sliced), str(summary)


def test_a_state_read_at_entry_is_counted_and_a_dead_one_is_not():
    """A region snapshots the states its neuron reads at entry and keeps them until its backward: snntorch's
    ``init_hidden=True`` membrane, one per call of the loop in forward (``NodeInfo.entry_state_bytes``). Not
    counted, the conformance suite's init_hidden conv net was predicted 31% below its measured peak; counted, 5%.
    Without ``init_hidden`` the membrane is an argument and the attributes ``mem``/``reset`` are rebound before any
    use (``ProbeResult.entry_dead``): nothing to count."""
    from plan_kinds import pipeline
    for name, expect_state in (("snntorch_init_hidden_loop_in_forward", True), ("snntorch_loop_in_forward_net", False)):
        model, inputs = other_libs.FACTORIES[name]()
        found, _, _, _, annotated, _ = pipeline(model, inputs)
        calls = [annotated[n] for n in annotated.order if annotated[n].stateful and annotated[n].target == "lif1"]
        assert len(calls) == inputs[0].shape[0]
        got = [c.entry_state_bytes for c in calls]
        if expect_state:
            # the previous step's membrane, the size of the spikes it returns (the first call reads the empty state
            # utils.reset left); `reset` is rebound before it is read
            assert found.entry_dead["lif1"] == ("reset",)
            assert got == [0] + [calls[0].nbytes] * (len(calls) - 1), got
        else:
            assert set(found.entry_dead["lif1"]) == {"mem", "reset"}
            assert got == [0] * len(calls), got


def test_optimizer_state_counts_in_the_whole_step():
    """``optimize(..., optimizer=opt)``: the optimizer's state (Adam: two tensors per parameter) is listed beside the
    parameters and added to the whole step's peaks; before its first step it is what Adam's first step allocates
    (its scalar ``step`` counters aside)."""
    model, inputs = other_libs.FACTORIES["snntorch_bn_event_net_small"]()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    adam = torch.optim.Adam(model.parameters())
    gm, summary = fxmemopt.optimize(model, inputs, return_summary=True, optimizer=adam)
    assert summary.resident["optimizer state"] == 2 * params
    assert summary.whole_step_peaks[1] == summary.predicted_peak_after + sum(summary.resident.values())
    assert "optimizer state" in str(fxmemopt.explain(gm))
    # after a step: what it holds (the estimate, plus one scalar step counter per parameter tensor)
    fxmemopt.compat.tree_leaves(gm(*inputs))[0].sum().backward()
    adam.step()
    counters = sum(1 for _ in model.parameters()) * 4
    from fxmemopt.profiling.optimizer import optimizer_state_bytes
    assert optimizer_state_bytes(adam) == 2 * params + counters
    with pytest.raises(fxmemopt.errors.InvalidOptionError, match="not a torch optimizer"):
        fxmemopt.optimize(model, inputs, optimizer="adam")
