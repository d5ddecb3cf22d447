"""Stateful spiking neurons.

Spiking neurons carry a membrane potential from one time step to the next. This module provides
:class:`MemoryModule`, a base class that keeps such per-sequence state apart from parameters and
buffers, and three neuron models on top of it: :class:`IFNode`, :class:`LIFNode` and
:class:`ParametricLIFNode`.

State convention (other parts of :mod:`fxmemopt` rely on it exactly):

* the current value of every state variable lives in the dict ``module._memories``
  (name -> Python float or Tensor), the value it is reset to in ``module._memories_reset``;
* ``module.v`` reads and writes ``module._memories["v"]``;
* neurons *replace* their state (``self.v = new_tensor``) and never modify it in place, so a
  tensor that autograd saved for the backward pass is never overwritten.

Neurons run in multi-step mode by default: the input is a whole sequence shaped ``[T, N, ...]``
(time first) and the output is the spike sequence of the same shape.

Example:
    >>> import torch
    >>> node = IFNode(v_threshold=1.0)
    >>> x = torch.full((3, 1), 0.6)  # T=3 steps, N=1
    >>> node(x).flatten()  # potential 0.6, 1.2 -> spike and reset to 0, 0.6
    tensor([0., 1., 0.])
    >>> node.reset()
    >>> node.v
    0.0
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .surrogate import ATan

__all__ = ["MemoryModule", "BaseNode", "IFNode", "LIFNode", "ParametricLIFNode"]


class MemoryModule(nn.Module):
    """Base class for modules with state that persists across calls within one sequence.

    A state variable ("memory") is declared with :meth:`register_memory` and then used like an
    attribute (``self.v``). Unlike a buffer it is not part of ``state_dict`` and it is restored
    by :meth:`reset`, which must be called between independent input sequences (see
    :func:`fxmemopt.snn.functional.reset_net`).

    Storage: current values in ``self._memories`` and reset values in ``self._memories_reset``,
    both plain dicts keyed by memory name. Memories are routed through ``__getattr__`` /
    ``__setattr__`` the same way :class:`torch.nn.Module` routes parameters.

    Example:
        >>> class Counter(MemoryModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.register_memory("count", 0)
        ...     def forward(self, x):
        ...         self.count = self.count + 1
        ...         return x
        >>> c = Counter()
        >>> _ = c(torch.zeros(1)); _ = c(torch.zeros(1))
        >>> c.count
        2
        >>> c.reset(); c.count
        0
    """

    _memories: dict[str, Any]
    _memories_reset: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self._memories = {}
        self._memories_reset = {}

    def register_memory(self, name: str, reset_value: Any) -> None:
        """Declare a state variable ``name`` whose value after :meth:`reset` is ``reset_value``.

        Args:
            name: Attribute name of the state; must not clash with an existing attribute.
            reset_value: Initial/reset value, typically a Python float (which a neuron turns into
                a tensor shaped like its input on first use) or a tensor.

        Raises:
            KeyError: If ``name`` is already an attribute, parameter, buffer, submodule or memory.
        """
        if "_memories" not in self.__dict__:
            raise AttributeError("cannot register a memory before MemoryModule.__init__() call")
        if hasattr(self, name):
            raise KeyError(f"attribute '{name}' already exists")
        self._memories[name] = copy.deepcopy(reset_value)
        self._memories_reset[name] = copy.deepcopy(reset_value)

    def reset(self) -> None:
        """Set every memory back to (a deep copy of) its reset value."""
        for name, value in self._memories_reset.items():
            # A copy, so that code that later mutates the state cannot corrupt the reset value.
            self._memories[name] = copy.deepcopy(value)

    def memories(self) -> Iterator[tuple[str, Any]]:
        """Yield ``(name, current_value)`` for every memory of this module (not of children)."""
        yield from self._memories.items()

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails, i.e. for parameters, buffers, submodules (handled by
        # nn.Module) and memories (handled here). __dict__ is read directly to avoid recursion
        # while the object is half-built (e.g. during unpickling).
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

    def __delattr__(self, name: str) -> None:
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            del memories[name]
            del self._memories_reset[name]
        else:
            super().__delattr__(name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._memories))


class BaseNode(MemoryModule):
    """Common machinery of spiking neurons: charge, fire, reset.

    One time step with input ``x_t`` and membrane potential ``v``::

        h   = charge(v, x_t)                      # subclass-specific
        s   = surrogate_function(h - v_threshold)  # 0/1 spikes
        s_r = s.detach() if detach_reset else s
        v   = h * (1 - s_r) + v_reset * s_r       # hard reset (v_reset is a float)
        v   = h - s_r * v_threshold               # soft reset (v_reset is None)

    Subclasses implement :meth:`neuronal_charge`.

    Args:
        v_threshold: Firing threshold.
        v_reset: Potential after a spike (hard reset), or ``None`` to subtract ``v_threshold``
            instead (soft reset). Also the resting/initial potential; ``None`` means 0.
        surrogate_function: Spike function ``x -> spikes`` with a surrogate gradient;
            ``None`` means a fresh :class:`~fxmemopt.snn.surrogate.ATan`.
        detach_reset: Cut the gradient that flows through the reset term.
        step_mode: ``"m"`` (multi-step: input ``[T, N, ...]``) or ``"s"`` (single step:
            input ``[N, ...]``, state carried between calls).

    Shape:
        ``"m"``: input ``[T, N, *]``, output ``[T, N, *]``.
        ``"s"``: input ``[N, *]``, output ``[N, *]``.
    """

    def __init__(
        self,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function: Callable[[torch.Tensor], torch.Tensor] | None = None,
        detach_reset: bool = False,
        step_mode: str = "m",
    ) -> None:
        super().__init__()
        if step_mode not in ("m", "s"):
            raise ValueError(f"step_mode must be 'm' or 's', got {step_mode!r}")
        self.v_threshold = v_threshold
        self.v_reset = v_reset
        self.surrogate_function = surrogate_function if surrogate_function is not None else ATan()
        self.detach_reset = detach_reset
        self.step_mode = step_mode
        self.register_memory("v", v_reset if v_reset is not None else 0.0)

    @property
    def v_rest(self) -> float:
        """Resting potential used by leaky charge equations: ``v_reset``, or 0 for soft reset."""
        return self.v_reset if self.v_reset is not None else 0.0

    def neuronal_charge(self, x: torch.Tensor) -> torch.Tensor:
        """Return the pre-spike potential ``h`` from the current ``self.v`` and input ``x``."""
        raise NotImplementedError

    def neuronal_fire(self, h: torch.Tensor) -> torch.Tensor:
        """Return 0/1 spikes for pre-spike potential ``h``."""
        return self.surrogate_function(h - self.v_threshold)

    def neuronal_reset(self, h: torch.Tensor, spike: torch.Tensor) -> torch.Tensor:
        """Return the post-spike potential (a new tensor; ``h`` is not modified)."""
        s_r = spike.detach() if self.detach_reset else spike
        if self.v_reset is None:
            return h - s_r * self.v_threshold
        return h * (1 - s_r) + self.v_reset * s_r

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Advance the neuron by one time step.

        Args:
            x: Input current for this step, shape ``[N, *]``.

        Returns:
            Spikes of shape ``[N, *]``; ``self.v`` is rebound to the new potential.
        """
        if not isinstance(self.v, torch.Tensor):
            # Lazily materialise the float reset value, since the input shape, dtype and device
            # are only known now.
            self.v = torch.full_like(x, self.v)
        h = self.neuronal_charge(x)
        spike = self.neuronal_fire(h)
        self.v = self.neuronal_reset(h, spike)
        return spike

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Run :meth:`single_step_forward` over the leading time dimension.

        Args:
            x_seq: Input sequence, shape ``[T, N, *]``.

        Returns:
            Spike sequence, shape ``[T, N, *]``.
        """
        spikes = [self.single_step_forward(x_seq[t]) for t in range(x_seq.shape[0])]
        return torch.stack(spikes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "m":
            return self.multi_step_forward(x)
        return self.single_step_forward(x)

    def extra_repr(self) -> str:
        return (
            f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, "
            f"detach_reset={self.detach_reset}, step_mode={self.step_mode!r}"
        )


class IFNode(BaseNode):
    """Integrate-and-fire neuron: ``h = v + x`` (no leak).

    Args:
        v_threshold, v_reset, surrogate_function, detach_reset, step_mode: see :class:`BaseNode`.

    Shape:
        ``[T, N, *]`` -> ``[T, N, *]`` in multi-step mode.

    Example:
        >>> node = IFNode(v_reset=None)  # soft reset keeps the overshoot
        >>> node(torch.full((3, 1), 0.6)).flatten()  # 0.6, 1.2 -> spike, 0.2 + 0.6
        tensor([0., 1., 0.])
        >>> node.v
        tensor([0.8000])
    """

    def neuronal_charge(self, x: torch.Tensor) -> torch.Tensor:
        return self.v + x


class LIFNode(BaseNode):
    """Leaky integrate-and-fire neuron with a fixed time constant ``tau``.

    With ``v_rest = v_reset`` (0 for soft reset)::

        decay_input=True:   h = v + (x - (v - v_rest)) / tau
        decay_input=False:  h = v - (v - v_rest) / tau + x

    Args:
        tau: Membrane time constant (> 1 for a stable leak).
        decay_input: Whether the input is also scaled by ``1 / tau``.
        v_threshold, v_reset, surrogate_function, detach_reset, step_mode: see :class:`BaseNode`.

    Shape:
        ``[T, N, *]`` -> ``[T, N, *]`` in multi-step mode.

    Example:
        >>> node = LIFNode(tau=2.0)
        >>> node(torch.full((4, 1), 1.5)).flatten()  # h = 0.75, then 1.125 -> spike
        tensor([0., 1., 0., 1.])
    """

    def __init__(
        self,
        tau: float = 2.0,
        decay_input: bool = True,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function: Callable[[torch.Tensor], torch.Tensor] | None = None,
        detach_reset: bool = False,
        step_mode: str = "m",
    ) -> None:
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode)
        self.tau = tau
        self.decay_input = decay_input

    def neuronal_charge(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v
        if self.decay_input:
            return v + (x - (v - self.v_rest)) / self.tau
        return v - (v - self.v_rest) / self.tau + x

    def extra_repr(self) -> str:
        return f"tau={self.tau}, decay_input={self.decay_input}, " + super().extra_repr()


class ParametricLIFNode(BaseNode):
    """Leaky integrate-and-fire neuron with a learnable time constant (PLIF).

    The decay factor ``k = 1 / tau`` is parametrised as ``k = sigmoid(w)`` so it stays in (0, 1)
    during training; ``w`` starts at ``-log(init_tau - 1)``, which gives ``k = 1 / init_tau``.
    With ``v_rest = v_reset`` (0 for soft reset)::

        decay_input=True:   h = v + (x - (v - v_rest)) * k
        decay_input=False:  h = v - (v - v_rest) * k + x

    Args:
        init_tau: Initial time constant; must be > 1.
        decay_input: Whether the input is also scaled by ``k``.
        v_threshold, v_reset, surrogate_function, detach_reset, step_mode: see :class:`BaseNode`.

    Shape:
        ``[T, N, *]`` -> ``[T, N, *]`` in multi-step mode.

    Example:
        >>> node = ParametricLIFNode(init_tau=2.0)
        >>> round(node.w.sigmoid().item(), 6)
        0.5
        >>> node(torch.full((2, 3), 4.0)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        init_tau: float = 2.0,
        decay_input: bool = True,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function: Callable[[torch.Tensor], torch.Tensor] | None = None,
        detach_reset: bool = False,
        step_mode: str = "m",
    ) -> None:
        if init_tau <= 1.0:
            raise ValueError(f"init_tau must be > 1, got {init_tau}")
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode)
        self.decay_input = decay_input
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))

    def neuronal_charge(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v
        k = self.w.sigmoid()
        if self.decay_input:
            return v + (x - (v - self.v_rest)) * k
        return v - (v - self.v_rest) * k + x

    def extra_repr(self) -> str:
        tau = 1.0 / self.w.sigmoid().item()
        return f"tau={tau:.4g}, decay_input={self.decay_input}, " + super().extra_repr()
