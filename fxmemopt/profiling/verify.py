"""Stage 9, *verify*: compare a whole training step of two independent copies of a model.

:func:`compare_training_step` runs forward + backward on a reference (the unoptimized model, usually a
``copy.deepcopy`` taken before :func:`fxmemopt.optimize`) and on a candidate (the optimized module), from the same
RNG seed, and compares everything a training step produces: outputs, every parameter gradient, the gradient of
every floating-point input, every buffer (BatchNorm running statistics, ``num_batches_tracked``), the state every
stateful module holds after the step, and the RNG state after the step (dropout draws the same numbers). On CPU
these are bitwise equal for deterministic ops, so the default is ``exact=True`` (``torch.equal``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import compat
from ..analysis.state import ModelState, rng_state, set_rng_state
from ..compat import tree_leaves
from ..runtime.checkpoint import SlicedRegion
from .measure import default_loss

__all__ = ["EquivalenceReport", "compare_training_step", "module_states", "slice_effects"]


@dataclass
class EquivalenceReport:
    """Result of :func:`compare_training_step`.

    Attributes:
        checked: number of tensors compared.
        mismatches: ``(what, detail)`` for every difference (empty when equivalent).
        max_grad_diff: the largest absolute gradient difference (parameters and inputs).
    """

    checked: int = 0
    mismatches: list[tuple[str, str]] = field(default_factory=list)
    #: Largest absolute difference over every parameter and input gradient (0.0 when all are equal).
    max_grad_diff: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def __str__(self) -> str:
        if self.ok:
            return f"equivalent: {self.checked} tensors compared"
        return f"{len(self.mismatches)} of {self.checked} differ:\n" + "\n".join(
            f"  {w}: {d}" for w, d in self.mismatches)


def module_states(module: nn.Module) -> dict[str, Any]:
    """``path.name -> value`` of every ``_memories`` entry (neuron states) in ``module``."""
    out = {}
    for path, m in module.named_modules():
        mem = m.__dict__.get("_memories")
        if isinstance(mem, dict):
            for k, v in mem.items():
                out[f"{path}.{k}" if path else k] = v
    return out


def _plain_name(name: str) -> str:
    """A parameter/buffer name without the wrapper prefix ``torch.compile`` adds (``_orig_mod.``)."""
    return name[len("_orig_mod."):] if name.startswith("_orig_mod.") else name


def _compare(report: EquivalenceReport, what: str, a: Any, b: Any, exact: bool, atol: float) -> None:
    report.checked += 1
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        report.mismatches.append((what, f"{type(a).__name__} vs {type(b).__name__}"))
        return
    if not isinstance(a, torch.Tensor):
        if a != b:
            report.mismatches.append((what, f"{a!r} vs {b!r}"))
        return
    if a.shape != b.shape or a.dtype != b.dtype:
        report.mismatches.append((what, f"{tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"))
        return
    equal = torch.equal(a, b) if exact else torch.allclose(a.double(), b.double(), atol=atol, rtol=0, equal_nan=True)
    if not equal:
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        report.mismatches.append((what, f"max abs difference {diff:.3g}"))


def compare_training_step(reference: nn.Module, candidate: nn.Module, inputs: Sequence[Any], *,
                          loss_fn: Callable[[Any], torch.Tensor] | None = None, seed: int = 0,
                          exact: bool = True, atol: float = 0.0,
                          between: Callable[[], None] | None = None) -> EquivalenceReport:
    """Run one training step on both modules and compare everything it produces.

    Both modules must be independent (no shared parameters) and start in the same state. Inputs are cloned per
    module; floating-point inputs are made to require grad so their gradients are compared too.

    Args:
        reference: e.g. a deepcopy of the model taken before optimizing (a deepcopy drops tensor hooks such as
            norse's recurrent cells' gradient hook: build such a model again instead; the report says so).
        candidate: the optimized module (sharing parameters with the original model, not with ``reference``).
        inputs: positional inputs.
        loss_fn: output -> scalar loss; default: sum of all floating outputs.
        seed: the RNG seed both steps start from.
        exact: compare with ``torch.equal``; else ``allclose`` with ``atol``.
        between: called between forward and backward of each step (e.g. ``lambda: torch.rand(3)`` to move the
            global RNG, proving that recomputation replays dropout masks from the forward's RNG state).

    Returns:
        An :class:`EquivalenceReport`; ``report.ok`` is True when everything matches.
    """
    loss_fn = loss_fn or default_loss
    report = EquivalenceReport()
    results = []
    for module in (reference, candidate):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
              for x in inputs]
        torch.manual_seed(seed)
        out = module(*xs)
        loss = loss_fn(out)
        if between is not None:
            between()
        loss.backward()
        results.append({
            "outputs": [t.detach() for t in tree_leaves(out) if isinstance(t, torch.Tensor)],
            "input_grads": [x.grad for x in xs if isinstance(x, torch.Tensor) and x.is_floating_point()],
            "grads": {_plain_name(n): p.grad for n, p in module.named_parameters()},
            "buffers": {_plain_name(n): b for n, b in module.named_buffers()},
            "states": {_plain_name(n): v for n, v in module_states(module).items()},
            "rng": torch.get_rng_state(),
        })
    ref, cand = results
    for k, (a, b) in enumerate(zip(ref["outputs"], cand["outputs"])):
        _compare(report, f"output[{k}]", a, b, exact, atol)
    if len(ref["outputs"]) != len(cand["outputs"]):
        report.mismatches.append(("outputs", f"{len(ref['outputs'])} vs {len(cand['outputs'])} tensors"))
    for k, (a, b) in enumerate(zip(ref["input_grads"], cand["input_grads"])):
        _compare(report, f"input[{k}].grad", a, b, exact, atol)
    pairs = list(zip(ref["input_grads"], cand["input_grads"]))
    pairs += [(ref["grads"][n], cand["grads"][n]) for n in ref["grads"] if n in cand["grads"]]
    report.max_grad_diff = max([(a.double() - b.double()).abs().max().item()
                                for a, b in pairs if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                                and a.shape == b.shape and a.numel()] + [0.0])
    for group in ("grads", "buffers", "states"):
        keys = set(ref[group]) | set(cand[group])
        for name in sorted(keys):
            if name not in ref[group] or name not in cand[group]:
                report.mismatches.append((f"{group}:{name}", "missing on one side"))
                continue
            a, b = ref[group][name], cand[group][name]
            if isinstance(a, torch.Tensor):
                a = a.detach()
            if isinstance(b, torch.Tensor):
                b = b.detach()
            _compare(report, f"{group}:{name}", a, b, exact, atol)
    _compare(report, "rng state after the step", ref["rng"], cand["rng"], True, 0.0)
    _explain_hooks(report, reference, candidate)
    return report


def _explain_hooks(report: EquivalenceReport, reference: nn.Module, candidate: nn.Module) -> None:
    """A differing parameter gradient where the two parameters carry different numbers of gradient hooks: say so.
    ``copy.deepcopy`` drops tensor hooks (norse's recurrent cells zero their weights' diagonal gradient with one,
    ``autapses=False``), so a deep-copied reference computes another gradient by design."""
    ref = {_plain_name(n): compat.gradient_hook_count(p) for n, p in reference.named_parameters()}
    cand = {_plain_name(n): compat.gradient_hook_count(p) for n, p in candidate.named_parameters()}
    for k, (what, detail) in enumerate(report.mismatches):
        name = what.removeprefix("grads:")
        if what.startswith("grads:") and ref.get(name, 0) != cand.get(name, 0):
            report.mismatches[k] = (what, f"{detail}; the candidate's parameter has {cand.get(name, 0)} gradient "
                                          f"hook(s), the reference's {ref.get(name, 0)}: copy.deepcopy drops tensor "
                                          f"hooks, so build the reference the way the model was built instead")


def slice_effects(model: nn.Module, gm: nn.Module, inputs: Sequence[Any],
                  stateful: dict[str, Sequence[str]]) -> dict[str, str]:
    """What running whole regions on time slices (Rule 9 of :mod:`fxmemopt.runtime.checkpoint`) changes, on the example.

    Runs ``gm`` forward once in training mode without grad; at every :class:`~fxmemopt.runtime.checkpoint.SlicedRegion`
    it
    also runs the region's body unsliced from the same states and RNG, and compares the outputs. Everything the
    run touched (BatchNorm statistics, neuron states, RNG) is restored afterwards.

    Returns:
        region name -> ``"equal"`` when the sliced output was bitwise equal to the unsliced one, else a
        description of the difference (largest absolute difference, and which modules inside couple time steps).
    """
    effects: dict[str, str] = {}
    whole: dict[str, Any] = {}
    handles = []

    def pre(region: SlicedRegion, args: tuple[Any, ...]) -> None:
        state = ModelState.capture(model, stateful)
        rng = rng_state()
        try:
            whole[region.spec.name] = region.__dict__["body"](list(args[0]))
        finally:
            state.restore()
            set_rng_state(rng)

    def post(region: SlicedRegion, args: tuple[Any, ...], out: Any) -> None:
        ref, got = tree_leaves(whole.pop(region.spec.name)), tree_leaves(out)
        if len(ref) == len(got) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(ref, got)):
            effects[region.spec.name] = "equal"
            return
        diffs = [(a.double() - b.double()).abs().max().item() for a, b in zip(ref, got) if a.shape == b.shape]
        coupled = sorted({type(m).__name__ for m in region.__dict__["body"].modules()
                          if isinstance(m, nn.modules.batchnorm._NormBase) or "attention" in type(m).__name__.lower()})
        why = f" (inside: {', '.join(coupled)})" if coupled else ""
        effects[region.spec.name] = (f"output differs from the unsliced region by up to {max(diffs, default=0.0):.3g} "
                                     f"on the example{why}")

    for m in gm.modules():
        if isinstance(m, SlicedRegion):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    if not handles:
        return effects
    state = ModelState.capture(model, stateful)
    try:
        gm.train()
        with torch.no_grad():
            gm(*inputs)
    finally:
        for h in handles:
            h.remove()
        state.restore()
    return effects
