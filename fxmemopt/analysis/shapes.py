"""Shapes at a size this machine cannot run: the annotated graph carried to meta example inputs.

:func:`fxmemopt.optimize` can plan for inputs on the meta device (``torch.empty(T, 4096, 2, 128, 128,
device="meta")``) with a small real sample beside them (``sample_inputs``): everything that needs values (tracing,
value sets, time-chunkability, the recordings behind the cost graph, validation) runs on the sample; the sizes the
cost model reads (each node's shape and bytes) are those of the meta inputs. :func:`at_shapes` supplies them the way
:mod:`fxmemopt.profiling.scaled` supplies the storages: the traced graph runs without grad on ``s``, ``2s`` and
``3s`` samples of the sample; every node's every dimension and its bytes are fitted as ``a + b * batch`` on the
first two, *checked exactly* on the third, and evaluated at the meta inputs' batch.

Why not fake tensors (``torch.fx.passes.fake_tensor_prop``, no values at all)? Library neurons read values while
they build their state: norse's ``LIF`` fills its membrane with ``torch.full(shape, tensor)``, a scalar read that
fake tensors refuse. Three tiny real forwards run every model that runs, and the check at the third size catches
what is not affine in the batch (a model that fixes its batch size), raising
:class:`~fxmemopt.errors.RecordingError` with the node. The model's state is put back after each forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from .. import compat
from .facts import AnnotatedGraph
from .state import ModelState

__all__ = ["at_shapes", "output_bytes"]


def output_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of a node's output tensors, counted per distinct storage: views of one storage (``chunk``, ``split``)
    add up, capped at the storage's size. The rule :mod:`fxmemopt.analysis.annotate` records ``nbytes`` by."""
    per_storage: dict[int, list[int]] = {}
    for t in tensors:
        st = t.untyped_storage()
        used = per_storage.setdefault(compat.storage_key(st), [0, st.nbytes()])
        used[0] += t.numel() * t.element_size()
    return sum(min(used, cap) for used, cap in per_storage.values())


def _flat(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat(v)]
    return []


class _Sizes(fx.Interpreter):
    """Runs the graph and keeps each node's ``(shape or None, bytes)`` (``None`` for a node with no tensor)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.found: dict[str, tuple[tuple[int, ...] | None, int] | None] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        tensors = _flat(result)
        self.found[n.name] = (tuple(result.shape) if isinstance(result, torch.Tensor) else None,
                              output_bytes(tensors)) if tensors else None
        return result


def _first(inputs: Sequence[Any], dim: int, n: int, have: int) -> tuple[Any, ...]:
    return tuple(a.detach().narrow(dim, 0, n) if isinstance(a, torch.Tensor) and a.dim() > dim and
                 a.shape[dim] == have else a for a in inputs)


def _affine(values: Sequence[int], sizes: Sequence[int], batch: int) -> int | None:
    """``values`` at ``sizes`` (three) as ``a + b * size``, fitted on two, exact on the third; at ``batch``."""
    (v1, v2, v3), (s1, s2, s3) = values, sizes
    slope, rem = divmod(v2 - v1, s2 - s1)
    if rem or v1 + slope * (s3 - s1) != v3:
        return None
    return v1 + slope * (batch - s1)


def at_shapes(annotated: AnnotatedGraph, gm: fx.GraphModule, model: torch.nn.Module,
              stateful: dict[str, Sequence[str]], sample: Sequence[Any], batch_dim: int, batch: int
              ) -> AnnotatedGraph:
    """``annotated`` with every node's ``shape`` and ``nbytes`` at ``batch`` samples along ``batch_dim``.

    Args:
        annotated: the graph annotated on the real sample.
        gm: the traced module it describes (shares its modules with ``model``).
        model: the user's model (its state is captured and put back around each forward).
        stateful: stateful module paths -> state attribute names.
        sample: the real sample inputs (3 or more samples along ``batch_dim``).
        batch_dim, batch: the meta example inputs' batch dimension and size.

    Raises:
        RecordingError: a node's shape or bytes are not affine in the batch (the message names it), or the forward
            fails on 1 to 6 samples.
    """
    from ..errors import RecordingError, first_line, format_error

    have = next(a.shape[batch_dim] for a in sample if isinstance(a, torch.Tensor) and a.dim() > batch_dim)
    why = f"the sample has {have} samples along dimension {batch_dim}, fewer than 3"
    for s in (1, 2):
        sizes = (s, 2 * s, 3 * s)
        if sizes[-1] > have:
            break
        try:
            runs = []
            for n in sizes:
                with ModelState.capture(model, stateful).restored_after(), torch.no_grad():
                    sizer = _Sizes(gm)
                    sizer.run(*_first(sample, batch_dim, n, have))
                runs.append(sizer.found)
        except Exception as e:  # the model refuses a single sample (BatchNorm over one value): try 2, 4, 6
            why = f"the forward fails at batch {s}: {type(e).__name__}: {first_line(e, 200)}"
            continue
        nodes, bad = dict(annotated.nodes), ""
        for name, info in annotated.nodes.items():
            found = [r.get(name) for r in runs]
            if any(f is None for f in found):
                continue
            shapes = [f[0] for f in found]
            shape = None
            if shapes[0] is not None:
                dims = [_affine([sh[d] for sh in shapes], sizes, batch) if len({len(sh) for sh in shapes}) == 1
                        else None for d in range(len(shapes[0]))]
                shape = tuple(dims) if None not in dims else None
            nbytes = _affine([f[1] for f in found], sizes, batch)
            if nbytes is None or (shapes[0] is not None and shape is None):
                bad = f"node {name}: {[f[0] or f[1] for f in found]} at batch {', '.join(map(str, sizes))}"
                break
            nodes[name] = dataclasses.replace(info, shape=shape if info.shape is not None else info.shape,
                                              nbytes=nbytes)
        if not bad:
            return dataclasses.replace(annotated, nodes=nodes)
        why = f"a size is not affine in the batch ({bad})"
    raise RecordingError(format_error(
        "sample_inputs", f"cannot be carried to the meta example inputs' batch of {batch}: {why}",
        expected="a model whose every tensor size is affine in the batch, running on 1 to 3 samples",
        got=f"sample {[tuple(a.shape) for a in sample if isinstance(a, torch.Tensor)]}",
        fix="plan with real example inputs at the training size on a machine where they fit"))
