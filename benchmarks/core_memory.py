"""Peak training-step memory and step time: unoptimized vs ``fxmemopt.optimize`` (default call and presets), on CPU.

Memory is the CPU storage tracker's peak (deterministic); time is the median of repeated steps, interleaved
baseline/optimized rounds in one process, reported as a ratio. Run by hand:

    python benchmarks/core_memory.py                 # DeepConvSNN 16x32ch 32x32 T=8 N=8, spiking VGG-11
    python benchmarks/core_memory.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import fxmemopt
from fxmemopt.snn import DeepConvSNN, SpikingVGG11

WORKLOADS = {
    "DeepConvSNN(16 blocks, 32 ch) 32x32 T=8 N=8": (lambda: DeepConvSNN(num_blocks=16, channels=32),
                                                    (8, 8, 3, 32, 32)),
    "SpikingVGG11(width 0.5) 48x48 T=10 N=4": (lambda: SpikingVGG11(width=0.5), (10, 4, 2, 48, 48)),
}


VARIANTS = {"default": {}, 'prefer="memory"': {"prefer": "memory"}, 'prefer="speed"': {"prefer": "speed"}}


def run(name: str, factory, shape, rounds: int, repeats: int, variant: str) -> dict:
    torch.manual_seed(0)
    model = factory()
    x = torch.rand(shape)
    t0 = time.perf_counter()
    gm = fxmemopt.optimize(model, (x,), **VARIANTS[variant])
    optimize_s = time.perf_counter() - t0
    base = fxmemopt.measure_step(model, (x,), repeats=0, warmup=1)
    opt = fxmemopt.measure_step(gm, (x,), repeats=0, warmup=1)
    ratios = []
    for _ in range(rounds):  # interleaved rounds: each ratio is measured under the same machine conditions
        b = fxmemopt.measure_step(model, (x,), repeats=repeats, measure_memory=False)
        o = fxmemopt.measure_step(gm, (x,), repeats=repeats, measure_memory=False)
        ratios.append((o.step_time_s / b.step_time_s, b.step_time_s, o.step_time_s))
    ratios.sort()
    ratio, bt, ot = ratios[len(ratios) // 2]
    return {"workload": name, "variant": variant, "baseline_peak_bytes": base.peak_bytes,
            "optimized_peak_bytes": opt.peak_bytes, "memory_ratio": base.peak_bytes / opt.peak_bytes,
            "baseline_step_s": bt, "optimized_step_s": ot, "step_time_ratio": ratio, "optimize_s": optimize_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    results = [run(n, f, s, args.rounds, args.repeats, v) for n, (f, s) in WORKLOADS.items() for v in VARIANTS]
    print(f"CPU, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| workload | call | unoptimized peak | fxmemopt peak | memory | step time | optimize() |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workload']} | {r['variant']} | {r['baseline_peak_bytes'] / 2**20:.1f} MiB | "
              f"{r['optimized_peak_bytes'] / 2**20:.1f} MiB | {r['memory_ratio']:.2f}x lower | "
              f"{r['step_time_ratio']:.2f}x | {r['optimize_s']:.2f} s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
