"""The conformance suite (issue 28): for every library's models (``conformance_cases.py``: spikingjelly, snntorch,
norse, sinabs and plain PyTorch, each in the styles of its own tutorials, at two sizes) and both presets (the
default and ``prefer="memory"``), the optimized training step is

* bitwise equal to the unoptimized one (outputs, every gradient, BatchNorm statistics, neuron states),
* never above it (the storage tracker's peak at the examples' size),
* predicted within 10% of what it measures (but for :data:`PREDICTION_MISSES`, expected to fail, with why),

and with ``prefer="memory"`` at least 2x below it on every model whose activations are most of its whole-step peak
(:attr:`CaseResult.activation_share` above one half) — except the cases listed in :data:`BELOW_2X`, each with what
limits it, expected to fail (strictly: a case that starts passing must leave the list).

Each case's reduction is printed (``pytest -s``); ``python -m fxmemopt bench --libraries`` prints the whole table
and writes the README's "works with" table from it. A library that is not installed is skipped.
"""

from __future__ import annotations

import functools

import pytest
from conformance_cases import PRESETS, CaseResult, cases, check  # (pytest puts this directory on sys.path)

CASES = cases()
PAIRS = [(c, p) for c in CASES for p in PRESETS]

#: Cases whose activations are most of the peak but that ``prefer="memory"`` does not bring 2x below the
#: unoptimized step (measured on this suite's sizes), and why. The test for them is expected to fail.
BELOW_2X: dict[str, str] = {
    "spikingjelly-conv_dvs_multistep-small": "the first layer's recomputation in backward sets the peak (its neuron's "
                                             "per-step tensors); 1.55x",
    "norse-sequential_state_lif-small": "norse's LIF keeps its per-step state tensors; the first layer's backward "
                                        "sets the peak; 1.78x",
    "norse-sequential_state_lif-large": "as the small one; 1.99x",
    "norse-sequential_state_lsnn-small": "as the LIF one; 1.49x",
    "norse-sequential_state_lsnn-large": "as the LIF one; 1.66x",
    "norse-sequential_state_lifbox-small": "Lift(LIFBoxCell) runs its cell per step, each call a region; 1.58x",
    "norse-sequential_state_lifbox-large": "as the small one; 1.70x",
    "norse-lifcell_loop-small": "LIFCell calls in a loop: per-step regions keep each step's real-valued state; 1.60x",
    "norse-lifcell_loop-large": "as the small one; 1.65x",
    "sinabs-iaf_squeeze_dvs-small": "IAFSqueeze sliced in time on batch and time flattened, its -0.0 spikes packed; "
                                    "the first layer's recomputation (its conv output whole, and each slice's copy) "
                                    "sets the peak; 1.74x",
    "sinabs-iaf_squeeze_dvs-large": "as the small one; 1.87x",
    "sinabs-lif_shd-large": "LIF's trainable tau_mem is transformed once per call (exp(-1/tau)): on time slices its "
                            "gradient would be summed in another order, so it is not sliced; 1.39x",
    "spikingjelly-mlp_single_step_loop-large": "per-step regions of a loop in forward: each keeps its step's "
                                               "real-valued membrane; 1.14x",
    "plain_PyTorch-multistep_conv-small": "the multi-step neuron (a custom autograd.Function in a Python loop) is a "
                                          "leaf, not sliced in time; 1.13x",
    "plain_PyTorch-multistep_conv-large": "as the small one; 1.14x",
}


@functools.cache
def _result(case_id: str, preset: str) -> CaseResult:
    return check(next(c for c in CASES if c.id == case_id), preset)


def _line(r: CaseResult) -> str:
    return (f"{r.case.id} {r.preset}: {r.unoptimized / 2**20:.2f} -> {r.optimized / 2**20:.2f} MiB "
            f"({r.reduction:.2f}x), predicted {r.predicted / 2**20:.2f} MiB ({r.prediction_error:+.1%}), "
            f"{r.regions} regions, {'exact' if r.exact else 'NOT EXACT'}")


#: (case id, preset) whose prediction misses the measured peak by more than 10%, and why; expected to fail.
PREDICTION_MISSES: dict[tuple[str, str], str] = {
}


@pytest.mark.parametrize(("case", "preset"), PAIRS, ids=[f"{c.id}-{p}" for c, p in PAIRS])
def test_exact_and_never_worse(case, preset):
    r = _result(case.id, preset)
    print(_line(r))
    assert r.exact, f"{_line(r)}\n{r.mismatch}"
    assert r.optimized <= r.unoptimized, f"above the unoptimized step: {_line(r)}"


@pytest.mark.parametrize(("case", "preset"), PAIRS, ids=[f"{c.id}-{p}" for c, p in PAIRS])
def test_predicted_within_10_percent(case, preset, request):
    if (case.id, preset) in PREDICTION_MISSES:
        request.applymarker(pytest.mark.xfail(reason=PREDICTION_MISSES[case.id, preset], strict=True))
    r = _result(case.id, preset)
    assert abs(r.prediction_error) <= 0.10, f"prediction off by more than 10%: {_line(r)}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_memory_preset_halves_the_peak_where_activations_dominate(case, request):
    if case.id in BELOW_2X:
        request.applymarker(pytest.mark.xfail(reason=BELOW_2X[case.id], strict=True))
    r = _result(case.id, "memory")
    # (the condition is part of the property, not an early return: a case whose activations are not most of its
    # peak passes with any reduction, never worse being the other test's)
    assert r.activation_share <= 0.5 or r.reduction >= 2.0, (
        f"activations {r.activation_share:.0%} of the whole step, and only {r.reduction:.2f}x: {_line(r)}")


def test_unpacked_inputs_of_a_recomputation_die_at_their_last_use():
    """norse's ``Lift`` stacks a region's unpacked steps first thing in its recomputation. As leaves requiring grad
    they lived until the recomputation ended (their ``AccumulateGrad`` nodes held them): 11.26 MiB measured against
    10.43 predicted. And the last step's state, which nothing uses, was charged to the end of the forward: the
    prediction was 7.7% above the measured peak once the first was fixed. Both fixed: to within 1%."""
    case = "norse-sequential_state_lifbox-large"
    if not any(c.id == case for c in CASES):
        pytest.skip("norse is not installed")
    r = _result(case, "default")
    assert abs(r.prediction_error) <= 0.01, _line(r)
    assert r.reduction >= 1.6, _line(r)
