"""Plain-PyTorch stateful modules that keep state the way spikingjelly 2.0.0's do, independent of fxmemopt.

Each keeps its own state either in a spikingjelly-style ``_memories`` dict (read and written through
``__getattr__``/``__setattr__``, as ``spikingjelly.activation_based.base.MemoryModule`` does) or in a plain
attribute it rebinds (``self.y = ...``), and the containers hold a neuron that keeps its own:

* :class:`LinearRecurrent` (``layer.LinearRecurrentContainer``): ``y[t] = sub(rc(cat(x[t], y[t-1])))``;
* :class:`ElementWiseRecurrent` (``layer.ElementWiseRecurrentContainer``): ``y[t] = sub(y[t-1] + x[t])``;
* :class:`Adaptive`: an adaptive threshold ``a`` of its own around a neuron, or around a recurrent container
  (two levels of nesting: three stateful modules, each with its own state);
* :class:`SynapseFilter` (``layer.SynapseFilter(learnable=True)``): a low-pass filter with a learnable tau, no
  spikes;
* :class:`StepLIF`: a single-step LIF neuron with its membrane in an attribute.

All run multi-step (input ``[T, N, ...]``, the containers looping over T and calling their single-step neuron),
the way ``functional.set_step_mode(net, "m")`` leaves spikingjelly's containers. ``reset_net`` resets them all.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class Memories(nn.Module):
    """spikingjelly's ``MemoryModule`` storage in plain PyTorch: state in ``self._memories``, reset values beside
    (``memories=False``: no such dict, state in plain attributes)."""

    def __init__(self, memories: bool = True) -> None:
        super().__init__()
        if memories:
            self._memories: dict[str, Any] = {}
            self._memories_rv: dict[str, Any] = {}

    def register_memory(self, name: str, value: Any) -> None:
        self._memories[name] = value
        self._memories_rv[name] = copy.deepcopy(value)

    def reset(self) -> None:
        for name, value in self.__dict__.get("_memories_rv", {}).items():
            self._memories[name] = copy.deepcopy(value)

    def __getattr__(self, name: str) -> Any:
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            return memories[name]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            memories[name] = value
        else:
            super().__setattr__(name, value)


class _State(Memories):
    """One state variable, kept in ``_memories`` (``memories=True``) or as a plain attribute the module rebinds;
    ``trace=True``: a second one, ``trace``, a plain attribute beside the ``_memories`` dict (a ``MemoryModule``
    subclass that keeps an observation of its own)."""

    def __init__(self, name: str, value: Any, memories: bool, trace: bool = False) -> None:
        super().__init__(memories)
        self._state_name, self._state_reset, self._traced = name, value, trace
        if memories:
            self.register_memory(name, value)
        else:
            setattr(self, name, value)
        if trace:
            self.trace = 0.0

    def reset(self) -> None:
        super().reset()
        if "_memories" not in self.__dict__:
            setattr(self, self._state_name, copy.deepcopy(self._state_reset))
        if self._traced:
            self.trace = 0.0


class _ATanSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return g / (1 + (math.pi * x).square())


class StepLIF(_State):
    """A single-step LIF neuron (``tau=2``), membrane ``v`` in an attribute or ``_memories``; ``v_threshold`` marks
    it a spiking neuron, as spikingjelly's are."""

    def __init__(self, detach_reset: bool, hard_reset: bool, memories: bool = False, trace: bool = False) -> None:
        super().__init__("v", 0.0, memories, trace)
        self.v_threshold = 1.0
        self.detach_reset, self.hard_reset = detach_reset, hard_reset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v if isinstance(self.v, torch.Tensor) else torch.full_like(x, self.v)
        h = v + (x - v) / 2.0
        if self._traced:  # spike-frequency adaptation, kept in a plain attribute beside _memories
            trace = self.trace if isinstance(self.trace, torch.Tensor) else torch.full_like(h, self.trace)
            h = h - 0.5 * torch.sigmoid(trace)
        z = _ATanSpike.apply(h - self.v_threshold)
        r = z.detach() if self.detach_reset else z
        self.v = h * (1.0 - r) if self.hard_reset else h - r * self.v_threshold
        if self._traced:
            self.trace = self.trace / 2.0 + z
        return z


class LinearRecurrent(_State):
    """``layer.LinearRecurrentContainer`` in step mode ``"m"``: ``y[t] = sub(rc(cat(x[t], y[t-1])))``, ``y[-1] = 0``;
    ``sub`` is single-step and keeps its own state."""

    def __init__(self, sub_module: nn.Module, features: int, bias: bool = True, memories: bool = True) -> None:
        super().__init__("y", None, memories)
        self.rc = nn.Linear(2 * features, features, bias)
        self.sub_module = sub_module
        self.features = features

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        y = self.y if self.y is not None else x_seq.new_zeros(*x_seq.shape[1:-1], self.features)
        out = []
        for t in range(x_seq.shape[0]):
            y = self.sub_module(self.rc(torch.cat((x_seq[t], y), dim=-1)))
            out.append(y)
        self.y = y
        return torch.stack(out)


class ElementWiseRecurrent(_State):
    """``layer.ElementWiseRecurrentContainer`` in step mode ``"m"`` with ``f(y, x) = y + x``."""

    def __init__(self, sub_module: nn.Module, memories: bool = True) -> None:
        super().__init__("y", None, memories)
        self.sub_module = sub_module

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        y = self.y if self.y is not None else torch.zeros_like(x_seq[0])
        out = []
        for t in range(x_seq.shape[0]):
            y = self.sub_module(y + x_seq[t])
            out.append(y)
        self.y = y
        return torch.stack(out)


class Adaptive(_State):
    """An adaptive threshold of its own (``a``, raised by each output spike, decaying) around a single-step module
    that keeps state (a neuron, or a container holding one): ``z[t] = sub(x[t] - a[t-1])``,
    ``a[t] = a[t-1] / 2 + z[t] / 4``."""

    def __init__(self, sub_module: nn.Module, memories: bool = True) -> None:
        super().__init__("a", 0.0, memories)
        self.sub_module = sub_module

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        a = self.a
        out = []
        for t in range(x_seq.shape[0]):
            z = self.sub_module(x_seq[t] - a)
            a = a / 2.0 + z / 4.0
            out.append(z)
        self.a = a
        return torch.stack(out)


class StepModule(nn.Module):
    """A multi-step module run one step at a time inside a container: ``m(x[None])[0]`` (the container's inner
    neuron is single-step)."""

    def __init__(self, sub_module: nn.Module) -> None:
        super().__init__()
        self.sub_module = sub_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sub_module(x.unsqueeze(0)).squeeze(0)


class MultiStep(nn.Module):
    """A single-step module run over T, keeping no state of its own (its child does)."""

    def __init__(self, sub_module: nn.Module) -> None:
        super().__init__()
        self.sub_module = sub_module

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.sub_module(x_seq[t]) for t in range(x_seq.shape[0])])


class SynapseFilter(_State):
    """``layer.SynapseFilter(tau=2, learnable=True)`` in step mode ``"m"``:
    ``i[t] = i[t-1] - (1 - x[t]) i[t-1] sigmoid(w) + x[t]``; a stateful module that makes no spikes."""

    def __init__(self, tau: float = 2.0, memories: bool = True) -> None:
        super().__init__("out_i", 0.0, memories)
        self.w = nn.Parameter(torch.as_tensor(-math.log(tau - 1)))

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        i = self.out_i if isinstance(self.out_i, torch.Tensor) else torch.full_like(x_seq[0], self.out_i)
        inv_tau = self.w.sigmoid()
        out = []
        for t in range(x_seq.shape[0]):
            i = i - (1.0 - x_seq[t]) * i * inv_tau + x_seq[t]
            out.append(i)
        self.out_i = i
        return torch.stack(out)


def reset_net(model: nn.Module) -> None:
    """Reset every module here (and every other module with a ``reset``) in ``model``."""
    for m in model.modules():
        if hasattr(m, "reset") and callable(m.reset):
            m.reset()
