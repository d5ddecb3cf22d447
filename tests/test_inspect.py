"""Seeing and reusing what optimize did: explain, dump (text/DOT), memory timeline, plan files, the command line."""

from __future__ import annotations

import copy
import csv
import io
import json
import shutil
import sys
import warnings

import pytest
import torch

import fxmemopt
from fxmemopt.errors import FxMemOptWarning, PlanError
from fxmemopt.report.render import MissingDependencyError
from fxmemopt.snn import DeepConvSNN, SpikingVGG11
from fxmemopt.tools import cli


def _vgg(seed: int = 0) -> SpikingVGG11:
    torch.manual_seed(seed)
    return SpikingVGG11(width=0.125, dropout=0.2)


@pytest.fixture(scope="module")
def vgg():
    """The bundled spiking VGG (narrow), optimized with prefer="memory" (time slices included)."""
    model = _vgg()
    x = torch.rand(4, 2, 2, 48, 48)
    gm, summary = fxmemopt.optimize(model, (x,), prefer="memory", return_summary=True)
    return model, x, gm, summary


def test_dump_text_names_every_region_and_how_it_stores_inputs(vgg):
    _, _, gm, summary = vgg
    text = fxmemopt.dump(gm)
    assert summary.regions
    for r in summary.regions:
        assert f"region {r.name} (anchor {r.anchor})" in text
        assert f"end {r.name}" in text
        for n in r.nodes:
            assert f"| {n} " in text  # every node of the region is inside its block
    assert "packed 1 bit" in text and "predicted recompute working set" in text
    assert any(r.chunks > 1 for r in summary.regions) and "time slices" in text
    assert fxmemopt.dump(summary) == text  # the summary alone is enough
    assert all(r.name in gm.code for r in summary.regions)  # gm.code names regions after module paths


def test_dump_dot_parses_with_one_cluster_per_region(vgg, tmp_path):
    pydot = pytest.importorskip("pydot")
    _, _, gm, summary = vgg
    dot = fxmemopt.dump(gm, format="dot")
    (graph,) = pydot.graph_from_dot_data(dot)
    clusters = graph.get_subgraphs()
    assert sorted(c.get_name().strip('"') for c in clusters) == sorted(f"cluster_{r.name}" for r in summary.regions)
    for cluster, r in zip(sorted(clusters, key=lambda c: c.get_name()),
                          sorted(summary.regions, key=lambda r: f'"cluster_{r.name}"')):
        assert {n.get_name().strip('"') for n in cluster.get_nodes()} == set(r.nodes)
    assert len(graph.get_edges()) == sum(len(summary.graph[n].inputs) for n in summary.graph.order)
    if shutil.which("dot"):  # Graphviz installed: it must render too
        out = fxmemopt.render_dot(dot, tmp_path / "g.svg")
        assert open(out).read().lstrip().startswith(("<?xml", "<svg"))


def test_render_dot_says_what_to_install_without_graphviz(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(MissingDependencyError, match="Graphviz"):
        fxmemopt.render_dot("digraph g {}", tmp_path / "g.svg")


def test_dump_rejects_unknown_formats_and_plain_modules(vgg):
    _, _, gm, _ = vgg
    with pytest.raises(fxmemopt.errors.InvalidOptionError, match="format"):
        fxmemopt.dump(gm, format="svg")
    with pytest.raises(fxmemopt.errors.InvalidOptionError, match="fxmemopt summary"):
        fxmemopt.dump(torch.nn.Linear(2, 2))


def test_explain_table_rows(vgg):
    _, _, gm, summary = vgg
    exp = fxmemopt.explain(gm)
    assert [r["region"] for r in exp.rows] == [r.name for r in summary.regions]
    packed = [r for r in exp.rows if any(i["bits"] == 1 for i in r["inputs"])]
    assert packed
    for r in packed:  # 1-bit inputs: stored at about 1/32 of their unpacked bytes
        assert r["stored_bytes"] * 30 < r["unpacked_bytes"]
    assert all(r["working_set_bytes"] and r["working_set_bytes"] > 0 for r in exp.rows)
    chunked = [r for r in exp.rows if r["slices"] != "1"]
    assert chunked and all(r["decision"] == "chunk" and "time slices" in r["reason"] for r in chunked)
    text = str(exp)
    assert "predicted peak" in text and all(r.name in text for r in summary.regions)
    assert exp.totals["predicted_peak_before"] == summary.predicted_peak_before


def test_explain_shows_measured_peaks_and_prediction_error():
    model = DeepConvSNN(num_blocks=2, channels=4)
    x = torch.rand(4, 2, 3, 16, 16)
    gm = fxmemopt.optimize(model, (x,), measure="in-process")
    text = str(fxmemopt.explain(gm))
    assert "measured peak" in text and "prediction error" in text


def test_memory_timeline_two_series_with_phases_and_regions(vgg, tmp_path):
    model, x, gm, summary = vgg
    tl = fxmemopt.memory_timeline(model, gm, (x,))
    assert tl.peak("optimized") < tl.peak("baseline")
    assert tl.peak("baseline") == fxmemopt.measure_step(model, (x,), repeats=0).peak_bytes
    rows = list(csv.DictReader(io.StringIO(tl.to_csv(tmp_path / "t.csv"))))
    assert (tmp_path / "t.csv").read_text() == tl.to_csv()
    assert {r["series"] for r in rows} == {"baseline", "optimized"}
    for series in ("baseline", "optimized"):
        phases = [r["phase"] for r in rows if r["series"] == series]
        assert phases[0] == "forward" and phases[-1] == "backward"
        assert phases == sorted(phases, key=lambda p: p == "backward")  # one switch, forward then backward
    regions = {r["region"] for r in rows if r["series"] == "optimized"} - {""}
    assert regions == {r.name for r in summary.regions}
    assert {r["region"] for r in rows if r["series"] == "baseline"} == {""}
    recomputed = {label.split(":", 1)[1] for _, label in tl.markers["optimized"] if label.startswith("recompute:")}
    assert recomputed == {r.name for r in summary.regions}
    data = json.loads(tl.to_json(tmp_path / "t.json"))
    assert data["peaks"]["optimized"] == tl.peak("optimized") and len(data["baseline"]) == len(tl.baseline)


def test_memory_timeline_png_has_two_curves(vgg, tmp_path):
    pytest.importorskip("matplotlib")
    model, x, gm, _ = vgg
    tl = fxmemopt.memory_timeline(model, gm, (x,))
    fig = tl.plot(tmp_path / "timeline.png")
    curves = [line for line in fig.axes[0].get_lines() if line.get_label().startswith(("baseline", "optimized"))]
    assert [c.get_label().split()[0] for c in curves] == ["baseline", "optimized"]
    assert len(curves[0].get_xdata()) == len(tl.baseline) and len(curves[1].get_xdata()) == len(tl.optimized)
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timeline_plot_says_what_to_install_without_matplotlib(vgg, monkeypatch):
    model, x, gm, _ = vgg
    tl = fxmemopt.report.render.Timeline([("a", 1)], [("a", 1)], {"baseline": [], "optimized": []})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match="matplotlib"):
        tl.plot()


# -- plans as files -----------------------------------------------------------------------------------------------
def test_saved_plan_reapplied_to_a_fresh_model_same_graph_exact_no_profiling(vgg, tmp_path):
    _, x, gm, summary = vgg
    path = summary.save_plan(tmp_path / "plan.json")
    text = (tmp_path / "plan.json").read_text()
    assert json.loads(text)["format"] == "fxmemopt-plan/1" and "pickle" not in text
    assert fxmemopt.Plan.from_json(text) == summary.plan

    fresh = _vgg(seed=1)  # another instance, other weights: the plan is about structure
    reference = copy.deepcopy(fresh)
    gm2, s2 = fxmemopt.optimize(fresh, (x,), plan=path, return_summary=True)
    assert gm2.code == gm.code
    assert s2.plan == summary.plan and s2.search.evaluated == 0 and s2.measured_peak_after is None
    assert s2.search.applied_steps == ["saved_plan"]
    report = fxmemopt.compare_training_step(reference, gm2, (x,))
    assert report.ok, report.mismatches
    # the plan object and its JSON text work the same as the path
    assert fxmemopt.optimize(_vgg(), (x,), plan=summary.plan).code == gm.code
    assert fxmemopt.optimize(_vgg(), (x,), plan=text).code == gm.code


def test_plan_for_other_input_shapes_applies_exactly_with_a_warning(vgg):
    _, _, _, summary = vgg
    x = torch.rand(6, 3, 2, 48, 48)
    model = _vgg(2)
    reference = copy.deepcopy(model)
    with pytest.warns(FxMemOptWarning, match="made for example inputs"):
        gm = fxmemopt.optimize(model, (x,), plan=summary.plan)
    assert fxmemopt.compare_training_step(reference, gm, (x,)).ok


def test_plan_for_another_model_is_refused_naming_the_difference(vgg):
    _, _, _, summary = vgg
    other = DeepConvSNN(num_blocks=2, channels=4)
    with pytest.raises(PlanError, match="different model") as e:
        fxmemopt.optimize(other, (torch.rand(4, 2, 3, 16, 16),), plan=summary.plan)
    assert "not in the model's graph" in str(e.value) and "Re-run fxmemopt.optimize" in str(e.value)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(format="other/9"), "format"),
    (lambda d: d["regions"][0].update(chunks="2"), "regions[0].chunks"),
    (lambda d: d["regions"][0].update(pack_bits=[3]), "regions[0].pack_bits"),
    (lambda d: d["regions"][0].update(keep_starts=1), "regions[0].keep_starts"),
    (lambda d: d["regions"][0].update(nodes=[]), "regions[0].nodes"),
    (lambda d: d.update(regions={}), "regions"),
    (lambda d: d.update(inputs=[{"shape": "x"}]), "inputs[0]"),
])
def test_malformed_plan_files_name_the_field(vgg, mutate, field):
    _, x, _, summary = vgg
    d = json.loads(summary.plan.to_json())
    mutate(d)
    with pytest.raises(PlanError) as e:
        fxmemopt.optimize(_vgg(), (x,), plan=json.dumps(d))
    assert field in str(e.value)


def test_plans_that_do_not_fit_the_graph_are_refused(vgg, tmp_path):
    _, x, _, summary = vgg
    d = json.loads(summary.plan.to_json())
    d["graph_fingerprint"] = ""  # no fingerprint: the region checks still apply
    d["regions"][1]["pack_bits"] = d["regions"][1]["pack_bits"] + [0]
    with pytest.raises(PlanError, match="wrong number of packing widths"):
        fxmemopt.optimize(_vgg(), (x,), plan=json.dumps(d))
    d = json.loads(summary.plan.to_json())
    d["graph_fingerprint"] = ""
    d["regions"][1]["nodes"] = d["regions"][1]["nodes"] + d["regions"][0]["nodes"][:1]
    with pytest.raises(PlanError, match="shares node|convex|packing"):
        fxmemopt.optimize(_vgg(), (x,), plan=json.dumps(d))
    with pytest.raises(PlanError, match="not valid JSON"):
        fxmemopt.optimize(_vgg(), (x,), plan="{not json")
    with pytest.raises(PlanError, match="cannot be read"):
        fxmemopt.optimize(_vgg(), (x,), plan=tmp_path / "missing.json")


def test_explain_reads_a_plan_file(vgg, tmp_path):
    _, _, gm, summary = vgg
    summary.save_plan(tmp_path / "p.json")
    assert str(fxmemopt.explain(tmp_path / "p.json")) == str(fxmemopt.explain(gm))
    (tmp_path / "bare.json").write_text(summary.plan.to_json())
    bare = fxmemopt.explain(tmp_path / "bare.json")
    assert [r["region"] for r in bare.rows] == [r.name for r in summary.regions] and "no report" in str(bare)


def test_progress_reports_each_stage():
    lines: list[str] = []
    fxmemopt.optimize(DeepConvSNN(num_blocks=2, channels=4), (torch.rand(4, 2, 3, 16, 16),), level=4,
                      progress=lines.append)
    text = "\n".join(lines)
    for stage in ("probing", "tracing", "annotating", "recording", "searching plans", "rewriting"):
        assert stage in text


# -- command line ---------------------------------------------------------------------------------------------------
MODEL_FILE = """
from fxmemopt.snn import SpikingVGG11

def build(width=0.125):
    return SpikingVGG11(width=width)
"""


def test_cli_optimize_save_plan_plot_then_reuse_and_explain(tmp_path, capsys):
    (tmp_path / "models.py").write_text(MODEL_FILE)
    spec = f"{tmp_path / 'models.py'}:build"
    plan, png, dump = tmp_path / "p.json", tmp_path / "t.png", tmp_path / "g.txt"
    argv = ["optimize", spec, "--input-shape", "4,2,2,48,48", "--prefer", "memory", "--save-plan", str(plan),
            "--dump", str(dump), "--dot", str(tmp_path / "g.dot"), "--timeline-csv", str(tmp_path / "t.csv")]
    if _has_matplotlib():
        argv += ["--plot", str(png)]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "fxmemopt explain" in out and "searching plans" in err and "rewriting" in err
    assert plan.exists() and dump.read_text().startswith("fxmemopt graph") and (tmp_path / "g.dot").exists()
    assert not _has_matplotlib() or png.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["optimize", spec, "--input-shape", "4,2,2,48,48", "--plan", str(plan), "-q"]) == 0
    out, err = capsys.readouterr()
    assert f"from plan file '{plan}'" in out and err == ""
    assert cli.main(["explain", str(plan)]) == 0
    assert "fxmemopt explain: SpikingVGG11" in capsys.readouterr().out


@pytest.mark.parametrize("argv, reason", [
    (["optimize", "models.py:nope", "--input-shape", "4,2,2,48,48"], "has no attribute 'nope'"),
    (["optimize", "models.py:build", "--input-shape", "4,2,3,48,48"], "InvalidInputsError"),
    (["optimize", "models.py:build", "--input-shape", "4,2,2,48,48", "--memory-budget", "-1"], "memory_budget"),
    (["optimize", "nomodule", "--input-shape", "4"], "expected MODULE:FACTORY"),
    (["explain", "missing.json"], "PlanError"),
    (["optimize", "models.py:build", "--input-shape", "4,2,2,48,48", "--calls-per-step", "0"], "calls_per_step"),
])
def test_cli_errors_exit_2_with_one_line(tmp_path, monkeypatch, capsys, argv, reason):
    (tmp_path / "models.py").write_text(MODEL_FILE)
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv + (["-q"] if argv[0] == "optimize" else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fxmemopt: error:") and reason in err[0]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_no_warning_when_the_plan_matches():
    x = torch.rand(4, 2, 3, 16, 16)
    _, s = fxmemopt.optimize(DeepConvSNN(num_blocks=2, channels=4), (x,), return_summary=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxMemOptWarning)
        fxmemopt.optimize(DeepConvSNN(num_blocks=2, channels=4), (x,), plan=s.plan)


STEP_MODEL_FILE = """
import torch
from torch import nn


class StepLIF(nn.Module):
    def __init__(self):
        super().__init__()
        self.v = 0.0

    def forward(self, x):
        self.v = 0.5 * self.v + x
        s = (self.v >= 1.0).float()
        self.v = self.v * (1 - s)
        return s + (self.v - self.v.detach()) * 0  # a straight-through path so the spikes carry a gradient


def build():
    return nn.Sequential(nn.Linear(8, 16), StepLIF(), nn.Linear(16, 4), StepLIF())
"""


def test_cli_calls_per_step(tmp_path, capsys):
    (tmp_path / "step.py").write_text(STEP_MODEL_FILE)
    argv = ["optimize", f"{tmp_path / 'step.py'}:build", "--input-shape", "4,8", "--calls-per-step", "6", "-q"]
    assert cli.main(argv) == 0
    assert "one training step = 6 calls of the module" in capsys.readouterr().out


def test_demo_shows_the_default_and_prefer_memory_side_by_side(capsys):
    from fxmemopt.tools.cli import main

    rc = main(["demo", "--width", "0.125", "--T", "3", "--batch", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert {"unoptimized", "fxmemopt default", 'prefer="memory"'} <= set(rows)
    assert "bitwise equal" in out
