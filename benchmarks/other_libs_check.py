"""What fxmemopt does with snntorch 1.0.0 and norse 1.1.0 models written the way their tutorials write them.

For every factory in ``tests/other_libs.py`` (and its diagnostic variants), with the default options and with
``prefer="memory"``: ``fxmemopt.optimize(model, inputs, return_summary=True)`` (the exception, or the number of
regions and ``summary.stateful_modules``); the peak ratio
``measure_step(reference).peak_bytes / measure_step(optimized).peak_bytes`` (above 1: the optimized step needs less;
state restored after each); one training step compared bitwise against a ``copy.deepcopy`` taken before optimizing
(``fxmemopt.compare_training_step``); then "step 2": the same step once more on each side (no optimizer step in
between), which must reproduce that side's step 1 bitwise since every model here resets its neurons per sequence.

``snntorch_single_step_net`` is one time step per call (optimized with ``calls_per_step=T``), so its step is the
whole sequence run with
``snntorch_run_sequence`` (``utils.reset`` then T calls), outputs and every parameter gradient compared bitwise,
and its peaks are those of that whole sequence; the one-call ``compare_training_step`` (on copies) is shown too.
A deepcopy is not in snntorch's class-level ``SpikingNeuron.instances`` list, so ``utils.reset`` never resets it:
its step 2 starts from step 1's final state (snntorch's behaviour, not fxmemopt's).

    python benchmarks/other_libs_check.py [--only NAME ...] [--no-variants] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import fxmemopt
from fxmemopt.profiling.measure import default_loss

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import other_libs  # noqa: E402

SINGLE_STEP = "snntorch_single_step_net"


class Sequence(nn.Module):
    """A whole snntorch tutorial-7 sequence as one module call, so one training step covers all T steps."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return other_libs.snntorch_run_sequence(self.net, x_seq)


def _err(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def _tensors(out: Any, module: nn.Module) -> list[torch.Tensor | None]:
    """Every tensor in the output (detached), then every parameter's gradient."""
    return [t.detach() for t in tree_leaves(out) if isinstance(t, torch.Tensor)] + [
        p.grad for p in module.parameters()]


def _diff(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> str:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} tensors"
    bad = sum(1 for x, y in zip(a, b) if (x is None) != (y is None) or (x is not None and (
        x.shape != y.shape or not torch.equal(x, y))))
    return f"exact ({len(a)} tensors)" if not bad else f"{bad} of {len(a)} tensors differ"


def _step(module: nn.Module, run: Callable[[], Any]) -> list[torch.Tensor | None] | str:
    """One training step from ``p.grad = None``: outputs and parameter gradients, or why it raised."""
    for p in module.parameters():
        p.grad = None
    try:
        out = run()
        default_loss(out).backward()
    except Exception as e:
        return f"raised {_err(e, 160)}"
    return _tensors(out, module)


def _repeat(name: str, first: list[torch.Tensor | None] | str, again: list[torch.Tensor | None] | str) -> str:
    if isinstance(again, str):
        return f"{name}: {again}"
    if isinstance(first, str):
        return f"{name}: first step raised"
    verdict = _diff(first, again)
    return f"{name}: {'same as step 1' if verdict.startswith('exact') else verdict}"


def _peak(module: nn.Module, inputs: tuple[Any, ...]) -> int | str:
    try:
        return fxmemopt.measure_step(module, inputs, repeats=1, warmup=0).peak_bytes
    except Exception as e:
        return f"raised {_err(e, 120)}"


def check(name: str, factory: Callable[[], tuple[nn.Module, tuple[Any, ...]]], prefer: str | None) -> dict[str, Any]:
    """Optimize, measure both peaks (state restored), step 1 against the deepcopy, then step 2 on each side.

    Step 2 is the same step again (no optimizer step between), so a model that resets its neurons (all of these
    do, in ``forward`` or in ``snntorch_run_sequence``) must reproduce step 1 bitwise.
    """
    row: dict[str, Any] = {"workload": name, "prefer": prefer or "default"}
    model, inputs = factory()
    reference = copy.deepcopy(model)  # before optimize: same parameters, same (fresh) neuron state
    row["inputs"] = " ".join(str(tuple(x.shape)) for x in inputs)
    t0 = time.perf_counter()
    try:
        # one call is one time step: the step the plan is for is T calls (what the README row says)
        calls = {"calls_per_step": other_libs.snntorch_example_sequence().shape[0]} if name == SINGLE_STEP else {}
        gm, summary = fxmemopt.optimize(model, inputs, prefer=prefer, return_summary=True, **calls)
    except Exception as e:
        row["optimize"] = f"raised {_err(e)}"
        return row
    row["optimize"] = f"ok in {time.perf_counter() - t0:.1f} s"
    row["regions"] = len(summary.regions)
    row["stateful_modules"] = dict(summary.stateful_modules)
    row["leaf_fallbacks"] = [f"{lf.path} ({lf.module_type})" for lf in summary.leaf_fallbacks]
    row["notes"] = [n[:200] for n in summary.notes if not n.startswith("prefer:")]
    if name == SINGLE_STEP:  # one call is one time step: a step is the whole sequence
        x_seq = other_libs.snntorch_example_sequence()
        row["one call"] = _compare(copy.deepcopy(reference), copy.deepcopy(gm), inputs)
        ref_mod, gm_mod, step_inputs = Sequence(reference), Sequence(gm), (x_seq,)
    else:
        ref_mod, gm_mod, step_inputs = reference, gm, inputs
    before, after = _peak(ref_mod, step_inputs), _peak(gm_mod, step_inputs)
    row["peak_before"], row["peak_after"] = before, after
    if isinstance(before, int) and isinstance(after, int) and after:
        row["peak_ratio"] = round(before / after, 2)
    if name == SINGLE_STEP:
        first = [_step(m, lambda m=m: m(*step_inputs)) for m in (ref_mod, gm_mod)]
        if isinstance(first[0], str) or isinstance(first[1], str):
            row["exact"] = "sequence: " + "; ".join(
                f"{w} {f}" for w, f in zip(("reference", "optimized"), first) if isinstance(f, str))
        else:
            row["exact"] = "sequence: " + _diff(*first)
    else:
        outs: list[Any] = []
        row["exact"] = _compare(reference, gm, inputs, outs)
        first = [_tensors(o, m) for o, m in zip(outs, (reference, gm))] if len(outs) == 2 else ["-", "-"]
    # The optimized side first: a reference whose forward calls snntorch's utils.reset would reset the optimized
    # module's neurons too (it resets every Leaky in the process), hiding a reset the optimized module lost.
    again = [_step(m, lambda m=m: m(*step_inputs)) for m in (gm_mod, ref_mod)][::-1]
    row["step 2"] = "; ".join(_repeat(w, f, a) for w, f, a in zip(("reference", "optimized"), first, again))
    return row


def _compare(reference: nn.Module, candidate: nn.Module, inputs: tuple[Any, ...],
             outs: list[Any] | None = None) -> str:
    def loss(out: Any) -> torch.Tensor:
        if outs is not None:
            outs.append(out)
        return default_loss(out)

    try:
        report = fxmemopt.compare_training_step(reference, candidate, inputs, loss_fn=loss)
    except Exception as e:
        return f"raised {_err(e)}"
    if report.ok:
        return f"exact ({report.checked} tensors)"
    first = "; ".join(f"{w}: {d}" for w, d in report.mismatches[:3])
    return f"{len(report.mismatches)} of {report.checked} differ (max grad diff {report.max_grad_diff:.3g}): {first}"


def _cell(column: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {x}" for k, x in v.items()) or "{}"
    if isinstance(v, list):
        return "; ".join(str(x) for x in v) or "-"
    if column.startswith("peak_") and isinstance(v, int):
        return f"{v / 1024:.0f} KiB"
    return str(v).replace("|", "\\|")


def _revision() -> str:
    """``git describe --always --dirty`` of this checkout, or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="workload names (default: all)")
    p.add_argument("--no-variants", action="store_true", help="skip the diagnostic variants")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    workloads = dict(other_libs.FACTORIES)
    if not args.no_variants:
        workloads.update(other_libs.VARIANTS)
    if args.only:
        workloads = {k: v for k, v in workloads.items() if k in args.only}
    import norse
    import snntorch
    print(f"fxmemopt {fxmemopt.__version__} ({_revision()}), torch {torch.__version__}, "
          f"snntorch {snntorch.__version__}, norse {norse.__version__}, CPU; peaks by the CPU storage tracker "
          "(measure_step)\n")
    rows = []
    cols = ["workload", "prefer", "inputs", "optimize", "regions", "stateful_modules", "exact", "step 2",
            "peak_before", "peak_after", "peak_ratio", "leaf_fallbacks", "notes", "one call"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for name, factory in workloads.items():
        for prefer in (None, "memory"):
            row = check(name, factory, prefer)
            rows.append(row)
            print("| " + " | ".join(_cell(c, row.get(c)) for c in cols) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
