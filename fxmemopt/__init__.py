"""fxmemopt: train deep spiking neural networks in less memory, with bitwise-identical gradients.

``fxmemopt.optimize(model, example_inputs)`` traces the model with torch.fx, turns every
"weight-norm-neuron" layer into a checkpoint region that keeps only its (bit-packed) inputs for backward, and
returns a ``torch.fx.GraphModule`` that trains exactly like the model.
"""

import warnings

with warnings.catch_warnings():
    # torch warns at import when NumPy is absent; fxmemopt never uses NumPy, so a fresh install's first screen
    # (`python -m fxmemopt demo`) should not start with that warning. Only this message, only during this import.
    warnings.filterwarnings("ignore", message=r"Failed to initialize NumPy")
    import torch  # noqa: F401

from . import distributed, errors
from ._version import __version__  # noqa: F401  (fxmemopt.__version__)
from .api import optimize
from .errors import FxMemOptError, FxMemOptWarning, GuardError
from .planning.plan import Plan, RegionPlan
from .profiling.measure import StepMeasurement, measure_step
from .profiling.verify import EquivalenceReport, compare_training_step
from .report.render import Explanation, Timeline, dump, explain, memory_timeline, render_dot
from .report.summary import Summary
from .runtime.packing import PackedTensor, try_pack, unpack
from .tools.manual import Checkpointed
from .tools.tradeoffs import Tradeoff, Tradeoffs, tradeoffs

__all__ = [
    "optimize", "distributed", "Summary", "Plan", "RegionPlan", "errors", "FxMemOptError", "FxMemOptWarning",
    "measure_step", "StepMeasurement", "compare_training_step", "EquivalenceReport",
    "PackedTensor", "try_pack", "unpack", "explain", "Explanation", "dump", "render_dot", "memory_timeline",
    "Timeline", "Checkpointed", "GuardError", "tradeoffs", "Tradeoffs", "Tradeoff",
]
