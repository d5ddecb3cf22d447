"""Fuzzing: value-set inference on random programs, and optimize() at every level on random SNNs.

* Static value-set inference must be *sound*: whatever random spikes go in, every value a node produces lies in
  the set inference claimed for it (a claim of {0,1} that a later batch breaks would cost packing fallbacks).
* ``optimize`` at every level, with and without targets, never raises an internal error and stays bitwise exact.
(Pack/unpack over any shape, dtype and value mix is fuzzed in test_packing.py.)
"""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import ConvLayer, ResLayer, SNNSpec, build, snn_specs
from torch import fx, nn

import fxmemopt
from fxmemopt.analysis.annotate import annotate
from fxmemopt.analysis.state import probe
from fxmemopt.analysis.trace import make_graph_module, trace
from fxmemopt.profiling.verify import compare_training_step
from fxmemopt.snn import IFNode

#: Shape-preserving operations on two values a, b and a small constant c (int or float), as written in models.
OPS = {
    "add": lambda a, b, c: a + b,
    "mul": lambda a, b, c: a * b,
    "sub": lambda a, b, c: a - b,
    "rsub_const": lambda a, b, c: c - a,
    "add_const": lambda a, b, c: a + c,
    "mul_const": lambda a, b, c: a * c,
    "maximum": lambda a, b, c: torch.maximum(a, b),
    "relu": lambda a, b, c: torch.relu(a),
    "clone": lambda a, b, c: a.clone(),
    "flip": lambda a, b, c: a.flip(0),
    "torch_add_alpha": lambda a, b, c: torch.add(a, b, alpha=c),
    "neg": lambda a, b, c: -a,
    "reshape_back": lambda a, b, c: a.flatten(1).reshape(a.shape),
}


class Program(nn.Module):
    """Two spiking sources, then a random straight-line program over everything computed so far."""

    def __init__(self, steps: list[tuple[str, int, int, float | int]]):
        super().__init__()
        self.src_a = IFNode(v_threshold=0.5)
        self.src_b = IFNode(v_threshold=0.7)
        self.steps = steps

    def forward(self, x):
        values = [self.src_a(x), self.src_b(x * 1.5)]
        for op, i, j, c in self.steps:
            values.append(OPS[op](values[i % len(values)], values[j % len(values)], c))
        return tuple(values)


@st.composite
def programs(draw) -> list[tuple[str, int, int, float | int]]:
    n = draw(st.integers(1, 10))
    consts = st.one_of(st.integers(-2, 4), st.sampled_from([0.5, 1.0, 2.0, -1.0, 3.0]))
    return [(draw(st.sampled_from(sorted(OPS))), draw(st.integers(0, 20)), draw(st.integers(0, 20)), draw(consts))
            for _ in range(n)]


def _values_in(t: torch.Tensor, hi: int) -> bool:
    t = t.double()
    return bool(((t == t.round()) & (t >= 0) & (t <= hi)).all())


@settings(max_examples=150, deadline=None)
@given(steps=programs(), seed=st.integers(0, 2**16))
def test_static_value_sets_are_sound_on_random_programs(steps, seed) -> None:
    model = Program(steps)
    torch.manual_seed(seed)
    example = torch.rand(3, 2, 5) * 2
    found = probe(model, (example,))
    stateful = dict(found.stateful)
    cap = trace(model, (example,), stateful_paths=stateful)
    graph, constants = cap.graph, cap.constants
    gm = make_graph_module(model, graph, "P", extra=constants)
    annotated = annotate(gm, (example,), stateful)
    claims = {n: annotated[n].static for n in annotated.order if annotated[n].is_tensor}
    assert annotated["src_a"].static.hi == 1 and annotated["src_b"].static.hi == 1

    env: dict[str, torch.Tensor] = {}

    class Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                env[n.name] = out
            return out

    for k in range(3):  # other inputs than the example: the claims must still hold
        torch.manual_seed(seed + 1 + k)
        for m in model.modules():
            if hasattr(m, "reset"):
                m.reset()
        with torch.no_grad():
            Capture(gm).run(torch.rand(3, 2, 5) * 3)
        for name, claim in claims.items():
            if claim.is_int and name in env:
                assert _values_in(env[name], claim.hi), (name, str(claim), steps)


@settings(max_examples=40, deadline=None)
@given(spec=snn_specs(max_depth=3), level=st.integers(0, 4), blocks=st.booleans(), compress=st.booleans())
def test_optimize_at_every_level_is_exact_and_never_fails_internally(spec: SNNSpec, level: int, blocks: bool,
                                                                     compress: bool) -> None:
    model, x = build(spec)
    reference = copy.deepcopy(model)
    has_blocks = any(isinstance(m, (ConvLayer, ResLayer)) for m in model.modules())
    targets = (ConvLayer, ResLayer) if blocks and has_blocks else None
    gm = fxmemopt.optimize(model, (x,), level=level, targets=targets, compress=compress)
    report = compare_training_step(reference, gm, (x,), between=lambda: torch.rand(5))
    assert report.ok, f"{spec}\nlevel={level}\n{report}"
