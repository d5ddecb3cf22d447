"""Measure fxmemopt on research SNN code copied unchanged from the official repositories.

Usage:  cd benchmarks/research && ./fetch_repos.sh
        PYTHONPATH=shims:_deps python run_model.py MODEL [--presets default,memory]
MODEL in: spikformer qkformer sdt resformer sewresnet
Writes out/MODEL.json, out/MODEL.<preset>.explain.txt, out/MODEL.log (stdout).
"""
import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from functools import partial

import torch
import torch.nn as nn

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sjshim  # noqa: E402, F401, I001  registers spikingjelly.clock_driven / .cext first (see its docstring)
from spikingjelly.activation_based import functional as sjf  # noqa: E402

import fxmemopt  # noqa: E402

SEED = 0
OUT = os.path.join(HERE, "out")
os.makedirs(OUT, exist_ok=True)


def load(repo, relpath, modname, extra_path=None):
    if extra_path:
        sys.path.insert(0, os.path.join(HERE, "repos", repo, extra_path))
    spec = importlib.util.spec_from_file_location(modname, os.path.join(HERE, "repos", repo, relpath))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


def cifar_images(batch):
    # what the repos' CIFAR10 loaders give the model: normalized float images [B, 3, 32, 32]
    g = torch.Generator().manual_seed(1234)
    return (torch.randn(batch, 3, 32, 32, generator=g),)


# ---- builders: fresh model from the repos' own constructors, small sizes through constructor args ----
def spec_spikformer():
    m = load("ZK-Zhou+spikformer", "cifar10/model.py", "spikformer_cifar10_model")
    size = dict(img_size_h=32, img_size_w=32, patch_size=4, embed_dims=128, num_heads=8, mlp_ratios=4,
                in_channels=3, num_classes=10, qkv_bias=False, depths=2, sr_ratios=1, T=4)
    def build():  # as train.py's create_model
        return m.Spikformer(norm_layer=partial(nn.LayerNorm, eps=1e-6), **size)
    return build, lambda: cifar_images(4), "T=4 B=4 32x32x3, embed 128, heads 8, depth 2"


def spec_qkformer():
    m = load("zhouchenlin2096+QKFormer", "cifar10/model.py", "qkformer_cifar10_model")
    size = dict(img_size_h=32, img_size_w=32, patch_size=4, embed_dims=128, num_heads=8, mlp_ratios=4,
                in_channels=3, num_classes=10, qkv_bias=False, depths=3, sr_ratios=1, T=4)
    def build():
        return m.spiking_transformer(norm_layer=partial(nn.LayerNorm, eps=1e-6), **size)
    return build, lambda: cifar_images(4), "T=4 B=4 32x32x3, embed 128, depths 3 (1+1+1 blocks)"


def spec_sdt():
    repo = "BICLab+Spike-Driven-Transformer"
    sys.path.insert(0, os.path.join(HERE, "repos", repo))
    import model.spikeformer as m  # the repo's own package layout (`from module import *`)
    # conf/cifar10/2_256_300E_t4.yml at a smaller dim: pooling_stat 0011, lif, T=4, 2 layers
    size = dict(T=4, num_heads=8, num_classes=10, pooling_stat="0011", img_size_h=32, img_size_w=32,
                patch_size=4, embed_dims=128, mlp_ratios=4, in_channels=3, qkv_bias=False, depths=2,
                sr_ratios=1, spike_mode="lif", dvs_mode=False, TET=False)
    def build():
        return m.SpikeDrivenTransformer(**size)
    return build, lambda: cifar_images(4), "T=4 B=4 32x32x3, embed 128, heads 8, depth 2"


def spec_resformer():
    repo = "xyshi2000+SpikingResformer"
    sys.path.insert(0, os.path.join(HERE, "repos", repo))
    from models.spikingresformer import SpikingResformer
    from models.submodules.layers import BN
    from spikingjelly.activation_based import layer

    def build():
        # spikingresformer_cifar's layout (3x3 conv prologue, DSSA+GWFFN stages), 2 stages at small width
        net = SpikingResformer([["DSSA", "GWFFN"], ["DSSA", "GWFFN"]], [32, 64], [1, 2], [4, 2], img_size=32, T=4,
                               in_channels=3, num_classes=10,
                               prologue=nn.Sequential(layer.Conv2d(3, 32, 3, 1, 1, bias=False, step_mode="m"),
                                                      BN(32)),
                               group_size=32)
        # the repo passes backend='cupy': sjshim makes spikingjelly 2.0.0 accept and drop it (torch path runs)
        return net
    return build, lambda: cifar_images(4), "T=4 B=4 32x32x3, planes [32,64], heads [1,2], patch [4,2]"


def spec_sewresnet():
    m = load("fangwei123456+Spike-Element-Wise-ResNet", "dvsgesture/smodels.py", "sew_dvsgesture_smodels")
    T, N = 8, 2

    def inputs():
        # DVS128 Gesture frames as train.py gives them: [N, T, 2, 128, 128] float event counts (split_by='number').
        # ResNetN sizes its Linear from a 128x128 dummy, so 128x128 is the only resolution the model accepts.
        g = torch.Generator().manual_seed(1234)
        events = (torch.rand(N, T, 2, 128, 128, generator=g) < 0.05).float()
        counts = torch.randint(1, 4, (N, T, 2, 128, 128), generator=g).float()
        return (events * counts,)
    return ((lambda: m.SEWResNet("ADD")), inputs,
            f"T={T} N={N} 2x128x128 event counts, official SEWResNet('ADD') (7x32ch)")


SPECS = dict(spikformer=spec_spikformer, qkformer=spec_qkformer, sdt=spec_sdt, resformer=spec_resformer,
             sewresnet=spec_sewresnet)
PRESETS = {"default": {}, "memory": {"prefer": "memory"}}


def fresh(build):
    torch.manual_seed(SEED)
    net = build()
    net.train()
    return net


def leave_one_out(s):
    """For every kept region: the cost model's predicted peak and step time of the same plan without it.
    A region pays for itself on memory when leaving it out raises the predicted peak (d_peak > 0)."""
    from fxmemopt.planning.costgraph import simulate
    from fxmemopt.planning.plan import Plan
    if s.cost_graph is None:
        return None
    base = simulate(s.cost_graph, s.plan)
    out = dict(plan_peak=base.peak_bytes, plan_time_s=base.step_time_s, peak_at=base.peak_at, regions={})
    for rp in s.plan.regions:
        alt = simulate(s.cost_graph, Plan(tuple(r for r in s.plan.regions if r.name != rp.name)))
        out["regions"][rp.name] = dict(chunks=rp.chunks, recompute=rp.recompute,
                                       d_peak=alt.peak_bytes - base.peak_bytes,
                                       d_peak_pct=100.0 * (alt.peak_bytes - base.peak_bytes) / base.peak_bytes,
                                       d_time_pct=100.0 * (alt.step_time_s - base.step_time_s) / base.step_time_s)
    return out


def tb(e):
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=sorted(SPECS))
    ap.add_argument("--presets", default="default,memory")
    args = ap.parse_args()
    build, make_inputs, size = SPECS[args.model]()
    inputs = make_inputs()
    res = dict(model=args.model, size=size, torch=torch.__version__, presets={})

    model = fresh(build)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    res.update(param_bytes=params, buffer_bytes=buffers,
               input_bytes=sum(x.numel() * x.element_size() for x in inputs))
    t0 = time.perf_counter()
    m0 = fxmemopt.measure_step(model, inputs, repeats=0)
    res["unopt_peak"] = m0.peak_bytes
    res["unopt_method"] = m0.method
    res["unopt_measure_s"] = time.perf_counter() - t0
    # where parameter gradients are counted: measure_step sets p.grad=None before the tracked step, so the
    # gradients are allocated during the step and fall inside the tracker peak (not in summary.resident).
    print(f"[{args.model}] {size}: params {params/2**20:.2f} MiB, unoptimized peak {m0.peak_bytes/2**20:.2f} MiB "
          f"({res['unopt_measure_s']:.1f}s)", flush=True)

    for name in args.presets.split(","):
        kw = PRESETS[name]
        r = res["presets"][name] = dict(kwargs=kw)
        model = fresh(build)
        sd_before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            t0 = time.perf_counter()
            gm, s = fxmemopt.optimize(model, inputs, return_summary=True, **kw)
            r["optimize_s"] = time.perf_counter() - t0
        except Exception as e:  # a failure of fxmemopt is a finding: record it, do not work around it
            r["error"] = tb(e)
            print(f"[{args.model}/{name}] optimize FAILED:\n{r['error']}", flush=True)
            continue
        # did optimize leave the caller's parameters/buffers as they were?
        sd_after = model.state_dict()
        r["state_dict_changed"] = [k for k, v in sd_before.items() if not torch.equal(v, sd_after[k])]
        r["regions"] = len(s.regions)
        r["predicted_before"] = s.predicted_peak_before
        r["predicted_after"] = s.predicted_peak_after
        r["predicted_step_time_ratio"] = s.predicted_step_time_ratio
        r["checked_peak_before"] = s.checked_peak_before
        r["checked_peak_after"] = s.checked_peak_after
        r["resident"] = dict(s.resident)
        r["whole_step_peaks"] = s.whole_step_peaks
        r["recording"] = str(s.recording)
        r["notes"] = [str(n) for n in s.notes]
        r["failed_regions"] = str(getattr(s, "failed_regions", ""))
        r["leaf_fallbacks"] = [str(x) for x in s.leaf_fallbacks]
        r["stateful_modules"] = {k: str(v) for k, v in s.stateful_modules.items()}
        r["decisions"] = [str(d) for d in s.decisions]
        r["explain_regions"] = [dict(name=rr.name, anchor=rr.anchor) for rr in s.regions]
        r["leave_one_out"] = leave_one_out(s)
        try:
            ex = str(fxmemopt.explain(gm))
        except Exception as e:
            ex = "explain FAILED:\n" + tb(e)
            r["explain_error"] = tb(e)
        with open(os.path.join(OUT, f"{args.model}.{name}.explain.txt"), "w") as f:
            f.write(ex + "\n\n# summary\n" + str(s) + "\n")
        try:
            t0 = time.perf_counter()
            m1 = fxmemopt.measure_step(gm, inputs, repeats=0)
            r["measured_peak"] = m1.peak_bytes
            r["measure_s"] = time.perf_counter() - t0
        except Exception as e:
            r["measure_error"] = tb(e)
            print(f"[{args.model}/{name}] measure_step(gm) FAILED:\n{r['measure_error']}", flush=True)
        try:
            ref = fresh(build)
            for net in (ref, gm):
                sjf.reset_net(net)  # as the repos' train loops do between steps
                for p in net.parameters():
                    p.grad = None
            rep = fxmemopt.compare_training_step(ref, gm, inputs)
            r["exact"] = rep.ok
            r["exact_detail"] = str(rep)[:2000]
            r["max_grad_diff"] = rep.max_grad_diff
        except Exception as e:
            r["compare_error"] = tb(e)
            print(f"[{args.model}/{name}] compare_training_step FAILED:\n{r['compare_error']}", flush=True)
        if "measured_peak" in r and r["predicted_after"]:
            r["pred_err_pct"] = 100.0 * (r["predicted_after"] - r["measured_peak"]) / r["measured_peak"]
            res_b = sum(r["resident"].values())
            r["whole_measured"] = (res["unopt_peak"] + res_b, r["measured_peak"] + res_b)
            if r["whole_step_peaks"]:
                r["whole_err_pct"] = [100.0 * (p - m) / m for p, m in zip(r["whole_step_peaks"], r["whole_measured"])]
        r["unopt_pred_err_pct"] = (100.0 * (r["predicted_before"] - res["unopt_peak"]) / res["unopt_peak"]
                                   if r["predicted_before"] else None)
        print(f"[{args.model}/{name}] regions {r['regions']}, optimize {r['optimize_s']:.1f}s, measured "
              f"{r.get('measured_peak', 0)/2**20:.2f} MiB, predicted {(r['predicted_after'] or 0)/2**20:.2f} MiB "
              f"({r.get('pred_err_pct', float('nan')):+.1f}%), exact {r.get('exact')}", flush=True)
        del gm, s, model
    with open(os.path.join(OUT, f"{args.model}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
