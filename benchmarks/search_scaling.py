"""How the planner's search scales with depth: ``optimize`` on DeepConvSNN with more and more blocks, one thread.

Issue 27's "optimizing is cheap": the search should cost no more than about (candidate regions) x (graph size),
i.e. a bounded number of simulations per candidate region, each linear in the graph. For each depth and preset
this prints the wall time of ``fxmemopt.optimize`` (trace, record, search, rewrite, validation: everything), the
search's own share, the number of plans it simulated (``summary.search.evaluated``), the simulations per candidate
region, and the measured time of one unoptimized training step (for scale: the search should cost a few steps'
worth per region, not grow with the square of the depth).

    python benchmarks/search_scaling.py                           # 32, 64, 128 blocks; default, memory, speed
    python benchmarks/search_scaling.py --blocks 128 --presets speed
    timeout 600 python benchmarks/search_scaling.py --blocks 32 64   # on an older checkout, bounded

Small blocks on purpose (4 channels, 8x8, T=4, batch 2): the model's own step is milliseconds, so what is timed is
the planner, not the convolutions. Times on a shared machine are noisy; the simulation counts are exact and
deterministic.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import fxmemopt
import fxmemopt.api
from fxmemopt.snn import DeepConvSNN, reset_net

#: preset name -> optimize's keyword arguments
PRESETS: dict[str, dict[str, str]] = {"default": {}, "memory": {"prefer": "memory"}, "speed": {"prefer": "speed"}}


def _step_time(model: torch.nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Median seconds of one unoptimized training step (forward, sum, backward)."""
    times = []
    for _ in range(repeats):
        reset_net(model)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(x).sum().backward()
        times.append(time.perf_counter() - t0)
    reset_net(model)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=list(PRESETS))
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--size", type=int, default=8, help="image height and width")
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    # The search's own wall time: optimize calls fxmemopt.api.search once per call.
    search_s: list[float] = []
    real_search = fxmemopt.api.search

    def timed_search(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_search(*a, **k)
        finally:
            search_s.append(time.perf_counter() - t0)

    fxmemopt.api.search = timed_search
    print(f"DeepConvSNN, {args.channels} channels, {args.size}x{args.size}, T={args.T}, batch {args.batch}, "
          f"torch {torch.__version__}, 1 thread")
    print(f"{'blocks':>6} {'regions':>7} {'preset':>8} {'optimize s':>10} {'search s':>8} {'simulated':>9} "
          f"{'per region':>10} {'step ms':>8} {'peak after/before':>17}")
    for blocks in args.blocks:
        torch.manual_seed(0)
        model = DeepConvSNN(num_blocks=blocks, channels=args.channels)
        x = (torch.rand(args.T, args.batch, 3, args.size, args.size) < 0.3).float()
        step_ms = _step_time(model, x) * 1e3
        for name in args.presets:
            search_s.clear()
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # never-worse notes on a net this small are expected, not news
                _, summary = fxmemopt.optimize(copy.deepcopy(model), (x,), return_summary=True, **PRESETS[name])
            total = time.perf_counter() - t0
            result = summary.search
            regions = result.candidates if result is not None else 0
            evaluated = result.evaluated if result is not None else 0
            ratio = summary.predicted_peak_after / max(1, summary.predicted_peak_before)
            print(f"{blocks:>6} {regions:>7} {name:>8} {total:>10.1f} {sum(search_s):>8.1f} {evaluated:>9} "
                  f"{evaluated / max(1, regions):>10.1f} {step_ms:>8.1f} {ratio:>17.3f}", flush=True)
    fxmemopt.api.search = real_search
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
