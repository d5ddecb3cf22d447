"""A prepared GPU check: bitwise exactness of every region kind, and peaks and step times, within a time budget.

    python benchmarks/gpu_check.py                        # on a GPU machine: within --budget-s (280 s)
    python benchmarks/gpu_check.py --out gpu.md --json gpu.json
    python benchmarks/gpu_check.py --device cpu --quick   # the CI smoke test (tests/test_gpu_check.py)

Part 1, exactness of every region kind (forced with a plan, never left to the search): on small random SNNs built
by ``tests/strategies.py`` (conv + BatchNorm, a SEW ADD residual block whose output takes 2-bit packing, max pooling,
a linear layer with dropout before its neuron) with three neurons (fxmemopt's LIF; a norse-style neuron that keeps
no state and returns it as a value; PLIF, whose trainable tau allows only one slice per time step), each plan kind:

* ``checkpoint`` -- :class:`~fxmemopt.runtime.checkpoint.CheckpointRegion` on every layer, spike inputs packed
  (the level-1 plan), and the same with nothing packed;
* ``chunked`` -- :class:`~fxmemopt.runtime.checkpoint.ChunkedRegion` (the neuron recomputed in T time slices, Rule
  8): prefix kept, prefix recomputed, every slice's start state kept (``keep_starts``), and uneven slices (T - 1);
* ``packed saves`` -- :class:`~fxmemopt.runtime.checkpoint.PackedRegion` (``recompute=False``, Rule 11) on every
  operation that saves spikes, no checkpoint region;
* ``unwrap`` -- every other region left out (the search's unwraps), the rest checkpointed;
* ``sliced`` -- :class:`~fxmemopt.runtime.checkpoint.SlicedRegion` (the whole region on 2 time slices, Rule 9):
  approximate by design (BatchNorm statistics per slice), so its row reports the largest difference, never "exact";
* a control, ``torch.utils.checkpoint`` per layer, which is known to be inexact for SNNs: if the check called it
  exact, the check itself would be broken.

Exact = one training step of the optimized module and of the unoptimized model, from the same state and seed, give
bitwise equal (``torch.equal``) outputs, input gradient, every parameter gradient, every buffer (BatchNorm running
statistics and counters), every neuron state after the step, and the CPU and CUDA RNG states. Each row also runs the
unoptimized model twice: where it differs from itself (a nondeterministic kernel on the device) the row says so, and
exactness of the optimized module cannot be asked for. On CUDA every kind is checked under four settings: fp32 with
``torch.backends.cudnn.benchmark`` False and True (cuDNN's benchmark cache is per thread, and backward
recomputation runs on autograd's device thread, so the recomputed forward may pick another algorithm), and the same
under ``torch.autocast("cuda", torch.bfloat16)``. On CPU: fp32 only (``--amp`` adds CPU bf16 autocast). Under
``cudnn.benchmark`` the rows are not asked to be bitwise equal to the unoptimized run: fxmemopt runs its regions
with benchmark mode off (Rule 12 in ``fxmemopt/runtime/checkpoint.py``) while the unoptimized model benchmarks;
they must still train without a ``RecomputationValueError`` (recomputation equal to its forward), and report their
largest difference.

Part 2, peaks and step times of the reference models of ``python -m fxmemopt bench`` (its ``--full`` workloads
on a GPU, its CPU workloads with ``--device cpu``, tiny ones with ``--quick``) and of spikingjelly's own
``sew_resnet18`` (multi-step, torch backend): unoptimized, fxmemopt's default, ``prefer="memory"`` and
``prefer="speed"`` and spikingjelly 2.0.0's ``optimize_memory`` levels 1-4 (on the model rebuilt with spikingjelly's
LIFNode, called as ``benchmarks/vs_spikingjelly.py`` does; on CPU its CUDA-only measuring is replaced by the CPU
storage tracker, as there), each with its peak (``torch.cuda.max_memory_allocated`` on CUDA, the CPU storage
tracker on CPU), its step time (median of interleaved rounds, synchronized), the time ``optimize`` took, and
whether its training step is bitwise the unoptimized one's.

Budget: the whole run stays within ``--budget-s`` (default 280 s): part 1 may use ``--exact-share`` of it (default
0.4; its unused time goes to part 2), each model of part 2 an equal share of what is left (a fifth of it kept for
the interleaved timing rounds; each variant's peak and exactness are measured as soon as it is built), and each row
(an ``optimize`` call, a measurement) is interrupted by an alarm at its phase's deadline; rows that do not fit are
skipped with a note. A watchdog ends the process ``--hard-stop-s`` (60 s) after the budget even if a call never
returns. The tables (``--out``, markdown) and ``--json`` are rewritten after every row, so a run cut short still
leaves what it measured. Exit status: 0 when every exactness row that must be exact is (and the control is not),
1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import faulthandler
import json
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's fxmemopt; tests/ for strategies and sj_zoo

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxmemopt  # noqa: E402
from fxmemopt.errors import RecomputationValueError  # noqa: E402
from fxmemopt.profiling.measure import default_loss, measure_step, reset_states  # noqa: E402
from fxmemopt.tools import bench  # noqa: E402

MIB = 2**20


# -- time budget ---------------------------------------------------------------------------------------------------
class OverBudget(BaseException):
    """Raised by the alarm of :func:`limited` when a row runs past its deadline. A ``BaseException``, like
    ``KeyboardInterrupt``: ``optimize`` turns an ``Exception`` in its validation step into an unwrapped region and
    carries on (measured: a 21 s limit became a 49 s optimize call)."""


class Clock:
    """Seconds since the start, and what is left of the whole budget."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    def now(self) -> float:
        return time.monotonic() - self.start

    def left(self, deadline: float | None = None) -> float:
        end = self.budget_s if deadline is None else min(deadline, self.budget_s)
        return end - self.now()


@contextlib.contextmanager
def limited(seconds: float) -> Iterator[None]:
    """Raise :class:`OverBudget` in the block after ``seconds``, and again every second until the block is left (a
    handler that swallows it once does not keep the row running). SIGALRM: only in the main thread, else no
    limit."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    if seconds <= 0:
        raise OverBudget("no time left")

    def alarm(signum: int, frame: Any) -> None:
        raise OverBudget(f"stopped at its deadline ({seconds:.0f} s)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


# -- environment ---------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    """Device name and the versions the results depend on."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        name = f"{name} (sm {cap}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
    else:
        name = f"CPU {bench._cpu_name()} ({platform.machine()}, {torch.get_num_threads()} threads)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        from importlib.metadata import version

        sj = version("spikingjelly")
    except Exception:
        sj = None
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
            "fxmemopt": fxmemopt.__version__, "fxmemopt_path": str(Path(fxmemopt.__file__).parent),
            "spikingjelly": sj, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


# -- part 1: exactness of every region kind --------------------------------------------------------------------------
@dataclass
class ExactRow:
    """One region kind on one model under one setting."""

    model: str
    kind: str
    setting: str
    regions: str = ""
    exact: bool | None = None
    max_diff: float | None = None
    must_be_exact: bool = True  # False: approximate by design (sliced) or the control (expected inexact)
    expect_inexact: bool = False  # the control
    baseline_deterministic: bool | None = None  # the unoptimized model equal to itself run to run
    mismatches: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def passed(self) -> bool:
        if self.exact is None:
            return False
        if self.expect_inexact:
            return not self.exact
        return self.exact or not self.must_be_exact or self.baseline_deterministic is False


def exactness_models(device: torch.device, quick: bool) -> tuple[str, list[tuple[str, Callable[[], tuple[
        nn.Module, torch.Tensor]]]]]:
    """The small models of part 1: (what they are, ``[(neuron, factory() -> (model in train mode, input [T, N, C, H,
    W]))]``)."""
    from strategies import LayerSpec, SNNSpec, build

    if device.type == "cuda":
        width, size, n, steps = 64, 32, 16, 4  # big enough for cuDNN to have several algorithms to choose from
    else:
        width, size, n, steps = (4, 8, 2, 4) if quick else (8, 16, 2, 4)
    layers = (LayerSpec("conv", width, True, "none", 0.0), LayerSpec("res", width, True, "none", 0.0),
              LayerSpec("conv", width, True, "max", 0.0), LayerSpec("linear", 2 * width, True, "none", 0.3))
    what = (f"conv-BN-neuron, SEW ADD block (2-bit spikes), conv-BN-neuron + max pool, linear-BN-dropout-neuron, "
            f"linear head (tests/strategies.py); {width} channels, input T={steps} N={n} 3x{size}x{size}")
    out = []
    for neuron, label in (("lif", "LIF"), ("value", "norse-style LIF (state as a value)"), ("plif", "PLIF")):
        spec = SNNSpec(layers=layers, neuron=neuron, hard_reset=False, detach_reset=True, surrogate="atan", T=steps,
                       N=n, in_channels=3, size=size, spike_input=False, seed=0)
        out.append((label, lambda spec=spec: build(spec)))
    return what, out


#: kind -> (region classes that must appear in the optimized module, must the training step be exact?)
KINDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "checkpoint, spikes packed": (("CheckpointRegion",), True),
    "checkpoint, nothing packed": (("CheckpointRegion",), True),
    "chunked (T slices), prefix kept": (("ChunkedRegion",), True),
    "chunked (T slices), prefix recomputed": (("ChunkedRegion",), True),
    "chunked (T slices), start states kept": (("ChunkedRegion",), True),
    "chunked (T-1 uneven slices)": (("ChunkedRegion",), True),
    "packed saves (recompute=False)": (("PackedRegion",), True),
    "unwrap every other region": (("CheckpointRegion",), True),
    "sliced (whole region, 2 slices; approximate)": (("SlicedRegion",), False),
}
CONTROL = "control: torch.utils.checkpoint per layer (inexact)"


def kind_plans(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[Any, str]]:
    """Every kind's plan for ``model``, derived from its level-1 plan (which carries the graph's fingerprint and
    guards): kind -> (plan, "") or (None, why the kind does not apply to this model)."""
    from fxmemopt.api import analyze
    from fxmemopt.planning.plan import chunkable, input_bits, sliceable
    from fxmemopt.planning.regions import is_metadata, region_io

    _, summary = fxmemopt.optimize(copy.deepcopy(model), (x,), level=1, never_worse=False, predict=False,
                                   return_summary=True)
    base = summary.plan
    graph = analyze(copy.deepcopy(model), (x,)).annotated
    steps = x.shape[0]

    def plan(regions: list[Any]) -> Any:
        return dataclasses.replace(base, regions=tuple(regions))

    def chunked(chunks: int, **kw: Any) -> tuple[Any, str]:
        rs, n = [], 0
        for r in base.regions:
            ok = chunkable(graph, r.nodes)[0] and chunks > 1
            neuron = graph[r.nodes[-1]]
            if ok and neuron.step_slices_only and chunks < neuron.time_steps:
                ok = False  # a neuron with trainable parameters: exact only in one slice per step (check_plan)
            rs.append(dataclasses.replace(r, chunks=chunks, **kw) if ok else r)
            n += ok
        return (plan(rs), "") if n else (None, f"no region can be recomputed in {chunks} slices here")

    out: dict[str, tuple[Any, str]] = {
        "checkpoint, spikes packed": (base, "" if any(any(r.pack_bits) for r in base.regions)
                                      else "note: no region input holds spikes"),
        "checkpoint, nothing packed": (plan([dataclasses.replace(r, pack_bits=(0,) * len(r.pack_bits))
                                             for r in base.regions]), ""),
        "chunked (T slices), prefix kept": chunked(steps, keep_prefix=True),
        "chunked (T slices), prefix recomputed": chunked(steps, keep_prefix=False),
        "chunked (T slices), start states kept": chunked(steps, keep_prefix=True, keep_starts=True),
        "chunked (T-1 uneven slices)": chunked(steps - 1, keep_prefix=True),
        "unwrap every other region": (plan(list(base.regions[::2])), ""),
    }
    packs = []
    for node in graph.order:  # packed saves on every operation that reads spikes, no checkpoint region
        info = graph[node]
        if info.op not in ("call_module", "call_function", "call_method") or is_metadata(graph, node):
            continue
        bits = tuple(input_bits(graph, i, True) for i in region_io(graph, (node,))[0])
        if any(bits):
            packs.append(dataclasses.replace(base.regions[0], name=f"pack_{node}", anchor=node, nodes=(node,),
                                             pack_bits=bits, chunks=1, keep_prefix=True, whole_slices=False,
                                             recompute=False, keep_starts=False))
    out["packed saves (recompute=False)"] = (plan(packs), "") if packs else (None, "no operation reads spikes")
    sliced = [dataclasses.replace(r, chunks=2, whole_slices=True) if sliceable(graph, r.nodes)[0] else r
              for r in base.regions]
    out["sliced (whole region, 2 slices; approximate)"] = (
        (plan(sliced), "") if any(r.whole_slices for r in sliced) else (None, "no region is sliceable"))
    return out


@dataclass
class Candidate:
    """A module of part 1, the names of its objects in the unoptimized model, and its buffers as built."""

    module: nn.Module | None
    names: dict[int, str]
    buffers: list[tuple[torch.Tensor, torch.Tensor]]
    note: str

    def step(self, inputs: tuple[torch.Tensor, ...], amp: torch.dtype | None, device: torch.device) -> dict[str, Any]:
        """:func:`training_step` from the buffers' values as built (BatchNorm statistics restored in place)."""
        assert self.module is not None
        with torch.no_grad():
            for live, saved in self.buffers:
                live.copy_(saved)
        return training_step(self.module, self.names, inputs, amp, device)


def _buffers(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.detach().clone()) for b in module.buffers()]


def _names(module: nn.Module) -> dict[int, str]:
    """id -> name of every parameter, buffer and module of ``module`` (wrappers rename them; identity does not)."""
    names = {id(p): n for n, p in module.named_parameters()}
    names.update({id(b): n for n, b in module.named_buffers()})
    names.update({id(m): n or "<root>" for n, m in module.named_modules()})
    return names


def training_step(runner: nn.Module, names: dict[int, str], inputs: tuple[torch.Tensor, ...],
                  amp: torch.dtype | None, device: torch.device) -> dict[str, Any]:
    """One training step of ``runner`` from reset neuron states and seed 0: everything it produces, by the names
    ``names`` gives its objects (the unoptimized model's own)."""
    from torch.utils._pytree import tree_leaves

    reset_states(runner)
    for p in runner.parameters():
        p.grad = None
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    torch.manual_seed(0)  # CPU and CUDA generators
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with autocast:
        out = runner(*xs)
    default_loss(out).backward()
    got: dict[str, Any] = {f"output[{k}]": t.detach() for k, t in enumerate(tree_leaves(out))
                           if isinstance(t, torch.Tensor)}
    got |= {f"input[{k}].grad": x.grad for k, x in enumerate(xs)}
    got |= {f"grad:{names.get(id(p), n)}": p.grad for n, p in runner.named_parameters()}
    got |= {f"buffer:{names.get(id(b), n)}": b.detach().clone() for n, b in runner.named_buffers()}
    for path, m in runner.named_modules():
        memories = m.__dict__.get("_memories")
        if isinstance(memories, dict):
            for k, v in memories.items():
                got[f"state:{names.get(id(m), path)}.{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    got["rng:cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        got["rng:cuda"] = torch.cuda.get_rng_state(device)
    return got


def compare(ref: dict[str, Any], got: dict[str, Any]) -> tuple[bool, float, list[str]]:
    """(bitwise equal, largest absolute difference over the tensors compared, the mismatches)."""
    bad, diff = [], 0.0
    for key in sorted(set(ref) | set(got)):
        if key not in ref or key not in got:
            bad.append(f"{key}: missing on one side")
            continue
        a, b = ref[key], got[key]
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if (a is None) != (b is None) or (a is not None and not isinstance(a, torch.Tensor) and a != b):
                bad.append(f"{key}: {type(a).__name__} vs {type(b).__name__}")
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            bad.append(f"{key}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
            continue
        if not torch.equal(a, b):
            d = (a.double() - b.double()).abs().max().item() if a.numel() and a.dtype != torch.bool else 1.0
            if a.is_floating_point():
                diff = max(diff, d)
            bad.append(f"{key}: max abs difference {d:.3g}")
    return not bad, diff, bad


def _settings(device: torch.device, amp: bool) -> list[tuple[str, bool, bool, torch.dtype | None]]:
    """(label, cudnn.benchmark, cudnn.deterministic, autocast dtype) of every setting part 1 runs under."""
    if device.type == "cuda":
        bf16 = torch.bfloat16
        return [("fp32", False, False, None), ("fp32, cudnn.benchmark", True, False, None),
                ("fp32, cudnn.deterministic", False, True, None),
                ("fp32, cudnn.deterministic + benchmark", True, True, None),
                ("bf16 autocast", False, False, bf16), ("bf16 autocast, cudnn.benchmark", True, False, bf16)]
    return [("fp32", False, False, None)] + ([("bf16 autocast", False, False, torch.bfloat16)] if amp else [])


def _region_counts(gm: nn.Module) -> dict[str, int]:
    from fxmemopt.runtime.checkpoint import CheckpointRegion

    counts: dict[str, int] = {}
    for m in gm.modules():
        if isinstance(m, CheckpointRegion):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


def _region_stats(gm: nn.Module) -> list[Any]:
    from fxmemopt.runtime.checkpoint import CheckpointRegion

    return [m.stats for m in gm.modules() if isinstance(m, CheckpointRegion)]


def run_exactness(device: torch.device, quick: bool, amp: bool, clock: Clock, deadline: float,
                  emit: Callable[[], None], log: Callable[[str], None], rows: list[ExactRow], *,
                  models: list[tuple[str, Callable[[], tuple[nn.Module, torch.Tensor]]]] | None = None,
                  kinds: tuple[str, ...] | None = None) -> None:
    """Part 1 (see the module docstring): appends to ``rows`` as it goes. ``models`` and ``kinds`` (names in
    :data:`KINDS`, or :data:`CONTROL`) replace :func:`exactness_models` and every kind."""
    settings = _settings(device, amp)
    if models is None:
        models = exactness_models(device, quick)[1]
    for model_name, factory in models:
        if clock.left(deadline) < 5:
            rows.append(ExactRow(model_name, "*", "*", note=f"skipped: part 1's time budget was used up "
                                 f"({clock.now():.0f} s)"))
            emit()
            continue
        # build every candidate once; each step starts from the state it was built with (buffers restored in place)
        try:
            with limited(clock.left(deadline)):
                model, x = factory()
                model, x = model.to(device), x.to(device)
                plans = kind_plans(model, x)
                candidates: dict[str, Candidate] = {}
                for kind, (plan, why) in plans.items():
                    if kinds is not None and kind not in kinds:
                        continue
                    if plan is None:
                        candidates[kind] = Candidate(None, {}, [], why)
                        continue
                    owner = copy.deepcopy(model)
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            gm, summary = fxmemopt.optimize(owner, (x,), plan=plan, never_worse=False, predict=False,
                                                            exact=not plan_is_sliced(plan), return_summary=True)
                    except OverBudget:
                        raise
                    except Exception as e:
                        candidates[kind] = Candidate(None, {}, [], f"optimize failed: {_error(e)}")
                        continue
                    note = why
                    if summary.failed_regions:
                        note = f"regions failed validation: {summary.failed_regions}"
                    candidates[kind] = Candidate(gm, _names(owner), _buffers(owner), note)
                owner = copy.deepcopy(model)
                names, buffers = _names(owner), _buffers(owner)
                control = bench.torch_checkpoint_per_layer(owner)  # in place: the names are taken before
                if kinds is not None and CONTROL not in kinds:
                    pass
                elif any(isinstance(m, bench._Checkpointed) for m in control.modules()):
                    candidates[CONTROL] = Candidate(control, names, buffers, "")
                else:
                    candidates[CONTROL] = Candidate(None, {}, [], "no layer holds a stateful neuron: "
                                                    "torch.utils.checkpoint would be exact here")
                reference = Candidate(model, _names(model), _buffers(model), "")
        except OverBudget as e:
            rows.append(ExactRow(model_name, "*", "*", note=f"skipped: {e} while building the candidates"))
            emit()
            continue
        except Exception as e:  # the table says what failed; the other models still run
            rows.append(ExactRow(model_name, "*", "*", note=f"error: {_error(e)}"))
            log(traceback.format_exc())
            emit()
            continue

        for setting, benchmark, deterministic_algorithms, dtype in settings:
            previous = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic_algorithms
            first = len(rows)
            try:
                with limited(clock.left(deadline)):
                    ref = reference.step((x,), dtype, device)
                    ref_again = reference.step((x,), dtype, device)
                    deterministic, self_diff, _ = compare(ref, ref_again)
                    for kind, cand in candidates.items():
                        runner, note = cand.module, cand.note
                        classes, must = KINDS.get(kind, ((), False))
                        # cudnn.benchmark on: regions run cuDNN's heuristic algorithms (Rule 12 in
                        # fxmemopt/runtime/checkpoint.py), the rest of the model benchmarked ones, so bitwise
                        # equality with the unoptimized run is not promised there; a recomputation that differs from
                        # its forward still fails the row (RecomputationValueError).
                        consistent_only = benchmark and kind != CONTROL
                        row = ExactRow(model_name, kind, setting, must_be_exact=must and kind != CONTROL
                                       and not consistent_only,
                                       expect_inexact=kind == CONTROL, baseline_deterministic=deterministic,
                                       note=note)
                        if not deterministic:
                            row.note = (f"the unoptimized model differs from itself run to run (max "
                                        f"{self_diff:.3g}): exactness cannot be asked for; {note}").rstrip("; ")
                        rows.append(row)
                        if runner is None:
                            row.regions = "-"
                            row.note = note or "not applicable"
                            row.must_be_exact = False
                            row.exact = None
                            continue
                        counts = _region_counts(runner)
                        row.regions = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"
                        missing = [c for c in classes if not counts.get(c)]
                        stats = _region_stats(runner)
                        for s in stats:
                            s.reset()
                        try:
                            got = cand.step((x,), dtype, device)
                        except RecomputationValueError as e:
                            row.exact, row.must_be_exact = False, kind != CONTROL
                            row.mismatches = [f"RecomputationValueError: {_error(e)}"]
                            emit()
                            continue
                        row.exact, row.max_diff, bad = compare(ref, got)
                        if consistent_only:
                            row.note = ("cudnn.benchmark: regions use cuDNN's heuristic algorithms (Rule 12), the "
                                        "rest benchmarked ones; recomputation matched its forward (value check)"
                                        + (f"; {row.note}" if row.note else ""))
                        row.mismatches = bad[:5]
                        recomputing = [s for s in stats if s.checkpointed_calls]
                        if missing:
                            row.exact = False
                            row.mismatches.insert(0, f"the optimized module has no {', '.join(missing)}")
                        elif kind != CONTROL and not recomputing:
                            row.exact = False
                            row.mismatches.insert(0, "no region ran as a checkpoint in the training step")
                        log(f"exact: {model_name[:24]} | {kind} | {setting}: "
                            f"{'exact' if row.exact else 'NOT exact'}"
                            f"{'' if row.exact else f' (max diff {row.max_diff:.3g}; {bad[:1]})'}")
                        emit()
            except OverBudget as e:
                for row in rows[first:]:
                    if row.exact is None and not row.note:
                        row.note = f"interrupted: {e}"
                rows.append(ExactRow(model_name, "*", setting, note=f"the rest skipped: {e} (part 1's time budget)"))
            except Exception as e:
                for row in rows[first:]:
                    if row.exact is None and not row.note:
                        row.note = f"interrupted: {_error(e)}"
                rows.append(ExactRow(model_name, "*", setting, note=f"error: {_error(e)}"))
                log(traceback.format_exc())
            finally:
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous
            emit()


def plan_is_sliced(plan: Any) -> bool:
    return any(r.whole_slices for r in plan.regions)


# -- part 2: peaks and step times ----------------------------------------------------------------------------------
@dataclass
class BenchRow:
    """One variant of one model."""

    model: str
    variant: str
    peak_bytes: int | None = None
    base_peak_bytes: int | None = None
    step_s: float | None = None
    step_ratio: float | None = None
    optimize_s: float | None = None
    exact: bool | None = None
    max_grad_diff: float | None = None
    regions: int | None = None
    note: str = ""


@dataclass(frozen=True)
class Workload:
    """A model of part 2: ``factory() -> model``; ``sj`` builds spikingjelly's side (``model -> (sj model, its
    optimize_memory targets)``, ``None``: no spikingjelly rows)."""

    name: str
    factory: Callable[[], nn.Module]
    shape: tuple[int, ...]
    sj: Callable[[nn.Module], tuple[nn.Module, tuple[type, ...]]] | None


def _spikingjelly() -> bool:
    """spikingjelly importable (a stand-in torchvision installed where it is missing, as tests/sj_zoo.py does)."""
    try:
        import spikingjelly.activation_based.memopt  # noqa: F401
        from sj_zoo import install_torchvision_stub
    except ImportError:
        return False
    install_torchvision_stub()
    return True


def sj_sew_resnet18() -> nn.Module:
    """spikingjelly 2.0.0's ``sew_resnet18(cnf="ADD")`` with its multi-step LIFNode (torch backend), 10 classes."""
    from sj_zoo import _lif_kwargs
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.model import sew_resnet

    model = sew_resnet.sew_resnet18(cnf="ADD", num_classes=10, **_lif_kwargs())
    functional.set_step_mode(model, "m")
    return model.train()


def workloads(device: torch.device, quick: bool, with_sj: bool) -> list[Workload]:
    """Part 2's models: spikingjelly's sew_resnet18 first (the issue names it), then the reference models of
    ``fxmemopt bench`` (``--full`` sizes on CUDA but VGG-11 at batch 32 only; CPU sizes; tiny with ``quick``)."""
    from fxmemopt.snn import DeepConvSNN
    from fxmemopt.snn.models import ConvBNNeuron

    def rebuilt(targets: tuple[type, ...]) -> Callable[[nn.Module], tuple[nn.Module, tuple[type, ...]]]:
        return lambda m: (bench.with_sj_neurons(m), targets)

    def own(m: nn.Module) -> tuple[nn.Module, tuple[type, ...]]:
        from zoo_check import sj_targets

        return m, sj_targets(m)

    out = []
    if with_sj and not quick:  # its fixed widths (11M parameters) take tens of seconds per optimize on a CPU
        shape = (4, 32, 3, 64, 64) if device.type == "cuda" else (4, 2, 3, 32, 32)
        out.append(Workload(f"spikingjelly sew_resnet18 (ADD, LIFNode) T={shape[0]} N={shape[1]} "
                            f"{shape[2]}x{shape[3]}x{shape[4]}", sj_sew_resnet18, shape, own))
    if quick:
        out.append(Workload("DeepConvSNN (2 blocks, 8 ch) T=4 N=2 3x16x16",
                            lambda: DeepConvSNN(num_blocks=2, channels=8), (4, 2, 3, 16, 16),
                            rebuilt((ConvBNNeuron,)) if with_sj else None))
        return out
    chosen = bench.workloads(full=device.type == "cuda")
    chosen = [w for w in chosen if not (device.type == "cuda" and "N=8 " in w.name and "VGG" in w.name)]
    order = {"DeepConvSNN": 0, "SpikingVGG11": 1, "Spikformer": 2, "SEWResNet18": 3}
    chosen.sort(key=lambda w: min((v for k, v in order.items() if k in w.name), default=9))
    for w in chosen:
        out.append(Workload(w.name, w.factory, w.shape, rebuilt(w.sj_targets) if with_sj else None))
    return out


FX_VARIANTS: dict[str, dict[str, Any]] = {"fxmemopt default": {}, 'fxmemopt prefer="memory"': {"prefer": "memory"},
                                          'fxmemopt prefer="speed"': {"prefer": "speed"}}


def run_workload(w: Workload, device: torch.device, rounds: int, clock: Clock, deadline: float,
                 rows: list[BenchRow], emit: Callable[[], None], log: Callable[[str], None],
                 sj_levels: tuple[int, ...] = (1, 2, 3, 4)) -> None:
    """Part 2 for one model (see the module docstring): appends to ``rows`` as it goes."""
    # each variant's peak and exactness are measured as soon as it is built; the timing rounds at the end (every
    # variant interleaved) keep this share of the model's time
    timing_reserve = 0.2 * clock.left(deadline)
    variants: list[tuple[BenchRow, nn.Module, nn.Module, nn.Module]] = []  # row, module, reference, baseline

    def skip(variant: str, why: str) -> None:
        rows.append(BenchRow(w.name, variant, note=f"skipped: {why}"))
        emit()

    def measure(row: BenchRow, m: nn.Module, reference: nn.Module, baseline: nn.Module) -> None:
        """Peak and exactness of one variant (the unoptimized rows too: the model against a copy of itself, which
        says whether the device is deterministic)."""
        try:
            with limited(clock.left(deadline) - 0.5 * timing_reserve):
                row.peak_bytes = measure_step(m, (x,), repeats=0).peak_bytes
                row.exact, row.max_grad_diff = bench._exactness(copy.deepcopy(reference), m, (x,))
                row.regions = getattr(m, "_gpu_check_regions", None)
        except OverBudget as e:
            row.note = (row.note + "; " if row.note else "") + f"measuring {e}"
        except Exception as e:
            row.note = (row.note + "; " if row.note else "") + f"measuring failed: {_error(e)}"
        row.base_peak_bytes = next((r.peak_bytes for r, mm, _, _ in variants if mm is baseline), None)
        log(f"bench: {w.name[:30]} | {row.variant}: "
            f"{'-' if row.peak_bytes is None else f'{row.peak_bytes / MIB:.1f} MiB'}, exact {row.exact}"
            f"{'' if row.optimize_s is None else f', optimized in {row.optimize_s:.1f} s'}")
        emit()

    try:
        with limited(clock.left(deadline)):
            torch.manual_seed(0)
            model = w.factory().to(device)
            x = torch.rand(w.shape, device=device)
            pristine = copy.deepcopy(model)
    except (Exception, OverBudget) as e:
        rows.append(BenchRow(w.name, "unoptimized", note=f"error: {_error(e)}"))
        emit()
        return
    base = BenchRow(w.name, "unoptimized")
    rows.append(base)
    variants.append((base, model, pristine, model))
    measure(base, model, pristine, model)

    def build(variant: str, fn: Callable[[], nn.Module], reference: nn.Module, baseline: nn.Module,
              row_note: str = "") -> None:
        left = clock.left(deadline) - timing_reserve
        if left < 2:
            skip(variant, f"the model's time budget was used up ({clock.now():.0f} s into the run)")
            return
        row = BenchRow(w.name, variant, note=row_note)
        t0 = time.perf_counter()
        try:
            with limited(left), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = fn()
        except OverBudget as e:
            row.note = f"skipped: optimize {e}"
            rows.append(row)
            emit()
            return
        except Exception as e:
            row.note = f"failed: {_error(e)}"
            rows.append(row)
            emit()
            return
        row.optimize_s = time.perf_counter() - t0
        rows.append(row)
        variants.append((row, m, reference, baseline))
        measure(row, m, reference, baseline)

    for variant, kwargs in FX_VARIANTS.items():
        def fx(kwargs: dict[str, Any] = kwargs) -> nn.Module:
            torch.manual_seed(0)
            gm, summary = fxmemopt.optimize(copy.deepcopy(pristine), (x,), return_summary=True, **kwargs)
            gm._gpu_check_regions = summary.region_count
            return gm
        build(variant, fx, pristine, model)

    if w.sj is not None:
        from spikingjelly.activation_based import memopt

        if device.type != "cuda":
            bench.patch_sj_for_cpu()  # its levels 2-4 measure with CUDA only (see fxmemopt/tools/bench.py)
        try:
            torch.manual_seed(0)
            sj_model, targets = w.sj(copy.deepcopy(pristine))
            sj_pristine = copy.deepcopy(sj_model)
        except Exception as e:
            skip("spikingjelly", f"could not build its model: {_error(e)}")
            sj_model = None
        if sj_model is not None:
            baseline = model  # spikingjelly's own model: the unoptimized row is its baseline
            if not _is_own_sj(w):  # the reference model rebuilt with spikingjelly's neurons: its own baseline
                sj_base = BenchRow(w.name, "unoptimized (spikingjelly neurons)",
                                   note="baseline of the spikingjelly rows")
                rows.append(sj_base)
                variants.append((sj_base, sj_model, sj_pristine, sj_model))
                measure(sj_base, sj_model, sj_pristine, sj_model)
                baseline = sj_model
            for level in sj_levels:
                def sj(level: int = level) -> nn.Module:
                    m = copy.deepcopy(sj_pristine)
                    memopt.optimize_memory(m, targets, lambda mm: mm(x), level=level, checkpoint_budget="memory",
                                           compress=True, split_fn=lambda mod: list(mod.children()),
                                           can_chunk=lambda leaf: True)
                    return m
                note = "" if device.type == "cuda" or level == 1 else "its CUDA measuring replaced by the CPU tracker"
                build(f"spikingjelly L{level}", sj, sj_pristine, baseline, note)

    # interleaved timing rounds over every variant measured
    measured = [(row, m) for row, m, _, _ in variants if row.peak_bytes is not None]
    times: dict[int, list[float]] = {id(m): [] for _, m in measured}
    done = 0
    try:
        for _ in range(rounds):
            if clock.left(deadline) < 0.5:
                break
            with limited(clock.left(deadline)):
                for _, m in measured:
                    times[id(m)].append(measure_step(m, (x,), repeats=1, warmup=0, measure_memory=False).step_time_s)
            done += 1
    except OverBudget:
        pass
    except Exception as e:
        log(f"timing failed: {_error(e)}")
    for row, m in measured:
        ts = times[id(m)][:done]
        row.step_s = statistics.median(ts) if ts else None
    for row, _, _, baseline in variants:
        base_row = next(r for r, mm, _, _ in variants if mm is baseline)
        if row.step_s is not None and base_row.step_s:
            row.step_ratio = row.step_s / base_row.step_s
        if done < rounds and row.step_s is not None:
            row.note = (row.note + "; " if row.note else "") + f"{done} of {rounds} timing rounds fit the budget"
    log(f"bench: {w.name[:30]}: {done} timing rounds; step times "
        + ", ".join(f"{row.variant} {row.step_s * 1e3:.1f} ms" for row, _ in measured if row.step_s is not None))
    emit()


def _is_own_sj(w: Workload) -> bool:
    return w.name.startswith("spikingjelly ")


# -- output ----------------------------------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.1f} MiB"


def header_line(env: dict[str, Any], elapsed: float, budget: float) -> str:
    return (f"fxmemopt {env['fxmemopt']} gpu_check, {env['device']}, torch {env['torch']}, CUDA {env['cuda'] or '-'}, "
            f"cuDNN {env['cudnn'] or '-'}, spikingjelly {env['spikingjelly'] or '-'}, python {env['python']}, "
            f"{env['date']}; {elapsed:.0f} s of a {budget:.0f} s budget")


def markdown(env: dict[str, Any], exact_rows: list[ExactRow], bench_rows: list[BenchRow], elapsed: float,
             budget: float, peaks_by: str) -> str:
    """Both tables as markdown (one header line first)."""
    lines = [header_line(env, elapsed, budget), "",
             f"Exactness of every region kind, forced by a plan; models: {env['part1_models']}; the model column "
             "names the neuron. Exact = bitwise equal outputs, input and parameter gradients, buffers, neuron states "
             "and RNG after one training step, against the unoptimized model.", "",
             "| model | region kind | setting | regions | exact? | max diff | note |", "|---|---|---|---|---|---|---|"]
    for r in exact_rows:
        if r.exact is None:
            verdict = "-"
        elif r.exact:
            verdict = "yes (bitwise)"
        elif r.expect_inexact:
            verdict = "no (expected)"
        elif not r.must_be_exact:
            verdict = "no (approximate)"
        else:
            verdict = "**NO**"
        note = "; ".join(x for x in (r.note, *r.mismatches[:2]) if x).replace("|", "/")
        lines.append(f"| {r.model} | {r.kind} | {r.setting} | {r.regions or '-'} | {verdict} | "
                     f"{'-' if r.max_diff is None else f'{r.max_diff:.3g}'} | {note} |")
    lines += ["", f"Peaks by {peaks_by}; step time = median of interleaved rounds (synchronized on CUDA); ratios "
              "against the row's baseline (the unoptimized model, or for spikingjelly's levels its model with "
              "spikingjelly's neurons).", "",
              "| model | variant | peak | vs unoptimized | step time | vs unoptimized | optimize | exact? | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in bench_rows:
        ratio = ("-" if r.peak_bytes is None or not r.base_peak_bytes
                 else f"{r.base_peak_bytes / r.peak_bytes:.2f}x lower")
        exact = ("-" if r.exact is None else "yes (bitwise)" if r.exact
                 else f"no (max grad diff {r.max_grad_diff:.2g})")
        lines.append(f"| {r.model} | {r.variant} | {_mib(r.peak_bytes)} | {ratio} | "
                     f"{'-' if r.step_s is None else f'{r.step_s * 1e3:.1f} ms'} | "
                     f"{'-' if r.step_ratio is None else f'{r.step_ratio:.2f}x'} | "
                     f"{'-' if r.optimize_s is None else f'{r.optimize_s:.1f} s'} | {exact} | "
                     f"{r.note.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="See this file's docstring.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CI smoke test)")
    p.add_argument("--budget-s", type=float, default=280.0, help="the whole run's time budget (default 280)")
    p.add_argument("--exact-share", type=float, default=0.4, help="share of the budget part 1 may use")
    p.add_argument("--hard-stop-s", type=float, default=60.0,
                   help="the process exits this long after the budget, whatever runs (0: never)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 7 CUDA, 3 CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --device cpu --quick, where the tensors are tiny and a "
                        "shared machine's oversubscribed threads made the run 6x slower; else torch's default)")
    p.add_argument("--models", help="comma-separated substrings: only part 2's models whose names contain one")
    p.add_argument("--no-exactness", action="store_true", help="skip part 1")
    p.add_argument("--no-bench", action="store_true", help="skip part 2")
    p.add_argument("--no-spikingjelly", action="store_true", help="no spikingjelly rows even when it is installed")
    p.add_argument("--amp", action="store_true", help="on CPU, also check under bf16 autocast (always on CUDA)")
    p.add_argument("--out", help="write the markdown tables here (they are always printed)")
    p.add_argument("--json", help="write every row here as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)

    clock = Clock(args.budget_s)
    if args.hard_stop_s > 0:
        faulthandler.dump_traceback_later(args.budget_s + args.hard_stop_s, exit=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads or (device.type == "cpu" and args.quick):
        torch.set_num_threads(args.threads or 1)
    rounds = args.rounds or (7 if device.type == "cuda" else 2 if args.quick else 3)
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

    def log(line: str) -> None:
        if not args.quiet:
            print(f"gpu_check [{clock.now():5.0f} s]: {line}", file=sys.stderr, flush=True)

    env = environment(device)
    env["part1_models"] = exactness_models(device, args.quick)[0]
    with_sj = not args.no_spikingjelly and _spikingjelly()
    exact_rows: list[ExactRow] = []
    bench_rows: list[BenchRow] = []
    peaks_by = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "the CPU storage tracker"

    phases: dict[str, float] = {}

    def emit(final: bool = False) -> str:
        md = markdown(env, exact_rows, bench_rows, clock.now(), args.budget_s, peaks_by)
        if args.out:
            Path(args.out).write_text(md + "\n", encoding="utf-8")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "environment": env, "budget_s": args.budget_s, "elapsed_s": clock.now(), "finished": final,
                "phase_s": phases, "quick": args.quick,
                "exactness": [asdict(r) | {"passed": r.passed} for r in exact_rows],
                "bench": [asdict(r) for r in bench_rows], "markdown": md}, indent=1), encoding="utf-8")
        return md

    log(header_line(env, 0, args.budget_s))
    if not with_sj and not args.no_spikingjelly:
        log("spikingjelly is not installed: its rows are skipped (pip install --no-deps spikingjelly==2.0.0 && "
            "pip install loguru)")
    if not args.no_exactness:
        run_exactness(device, args.quick, args.amp, clock, args.exact_share * args.budget_s, emit, log, exact_rows)
        phases["exactness"] = clock.now()
    if not args.no_bench:
        chosen = workloads(device, args.quick, with_sj)
        if args.models:
            keys = [k.strip().lower() for k in args.models.split(",") if k.strip()]
            chosen = [w for w in chosen if any(k in w.name.lower() for k in keys)]
        reserve = 5.0  # for the tables at the end
        for k, w in enumerate(chosen):
            share = (clock.left() - reserve) / (len(chosen) - k)
            if share < 3:
                bench_rows.append(BenchRow(w.name, "*", note=f"skipped: the time budget was used up "
                                           f"({clock.now():.0f} s)"))
                emit()
                continue
            log(f"bench: {w.name} ({share:.0f} s)")
            run_workload(w, device, rounds, clock, clock.now() + share, bench_rows, emit, log,
                         sj_levels=(1, 2) if args.quick else (1, 2, 3, 4))
        phases["bench"] = clock.now() - phases.get("exactness", 0.0)
    md = emit(final=True)
    faulthandler.cancel_dump_traceback_later()
    print(md)
    failed = [r for r in exact_rows if r.exact is not None and not r.passed]
    if failed:
        print(f"\ngpu_check: {len(failed)} exactness row(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
