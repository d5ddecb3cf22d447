"""How well the cost model predicts peak memory: predicted vs measured (CPU storage tracker), unoptimized and with
the default plan, on every reference model.

    python benchmarks/prediction_accuracy.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import fxmemopt
from fxmemopt.snn import DeepConvSNN, SEWResNet18, Spikformer, SpikingVGG11

WORKLOADS = {
    "SpikingVGG11(width 0.5) T=10 N=4 48x48": (lambda: SpikingVGG11(width=0.5, dropout=0.2), (10, 4, 2, 48, 48)),
    "SEWResNet18(width 0.5) T=4 N=4 64x64": (lambda: SEWResNet18(width=0.5), (4, 4, 3, 64, 64)),
    "Spikformer(dim 128, depth 2) T=4 N=8 32x32": (lambda: Spikformer(embed_dim=128, num_heads=4, depth=2),
                                                   (4, 8, 3, 32, 32)),
    "DeepConvSNN(16 blocks, 32 ch) T=8 N=8 32x32": (lambda: DeepConvSNN(num_blocks=16, channels=32),
                                                    (8, 8, 3, 32, 32)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    print("| workload | predicted / measured, unoptimized | error | predicted / measured, optimized | error | "
          "optimize() |")
    print("|---|---|---|---|---|---|")
    for name, (factory, shape) in WORKLOADS.items():
        torch.manual_seed(0)
        model = factory()
        x = torch.rand(shape)
        t0 = time.perf_counter()
        gm, s = fxmemopt.optimize(model, (x,), return_summary=True)
        opt_s = time.perf_counter() - t0
        base = fxmemopt.measure_step(model, (x,), repeats=0).peak_bytes
        opt = fxmemopt.measure_step(gm, (x,), repeats=0).peak_bytes
        e0 = (s.predicted_peak_before - base) / base
        e1 = (s.predicted_peak_after - opt) / opt
        rows.append({"workload": name, "predicted_before": s.predicted_peak_before, "measured_before": base,
                     "predicted_after": s.predicted_peak_after, "measured_after": opt, "error_before": e0,
                     "error_after": e1, "optimize_s": opt_s})
        mib = 2**20
        print(f"| {name} | {s.predicted_peak_before / mib:.1f} / {base / mib:.1f} MiB | {e0:+.2%} | "
              f"{s.predicted_peak_after / mib:.1f} / {opt / mib:.1f} MiB | {e1:+.2%} | {opt_s:.1f} s |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
