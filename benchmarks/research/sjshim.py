"""Compatibility glue for research code written against spikingjelly's old API (0.0.0.0.x).

spikingjelly 2.0.0 is installed; it has `spikingjelly.activation_based` but no `spikingjelly.clock_driven`
and no `spikingjelly.cext`. Importing this module registers, in sys.modules only (nothing on disk under
site-packages is touched):

  spikingjelly.clock_driven.neuron.MultiStepLIFNode           -> subclass of activation_based.neuron.LIFNode
  spikingjelly.clock_driven.neuron.MultiStepParametricLIFNode -> subclass of activation_based.neuron.ParametricLIFNode
  spikingjelly.clock_driven.neuron.MultiStepIFNode            -> subclass of activation_based.neuron.IFNode
      all with step_mode='m' (the `backend='cupy'` argument the research code passes is accepted and ignored:
      2.0.0 has no backend choice; no CUDA/cupy here). Old defaults kept: surrogate Sigmoid(), v_reset=0.,
      decay_input=True, detach_reset=False.
  spikingjelly.cext.neuron.MultiStepParametricLIFNode         -> activation_based.neuron.ParametricLIFNode,
      step_mode='m', backend='torch', with the old cext defaults: surrogate ATan(alpha=2.0), v_threshold=1.,
      v_reset=0., decay_input=True (the cext kernel computes v + (x - (v - v_reset)) * sigmoid(w)).
  spikingjelly.clock_driven.layer      -> spikingjelly.activation_based.layer (SeqToANNContainer etc.)
  spikingjelly.clock_driven.functional -> spikingjelly.activation_based.functional (reset_net etc.)
  spikingjelly.clock_driven.surrogate  -> spikingjelly.activation_based.surrogate

spikingjelly 2.0.0's neurons have no `backend` argument at all (their multi-step forward is plain torch), so
code written for activation_based 0.0.0.0.14 that passes `backend='cupy'` (SpikingResformer) raises TypeError.
This module wraps `__init__` of activation_based.neuron.{LIFNode, IFNode, ParametricLIFNode} (in memory only)
to accept and drop a `backend=` keyword: the torch path is what runs, the classes themselves are unchanged.
"""
import functools
import sys
import types

import spikingjelly
from spikingjelly.activation_based import functional as _functional
from spikingjelly.activation_based import layer as _layer
from spikingjelly.activation_based import neuron as _neuron
from spikingjelly.activation_based import surrogate as _surrogate


class MultiStepLIFNode(_neuron.LIFNode):
    def __init__(self, tau=2., decay_input=True, v_threshold=1., v_reset=0., surrogate_function=None,
                 detach_reset=False, backend='torch', **_ignored):
        super().__init__(tau=tau, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                         surrogate_function=surrogate_function if surrogate_function is not None
                         else _surrogate.Sigmoid(),
                         detach_reset=detach_reset, step_mode='m')


class MultiStepParametricLIFNode(_neuron.ParametricLIFNode):
    def __init__(self, init_tau=2., decay_input=True, v_threshold=1., v_reset=0., surrogate_function=None,
                 detach_reset=False, backend='torch', **_ignored):
        super().__init__(init_tau=init_tau, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                         surrogate_function=surrogate_function if surrogate_function is not None
                         else _surrogate.Sigmoid(),
                         detach_reset=detach_reset, step_mode='m')


class MultiStepIFNode(_neuron.IFNode):
    def __init__(self, v_threshold=1., v_reset=0., surrogate_function=None, detach_reset=False,
                 backend='torch', **_ignored):
        super().__init__(v_threshold=v_threshold, v_reset=v_reset,
                         surrogate_function=surrogate_function if surrogate_function is not None
                         else _surrogate.Sigmoid(),
                         detach_reset=detach_reset, step_mode='m')


class CextMultiStepParametricLIFNode(_neuron.ParametricLIFNode):
    def __init__(self, init_tau=2.0, v_threshold=1.0, v_reset=0.0, surrogate_function='ATan', alpha=2.0,
                 detach_reset=False, **_ignored):
        sg = {'ATan': _surrogate.ATan, 'Sigmoid': _surrogate.Sigmoid}[surrogate_function](alpha=alpha)
        super().__init__(init_tau=init_tau, decay_input=True, v_threshold=v_threshold, v_reset=v_reset,
                         surrogate_function=sg, detach_reset=detach_reset, step_mode='m')


def _register(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


_cd = _register('spikingjelly.clock_driven')
_cd.neuron = _register('spikingjelly.clock_driven.neuron', MultiStepLIFNode=MultiStepLIFNode,
                       MultiStepParametricLIFNode=MultiStepParametricLIFNode, MultiStepIFNode=MultiStepIFNode,
                       LIFNode=_neuron.LIFNode, IFNode=_neuron.IFNode, ParametricLIFNode=_neuron.ParametricLIFNode)
_cd.layer = _layer
_cd.functional = _functional
_cd.surrogate = _surrogate
sys.modules['spikingjelly.clock_driven.layer'] = _layer
sys.modules['spikingjelly.clock_driven.functional'] = _functional
sys.modules['spikingjelly.clock_driven.surrogate'] = _surrogate
spikingjelly.clock_driven = _cd
_cext = _register('spikingjelly.cext')
_cext.neuron = _register('spikingjelly.cext.neuron', MultiStepParametricLIFNode=CextMultiStepParametricLIFNode)
spikingjelly.cext = _cext


def _drop_backend_kwarg(cls):
    orig = cls.__init__

    @functools.wraps(orig)
    def __init__(self, *args, backend=None, **kwargs):
        orig(self, *args, **kwargs)
    cls.__init__ = __init__


for _cls in (_neuron.LIFNode, _neuron.IFNode, _neuron.ParametricLIFNode):
    _drop_backend_kwarg(_cls)
