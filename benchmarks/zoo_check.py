"""Run fxmemopt over every model of spikingjelly's zoo (``tests/sj_zoo.py``) and print one line per model and preset.

For each ZOO entry (or the names given): build it, check that the unoptimized model trains (one measured step:
its peak and step time are the baseline), then for each preset (default, ``prefer="memory"``) optimize a copy with
``fxmemopt.optimize(..., return_summary=True)``, reset neuron states (``functional.reset_net``) on the optimized
module and on an untouched copy, compare one training step of the two (``fxmemopt.compare_training_step``) and
measure the optimized module's peak. Exceptions are caught per model and stage so that the script always finishes.

    python benchmarks/zoo_check.py                      # every model
    python benchmarks/zoo_check.py sew_resnet18 qkformer
    python benchmarks/zoo_check.py --list

Columns: model, preset, state (OK / FAIL: the comparison found differences / ERROR: an exception), number of
checkpoint regions, optimize time, check time (compare_training_step; for the unoptimized row, its measured step),
peak of one training step unoptimized and optimized (fxmemopt.measure_step) and their ratio, then the error:
``[stage] exception type: first line of its message``, or the first mismatch of the comparison.

``--sj`` adds spikingjelly 2.0.0's own optimizer (``memopt.optimize_memory``, levels 1-4) on the same model, its
peak measured the same way. SUBSTITUTION (as in ``benchmarks/vs_spikingjelly.py``): its levels 2-4 measure with
CUDA only, so its measuring is replaced by the CPU storage tracker. It is given its best chance: ``targets`` are the
classes of the modules that hold a neuron as a direct child (each model's blocks), ``split_fn`` their children
(level 2), ``can_chunk`` always (level 3; it then also slices BatchNorm in time, which changes results: fxmemopt
never does). Its best level is the one with the lowest peak. ``--time N`` adds each preset's step-time ratio to
the unoptimized model (median of N interleaved pairs, one torch thread unless ``--threads``). ``--markdown`` prints
the README's "Works with" rows at the end (with ``--batch``, docs/benchmarks.md's training-batch table instead).

``--batch N`` runs every model at batch N instead of the tests' 2; ``--batch train`` at the batch its paper's
training recipe uses per device (``TRAIN_BATCH``): the inputs are drawn again at that batch, of the same kind
(binary spikes at the same rate, or uniform [0, 1) values), the model and its widths unchanged. The tests' sizes are
dominated by parameter gradients; at training batches the activations are most of the peak, as on a real run::

    python benchmarks/zoo_check.py --sj --batch train --markdown
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import sj_zoo  # noqa: E402
from spikingjelly.activation_based import functional  # noqa: E402

import fxmemopt  # noqa: E402

PRESETS: dict[str, dict] = {"default": {}, "memory": {"prefer": "memory"}}

#: Per-device batch of each model's training recipe (its paper or repository), at the zoo's resolutions: ImageNet
#: ResNets/VGGs 32 (SEW-ResNet), the Parametric-LIF nets 16 (their scripts' ``-b 16``), the CIFAR transformers and
#: MS-ResNets 64, the DVS nets 16; spike_dhs 8 (its fixed 576-channel head makes a CPU step slow).
TRAIN_BATCH: dict[str, int] = {
    "sew_resnet18": 32, "sew_resnet_bottleneck_iand": 32, "spiking_resnet18": 32, "spiking_vgg11_bn": 32,
    "spiking_vgg11": 32, "ottt_spiking_vggws": 128, "plif_mnist": 16, "plif_fashion_mnist": 16, "plif_nmnist": 16,
    "plif_cifar10": 16, "plif_cifar10_dvs": 16, "plif_dvs_gesture": 16, "ms_resnet18": 64, "ms_resnet34": 64,
    "max_resnet18": 64, "att_ms_resnet18": 64, "masnn_dvs128_gesture": 16, "spikformer_cifar": 64,
    "spikformer_imagenet": 32, "qkformer": 64, "spike_driven_transformer": 64, "maxformer": 64,
    "maxformer_cifar": 64, "spike_dhs": 8,
}


def at_batch(inputs: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    """``inputs`` drawn again at batch ``n`` (dim 1 of ``[T, N, ...]`` sequences, dim 0 of ``[N, C, H, W]`` images):
    binary spikes at the same firing rate, other values uniform in [0, 1) as the zoo draws them; seeded."""
    torch.manual_seed(0)
    out = []
    for x in inputs:
        dim = 1 if x.dim() == 5 else 0
        shape = list(x.shape)
        shape[dim] = n
        binary = bool(((x == 0) | (x == 1)).all())
        out.append((torch.rand(shape) < x.float().mean()).to(x.dtype) if binary else torch.rand(shape, dtype=x.dtype))
    return tuple(out)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _peak(module: torch.nn.Module, inputs, repeats: int) -> int:
    functional.reset_net(module)
    return fxmemopt.measure_step(module, inputs, repeats=repeats, warmup=1).peak_bytes


def _row(name: str, preset: str, status: str, regions="-", t_opt="-", t_cmp="-", base=None, peak=None,
         err: str = "") -> str:
    ratio = f"{peak / base:.3f}" if base and peak is not None else "-"
    return (f"{name:28s} {preset:11s} {status:5s} {regions!s:>7s} {t_opt!s:>8s} {t_cmp!s:>8s} "
            f"{_mib(base):>9s} {_mib(peak):>9s} {ratio:>6s}  {err}")


def sj_targets(model: torch.nn.Module) -> tuple[type, ...]:
    """The classes of the modules (not the root) that hold a spikingjelly neuron as a direct child: its blocks."""
    from spikingjelly.activation_based import neuron

    return tuple({type(m) for name, m in model.named_modules() if name and not isinstance(m, neuron.BaseNode)
                  and any(isinstance(c, neuron.BaseNode) for c in m.children())})


def sj_levels(pristine: torch.nn.Module, inputs, repeats: int) -> dict[int, dict | str]:
    """spikingjelly's ``optimize_memory`` at levels 1-4 (see the module docstring): level -> ``{"peak", "exact",
    "diff"}`` (its measured peak; whether one training step is bitwise equal to the unoptimized model's, checked
    with ``fxmemopt.compare_training_step``; the largest gradient difference), or the error."""
    from spikingjelly.activation_based.memopt import pipeline

    from fxmemopt.tools.bench import patch_sj_for_cpu

    patch_sj_for_cpu()
    targets = sj_targets(pristine)
    out: dict[int, dict | str] = {}
    for level in (1, 2, 3, 4):
        m = copy.deepcopy(pristine)
        try:
            functional.reset_net(m)
            names = _names_by_id(m)  # its wrappers rename parameters: compare them by identity
            pipeline.optimize_memory(m, targets, lambda mm: mm(*inputs), level=level, checkpoint_budget="memory",
                                     compress=True, split_fn=lambda mod: list(mod.children()),
                                     can_chunk=lambda leaf: True)
            reference = copy.deepcopy(pristine)
            functional.reset_net(reference)
            functional.reset_net(m)
            exact, diff = _same_step(reference, m, names, inputs)
            out[level] = {"peak": _peak(m, inputs, repeats), "exact": exact, "diff": diff}
        except Exception as e:  # recorded, not raised: the table says what ran
            out[level] = _first_line(e)
    return out


def _names_by_id(module: torch.nn.Module) -> dict[int, str]:
    """id -> name of every parameter, buffer and neuron (by its own module path) of ``module``."""
    from spikingjelly.activation_based import neuron

    named = {id(p): n for n, p in module.named_parameters()}
    named.update({id(b): n for n, b in module.named_buffers()})
    named.update({id(m): n for n, m in module.named_modules() if isinstance(m, neuron.BaseNode)})
    return named


def _same_step(reference: torch.nn.Module, candidate: torch.nn.Module, names: dict[int, str],
               inputs) -> tuple[bool, float]:
    """One training step of each from the same seed: (bitwise equal outputs, input and parameter gradients,
    buffers and neuron states; the largest gradient difference). ``names`` maps the candidate's objects to the
    names they had before spikingjelly wrapped them (``compare_training_step`` matches by name)."""
    from spikingjelly.activation_based import neuron

    runs = []
    for module, rename in ((reference, None), (candidate, names)):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        torch.manual_seed(0)
        out = module(*xs)
        fxmemopt.profiling.measure.default_loss(out).backward()

        def key(obj, name, rename=rename):
            return rename.get(id(obj), name) if rename else name

        got = {f"in{k}": x.grad for k, x in enumerate(xs)}
        got |= {f"out{k}": t.detach() for k, t in enumerate(torch.utils._pytree.tree_leaves(out))}
        got |= {"grad:" + key(p, n): p.grad for n, p in module.named_parameters()}
        got |= {"buf:" + key(b, n): b for n, b in module.named_buffers()}
        got |= {"v:" + key(mm, n): mm.v for n, mm in module.named_modules()
                if isinstance(mm, neuron.BaseNode) and isinstance(getattr(mm, "v", None), torch.Tensor)}
        runs.append(got)
    ref, cand = runs
    exact, diff = set(ref) == set(cand), 0.0
    for k in ref.keys() & cand.keys():
        a, b = ref[k], cand[k]
        if a is None or b is None or a.shape != b.shape:
            exact = exact and a is None and b is None
            continue
        exact = exact and torch.equal(a, b)
        if k.startswith(("grad:", "in")):
            diff = max(diff, (a.double() - b.double()).abs().max().item())
    return exact, diff


def _sj_text(level: int, v: dict | str) -> str:
    if isinstance(v, str):
        return f"L{level} {v}"
    return f"L{level} {_mib(v['peak'])}" + ("" if v["exact"] else f" (not exact, grad diff {v['diff']:.2g})")


def check(name: str, presets: list[str], repeats: int, verbose: bool, sj: bool = False,
          time_pairs: int = 0, batch: int | None = None) -> list[dict]:
    """Check one ZOO entry; print and return one result per preset (and one for the unoptimized baseline)."""
    results = []

    def emit(preset, status, **kw):
        shown = {k: v for k, v in kw.items() if k in ("regions", "t_opt", "t_cmp", "base", "peak", "err")}
        print(_row(name, preset, status, **shown), flush=True)
        results.append({"model": name, "preset": preset, "status": status, "batch": batch, **kw})

    try:
        torch.manual_seed(0)
        model, inputs = sj_zoo.ZOO[name]()
        if batch is not None:
            inputs = at_batch(inputs, batch)
        pristine = copy.deepcopy(model)
    except Exception as e:
        emit("build", "ERROR", err=_first_line(e))
        if verbose:
            traceback.print_exc()
        return results
    try:
        t0 = time.perf_counter()
        base = _peak(copy.deepcopy(pristine), inputs, repeats)
        emit("unoptimized", "OK", t_cmp=f"{time.perf_counter() - t0:.2f}s", base=base, peak=base)
    except Exception as e:
        emit("unoptimized", "ERROR", err=_first_line(e))
        if verbose:
            traceback.print_exc()
        return results  # the model itself does not train: nothing to compare against

    for preset in presets:
        regions, t_opt, t_cmp, peak = "-", "-", "-", None
        stage = "optimize"
        try:
            reference = copy.deepcopy(pristine)
            candidate = copy.deepcopy(pristine)
            t0 = time.perf_counter()
            gm, summary = fxmemopt.optimize(candidate, inputs, return_summary=True, **PRESETS[preset])
            t_opt = f"{time.perf_counter() - t0:.2f}s"
            regions = len(summary.regions)
            stage = "compare"
            functional.reset_net(reference)
            functional.reset_net(gm)
            t0 = time.perf_counter()
            report = fxmemopt.compare_training_step(reference, gm, inputs)
            t_cmp = f"{time.perf_counter() - t0:.2f}s"
            stage = "measure"
            peak = _peak(gm, inputs, repeats)
            extra = {}
            if time_pairs:
                stage = "time"
                extra["time_ratio"] = _time_ratio(copy.deepcopy(pristine), gm, inputs, time_pairs)
            if report.ok:
                emit(preset, "OK", regions=regions, t_opt=t_opt, t_cmp=t_cmp, base=base, peak=peak,
                     err=f"time {extra['time_ratio']:.2f}x" if extra else "", **extra)
            else:
                what, detail = report.mismatches[0]
                detail = (str(detail).strip().splitlines() or [""])[0]
                emit(preset, "FAIL", regions=regions, t_opt=t_opt, t_cmp=t_cmp, base=base, peak=peak,
                     err=f"{len(report.mismatches)} of {report.checked} differ, first {what}: {detail}")
        except Exception as e:
            emit(preset, "ERROR", regions=regions, t_opt=t_opt, t_cmp=t_cmp, base=base, peak=peak,
                 err=f"[{stage}] {_first_line(e)}")
            if verbose:
                traceback.print_exc()
    if sj:
        t0 = time.perf_counter()
        levels = sj_levels(pristine, inputs, repeats)
        ok = {lv: v for lv, v in levels.items() if isinstance(v, dict)}
        best = min(ok, key=lambda lv: ok[lv]["peak"]) if ok else None
        exact = {lv: v for lv, v in ok.items() if v["exact"]}
        best_exact = min(exact, key=lambda lv: exact[lv]["peak"]) if exact else None
        text = "; ".join(_sj_text(lv, v) for lv, v in levels.items())
        emit("sj-best", "OK" if ok else "ERROR", t_opt=f"{time.perf_counter() - t0:.2f}s", base=base,
             peak=ok[best]["peak"] if ok else None, err=text, level=best,
             exact=bool(ok) and ok[best]["exact"], diff=ok[best]["diff"] if ok else None,
             exact_level=best_exact, exact_peak=exact[best_exact]["peak"] if exact else None)
    return results


def _time_ratio(base: torch.nn.Module, cand: torch.nn.Module, inputs, pairs: int) -> float:
    """Median of ``pairs`` interleaved step-time ratios, neuron states reset before every step."""
    from fxmemopt.tools.bench import _time_ratio as ratio

    functional.reset_net(base)
    functional.reset_net(cand)
    return ratio(base, cand, inputs, pairs)


def _cell(r: dict | None, base: int) -> str:
    """A measured peak and its reduction against ``base`` (and the step-time ratio where measured), or the state."""
    if not r or r.get("peak") is None or r["status"] != "OK":
        return r["status"] if r else "-"
    t = f", {r['time_ratio']:.2f}x time" if "time_ratio" in r else ""
    return f"{r['peak'] / 2**20:.1f} MiB ({base / r['peak']:.2f}x{t})"


def _by_model(results: list[dict]):
    """``(name, {preset: result}, unoptimized peak)`` per model that trained unoptimized, in the order checked."""
    for name in dict.fromkeys(r["model"] for r in results):
        by = {r["preset"]: r for r in results if r["model"] == name}
        base = by.get("unoptimized", {}).get("base")
        if base:
            yield name, by, base


def markdown(results: list[dict]) -> list[str]:
    """The README's "Works with" rows: model, regions, unoptimized, each preset (and time), spikingjelly's best."""
    rows = []
    for name, by, base in _by_model(results):
        sj = by.get("sj-best")
        sj_cell = "-"
        if sj and sj.get("level"):
            sj_cell = f"{_cell(sj, base)} level {sj['level']}"
            if not sj["exact"]:  # its lowest peak changes the training step: say so, and give its best exact one
                sj_cell += f", not exact (gradients differ by up to {sj['diff']:.1g})"
                if sj.get("exact_level"):
                    sj_cell += (f"; exact: {sj['exact_peak'] / 2**20:.1f} MiB ({base / sj['exact_peak']:.2f}x) "
                                f"level {sj['exact_level']}")
        regions = by.get("default", {}).get("regions", "-")
        rows.append(f"| spikingjelly `{name}` | {regions} | {base / 2**20:.1f} MiB | "
                    f"{_cell(by.get('default'), base)} | {_cell(by.get('memory'), base)} | {sj_cell} |")
    return rows


#: below this, a ratio to spikingjelly's best is printed in bold (issue 28's target: at least 1.2x below it)
TARGET_VS_SJ = 1.2


def _level_text(v: tuple | None) -> str:
    """``(peak, level, exact)`` of a spikingjelly level as a table cell."""
    return "-" if v is None else f"{v[0] / 2**20:.1f} MiB L{v[1]}" + ("" if v[2] else " (not exact)")


def _vs_text(v: tuple | None, ours: int | None) -> str:
    """spikingjelly's peak over ours, bold below :data:`TARGET_VS_SJ`."""
    if v is None or not ours:
        return "-"
    ratio = v[0] / ours
    return f"{ratio:.2f}x" if ratio >= TARGET_VS_SJ else f"**{ratio:.2f}x**"


def batch_markdown(results: list[dict]) -> list[str]:
    """docs/benchmarks.md's training-batch table, header first: model, batch, unoptimized, each preset,
    spikingjelly's best level and its best exact one, then spikingjelly's best over ``prefer="memory"``'s peak and
    the same for its best exact level (bold below :data:`TARGET_VS_SJ`)."""
    rows = ["| model | batch | unoptimized | default | `prefer=\"memory\"` | spikingjelly best | its best exact | "
            "vs best / best exact |", "|---|---|---|---|---|---|---|---|"]
    for name, by, base in _by_model(results):
        sj, memory = by.get("sj-best") or {}, by.get("memory") or {}
        ours = memory.get("peak") if memory.get("status") == "OK" else None
        best = (sj["peak"], sj["level"], sj["exact"]) if sj.get("level") else None
        exact = (sj["exact_peak"], sj["exact_level"], True) if sj.get("exact_level") else None
        rows.append(f"| `{name}` | {by['unoptimized'].get('batch') or '-'} | {base / 2**20:.1f} MiB | "
                    f"{_cell(by.get('default'), base)} | {_cell(by.get('memory'), base)} | {_level_text(best)} | "
                    f"{_level_text(exact)} | {_vs_text(best, ours)} / {_vs_text(exact, ours)} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="ZOO entries to check (default: all)")
    p.add_argument("--list", action="store_true", help="list the ZOO entries and exit")
    p.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated, of {', '.join(PRESETS)}")
    p.add_argument("--repeats", type=int, default=1, help="measured steps per measure_step (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--warnings", action="store_true", help="show warnings (hidden by default)")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks")
    p.add_argument("--sj", action="store_true", help="also spikingjelly's optimize_memory, levels 1-4 (its best)")
    p.add_argument("--time", type=int, default=0, metavar="N", help="step-time ratios, median of N interleaved pairs")
    p.add_argument("--markdown", action="store_true", help="print the README table rows at the end")
    p.add_argument("--batch", default=None, help="batch size for every model, or 'train' for TRAIN_BATCH")
    args = p.parse_args(argv)
    if args.batch not in (None, "train") and not (args.batch.isdigit() and int(args.batch) > 0):
        p.error(f"--batch takes a positive integer or 'train', got {args.batch!r}")

    if args.list:
        for name, factory in sj_zoo.ZOO.items():
            print(f"{name:28s} {(factory.__doc__ or '').strip().splitlines()[0]}")
        return 0
    unknown = [n for n in args.names if n not in sj_zoo.ZOO]
    if unknown:
        p.error(f"unknown model(s) {unknown}; see --list")
    presets = [s for s in args.presets.split(",") if s]
    if bad := [s for s in presets if s not in PRESETS]:
        p.error(f"unknown preset(s) {bad}")
    if args.threads or args.time:
        torch.set_num_threads(args.threads or 1)
    if not args.warnings:
        warnings.filterwarnings("ignore")

    print(f"{'model':28s} {'preset':11s} {'state':5s} {'regions':>7s} {'optimize':>8s} {'check':>8s} "
          f"{'base MiB':>9s} {'opt MiB':>9s} {'ratio':>6s}  error")
    results = []
    t0 = time.perf_counter()
    for name in args.names or list(sj_zoo.ZOO):
        batch = None if args.batch is None else TRAIN_BATCH[name] if args.batch == "train" else int(args.batch)
        results.extend(check(name, presets, args.repeats, args.verbose, sj=args.sj, time_pairs=args.time,
                             batch=batch))
    tried = [r for r in results if r["preset"] in presets]
    ok = sum(r["status"] == "OK" for r in tried)
    broken = sorted({r["model"] for r in results if r["preset"] in ("build", "unoptimized") and r["status"] != "OK"})
    print(f"\n{ok}/{len(tried)} optimized runs OK; {len(tried) - ok} FAIL/ERROR; "
          f"models that do not train unoptimized: {broken or 'none'}; {time.perf_counter() - t0:.0f}s")
    if args.markdown and args.batch is not None:
        print("\n" + "\n".join(batch_markdown(results)))
    elif args.markdown:
        print("\n| model | regions | unoptimized | default | `prefer=\"memory\"` | spikingjelly best |")
        print("|---|---|---|---|---|---|")
        print("\n".join(markdown(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
