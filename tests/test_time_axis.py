"""Time layouts (:class:`fxmemopt.runtime.steps.TimeAxis`): cutting a neuron's input into consecutive time slices
and joining the slices' outputs must give back the very tensor, on every layout: time-major ``[T, ...]``, batch
first ``[B, T, ...]`` (sinabs' ``IAF``/``LIF``), batch and time flattened ``[B * T, ...]`` (sinabs' ``*Squeeze``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from fxmemopt.runtime.steps import TIME_MAJOR, TimeAxis


@st.composite
def laid_out(draw):
    """(axis, tensor laid out on it, its T, k slices)."""
    kind = draw(st.sampled_from(["time-major", "batch-first", "flat"]))
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 7))
    rest = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    k = draw(st.integers(1, 9))
    if kind == "time-major":
        axis, shape = TIME_MAJOR, (t, b, *rest)
    elif kind == "batch-first":
        axis, shape = TimeAxis(dim=1), (b, t, *rest)
    else:
        axis, shape = TimeAxis(batch=b), (b * t, *rest)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    return axis, x, t, k


def _steps_of(axis: TimeAxis, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[B, T, ...]``: where each step is, whatever the layout."""
    if axis.batch:
        return x.unflatten(0, (axis.batch, -1))
    return x.transpose(0, 1) if axis.dim == 0 else x


@given(laid_out())
@example((TimeAxis(batch=2), torch.arange(12.0).view(6, 2), 3, 2))
@example((TimeAxis(dim=1), torch.arange(24.0).view(2, 4, 3), 4, 3))
def test_split_then_cat_gives_the_tensor_back_and_slices_are_consecutive_steps(case):
    axis, x, t, k = case
    assert axis.steps(x) == t
    parts = axis.split(x, k)
    assert len(parts) == min(k, t)
    assert [axis.steps(p) for p in parts] == axis.sizes(t, k)
    assert torch.equal(axis.cat(list(parts)), x)
    t0 = 0
    for p in parts:
        t1 = t0 + axis.steps(p)
        assert torch.equal(p, axis.narrow(x, t0, t1))
        assert torch.equal(_steps_of(axis, p), _steps_of(axis, x)[:, t0:t1])
        t0 = t1


def test_split_gradient_is_the_joined_slice_gradients():
    x = torch.randn(6, 3, requires_grad=True)
    axis = TimeAxis(batch=2)
    parts = axis.split(x, 2)
    g = [torch.randn(p.shape) for p in parts]
    torch.autograd.backward(parts, g)
    assert torch.equal(x.grad, axis.cat(g))


def test_layouts_that_cannot_hold_time_are_refused():
    with pytest.raises(ValueError):
        TimeAxis(dim=2)
    with pytest.raises(ValueError):
        TimeAxis(dim=1, batch=2)
    with pytest.raises(ValueError):
        TimeAxis(derived=(("firing_rate", "median"),))
    with pytest.raises(ValueError, match="multiple"):
        TimeAxis(batch=4).steps(torch.zeros(6, 2))


def test_steps_attribute_follows_each_slice_and_is_put_back():
    m = nn.Identity()
    m.num_timesteps = 8
    axis = TimeAxis(batch=2, steps_attr="num_timesteps")
    with axis.calling(m, 3):
        assert m.num_timesteps == 3
    assert m.num_timesteps == 8
    with pytest.raises(RuntimeError), axis.calling(m, 5):
        raise RuntimeError
    assert m.num_timesteps == 8


def test_derived_observation_is_set_from_the_joined_output():
    m = nn.Identity()
    out = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    TimeAxis(derived=(("firing_rate", "mean"), ("rate", "sum/numel"))).finish(m, out)
    assert torch.equal(m.firing_rate, out.mean()) and torch.equal(m.rate, out.sum() / out.numel())
