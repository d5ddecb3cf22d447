"""Does the plan survive a busy machine? Each model's unoptimized step is recorded once; then its measured node times
are disturbed as load disturbs them (every node's forward time, with and without grad, times its own log-normal
factor; the step's time too, a third as much; the whole times 1 or 2.5) and the plan is searched again on the
disturbed cost graph, ``--draws`` times per model and preset. It prints how many draws gave the same plan as the
undisturbed graph, with the times calibrated per kind of node as the search uses them
(:func:`fxmemopt.planning.timing.steady_times`) and, for comparison, with the raw measurements.

    python benchmarks/plan_stability.py [--sigma 0.2] [--draws 12] [--models sinabs deepconv sew18 vgg11]
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fxmemopt  # noqa: E402
from fxmemopt.api import analyze  # noqa: E402
from fxmemopt.planning.costgraph import facts  # noqa: E402
from fxmemopt.planning.search import resolve_options, search  # noqa: E402
from fxmemopt.planning.timing import steady_times  # noqa: E402
from fxmemopt.snn import DeepConvSNN, SEWResNet18, SpikingVGG11  # noqa: E402


def _sinabs():
    from test_sinabs import SIZES, _dvs_net
    return _dvs_net(*SIZES["4x16x32x32"])


def _seeded(build, shape):
    def make():
        torch.manual_seed(0)
        return build(), (torch.rand(*shape),)
    return make


MODELS = {
    "sinabs": _sinabs,
    "deepconv": _seeded(lambda: DeepConvSNN(num_blocks=8, channels=16), (4, 4, 3, 32, 32)),
    "sew18": _seeded(lambda: SEWResNet18(width=0.25), (4, 2, 3, 32, 32)),
    "vgg11": _seeded(lambda: SpikingVGG11(width=0.25), (4, 2, 2, 48, 48)),
}


def disturbed(cost, rng: random.Random, sigma: float, calibrated: bool):
    """A copy of ``cost`` whose measured times are disturbed, then calibrated (or used raw)."""
    c = copy.deepcopy(cost)
    uniform = rng.choice([1.0, 2.5])
    for key in ("fwd_time_s", "fwd_nograd_time_s"):
        measured = {n: (d.get(f"measured_{key}") or 0.0) * uniform * math.exp(rng.gauss(0, sigma))
                    for n, d in c.nodes(data=True) if d.get(f"measured_{key}") is not None}
        times = steady_times(facts(c).nodes, measured) if calibrated else measured
        for n, t in times.items():
            c.nodes[n][key] = t
    c.graph["step_time_s"] *= uniform * math.exp(rng.gauss(0, sigma / 3))
    return c


def _key(plan) -> tuple:
    return tuple((r.name, r.nodes, r.chunks, r.keep_prefix, r.keep_starts, r.recompute) for r in plan.regions)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sigma", type=float, default=0.2)
    p.add_argument("--draws", type=int, default=12)
    p.add_argument("--models", nargs="*", default=list(MODELS))
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print(f"| model | preset | same plan, calibrated times | same plan, raw times | (sigma {args.sigma}) |")
    print("|---|---|---|---|---|")
    for name in args.models:
        model, inputs = MODELS[name]()
        an = analyze(model, inputs)
        cost = fxmemopt.optimize(model, inputs, return_summary=True)[1].cost_graph
        for label, preset in (("default", {}), ('prefer="speed"', {"prefer": "speed"}),
                              ('prefer="memory"', {"prefer": "memory"})):
            opts = resolve_options(**preset)
            counts = []
            for calibrated in (True, False):
                rng = random.Random(0)
                ref = _key(search(disturbed(cost, random.Random(1), 0.0, calibrated), list(an.regions),
                                  dict(an.splits), opts).plan)
                counts.append(sum(_key(search(disturbed(cost, rng, args.sigma, calibrated), list(an.regions),
                                              dict(an.splits), opts).plan) == ref for _ in range(args.draws)))
            print(f"| {name} | {label} | {counts[0]}/{args.draws} | {counts[1]}/{args.draws} | |", flush=True)


if __name__ == "__main__":
    main()
