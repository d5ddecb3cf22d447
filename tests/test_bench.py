"""The benchmark suite's machinery on tiny workloads (the real sizes run by hand: ``python -m fxmemopt bench``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fxmemopt.snn import DeepConvSNN, SpikingVGG11
from fxmemopt.tools import bench, cli

TINY = bench.Workload("tiny DeepConvSNN", lambda: DeepConvSNN(num_blocks=2, channels=4), (4, 2, 3, 16, 16), ())


def test_torch_checkpoint_per_layer_wraps_layers_and_is_not_exact_for_snns():
    torch.manual_seed(0)
    model = SpikingVGG11(width=0.125)
    reference = copy.deepcopy(model)
    wrapped = bench.torch_checkpoint_per_layer(copy.deepcopy(model))
    layers = [m for m in wrapped.modules() if isinstance(m, bench._Checkpointed)]
    assert len(layers) == sum(1 for _, m in model.named_modules() if type(m).__name__ == "ConvBNNeuron")
    assert not any(isinstance(m, bench._Checkpointed) for layer in layers for m in layer.inner.modules())
    x = torch.rand(4, 2, 2, 48, 48)
    with torch.no_grad():  # forward alone is the same ...
        assert torch.equal(wrapped(x), copy.deepcopy(reference)(x))
    exact, diff = bench._exactness(reference, wrapped, (x,))
    assert not exact and diff > 0  # ... but recomputation from the post-forward neuron state changes gradients


def test_exactness_is_positional_and_bitwise():
    torch.manual_seed(0)
    model = DeepConvSNN(num_blocks=2, channels=4)
    x = torch.rand(4, 2, 3, 16, 16)
    assert bench._exactness(model, copy.deepcopy(model), (x,)) == (True, 0.0)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    exact, diff = bench._exactness(model, other, (x,))
    assert not exact and diff > 0


def test_run_workload_rows():
    rows = bench.run_workload(TINY, repeats=1, with_spikingjelly=False)
    variants = [r.variant for r in rows]
    assert variants == ["unoptimized", "torch checkpoint per layer", *bench.FXMEMOPT_VARIANTS]
    base = rows[0]
    assert base.memory_ratio == 1.0 and base.peak_bytes > 0
    for r in rows[2:]:
        assert r.exact is True and r.max_grad_diff == 0.0, r
        assert r.peak_bytes < base.peak_bytes and r.memory_ratio == pytest.approx(base.peak_bytes / r.peak_bytes)
        assert r.step_time_ratio > 0 and r.optimize_s > 0 and r.profiling_runs == 0
    md = bench.markdown(rows, [], "header")
    assert md.count("| tiny DeepConvSNN |") == len(rows) and "yes (bitwise)" in md


def test_scaling_grows_with_T_for_the_unoptimized_model(tmp_path):
    scale = bench.scaling(steps=(2, 4, 8), depths=(2, 4), t_blocks=2, depth_steps=2, channels=4)
    t_rows = [r for r in scale if r["axis"] == "T"]
    base = [r["unoptimized"] for r in t_rows]
    assert base == sorted(base) and base[-1] > 2 * base[0]
    for r in scale:
        assert r['fxmemopt prefer="memory"'] <= r["fxmemopt"] < r["unoptimized"]
    assert "| T=8 |" in bench.markdown([], scale, "h")
    pytest.importorskip("matplotlib")
    bench.plot_scaling(scale, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bench_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "workloads", lambda full=False: [TINY])
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    assert cli.main(["bench", "--no-scaling", "--no-spikingjelly", "--repeats", "1", "-q", "--json", str(out_json),
                     "--markdown", str(out_md)]) == 0
    data = json.loads(out_json.read_text())
    assert [r["variant"] for r in data["rows"]][0] == "unoptimized" and "torch" in data["header"]
    assert out_md.read_text().strip() == capsys.readouterr().out.strip()
    assert cli.main(["bench", "--models", "nothing-matches", "-q"]) == 2
