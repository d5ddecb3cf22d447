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
from fxmemopt.verify import compare_training_step

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
    gm, summary = fxmemopt.optimize(model, (x,), targets=targets, compress=compress, return_summary=True)

    report = compare_training_step(reference, gm, (x,), between=lambda: torch.rand(5))

    assert report.ok, f"{spec}\n{report}"
    assert report.checked >= 3
    # every region ran as a checkpoint and recomputed in backward
    assert summary.region_count >= 1
    for name, stats in summary.runtime.items():
        assert stats.checkpointed_calls == 1, name
        assert stats.recomputations == 1, name
        assert stats.unpacked_fallbacks == 0, name
    # the caller's example tensor is untouched
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None
    # packing follows the value sets: never when compress=False
    assert compress or summary.packed_input_count == 0
