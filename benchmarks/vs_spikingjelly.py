"""fxmemopt vs spikingjelly 2.0.0 ``memopt.optimize_memory`` on the reference models, on CPU.

Both tools optimize the *same* models built with spikingjelly's own multi-step ``LIFNode`` (so spikingjelly's
checkpointing handles neuron state the way it was written to). Peaks are measured the same way for both: the CPU
live-storage tracker (:func:`fxmemopt.measure_step`).

SUBSTITUTION (said in the output too): spikingjelly's levels 2-4 measure candidates with
``torch.cuda.max_memory_allocated`` and time them with CUDA events, and raise without CUDA. Here its
``_measure_peak`` is replaced by the same CPU tracker and its ``_forward_costs`` by wall-clock hooks; everything
else in its search runs unchanged. It is given its best chance: blocks as ``targets``, ``split_fn`` = a block's
children (level 2), ``can_chunk`` = always (level 3; its chunking also slices BatchNorm, which changes results:
fxmemopt never does). Its best level is the one with the lowest measured peak.

    pip install --no-deps spikingjelly==2.0.0 && pip install loguru numpy packaging tqdm scipy h5py
    python benchmarks/vs_spikingjelly.py [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import torch

import fxmemopt
from fxmemopt.snn import DeepConvSNN, SEWResNet18, Spikformer, SpikingVGG11
from fxmemopt.snn.models import ConvBNNeuron, SEWBasicBlock, SpikformerBlock, SpikformerPatchEmbed
from fxmemopt.tools.bench import patch_sj_for_cpu, with_sj_neurons


def _sj():
    try:
        from spikingjelly.activation_based import memopt
    except ImportError as e:  # pragma: no cover - optional
        raise SystemExit("spikingjelly is not installed: pip install --no-deps spikingjelly==2.0.0 && "
                         "pip install loguru numpy packaging tqdm scipy h5py") from e
    return memopt


WORKLOADS = {
    "SpikingVGG11(width 0.25) T=10 N=4 48x48": (lambda: SpikingVGG11(width=0.25), (10, 4, 2, 48, 48),
                                                (ConvBNNeuron,)),
    "SEWResNet18(width 0.25) T=4 N=4 64x64": (lambda: SEWResNet18(width=0.25), (4, 4, 3, 64, 64),
                                              (ConvBNNeuron, SEWBasicBlock)),
    "Spikformer(dim 64, depth 2) T=4 N=4 32x32": (lambda: Spikformer(embed_dim=64, num_heads=4, depth=2),
                                                  (4, 4, 3, 32, 32), (SpikformerPatchEmbed, SpikformerBlock)),
    "DeepConvSNN(16 blocks, 32 ch) T=8 N=8 32x32": (lambda: DeepConvSNN(num_blocks=16, channels=32),
                                                    (8, 8, 3, 32, 32), (ConvBNNeuron,)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    args = p.parse_args()
    memopt = _sj()
    patch_sj_for_cpu()
    warnings.filterwarnings("ignore")
    print("spikingjelly 2.0.0 optimize_memory levels 2-4 measured with the CPU storage tracker instead of CUDA "
          "(see this file's docstring)")
    print("| workload | unoptimized | spikingjelly best (level) | fxmemopt prefer=\"memory\" | fxmemopt vs sj |")
    print("|---|---|---|---|---|")
    rows = []
    for name, (factory, shape, targets) in WORKLOADS.items():
        torch.manual_seed(0)
        model = with_sj_neurons(factory())
        x = torch.rand(shape)
        base = fxmemopt.measure_step(model, (x,), repeats=0).peak_bytes
        sj = {}
        for level in (1, 2, 3, 4):
            m = copy.deepcopy(model)
            try:
                memopt.optimize_memory(m, targets, lambda mm, x=x: mm(x), level=level, checkpoint_budget="memory",
                                       compress=True, split_fn=lambda mod: list(mod.children()),
                                       can_chunk=lambda leaf: True)
                sj[level] = fxmemopt.measure_step(m, (x,), repeats=0).peak_bytes
            except Exception as e:  # record, keep going: the comparison reports what ran
                sj[level] = f"{type(e).__name__}: {str(e)[:60]}"
        ok = {lv: v for lv, v in sj.items() if isinstance(v, int)}
        best_level = min(ok, key=ok.get) if ok else None
        gm = fxmemopt.optimize(copy.deepcopy(model), (x,), prefer="memory")
        ours = fxmemopt.measure_step(gm, (x,), repeats=0).peak_bytes
        mib = 2**20
        sj_text = f"{ok[best_level] / mib:.1f} MiB (level {best_level})" if ok else "failed"
        ratio = f"{ok[best_level] / ours:.2f}x lower" if ok else "n/a"
        print(f"| {name} | {base / mib:.1f} MiB | {sj_text} | {ours / mib:.1f} MiB | {ratio} |", flush=True)
        rows.append({"workload": name, "unoptimized": base, "spikingjelly": sj, "fxmemopt": ours})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)


if __name__ == "__main__":
    main()
