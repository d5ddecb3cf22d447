"""What ``fxmemopt.optimize`` itself costs, against the module it returns (issue 27, item 5).

For each preset: the storage peak of the whole ``optimize`` call (a :class:`~fxmemopt.profiling.measure.
LiveBytesTracker` around it: every tensor it or its stages allocate, the recordings, validation, the measured
step), against the storage peak of one training step of the returned module (``measure_step``); and the call's
time against the unoptimized step's (median of 3, measured in the same run, one thread).

    python benchmarks/optimize_cost.py                       # DeepConvSNN 8 x 16, T=4, N=16, 32x32
    python benchmarks/optimize_cost.py --blocks 16 --channels 32 --T 8 --N 16
    python benchmarks/optimize_cost.py --model sew_resnet18 --T 4 --N 80 --hw 64

Prints one markdown table row per preset. Memory figures are exact on any machine; times are ratios in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fxmemopt  # noqa: E402
from fxmemopt.profiling.measure import LiveBytesTracker, reset_states  # noqa: E402


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if args.model == "deepconv":
        from fxmemopt.snn.models import DeepConvSNN

        return DeepConvSNN(num_blocks=args.blocks, channels=args.channels), \
            (torch.rand(args.T, args.N, 3, args.hw, args.hw) > 0.5).float()
    from sj_zoo import install_torchvision_stub

    install_torchvision_stub()
    from spikingjelly.activation_based import functional, neuron, surrogate
    from spikingjelly.activation_based.model import sew_resnet

    model = sew_resnet.sew_resnet18(spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(),
                                    detach_reset=True, cnf="ADD", num_classes=10)
    functional.set_step_mode(model, "m")
    return model, torch.rand(args.T, args.N, 3, args.hw, args.hw)


def step_time(model: torch.nn.Module, x: torch.Tensor) -> float:
    reset_states(model)
    t0 = time.perf_counter()
    model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    reset_states(model)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deepconv", choices=["deepconv", "sew_resnet18"])
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--N", type=int, default=16)
    ap.add_argument("--hw", type=int, default=32)
    ap.add_argument("--presets", default="default,memory")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, x = build(args)
    step_time(model, x)  # warm-up
    print("| preset | optimize peak | returned step peak | ratio | optimize time / unoptimized step |")
    print("|---|---|---|---|---|")
    for preset in args.presets.split(","):
        kwargs = {} if preset == "default" else {"prefer": preset}
        before = statistics.median(step_time(model, x) for _ in range(3))
        t0 = time.perf_counter()
        with LiveBytesTracker() as tracker:
            gm = fxmemopt.optimize(model, (x,), **kwargs)
        spent = time.perf_counter() - t0
        after = statistics.median(step_time(model, x) for _ in range(3))
        step_peak = fxmemopt.measure_step(gm, (x,), repeats=0, warmup=0).peak_bytes
        base = (before + after) / 2
        print(f"| {preset} | {tracker.peak / 2**20:.1f} MiB | {step_peak / 2**20:.1f} MiB | "
              f"{tracker.peak / step_peak:.2f}x | {spent / base:.1f} ({spent:.1f} s / {base:.2f} s) |", flush=True)


if __name__ == "__main__":
    main()
