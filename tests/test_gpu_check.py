"""``benchmarks/gpu_check.py`` on CPU: the CI smoke run of the prepared GPU check, and that its exactness check
catches an inexact region (a recomputation that unpacks wrong spikes)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load():
    """The script as a module (registered first: its dataclasses look their module up)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def _table_rows(md: str, header_start: str) -> tuple[str, list[str]]:
    lines = md.splitlines()
    k = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[k + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return lines[k], rows


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    md, js = out / "gpu.md", out / "gpu.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(md), "--json",
                           str(js), "--budget-s", "200", "--hard-stop-s", "30", "-q"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    data = json.loads(js.read_text())
    print(f"gpu_check --device cpu --quick: {seconds:.0f} s, phases {data['phase_s']}")
    return proc, md.read_text(), data, seconds


def test_quick_cpu_run_exits_cleanly_within_its_budget(quick_run):
    proc, md, data, seconds = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert data["finished"] and data["elapsed_s"] <= data["budget_s"], data["phase_s"]
    assert md.strip() == data["markdown"].strip()
    assert proc.stdout.strip().endswith(data["markdown"].strip().splitlines()[-1])  # also printed
    env = data["environment"]
    assert env["device"].startswith("CPU") and env["torch"] == torch.__version__
    assert md.splitlines()[0].startswith(f"fxmemopt {env['fxmemopt']} gpu_check, CPU")


def test_every_region_kind_is_checked_and_exact(quick_run):
    gpu_check = _load()
    _, _, data, _ = quick_run
    rows = data["exactness"]
    assert rows and not [r for r in rows if r["kind"] == "*"], "a model or setting was skipped or failed"
    for kind, (classes, must) in gpu_check.KINDS.items():
        ran = [r for r in rows if r["kind"] == kind and r["exact"] is not None]
        assert ran, f"{kind}: never ran"
        for r in ran:
            assert any(c in r["regions"] for c in classes), r
            if must:
                assert r["exact"] and r["max_diff"] == 0.0 and r["passed"], r
            else:  # sliced: approximate, its difference reported (BatchNorm statistics per slice differ)
                assert not r["exact"] and r["max_diff"] > 0 and r["passed"], r
    # the norse-style neuron (state returned as a value) is chunked too, exactly
    value = [r for r in rows if r["model"].startswith("norse-style") and r["kind"].startswith("chunked")]
    assert value and all(r["exact"] and "ChunkedRegion" in r["regions"] for r in value), value
    # the control, torch.utils.checkpoint per layer, is caught: neuron states and BatchNorm are run twice
    control = [r for r in rows if r["kind"] == gpu_check.CONTROL and r["exact"] is not None]
    assert control and all(not r["exact"] and r["passed"] for r in control), control


def test_bench_rows_measure_every_variant(quick_run):
    _, _, data, _ = quick_run
    rows = {r["variant"]: r for r in data["bench"]}
    for variant in ("unoptimized", "fxmemopt default", 'fxmemopt prefer="memory"', 'fxmemopt prefer="speed"'):
        r = rows[variant]
        assert r["peak_bytes"] > 0 and r["step_s"] > 0 and r["exact"], r
    for variant in ("fxmemopt default", 'fxmemopt prefer="memory"', 'fxmemopt prefer="speed"'):
        assert rows[variant]["peak_bytes"] < rows["unoptimized"]["peak_bytes"], rows[variant]
        assert rows[variant]["optimize_s"] > 0
    try:
        import spikingjelly  # noqa: F401
    except ImportError:
        return
    for level in (1, 2):
        r = rows[f"spikingjelly L{level}"]
        assert r["peak_bytes"] > 0 and r["step_s"] > 0 and r["exact"] is not None, r


def test_tables_are_well_formed(quick_run):
    _, md, data, _ = quick_run
    for start, count in (("| model | region kind |", len(data["exactness"])), ("| model | variant |",
                                                                               len(data["bench"]))):
        header, rows = _table_rows(md, start)
        assert len(rows) == count
        cells = header.count("|")
        assert all(row.count("|") == cells for row in rows), [r for r in rows if r.count("|") != cells]


@pytest.mark.parametrize("value_check", [False, True])
def test_the_check_catches_a_region_that_recomputes_from_wrong_spikes(monkeypatch, value_check):
    """Flip every unpacked spike in recomputation. With fxmemopt's recompute value check off, the packed checkpoint
    kind must come out inexact and fail: the GPU check itself can see a wrong gradient. With it on (the default),
    optimize's validation step catches the wrong recomputation and keeps those regions' activations: exact."""
    gpu_check = _load()
    import fxmemopt.runtime.checkpoint as checkpoint

    real = checkpoint.unpack
    monkeypatch.setattr(checkpoint, "unpack", lambda p: 1 - real(p))
    if not value_check:
        monkeypatch.setattr(checkpoint, "_print_of", lambda t, mode: None)
    _, models = gpu_check.exactness_models(torch.device("cpu"), quick=True)
    rows: list = []
    kinds = ("checkpoint, spikes packed", "checkpoint, nothing packed")
    gpu_check.run_exactness(torch.device("cpu"), True, False, gpu_check.Clock(120), 120, lambda: None,
                            lambda line: None, rows, models=models[:1], kinds=kinds)
    got = {r.kind: r for r in rows}
    assert set(got) == set(kinds), rows
    assert got["checkpoint, nothing packed"].exact  # nothing unpacked there
    packed = got["checkpoint, spikes packed"]
    if value_check:
        assert packed.exact, packed
    else:
        assert not packed.exact and not packed.passed and packed.mismatches


def test_the_gpu_plan_is_what_the_issue_asks_for():
    """The rows a GPU run would take (built lazily: no CUDA needed to list them)."""
    gpu_check = _load()
    cuda = torch.device("cuda")
    with_sj = gpu_check._spikingjelly()
    names = [w.name for w in gpu_check.workloads(cuda, False, with_sj)]
    assert any("DeepConvSNN" in n for n in names) and any("SpikingVGG11" in n and "N=32" in n for n in names)
    assert any("Spikformer" in n for n in names) and any(n.startswith("SEWResNet18") for n in names)
    if with_sj:
        assert names[0].startswith("spikingjelly sew_resnet18") and "T=4 N=32 3x64x64" in names[0]
        model = gpu_check.sj_sew_resnet18()
        assert sum(p.numel() for p in model.parameters()) > 10_000_000
    settings = gpu_check._settings(cuda, amp=False)
    assert {(b, dtype) for _, b, _, dtype in settings} == {(False, None), (True, None), (False, torch.bfloat16),
                                                         (True, torch.bfloat16)}
