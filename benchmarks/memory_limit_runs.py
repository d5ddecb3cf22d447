"""Memory-limit runs at issue 27's sizes (docs/benchmarks.md, "When the step does not fit"): the unoptimized step,
then the default, ``prefer="memory"`` and ``memory_budget`` inside an RLIMIT_AS child (``tests/memlimit_child.py``),
each compared bitwise with the unoptimized step computed outside the limit.

    python benchmarks/memory_limit_runs.py sew      # spikingjelly sew_resnet18, T=4, N=80, 64x64, 750 MiB headroom
    python benchmarks/memory_limit_runs.py deep16   # DeepConvSNN 16 x 32, T=8, N=16, 820 MiB headroom
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from memlimit_child import build, reset  # noqa: E402
from test_memory_limit import _run, _same_step  # noqa: E402

import fxmemopt  # noqa: E402

MiB = 2**20
CASES = {"sew": (dict(model="sew_resnet18", T=4, N=80, hw=64), 750 * MiB, 600 * MiB),
         "deep16": (dict(model="deepconv", blocks=16, channels=32, T=8, N=16, hw=32), 820 * MiB, 200 * MiB)}


def main(which: str) -> None:
    cfg, headroom, budget = CASES[which]
    model, x = build(cfg)
    peak = fxmemopt.measure_step(model, (x,), repeats=0, warmup=0).peak_bytes
    reset(model)
    y = model(x)
    y.sum().backward()
    ref = {"peak": peak, "y": y.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
           "buffers": {n: b.clone() for n, b in model.named_buffers()}}
    print(f"{which}: unoptimized peak {peak / MiB:.1f} MiB; headroom {headroom / MiB:.0f} MiB", flush=True)
    del model, y
    tmp = Path("/tmp/memory_limit_runs")
    tmp.mkdir(exist_ok=True)
    out = _run(dict(cfg, headroom=headroom, what="unoptimized"), tmp)
    print("unoptimized inside the limit:", out.get("error", "ok")[:100], flush=True)
    for kwargs in ({}, {"prefer": "memory"}, {"memory_budget": budget}):
        save = tmp / "step.pt"
        out = _run(dict(cfg, headroom=headroom, what="optimize", kwargs=kwargs, save=str(save)), tmp)
        if "error" in out:
            print(kwargs, "ERROR", out["error"], flush=True)
            continue
        try:
            _same_step(torch.load(save), ref)
            same = "bitwise"
        except AssertionError as e:
            same = f"DIFFERS {e}"
        m, p = out["measured_peak_after"], out["predicted_peak_after"]
        print(f"{kwargs}: optimize {out['optimize_s']:.0f} s, {out['regions']} regions, predicted {p / MiB:.1f} "
              f"measured {m / MiB:.1f} MiB ({p / m - 1:+.1%}), {same}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sew")
