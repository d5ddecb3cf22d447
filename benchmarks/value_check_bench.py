"""What the recompute value check costs: step time with ``recompute_check`` off, sampled and full.

Each reference model of ``speed_check.py`` is optimized once with the default plan; the same module is then timed
with each value-check mode (NOTE [Checkpoint region invariants], Rule 3), modes interleaved round by round, and each
mode's step time is divided by the "off" step measured right before it; the median over rounds is printed with its
spread, and the unoptimized step time for scale. Steadier on a noisy machine: the fingerprints one step takes
(forward and recomputation), each timed again on its own, as a share of the unoptimized step. One torch thread by
default (``--threads``).

    python benchmarks/value_check_bench.py                   # every model, 7 rounds
    python benchmarks/value_check_bench.py --models dcs sew --rounds 11 --markdown
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_check import MODELS, step_time  # noqa: E402

import fxmemopt  # noqa: E402
import fxmemopt.runtime.checkpoint as runtime  # noqa: E402
from fxmemopt.api import set_value_check  # noqa: E402
from fxmemopt.runtime.checkpoint import CheckpointRegion  # noqa: E402

MODES = ("off", "sampled", "full")


def run(key: str, rounds: int) -> dict[str, object]:
    label, build, shape = MODELS[key]
    torch.manual_seed(0)
    model = build()
    x = torch.rand(*shape)
    base = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fxmemopt.optimize(model, (x,))
    regions = sum(isinstance(m, CheckpointRegion) for m in gm.modules())
    ratios: dict[str, list[float]] = {m: [] for m in MODES[1:]}
    plain: list[float] = []
    for mode in MODES:  # warm-up
        set_value_check(gm, mode)
        step_time(gm, x)
    for _ in range(rounds):
        plain.append(step_time(base, x))
        set_value_check(gm, "off")
        off = step_time(gm, x)
        for mode in MODES[1:]:
            set_value_check(gm, mode)
            ratios[mode].append(step_time(gm, x) / off)
            set_value_check(gm, "off")
            off = step_time(gm, x)
    # A steadier figure than the ratio on a noisy machine: the fingerprints one step takes, each timed on its own.
    taken: list[torch.Tensor] = []
    print_of = runtime._print_of

    def counting(t: torch.Tensor, mode: str) -> object:
        taken.append(t.detach())
        return print_of(t, mode)

    runtime._print_of = counting
    try:
        set_value_check(gm, "sampled")
        step_time(gm, x)
    finally:
        runtime._print_of = print_of
    cost = {}
    for mode in MODES[1:]:
        t0 = time.perf_counter()
        for t in taken:
            print_of(t, mode)
        cost[mode] = time.perf_counter() - t0
    step = statistics.median(plain)
    return {"model": label, "regions": regions, "unoptimized_ms": 1e3 * step, "prints": len(taken),
            **{m: (statistics.median(r), min(r), max(r)) for m, r in ratios.items()},
            **{f"{m}_ms": 1e3 * c for m, c in cost.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [run(k, args.rounds) for k in args.models]
    head = ["model", "regions", "unoptimized step", "sampled / off", "full / off", "fingerprints per step",
            "their time, sampled", "full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if args.markdown else ["  ".join(head)]
    for r in rows:
        cells = [str(r["model"]), str(r["regions"]), f"{r['unoptimized_ms']:.0f} ms",
                 *(f"{r[m][0]:.3f} ({r[m][1]:.3f}-{r[m][2]:.3f})" for m in MODES[1:]), str(r["prints"]),
                 *(f"{r[f'{m}_ms']:.1f} ms ({100 * r[f'{m}_ms'] / r['unoptimized_ms']:.1f}%)" for m in MODES[1:])]
        lines.append("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells))
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds, median (min-max)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
