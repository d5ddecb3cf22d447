"""The CPU live-storage tracker and measure_step."""

import torch

import fxmemopt
from fxmemopt.profiling.measure import LiveBytesTracker, default_loss
from fxmemopt.profiling.verify import module_states
from fxmemopt.snn import DeepConvSNN


def test_tracker_counts_allocations_and_frees():
    with LiveBytesTracker() as t:
        a = torch.ones(1000)          # 4000 B
        b = a * 2                     # +4000
        del a                         # -4000
        c = b + 1                     # +4000
        assert t.live == 8000
    assert t.peak == 8000
    del b, c


def test_tracker_ignores_views_and_in_place_results_of_existing_tensors():
    """Regression: views of tensors that existed before tracking (inputs, parameters) were counted."""
    x = torch.rand(100, 10)
    w = torch.rand(10, 10)
    with LiveBytesTracker() as t:
        v = x.view(10, 100)
        wt = w.t()
        x.mul_(2)
        s = x[3]
        assert t.live == 0
        y = v.sum()                   # a real allocation
        assert t.live == y.nbytes
    del v, wt, s


def test_measure_step_is_deterministic_and_side_effect_free():
    torch.manual_seed(0)
    model = DeepConvSNN(num_blocks=2, channels=4)
    x = torch.rand(2, 2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    a = fxmemopt.measure_step(model, (x,), repeats=1)
    b = fxmemopt.measure_step(model, (x,), repeats=1)
    assert a.peak_bytes == b.peak_bytes > 0 and a.method == "cpu-storage-tracker"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(v == 0.0 for v in module_states(model).values())


def test_default_loss_sums_floating_outputs():
    out = (torch.ones(2), torch.tensor([1, 2]), {"a": torch.full((3,), 2.0)})
    assert default_loss(out).item() == 8.0


def test_measure_step_restores_rebound_attributes_of_plain_neurons():
    """Regression: a plain-PyTorch neuron's rebound `self.v` must not survive a measurement (or optimize's
    warm-up step): the next training step would back-propagate into a freed graph."""
    from torch import nn

    class PlainIF(nn.Module):
        def __init__(self):
            super().__init__()
            self.v = 0.0

        def forward(self, x):
            self.v = self.v + x
            return (self.v >= 1).to(x) + 0 * self.v

    model = nn.Sequential(nn.Linear(3, 3), PlainIF())
    v0 = model[1].v
    fxmemopt.measure_step(model, (torch.rand(2, 3),), repeats=1)
    assert model[1].v is v0
    gm = fxmemopt.optimize(model, (torch.rand(2, 3),))
    assert model[1].v is v0
    gm(torch.rand(2, 3)).sum().backward()
