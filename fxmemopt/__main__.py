"""Command line: ``python -m fxmemopt demo`` (more subcommands come with the inspection tools).

``demo`` optimizes the bundled spiking VGG-11 on CIFAR10-DVS-shaped input on CPU, checks that a training step is
bitwise identical to the unoptimized model's, and prints baseline vs optimized peak memory, step time and the
checkpoint regions.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def demo(args: argparse.Namespace) -> int:
    # torch warns at import when NumPy is absent; fxmemopt does not use NumPy, so the line is only noise here.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch

    import fxmemopt
    from fxmemopt.snn import SpikingVGG11

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
    report = fxmemopt.compare_training_step(reference, gm, (x,))

    base = fxmemopt.measure_step(model, (x,), repeats=args.repeats)
    opt = fxmemopt.measure_step(gm, (x,), repeats=args.repeats)
    # Interleave a second round so both timings see the same machine conditions; keep each best median.
    base2 = fxmemopt.measure_step(model, (x,), repeats=args.repeats, measure_memory=False)
    opt2 = fxmemopt.measure_step(gm, (x,), repeats=args.repeats, measure_memory=False)
    bt, ot = min(base.step_time_s, base2.step_time_s), min(opt.step_time_s, opt2.step_time_s)

    print()
    print(summary.table())
    print()
    rows = [("", "peak memory (CPU tracker)", "step time"),
            ("unoptimized", _mib(base.peak_bytes), f"{bt * 1e3:.0f} ms"),
            ("fxmemopt", _mib(opt.peak_bytes), f"{ot * 1e3:.0f} ms"),
            ("ratio", f"{base.peak_bytes / opt.peak_bytes:.2f}x lower", f"{ot / bt:.2f}x")]
    w = [max(len(r[k]) for r in rows) for k in range(3)]
    for r in rows:
        print("  ".join(c.ljust(wk) for c, wk in zip(r, w)))
    print()
    print(f"optimize() took {opt_s:.2f} s; {summary.region_count} regions, {summary.packed_input_count} packed "
          f"inputs; exactness check (outputs, gradients, BN stats, neuron states, RNG): "
          f"{'bitwise equal' if report.ok else 'MISMATCH'} ({report.checked} tensors)")
    return 0 if report.ok else 1


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as e:  # one-line reason, non-zero exit
        if args.verbose:
            raise
        print(f"fxmemopt: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
