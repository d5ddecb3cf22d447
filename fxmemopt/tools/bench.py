"""The benchmark suite: reference SNNs side by side with the peers, and how memory scales with T and depth.

``python -m fxmemopt bench`` (or ``python benchmarks/run_bench.py``) runs, for each reference workload, these
variants of one training step and prints a markdown table (``--json`` / ``--markdown`` save them):

* ``unoptimized`` -- the model as is;
* ``torch checkpoint`` -- ``torch.utils.checkpoint`` (non-reentrant) around every module that directly holds a
  neuron (layer granularity): the usual hand-made alternative. It is *not* exact for SNNs: recomputation starts
  from the neuron state the forward left behind and runs BatchNorm a second time, so gradients, neuron states and
  running statistics differ (the ``exact?`` column says by how much);
* ``spikingjelly L1-4`` -- spikingjelly 2.0.0 ``memopt.optimize_memory`` when it is installed, on the same model
  rebuilt with spikingjelly's own ``LIFNode`` (compared against that model's unoptimized peak, its own row).
  **Its levels 2-4 measure candidates with CUDA only; on CPU its measurement is replaced by the same CPU storage
  tracker** (and its forward timing by wall-clock hooks); its search is otherwise unchanged;
* ``fxmemopt L1-4`` and ``prefer=speed|balanced|memory``.

Columns: peak memory (CPU storage tracker, deterministic; CUDA allocator on a GPU), ratio to the unoptimized peak,
step-time ratio (median of interleaved repeats against the unoptimized step, same run), optimization wall time,
``exact?`` (bitwise equal training step: outputs, every gradient, BatchNorm statistics, neuron states, RNG; else
the largest gradient difference) and profiling runs (full training steps the optimizer measured).

Scaling (``--no-scaling`` skips it): peak memory of DeepConvSNN vs T (4, 8, 16, 32) and vs depth (4, 8, 16, 32
blocks), unoptimized and fxmemopt (default and ``prefer="memory"``), as a table and a PNG (``--plot``).

``--libraries`` runs the conformance suite's models instead (:mod:`fxmemopt.tools.libraries`): every library,
both presets, and ``--readme README.md`` writes the README's "works with" table from it.

Default sizes run on a 2-core CPU in minutes; ``--full`` uses the seed tutorial's GPU sizes (VGG-11 with batch
8 and 32, T=10, 48x48).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .._version import __version__

__all__ = ["Workload", "workloads", "run_workload", "scaling", "markdown", "main"]


@dataclass(frozen=True)
class Workload:
    """One reference model and input shape: ``factory()`` builds the model (fxmemopt.snn neurons)."""

    name: str
    factory: Callable[[], nn.Module]
    shape: tuple[int, ...]
    sj_targets: tuple[type, ...]  # what spikingjelly's optimize_memory wraps (its ``instance`` argument)


def workloads(full: bool = False) -> list[Workload]:
    """The reference workloads: CPU sizes by default, the seed tutorial's GPU sizes with ``full``."""
    from ..snn import DeepConvSNN, SEWResNet18, Spikformer, SpikingVGG11
    from ..snn.models import ConvBNNeuron, SEWBasicBlock, SpikformerBlock, SpikformerPatchEmbed

    if full:
        return [
            Workload("SpikingVGG11 T=10 N=8 2x48x48 (CIFAR10-DVS)", lambda: SpikingVGG11(width=1.0),
                     (10, 8, 2, 48, 48), (ConvBNNeuron,)),
            Workload("SpikingVGG11 T=10 N=32 2x48x48 (CIFAR10-DVS)", lambda: SpikingVGG11(width=1.0),
                     (10, 32, 2, 48, 48), (ConvBNNeuron,)),
            Workload("SEWResNet18 (ADD) T=4 N=16 3x64x64", lambda: SEWResNet18(width=1.0), (4, 16, 3, 64, 64),
                     (ConvBNNeuron, SEWBasicBlock)),
            Workload("Spikformer (dim 256, depth 4) T=4 N=16 3x32x32",
                     lambda: Spikformer(embed_dim=256, num_heads=8, depth=4), (4, 16, 3, 32, 32),
                     (SpikformerPatchEmbed, SpikformerBlock)),
            Workload("DeepConvSNN (16 blocks, 64 ch) T=8 N=16 3x32x32",
                     lambda: DeepConvSNN(num_blocks=16, channels=64), (8, 16, 3, 32, 32), (ConvBNNeuron,)),
        ]
    return [
        Workload("SpikingVGG11 (width 0.25) T=10 N=2 2x48x48 (CIFAR10-DVS)", lambda: SpikingVGG11(width=0.25),
                 (10, 2, 2, 48, 48), (ConvBNNeuron,)),
        Workload("SEWResNet18 (ADD, width 0.25) T=4 N=2 3x64x64", lambda: SEWResNet18(width=0.25),
                 (4, 2, 3, 64, 64), (ConvBNNeuron, SEWBasicBlock)),
        Workload("Spikformer (dim 64, depth 2) T=4 N=4 3x32x32", lambda: Spikformer(embed_dim=64, num_heads=4,
                                                                                   depth=2),
                 (4, 4, 3, 32, 32), (SpikformerPatchEmbed, SpikformerBlock)),
        Workload("DeepConvSNN (16 blocks, 32 ch) T=8 N=4 3x32x32", lambda: DeepConvSNN(num_blocks=16, channels=32),
                 (8, 4, 3, 32, 32), (ConvBNNeuron,)),
    ]


#: fxmemopt variants: label -> optimize() keyword arguments.
FXMEMOPT_VARIANTS: dict[str, dict[str, Any]] = {
    "fxmemopt L1": {"level": 1}, "fxmemopt L2": {"level": 2}, "fxmemopt L3": {"level": 3},
    "fxmemopt L4": {"level": 4}, 'fxmemopt prefer="speed"': {"prefer": "speed"},
    'fxmemopt prefer="balanced"': {"prefer": "balanced"}, 'fxmemopt prefer="memory"': {"prefer": "memory"},
}


@dataclass
class Row:
    """One variant of one workload (see the module docstring for the columns)."""

    workload: str
    variant: str
    peak_bytes: int | None = None
    memory_ratio: float | None = None
    step_time_ratio: float | None = None
    optimize_s: float | None = None
    exact: bool | None = None
    max_grad_diff: float | None = None
    profiling_runs: int | None = None
    note: str = ""
    baseline_peak_bytes: int | None = None


# -- variants ------------------------------------------------------------------------------------------------------
class _Checkpointed(nn.Module):
    """``torch.utils.checkpoint`` around one module (non-reentrant, the recommended mode)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, *args, use_reentrant=False)


def torch_checkpoint_per_layer(model: nn.Module) -> nn.Module:
    """Wrap every module that directly holds a neuron (a layer; the outermost one where such modules nest) in
    ``torch.utils.checkpoint``, in place. Returns ``model``."""
    from ..analysis.state import has_memories

    layers = [path for path, m in model.named_modules() if path and any(has_memories(c) for c in m.children())]
    outermost = [p for p in layers if not any(p.startswith(q + ".") for q in layers)]
    for path in outermost:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, _Checkpointed(getattr(parent, name)))
    return model


def _sj() -> Any | None:
    try:
        from spikingjelly.activation_based import memopt, neuron, surrogate  # noqa: F401
        from spikingjelly.activation_based.memopt import pipeline
    except ImportError:
        return None
    return pipeline


def with_sj_neurons(model: nn.Module) -> nn.Module:
    """Replace every fxmemopt.snn neuron by spikingjelly's multi-step LIFNode (same tau, threshold, reset)."""
    from spikingjelly.activation_based import neuron, surrogate

    from ..snn import BaseNode

    for name, child in list(model.named_children()):
        if isinstance(child, BaseNode):
            setattr(model, name, neuron.LIFNode(tau=2.0, v_threshold=child.v_threshold, v_reset=child.v_reset,
                                                surrogate_function=surrogate.ATan(), detach_reset=child.detach_reset,
                                                step_mode="m"))
        else:
            with_sj_neurons(child)
    return model


_SJ_MEASUREMENTS = [0]


def patch_sj_for_cpu() -> None:
    """SUBSTITUTION: spikingjelly's levels 2-4 measure candidates with CUDA only; measure them with the CPU storage
    tracker instead (and time layers with wall-clock hooks). Counts its measurements in ``_SJ_MEASUREMENTS``."""
    from ..profiling.measure import LiveBytesTracker

    P = _sj()
    if P is None or getattr(P, "_fxmemopt_patched", False):
        return

    def measure_peak(model: nn.Module, example_forward: Any) -> float:
        _SJ_MEASUREMENTS[0] += 1
        state = P._capture_runtime(model)
        try:
            P._execute_example(model, example_forward, backward=True)
            P._restore_runtime(model, state)
            with LiveBytesTracker() as tracker:
                P._execute_example(model, example_forward, backward=True)
            return float(tracker.peak)
        finally:
            P._restore_runtime(model, state)

    def forward_costs(model: nn.Module, example_forward: Any, process_group: Any) -> dict[str, float]:
        leaves = P._checkpoint_leaves(model)
        costs = {path: 0.0 for path, _ in leaves}
        starts: dict[str, float] = {}
        handles = []
        state = P._capture_runtime(model)
        try:
            for path, wrapper in leaves:
                original = P._unwrap_checkpoint_module(wrapper)
                handles.append(original.register_forward_pre_hook(
                    lambda m, a, path=path: starts.__setitem__(path, time.perf_counter())))
                handles.append(original.register_forward_hook(
                    lambda m, a, o, path=path: costs.__setitem__(path, costs[path] + time.perf_counter()
                                                                  - starts[path])))
            for _ in range(3):
                example_forward(model)
                P._restore_runtime(model, state)
        finally:
            for h in handles:
                h.remove()
            P._restore_runtime(model, state)
        return costs

    P._measure_peak = measure_peak
    P._forward_costs = forward_costs
    P._fxmemopt_patched = True


# -- measuring -----------------------------------------------------------------------------------------------------
def _time_ratio(base: nn.Module, cand: nn.Module, inputs: tuple[Any, ...], repeats: int) -> float:
    """Median over interleaved rounds of candidate step time / unoptimized step time (same machine conditions),
    after one untimed step of each."""
    from ..profiling.measure import measure_step

    ratios = []
    for k in range(repeats):
        b = measure_step(base, inputs, repeats=1, warmup=int(k == 0), measure_memory=False).step_time_s
        c = measure_step(cand, inputs, repeats=1, warmup=int(k == 0), measure_memory=False).step_time_s
        ratios.append(c / b)
    return statistics.median(ratios)


def _exactness(reference: nn.Module, candidate: nn.Module, inputs: tuple[Any, ...]) -> tuple[bool, float]:
    """One training step of each from the same seed; compare outputs, parameter gradients, buffers, neuron states
    and the RNG *by position* (wrappers such as torch's or spikingjelly's rename modules). Returns (bitwise equal,
    largest gradient difference)."""
    from ..compat import tree_leaves
    from ..profiling.measure import default_loss, reset_states
    from ..profiling.verify import module_states

    results = []
    for module in (reference, candidate):
        reset_states(module)
        for p in module.parameters():
            p.grad = None
        torch.manual_seed(0)
        out = module(*inputs)
        default_loss(out).backward()
        results.append(([t.detach() for t in tree_leaves(out) if isinstance(t, torch.Tensor)],
                        [p.grad for p in module.parameters()], [b.detach() for b in module.buffers()],
                        [v for v in module_states(module).values() if isinstance(v, torch.Tensor)],
                        torch.get_rng_state()))
        reset_states(module)
    (o1, g1, b1, s1, r1), (o2, g2, b2, s2, r2) = results
    diff = max([(a - b).abs().max().item() for a, b in zip(g1, g2) if a is not None and b is not None
                and a.shape == b.shape] + [0.0])

    def same(xs: list[Any], ys: list[Any]) -> bool:
        return len(xs) == len(ys) and all(
            (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape
                                          and torch.equal(a, b)) for a, b in zip(xs, ys))

    exact = same(o1, o2) and same(g1, g2) and same(b1, b2) and same(s1, s2) and torch.equal(r1, r2)
    return exact, diff


def run_workload(w: Workload, *, repeats: int = 3, device: str = "cpu", with_spikingjelly: bool = True,
                 log: Callable[[str], None] = lambda s: None) -> list[Row]:
    """Every variant of one workload (see the module docstring)."""
    import fxmemopt

    from ..profiling.measure import measure_step

    torch.manual_seed(0)
    model = w.factory().to(device)
    x = torch.rand(w.shape, device=device)
    inputs = (x,)
    pristine = copy.deepcopy(model)
    base_peak = measure_step(model, inputs, repeats=0).peak_bytes
    rows = [Row(w.name, "unoptimized", base_peak, 1.0, 1.0, None, True, 0.0, 0, "",
                base_peak)]
    log(f"{w.name}: unoptimized {base_peak / 2**20:.1f} MiB")

    def add(variant: str, cand: nn.Module, reference: nn.Module, base: nn.Module, base_peak_: int,
            optimize_s: float | None, runs: int | None, note: str = "") -> None:
        peak = measure_step(cand, inputs, repeats=0).peak_bytes
        ratio = _time_ratio(base, cand, inputs, repeats)
        exact, diff = _exactness(reference, cand, inputs)
        rows.append(Row(w.name, variant, peak, base_peak_ / peak, ratio, optimize_s, exact, diff, runs, note,
                        base_peak_))
        log(f"{w.name}: {variant} {peak / 2**20:.1f} MiB ({base_peak_ / peak:.2f}x lower), time x{ratio:.2f}, "
            f"{'exact' if exact else f'NOT exact (max grad diff {diff:.3g})'}")

    # torch.utils.checkpoint per layer
    ck = torch_checkpoint_per_layer(copy.deepcopy(pristine))
    add("torch checkpoint per layer", ck, copy.deepcopy(pristine), model, base_peak, 0.0, 0)

    # fxmemopt
    for variant, kwargs in FXMEMOPT_VARIANTS.items():
        torch.manual_seed(0)
        m = copy.deepcopy(pristine)
        t0 = time.perf_counter()
        gm, summary = fxmemopt.optimize(m, inputs, return_summary=True, **kwargs)
        opt_s = time.perf_counter() - t0
        runs = 2 if summary.measured_peak_after is not None else 0
        add(variant, gm, copy.deepcopy(pristine), model, base_peak, opt_s, runs)

    # spikingjelly
    if with_spikingjelly and _sj() is not None:
        from spikingjelly.activation_based import memopt

        patch_sj_for_cpu()
        torch.manual_seed(0)
        sj_model = with_sj_neurons(copy.deepcopy(pristine))
        sj_pristine = copy.deepcopy(sj_model)
        sj_base = measure_step(sj_model, inputs, repeats=0).peak_bytes
        rows.append(Row(w.name, "unoptimized (spikingjelly neurons)", sj_base, 1.0, None, None, True, 0.0, 0,
                        "baseline of the spikingjelly rows", sj_base))
        for level in (1, 2, 3, 4):
            m = copy.deepcopy(sj_pristine)
            _SJ_MEASUREMENTS[0] = 0
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    memopt.optimize_memory(m, w.sj_targets, lambda mm: mm(x), level=level,
                                           checkpoint_budget="memory", compress=True,
                                           split_fn=lambda mod: list(mod.children()), can_chunk=lambda leaf: True)
            except Exception as e:  # record and carry on: the table says what ran
                rows.append(Row(w.name, f"spikingjelly L{level}", note=f"failed: {type(e).__name__}: "
                                f"{str(e)[:80]}", baseline_peak_bytes=sj_base))
                continue
            opt_s = time.perf_counter() - t0
            note = "CPU tracker substituted for CUDA measurement" if level >= 2 else ""
            add(f"spikingjelly L{level}", m, copy.deepcopy(sj_pristine), sj_model, sj_base, opt_s,
                _SJ_MEASUREMENTS[0], note)
    return rows


def scaling(device: str = "cpu", steps: tuple[int, ...] = (4, 8, 16, 32), depths: tuple[int, ...] = (4, 8, 16, 32),
            log: Callable[[str], None] = lambda s: None, *, t_blocks: int = 16, depth_steps: int = 8,
            channels: int = 16) -> list[dict[str, Any]]:
    """Peak memory of DeepConvSNN (``channels``, N=2, 32x32) vs T (at ``t_blocks`` blocks) and vs depth (at
    ``depth_steps`` time steps): unoptimized, fxmemopt default and ``prefer="memory"``."""
    import fxmemopt

    from ..profiling.measure import measure_step
    from ..snn import DeepConvSNN

    out = []
    points = [("T", t, t_blocks, t) for t in steps] + [("depth", d, d, depth_steps) for d in depths]
    for axis, value, blocks, t in points:
        torch.manual_seed(0)
        model = DeepConvSNN(num_blocks=blocks, channels=channels).to(device)
        x = torch.rand((t, 2, 3, 32, 32), device=device)
        row = {"axis": axis, "value": value, "blocks": blocks, "T": t,
               "unoptimized": measure_step(model, (x,), repeats=0).peak_bytes}
        for label, kwargs in (("fxmemopt", {}), ('fxmemopt prefer="memory"', {"prefer": "memory"})):
            gm = fxmemopt.optimize(model, (x,), **kwargs)
            row[label] = measure_step(gm, (x,), repeats=0).peak_bytes
        log(f"scaling {axis}={value}: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in row.items()
                                                    if isinstance(v, int) and k not in ("value", "blocks", "T")))
        out.append(row)
    return out


# -- output ---------------------------------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def markdown(rows: list[Row], scale: list[dict[str, Any]], header: str) -> str:
    """The results as markdown tables."""
    lines = [header, "", "| workload | variant | peak | vs unoptimized | step time | optimize | exact? | "
             "profiling runs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        exact = "-" if r.exact is None else (
            "yes (bitwise)" if r.exact else f"no (max grad diff {r.max_grad_diff:.2g})")
        lines.append(
            f"| {r.workload} | {r.variant}{' *' if r.note and 'CPU tracker' in r.note else ''} | "
            f"{_mib(r.peak_bytes) if r.peak_bytes is not None else r.note} | "
            f"{'-' if r.memory_ratio is None else f'{r.memory_ratio:.2f}x lower'} | "
            f"{'-' if r.step_time_ratio is None else f'{r.step_time_ratio:.2f}x'} | "
            f"{'-' if r.optimize_s is None else f'{r.optimize_s:.1f} s'} | {exact} | "
            f"{'-' if r.profiling_runs is None else r.profiling_runs} |")
    if any("CPU tracker" in r.note for r in rows):
        lines += ["", "\\* spikingjelly's levels 2-4 measure candidates with CUDA only: here its measurement was "
                  "replaced by the same CPU storage tracker (its search otherwise unchanged), on the model rebuilt "
                  "with spikingjelly's LIFNode; ratios are against that model's own unoptimized peak."]
    if scale:
        labels = [k for k in scale[0] if k not in ("axis", "value", "blocks", "T")]
        lines += ["", "Scaling (DeepConvSNN, 16 channels, N=2, 32x32; T sweep at 16 blocks, depth sweep at T=8):",
                  "", "| sweep | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for row in scale:
            lines.append(f"| {row['axis']}={row['value']} | " + " | ".join(_mib(row[k]) for k in labels) + " |")
    return "\n".join(lines)


def plot_scaling(scale: list[dict[str, Any]], path: str) -> None:
    """Peak memory vs T and vs depth, one panel each (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        from ..report.render import MissingDependencyError

        raise MissingDependencyError("plotting the scaling needs matplotlib: pip install 'fxmemopt[plot]'") from e
    labels = [k for k in scale[0] if k not in ("axis", "value", "blocks", "T")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, xlabel in ((axes[0], "T", "time steps T (16 blocks)"), (axes[1], "depth", "blocks (T=8)")):
        pts = [r for r in scale if r["axis"] == axis]
        for label in labels:
            ax.plot([r["value"] for r in pts], [r[label] / 2**20 for r in pts], marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("peak training-step memory (MiB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("DeepConvSNN (16 ch, N=2, 32x32): peak memory, CPU storage tracker")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxmemopt bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true", help="the seed tutorial's GPU sizes (VGG batch 8 and 32)")
    p.add_argument("--models", help="comma-separated substrings of workload names to run (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds per variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-spikingjelly", action="store_true", help="skip spikingjelly even when installed")
    p.add_argument("--no-scaling", action="store_true", help="skip the T / depth scaling sweep")
    p.add_argument("--json", help="write every row (and the scaling) here")
    p.add_argument("--markdown", help="write the markdown tables here")
    p.add_argument("--plot", help="write the scaling plot here (PNG; needs matplotlib)")
    p.add_argument("--libraries", action="store_true",
                   help="the conformance suite instead: every library's models (tests/conformance/), both presets")
    p.add_argument("--readme", help="with --libraries: write the table into this README between its markers")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(args: argparse.Namespace) -> int:
    def log(line: str) -> None:
        if not args.quiet:
            print(f"bench: {line}", file=sys.stderr, flush=True)

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    if getattr(args, "libraries", False):
        from ..errors import FxMemOptWarning
        from .libraries import run_libraries
        warnings.filterwarnings("ignore", category=FxMemOptWarning)  # (each case's notes: the table says enough)
        return run_libraries(args)
    started = time.perf_counter()
    chosen = workloads(args.full)
    if args.models:
        keys = [k.strip().lower() for k in args.models.split(",") if k.strip()]
        chosen = [w for w in chosen if any(k in w.name.lower() for k in keys)]
        if not chosen:
            raise ValueError(f"--models {args.models!r} matches no workload; names: "
                             + "; ".join(w.name for w in workloads(args.full)))
    rows: list[Row] = []
    for w in chosen:
        rows += run_workload(w, repeats=args.repeats, device=args.device,
                             with_spikingjelly=not args.no_spikingjelly, log=log)
    scale = [] if args.no_scaling else scaling(args.device, log=log)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (
        f"CPU {_cpu_name()} ({platform.machine()}, {torch.get_num_threads()} threads)")
    header = (f"fxmemopt {__version__} bench, {device}, torch {torch.__version__}, "
              f"{datetime.date.today().isoformat()}; peaks by "
              f"{'the CUDA allocator' if args.device.startswith('cuda') else 'the CPU storage tracker'}; "
              f"{time.perf_counter() - started:.0f} s")
    md = markdown(rows, scale, header)
    print(md)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(md + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"header": header, "rows": [asdict(r) for r in rows], "scaling": scale}, f, indent=1)
    if args.plot and scale:
        plot_scaling(scale, args.plot)
    return 0

