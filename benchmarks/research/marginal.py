"""Measured check of the kept regions the cost model says pay for themselves by less than 1% of the predicted peak.

Usage: cd benchmarks/research && PYTHONPATH=shims:_deps python marginal.py MODEL PRESET
For each kept region with a predicted leave-one-out gain under 1% (from out/MODEL.json), applies the plan
without that region (optimize(..., plan=...): no search) and measures the step's peak with measure_step.
Writes out/MODEL.PRESET.marginal.json.
"""
import dataclasses
import json
import os
import sys
import warnings

import run_model as rm  # sets threads, shims

import fxmemopt

warnings.simplefilter("ignore")
model_name, preset = sys.argv[1], sys.argv[2]
res = json.load(open(os.path.join(rm.OUT, f"{model_name}.json")))
loo = res["presets"][preset]["leave_one_out"]["regions"]
marginal = [n for n, d in loo.items() if d["d_peak_pct"] < 1.0]
build, make_inputs, _ = rm.SPECS[model_name]()
inputs = make_inputs()
model = rm.fresh(build)
gm, s = fxmemopt.optimize(model, inputs, return_summary=True, **rm.PRESETS[preset])
full = fxmemopt.measure_step(gm, inputs, repeats=3, warmup=1)
out = dict(model=model_name, preset=preset, full_peak=full.peak_bytes, full_time_s=full.step_time_s, regions={})
for name in marginal:
    plan = dataclasses.replace(s.plan, regions=tuple(r for r in s.plan.regions if r.name != name))
    g2 = fxmemopt.optimize(rm.fresh(build), inputs, plan=plan)
    m2 = fxmemopt.measure_step(g2, inputs, repeats=3, warmup=1)
    out["regions"][name] = dict(predicted_d_peak=loo[name]["d_peak"], predicted_d_time_pct=loo[name]["d_time_pct"],
                                measured_peak_without=m2.peak_bytes, measured_d_peak=m2.peak_bytes - full.peak_bytes,
                                measured_time_without_s=m2.step_time_s)
    print(f"{model_name}/{preset} without {name}: measured peak {full.peak_bytes/2**20:.3f} -> "
          f"{m2.peak_bytes/2**20:.3f} MiB (d {(m2.peak_bytes-full.peak_bytes)/2**10:+.0f} KiB; predicted "
          f"{loo[name]['d_peak']/2**10:+.0f} KiB), step {full.step_time_s*1e3:.0f} -> {m2.step_time_s*1e3:.0f} ms",
          flush=True)
json.dump(out, open(os.path.join(rm.OUT, f"{model_name}.{preset}.marginal.json"), "w"), indent=1)
