"""The recompute value check (NOTE [Checkpoint region invariants], Rule 3): recomputation that reproduces shapes but
not values raises a typed error naming the region, or (in optimize's validation step) leaves that region's
activations kept; the gradient is never wrong. And the CUDA kernel policy's flag handling (Rule 12)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxmemopt
import fxmemopt.runtime.checkpoint as runtime
from fxmemopt.api import set_value_check
from fxmemopt.errors import InvalidOptionError, RecomputationValueError
from fxmemopt.runtime.fingerprint import SAMPLE, fingerprint
from fxmemopt.snn import LIFNode, SeqToANNContainer, reset_net


class Drifting(nn.Module):
    """Adds a value that changes on every call (a global counter, not module state: nothing can replay it), in the
    last bits only. Same shapes, same dtypes, same number of saved tensors each call: only values differ, as a
    convolution algorithm picked anew on recomputation would differ."""

    calls = [0]

    def forward(self, x):
        Drifting.calls[0] += 1
        return x * (1.0 + 1e-6 * Drifting.calls[0])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(SeqToANNContainer(nn.Linear(6, 8)), Drifting(), LIFNode(),
                         SeqToANNContainer(nn.Linear(8, 4)), LIFNode())


def _hand_placed(mode: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(SeqToANNContainer(nn.Linear(6, 8)),
                         fxmemopt.Checkpointed(nn.Sequential(SeqToANNContainer(nn.Linear(8, 8)), Drifting(),
                                                             LIFNode()), recompute_check=mode))


X = torch.rand(4, 3, 6) * 2


@pytest.mark.parametrize("mode", [None, "sampled", "full"])
def test_a_value_mismatch_in_recomputation_raises_naming_the_region(mode):
    model = _hand_placed(mode)
    with pytest.raises(RecomputationValueError, match=r"region .*recomputation in backward produced other values"
                                                      r".*cudnn.benchmark = False"):
        model(X).sum().backward()
    assert model[1].stats.value_mismatches == 1


def test_without_the_check_the_same_mismatch_gives_a_wrong_gradient_silently():
    """What the check prevents: the same region with the check off completes its backward, and a gradient differs
    from the same layers run plainly (forward once, the counter at the forward's value)."""
    model = _hand_placed("off")
    torch.manual_seed(0)
    plain = nn.Sequential(SeqToANNContainer(nn.Linear(6, 8)),
                          nn.Sequential(SeqToANNContainer(nn.Linear(8, 8)), Drifting(), LIFNode()))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters(), strict=True))
    Drifting.calls[0] = 0
    out = model(X)
    out.sum().backward()
    Drifting.calls[0] = 0
    ref = plain(X)
    ref.sum().backward()
    assert torch.equal(out, ref)  # the forward is the plain one
    assert any(not torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), plain.parameters()))


def test_optimize_keeps_the_activations_of_a_region_whose_values_differ_and_stays_exact():
    model = _model()
    reference = copy.deepcopy(model)
    with pytest.warns(fxmemopt.FxMemOptWarning, match="ckpt_2"):
        gm, summary = fxmemopt.optimize(model, (X,), leaf_modules=(Drifting,), never_worse=False,
                                        return_summary=True)
    (name, why), = summary.failed_regions
    assert name == "ckpt_2" and why.startswith("RecomputationValueError")
    assert "ckpt_4" in {r.name for r in summary.plan.regions}  # the deterministic region stays
    Drifting.calls[0] = 0
    out = gm(X)
    out.sum().backward()
    Drifting.calls[0] = 0
    ref = reference(X)
    ref.sum().backward()
    assert torch.equal(out, ref)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(gm.parameters(), reference.parameters()))


def test_the_returned_module_checks_the_mode_asked_and_validation_checks_in_full(monkeypatch):
    modes = []
    original = runtime._print_of

    def spy(t, mode):
        modes.append(mode)
        return original(t, mode)

    monkeypatch.setattr(runtime, "_print_of", spy)
    torch.manual_seed(0)
    model = nn.Sequential(SeqToANNContainer(nn.Linear(6, 8)), LIFNode(), SeqToANNContainer(nn.Linear(8, 4)),
                          LIFNode())
    gm = fxmemopt.optimize(model, (X,), recompute_check="off", never_worse=False)
    assert "full" in modes  # the validation step
    modes.clear()
    gm(X).sum().backward()
    assert modes == []
    set_value_check(gm, None)
    reset_net(gm)
    gm(X).sum().backward()
    assert modes and set(modes) == {"sampled"}  # the default on CPU
    with pytest.raises(InvalidOptionError, match="recompute_check"):
        fxmemopt.optimize(model, (X,), recompute_check="always")


def test_the_check_on_an_accelerator_reads_its_verdict_when_backward_ends(monkeypatch):
    """On CUDA fingerprints stay on the device and the comparison is read by a callback at the end of the backward
    pass. The same path on CPU, by keeping fingerprints as tensors: the error still ends the backward."""
    monkeypatch.setattr(runtime, "_print_of", lambda t, mode: fingerprint(t, mode))
    model = _hand_placed()
    queued = []
    engine = torch.autograd.Variable._execution_engine
    real = engine.queue_callback

    class Engine:
        def __getattr__(self, name):
            return getattr(engine, name)

        def queue_callback(self, fn):
            queued.append(fn)
            return real(fn)

    monkeypatch.setattr(torch.autograd.Variable, "_execution_engine", Engine())
    with pytest.raises(RecomputationValueError):
        model(X).sum().backward()
    assert queued


def test_fingerprints_see_every_element_in_full_and_their_samples_when_sampled():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool,
                  torch.uint8):
        t = (torch.rand(5, 37, 11) * 4).to(dtype)
        assert fingerprint(t, "full") == fingerprint(t.clone(), "full")
        assert fingerprint(t, "sampled") == fingerprint(t.clone(), "sampled")
        assert fingerprint(t.transpose(0, 2), "full") == fingerprint(t.transpose(0, 2).contiguous(), "full")
        for at in (0, 1234, t.numel() - 1):  # one element, its last bit (or its truth) changed
            u = t.clone().reshape(-1)
            if dtype == torch.bool:
                u[at] = ~u[at]
            else:
                u.view(torch.uint8)[at * t.element_size()] ^= 1
            assert fingerprint(u.reshape(t.shape), "full") != fingerprint(t, "full"), (dtype, at)
    t = torch.rand(10_000)
    step = (t.numel() - 1) // (SAMPLE - 1)
    u = t.clone()
    u[step * 3] += 1  # a sampled position
    assert fingerprint(u, "sampled") != fingerprint(t, "sampled")
    assert fingerprint(t, "off") is None
    assert fingerprint(torch.rand(3, dtype=torch.complex64), "full") is None


def test_same_kernels_turns_cudnn_benchmark_off_inside_a_cuda_region_and_back(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with runtime.same_kernels([torch.device("cuda", 0)]):
        assert torch.backends.cudnn.benchmark is False
    assert torch.backends.cudnn.benchmark is True
    with runtime.same_kernels([]):  # CPU: untouched
        assert torch.backends.cudnn.benchmark is True
    with pytest.raises(ValueError), runtime.same_kernels([torch.device("cuda", 0)]):
        raise ValueError
    assert torch.backends.cudnn.benchmark is True
