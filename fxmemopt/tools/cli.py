"""Command line: ``python -m fxmemopt`` (or ``fxmemopt``) ``demo | optimize | explain | bench``.

``demo``
    optimizes the bundled spiking VGG-11 on CIFAR10-DVS-shaped input on CPU, checks that a training step is
    bitwise identical to the unoptimized model's, and prints baseline vs optimized peak memory, step time and the
    checkpoint regions.
``optimize MODULE:FACTORY --input-shape T,N,C,H,W``
    builds your model by calling ``FACTORY()`` from ``MODULE`` (a dotted module name or a ``.py`` file), optimizes
    it on random example inputs of that shape, prints the explain table, and optionally saves the plan
    (``--save-plan``), the memory timeline (``--plot``, ``--timeline-csv``) and the graph (``--dump``, ``--dot``).
    ``--plan p.json`` applies a saved plan instead of searching.
``explain PLAN.json``
    prints the explain table stored in a plan file.
``bench [--full] [--models vgg,sew] [--json out.json] [--markdown out.md] [--plot scaling.png]``
    the benchmark suite (see :mod:`fxmemopt.tools.bench`).

Errors end the command with exit status 2 and a one-line reason (``-v`` shows the traceback and logs each stage).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings
from typing import Any


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def demo(args: argparse.Namespace) -> int:
    # torch warns at import when NumPy is absent; fxmemopt does not use NumPy, so the line is only noise here.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch

    import fxmemopt
    from fxmemopt.snn import SpikingVGG11, reset_net

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = SpikingVGG11(in_channels=2, num_classes=10, width=args.width, image_size=48, dropout=0.2)
    reference = copy.deepcopy(model)
    # CIFAR10-DVS-shaped event frames: small non-negative counts per pixel and polarity.
    x = torch.poisson(torch.full((args.T, args.batch, 2, 48, 48), 0.3)).clamp_(max=3)
    print(f"model: SpikingVGG11(width={args.width}), input [T, N, C, H, W] = {list(x.shape)}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")

    t0 = time.perf_counter()
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    opt_s = time.perf_counter() - t0
    # prefer="memory" on copies: a training step moves BatchNorm statistics and neuron states, so each comparison
    # starts from a model and a reference that no other step has touched
    mem_model, mem_reference = copy.deepcopy(model), copy.deepcopy(reference)
    mem = fxmemopt.optimize(mem_model, (x,), prefer="memory")
    reports = [fxmemopt.compare_training_step(reference, gm, (x,)),
               fxmemopt.compare_training_step(mem_reference, mem, (x,))]
    for m in (gm, mem, reference, mem_reference):
        reset_net(m)

    candidates = [("unoptimized", model), ("fxmemopt default", gm), ('prefer="memory"', mem)]
    peaks = {name: fxmemopt.measure_step(m, (x,), repeats=0).peak_bytes for name, m in candidates}
    # Times: rounds interleaved so every module sees the same machine conditions; each keeps its best median.
    times: dict[str, float] = {}
    for _ in range(2):
        for name, m in candidates:
            t = fxmemopt.measure_step(m, (x,), repeats=args.repeats, measure_memory=False).step_time_s
            times[name] = min(times.get(name, t), t)

    print()
    print(summary.table())
    print()
    base_peak, base_time = peaks["unoptimized"], times["unoptimized"]
    rows = [("", "peak memory (CPU tracker)", "lower by", "step time", "vs unoptimized")]
    for name, _ in candidates:
        rows.append((name, _mib(peaks[name]), f"{base_peak / peaks[name]:.2f}x", f"{times[name] * 1e3:.0f} ms",
                     f"{times[name] / base_time:.2f}x"))
    w = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(wk) for c, wk in zip(r, w)).rstrip())
    print()
    ok = all(r.ok for r in reports)
    print(f"optimize() took {opt_s:.2f} s; {summary.region_count} regions, {summary.packed_input_count} packed "
          f"inputs; exactness check of both (outputs, gradients, BN stats, neuron states, RNG): "
          f"{'bitwise equal' if ok else 'MISMATCH'} ({reports[0].checked} tensors each)")
    print('prefer="memory" also recomputes each neuron in time slices; fxmemopt.tradeoffs(model, (x,)) lists every '
          "plan in between.")
    return 0 if ok else 1


def _load_factory(spec: str) -> Any:
    """``module:factory`` or ``path/to/file.py:factory`` -> the factory callable."""
    import importlib
    import importlib.util
    import os

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model {spec!r}: expected MODULE:FACTORY, e.g. mypkg.models:build or models.py:build")
    if module_name.endswith(".py") or os.sep in module_name:
        if not os.path.exists(module_name):
            raise FileNotFoundError(f"model {spec!r}: no file {module_name!r}")
        sys.path.insert(0, os.path.dirname(os.path.abspath(module_name)))
        mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module_name))[0],
                                                          module_name)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}") from None


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 10,4,2,48,48") from None
    if not shape or any(n <= 0 for n in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape of positive sizes like 10,4,2,48,48")
    return shape


def _model_and_inputs(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The model the factory builds and example inputs of the requested shapes and kind."""
    import json

    import torch

    factory = _load_factory(args.model)
    kwargs = json.loads(args.factory_kwargs) if args.factory_kwargs else {}
    torch.manual_seed(args.seed)
    model = factory(**kwargs)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model {args.model!r}: the factory returned {type(model).__name__}, not an nn.Module")
    inputs = []
    for shape in args.input_shape:
        if args.input_kind == "spikes":
            inputs.append((torch.rand(shape) > 0.5).float())
        elif args.input_kind == "int":
            inputs.append(torch.randint(0, args.vocab, shape))
        else:
            inputs.append(torch.rand(shape))
    return model, inputs


def tradeoffs_cmd(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import fxmemopt

    model, inputs = _model_and_inputs(args)
    print(fxmemopt.tradeoffs(model, tuple(inputs), exact=not args.approximate))
    return 0


def optimize_cmd(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import fxmemopt

    model, inputs = _model_and_inputs(args)
    quiet = args.quiet

    def progress(line: str) -> None:
        if not quiet:
            print(f"fxmemopt: {line}", file=sys.stderr, flush=True)

    options = {"level": args.level, "prefer": args.prefer, "profile": args.profile,
               "memory_budget": args.memory_budget, "measure": args.measure, "exact": not args.approximate,
               "plan": args.plan, "calls_per_step": args.calls_per_step}
    options = {k: v for k, v in options.items() if v is not None}
    t0 = time.perf_counter()
    gm, summary = fxmemopt.optimize(model, tuple(inputs), return_summary=True, progress=progress, **options)
    progress(f"[{time.perf_counter() - t0:6.1f} s] done")
    print(fxmemopt.explain(summary))
    if args.save_plan:
        summary.save_plan(args.save_plan)
        print(f"plan saved to {args.save_plan} (apply it with --plan {args.save_plan})")
    if args.dump:
        with open(args.dump, "w", encoding="utf-8") as f:
            f.write(fxmemopt.dump(gm))
        print(f"graph dump written to {args.dump}")
    if args.dot:
        dot = fxmemopt.dump(gm, format="dot")
        if args.dot.endswith(".dot") or args.dot.endswith(".gv"):
            with open(args.dot, "w", encoding="utf-8") as f:
                f.write(dot)
        else:
            fxmemopt.render_dot(dot, args.dot)
        print(f"graph written to {args.dot}")
    if args.plot or args.timeline_csv or args.timeline_json:
        progress("measuring the memory timeline of both models")
        tl = fxmemopt.memory_timeline(model, gm, tuple(inputs))
        for path, write in ((args.timeline_csv, tl.to_csv), (args.timeline_json, tl.to_json), (args.plot, tl.plot)):
            if path:
                write(path)
                print(f"memory timeline written to {path}")
    return 0


def explain_cmd(args: argparse.Namespace) -> int:
    import fxmemopt

    print(fxmemopt.explain(args.plan_file))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxmemopt", description="Train deep SNNs in less memory, exactly.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="optimize the bundled spiking VGG-11 on CPU and print the memory table")
    d.add_argument("--width", type=float, default=0.5, help="channel width multiplier (1.0 = VGG-11)")
    d.add_argument("--T", type=int, default=10, help="time steps")
    d.add_argument("--batch", type=int, default=4, help="batch size")
    d.add_argument("--repeats", type=int, default=3, help="timed steps per measurement")
    d.set_defaults(func=demo)

    def model_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="MODULE:FACTORY (dotted module or a .py file), e.g. models.py:build_vgg")
        p.add_argument("--input-shape", type=_shape, action="append", required=True,
                       help="shape of one example input, e.g. 10,4,2,48,48 (repeat for several inputs)")
        p.add_argument("--input-kind", choices=("rand", "spikes", "int"), default="rand",
                       help="example values: uniform [0, 1) floats, 0/1 spikes, or integer ids below --vocab")
        p.add_argument("--vocab", type=int, default=1000, help="upper bound of --input-kind int values")
        p.add_argument("--factory-kwargs", help='JSON keyword arguments for the factory, e.g. \'{"width": 0.5}\'')
        p.add_argument("--seed", type=int, default=0, help="torch seed for the model and the example inputs")

    o = sub.add_parser("optimize", help="optimize your model (MODULE:FACTORY) and print what changed")
    model_arguments(o)
    o.add_argument("--level", type=int, help="0-4 (default 1; see README 'Levels, presets and budgets')")
    o.add_argument("--prefer", choices=("speed", "balanced", "memory"))
    o.add_argument("--profile", choices=("safe", "balanced", "memory", "exhaustive"))
    o.add_argument("--memory-budget", help='the whole training step\'s budget (parameters and inputs included): '
                                           'bytes or a size such as "2GiB"')
    o.add_argument("--approximate", action="store_true",
                   help="exact=False: allow the seed's whole-region time slices (BatchNorm per slice)")
    o.add_argument("--measure", choices=("worker", "in-process"), help="confirm by measuring both models")
    o.add_argument("--calls-per-step", type=int,
                   help="module calls per training step (T for a single-step net called once per time step)")
    o.add_argument("--plan", help="apply this saved plan instead of searching")
    o.add_argument("--save-plan", help="write the plan (JSON, with its report) here")
    o.add_argument("--plot", help="write the memory timeline plot here (PNG/SVG; needs matplotlib)")
    o.add_argument("--timeline-csv", help="write the memory timeline here as CSV")
    o.add_argument("--timeline-json", help="write the memory timeline here as JSON")
    o.add_argument("--dump", help="write the text graph dump (regions marked) here")
    o.add_argument("--dot", help="write the graph as DOT (.dot/.gv) or render it (.svg/.png; needs Graphviz)")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    o.set_defaults(func=optimize_cmd)

    t = sub.add_parser("tradeoffs", help="print the plans from nothing to least memory for your model "
                                         "(predicted peak and step time each)")
    model_arguments(t)
    t.add_argument("--approximate", action="store_true", help="exact=False: whole-region time slices allowed too")
    t.set_defaults(func=tradeoffs_cmd)

    e = sub.add_parser("explain", help="print the explain table stored in a plan file")
    e.add_argument("plan_file", help="a plan saved with --save-plan or summary.save_plan()")
    e.set_defaults(func=explain_cmd)

    from . import bench

    b = sub.add_parser("bench", help="benchmark the reference models: unoptimized, torch checkpoint, spikingjelly, "
                                     "fxmemopt levels and presets; memory vs T and depth")
    bench.add_arguments(b)
    b.set_defaults(func=bench.run)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as e:  # one-line reason, non-zero exit
        if args.verbose:
            raise
        reason = " ".join(str(e).split())  # one line, even for multi-line messages
        print(f"fxmemopt: error: {type(e).__name__}: {reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
