"""Mixed precision: autocast (bf16 / fp16 on CPU) and models converted to bf16 / fp16 train exactly like the
unoptimized model under the same precision; packed spikes come back in their dtype."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import fxmemopt
from fxmemopt.snn import DeepConvSNN, SpikingVGG11

CASES = {
    "autocast bf16": (torch.float32, torch.bfloat16),
    "autocast fp16": (torch.float32, torch.float16),
    "bf16 model": (torch.bfloat16, None),
    "fp16 model": (torch.float16, None),
}


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("prefer", [None, "memory"])
def test_mixed_precision_training_step_is_exact(case, prefer):
    model_dtype, autocast_dtype = CASES[case]
    torch.manual_seed(0)
    model = SpikingVGG11(width=0.125, dropout=0.2).to(model_dtype)
    x = torch.rand(4, 2, 2, 48, 48).to(model_dtype)
    reference = copy.deepcopy(model)
    with _autocast(autocast_dtype):
        # never_worse=False: every region stays (what is tested is exactness under reduced precision; measuring
        # the peak of reduced-precision steps on CPU would double this test's time)
        gm, summary = fxmemopt.optimize(model, (x,), prefer=prefer, return_summary=True, never_worse=False)
        report = fxmemopt.compare_training_step(reference, gm, (x,))
    assert report.ok, report.mismatches
    assert summary.packed_input_count > 0  # spikes are still stored packed under reduced precision
    assert sum(s.unpacked_fallbacks for s in summary.runtime.values()) == 0
    assert sum(s.packed_bytes for s in summary.runtime.values()) > 0


def test_optimized_in_float32_then_trained_under_autocast():
    """The plan does not depend on precision: autocast is recorded per call and replayed in recomputation."""
    torch.manual_seed(0)
    model = DeepConvSNN(num_blocks=3, channels=4)
    x = torch.rand(4, 2, 3, 16, 16)
    reference = copy.deepcopy(model)
    gm = fxmemopt.optimize(model, (x,), prefer="memory")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = fxmemopt.compare_training_step(reference, gm, (x,))
    assert report.ok, report.mismatches


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_spikes_keep_their_dtype(dtype):
    spikes = (torch.rand(3, 5, 7) > 0.5).to(dtype)
    packed = fxmemopt.try_pack(spikes, 1)
    assert packed is not None and packed.nbytes * 8 * spikes.element_size() >= spikes.numel()
    out = fxmemopt.unpack(packed)
    assert out.dtype == dtype and torch.equal(out, spikes) and out.stride() == spikes.stride()
