"""Step time of fxmemopt's plans against the unoptimized model, on the reference models of the speed issue.

For each model and preset: measured peak (CPU storage tracker) and its ratio to the unoptimized peak, the
predicted and measured step-time ratios (interleaved rounds, median), bitwise exactness of one training step,
with one torch thread and with the default thread count.

    python benchmarks/speed_check.py                       # DeepConvSNN 16x32 T=8 N=8, VGG-11 T=10 N=4
    python benchmarks/speed_check.py --presets default speed --rounds 7 --threads 1
    python benchmarks/speed_check.py --models dcs --markdown

Times on a shared machine are noisy: only ratios from one run mean anything, and a ratio's spread is printed
next to its median.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fxmemopt
from fxmemopt.profiling.measure import measure_step, reset_states
from fxmemopt.profiling.verify import compare_training_step
from fxmemopt.snn import DeepConvSNN, SEWResNet18, Spikformer, SpikingVGG11

MODELS: dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = {
    "dcs": ("DeepConvSNN 16 blocks 32 ch, T=8 N=8 3x32x32",
            lambda: DeepConvSNN(num_blocks=16, channels=32), (8, 8, 3, 32, 32)),
    "vgg": ("SpikingVGG11 (width 1) T=10 N=4 2x48x48",
            lambda: SpikingVGG11(width=1.0), (10, 4, 2, 48, 48)),
    "vgg-half": ("SpikingVGG11 (width 0.5) T=10 N=4 2x48x48",
                 lambda: SpikingVGG11(width=0.5), (10, 4, 2, 48, 48)),
    "sew": ("SEWResNet18 (width 0.5) T=4 N=4 3x64x64", lambda: SEWResNet18(width=0.5), (4, 4, 3, 64, 64)),
    "spikformer": ("Spikformer (dim 128, depth 2) T=4 N=8 3x32x32",
                   lambda: Spikformer(embed_dim=128, num_heads=4, depth=2), (4, 8, 3, 32, 32)),
}
PRESETS: dict[str, dict[str, Any]] = {
    "default": {}, "speed": {"prefer": "speed"}, "balanced": {"prefer": "balanced"},
    "memory": {"prefer": "memory"},
}


def step_time(module: nn.Module, x: torch.Tensor) -> float:
    """One training step's wall time (states reset, gradients cleared first)."""
    reset_states(module)
    module.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    module(x).sum().backward()
    return time.perf_counter() - t0


def time_ratios(base: nn.Module, cands: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    """Per candidate, the step time over the unoptimized step time measured right before it, for each round."""
    step_time(base, x)
    for m in cands.values():
        step_time(m, x)
    out: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for k, m in cands.items():
            b = step_time(base, x)
            out[k].append(step_time(m, x) / b)
    return out


def run_model(key: str, presets: list[str], rounds: int, threads: list[int]) -> list[dict[str, Any]]:
    label, build, shape = MODELS[key]
    torch.manual_seed(0)
    model = build()
    x = torch.rand(*shape)
    base = copy.deepcopy(model)
    base_peak = measure_step(base, (x,), repeats=1).peak_bytes
    rows, cands = [], {}
    for p in presets:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        gm, s = fxmemopt.optimize(m, (x,), return_summary=True, **PRESETS[p])
        opt_s = time.perf_counter() - t0
        peak = measure_step(gm, (x,), repeats=1).peak_bytes
        exact = compare_training_step(copy.deepcopy(base), gm, (x,)).ok
        cands[p] = gm
        rows.append({"model": label, "preset": p, "peak_mib": peak / 2**20, "memory_ratio": base_peak / peak,
                     "predicted_peak_ratio": s.predicted_peak_before / max(1, s.predicted_peak_after),
                     "predicted_time_ratio": s.predicted_step_time_ratio, "exact": exact,
                     "optimize_s": opt_s, "regions": len(s.regions)})
    for n in threads:
        torch.set_num_threads(n)
        ratios = time_ratios(base, cands, x, rounds)
        for r in rows:
            rs = ratios[r["preset"]]
            r[f"time_ratio_t{n}"] = statistics.median(rs)
            r[f"spread_t{n}"] = (min(rs), max(rs))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["dcs", "vgg"], choices=sorted(MODELS))
    ap.add_argument("--presets", nargs="*", default=["default", "speed"], choices=sorted(PRESETS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, torch.get_num_threads()])
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows = []
    for key in args.models:
        rows += run_model(key, args.presets, args.rounds, args.threads)
        for r in rows[-len(args.presets):]:
            times = "  ".join(f"t{n} {r[f'time_ratio_t{n}']:.3f}x "
                              f"[{r[f'spread_t{n}'][0]:.2f}-{r[f'spread_t{n}'][1]:.2f}]" for n in args.threads)
            print(f"{r['model']:45s} {r['preset']:8s} peak {r['peak_mib']:7.1f} MiB  {r['memory_ratio']:.2f}x lower "
                  f"(pred {r['predicted_peak_ratio']:.2f}x)  time pred {r['predicted_time_ratio']:.3f}x  {times}  "
                  f"exact {r['exact']}  optimize {r['optimize_s']:.1f}s", flush=True)
    if args.markdown:
        cols = " | ".join(f"step time ({n} thread{'s' if n > 1 else ''})" for n in args.threads)
        print(f"\n| model | preset | peak | lower by | predicted time | {cols} | prediction error | exact |")
        print("|---|---|---|---|---|" + "---|" * len(args.threads) + "---|---|")
        for r in rows:
            times = " | ".join(f"{r[f'time_ratio_t{n}']:.2f}x" for n in args.threads)
            measured = statistics.mean(r[f"time_ratio_t{n}"] for n in args.threads)
            print(f"| {r['model']} | {r['preset']} | {r['peak_mib']:.1f} MiB | {r['memory_ratio']:.2f}x | "
                  f"{r['predicted_time_ratio']:.2f}x | {times} | {r['predicted_time_ratio'] / measured - 1:+.0%} | "
                  f"{'yes' if r['exact'] else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
