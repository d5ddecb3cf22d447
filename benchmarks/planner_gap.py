"""How far the planner's greedy search is from the best plan, on random SNNs of up to 8 regions.

For each random SNN (the test suite's strategy, deterministic op times), every plan of whole / sliced (one slice per
step, prefix kept or recomputed) / left-out regions is enumerated and simulated; ``prefer="memory"`` is compared with
the least predicted peak, and ``memory_budget`` searches at several budgets with the fastest enumerated plan that
fits. The suite runs the same comparison on up to 6 regions every CI run (``tests/test_planner.py``); this script
goes to 8 (up to 4**8 plans per model, minutes).

    python benchmarks/planner_gap.py [--models 12] [--min-regions 5] [--max-regions 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from strategies import LayerSpec, SNNSpec  # noqa: E402
from test_planner import _cost_graph, _every_plan  # noqa: E402

from fxmemopt.planning.costgraph import simulate  # noqa: E402
from fxmemopt.planning.plan import checkpoint_all  # noqa: E402
from fxmemopt.planning.search import resolve_options, search  # noqa: E402


def _random_spec(rng: random.Random, depth: int) -> SNNSpec:
    layers = tuple(LayerSpec(rng.choice(["conv", "conv", "linear", "res"]), rng.randint(1, 4), rng.random() < 0.5,
                             "none", 0.0) for _ in range(depth))
    return SNNSpec(layers=layers, neuron=rng.choice(["if", "lif", "plif", "value"]), hard_reset=rng.random() < 0.5,
                   detach_reset=rng.random() < 0.5, surrogate=rng.choice(["atan", "sigmoid"]), T=rng.randint(2, 4),
                   N=rng.randint(1, 3), in_channels=rng.randint(1, 3), size=rng.choice([2, 4, 6]),
                   spike_input=rng.random() < 0.5, seed=rng.randint(0, 2**16))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=12)
    ap.add_argument("--min-regions", type=int, default=5)
    ap.add_argument("--max-regions", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    memory_gaps, budget_gaps, monotone, done = [], [], [0, 0], 0
    print(f"{'regions':>7} {'plans':>6} {'memory/least':>12} {'budget time/fastest (worst)':>27} {'s':>5}")
    while done < args.models:
        cost, annotated, regions = _cost_graph(_random_spec(rng, rng.randint(args.min_regions - 1, args.max_regions)))
        count = len(checkpoint_all(regions, annotated).regions)
        if not args.min_regions <= count <= args.max_regions:
            continue
        t0 = time.perf_counter()
        plans = list(_every_plan(annotated, regions))
        predicted = [(p.peak_bytes, p.step_time_s) for p in (simulate(cost, plan) for plan in plans)]
        least = min(peak for (peak, _), plan in zip(predicted, plans) if plan.regions)
        memory = search(cost, regions, {}, resolve_options(prefer="memory")).prediction
        memory_gaps.append(memory.peak_bytes / least)
        baseline = simulate(cost, None).peak_bytes
        least_any = min(peak for peak, _ in predicted)
        peaks, worst = [], 0.0
        for f in (0.1, 0.3, 0.5, 0.7, 0.9):
            budget = int(least_any + (baseline - least_any) * f)
            chosen = search(cost, regions, {}, resolve_options(memory_budget=budget)).prediction
            fastest = min(t for peak, t in predicted if peak <= budget)
            budget_gaps.append(chosen.step_time_s / fastest)
            worst = max(worst, chosen.step_time_s / fastest)
            peaks.append(chosen.peak_bytes)
        monotone[0] += sum(a <= b for a, b in zip(peaks, peaks[1:]))
        monotone[1] += len(peaks) - 1
        done += 1
        print(f"{count:>7} {len(plans):>6} {memory_gaps[-1]:>12.4f} {worst:>27.3f} {time.perf_counter() - t0:>5.0f}",
              flush=True)
    print(f"prefer='memory' peak / least enumerated peak: mean {statistics.mean(memory_gaps):.4f}, "
          f"worst {max(memory_gaps):.4f}")
    print(f"budget search time / fastest enumerated plan that fits: mean {statistics.mean(budget_gaps):.3f}, "
          f"worst {max(budget_gaps):.3f}, better than enumeration in {sum(g < 0.999 for g in budget_gaps)} of "
          f"{len(budget_gaps)}")
    print(f"a tighter budget never gave a higher peak: {monotone[0]} of {monotone[1]} pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
