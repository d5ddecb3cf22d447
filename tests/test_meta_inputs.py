"""Planning for a size this machine cannot run: example inputs on the meta device, a real sample beside them
(``optimize(..., sample_inputs=...)``, fxmemopt.analysis.shapes).

What is promised: the shapes and bytes the cost model reads are those a real run at that size has (checked node by
node against an annotation of real inputs); the predictions equal, to the byte, those made from real inputs of that
size; the plan file applies on the "training machine" (real inputs) and trains bitwise like the unoptimized model,
measured within 10% of the prediction; a size no machine here could run (a terabyte step) is planned without
allocating it; and every misuse is a typed error that says what to do."""

from __future__ import annotations

import copy

import pytest
import torch
from other_libs import FACTORIES
from sj_zoo import ZOO
from torch import nn

import fxmemopt
from fxmemopt.analysis.shapes import at_shapes
from fxmemopt.api import analyze
from fxmemopt.errors import InvalidInputsError, InvalidOptionError, MemoryBudgetError, RecordingError
from fxmemopt.planning.costgraph import simulate
from fxmemopt.profiling.verify import compare_training_step
from fxmemopt.snn import reset_net
from fxmemopt.snn.models import DeepConvSNN, SEWResNet18, Spikformer


def _meta(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def _batch_dim(x: torch.Tensor) -> int:
    return 1 if x.dim() == 5 else 0


def _sample(x: torch.Tensor, n: int = 4) -> torch.Tensor:
    return x.narrow(_batch_dim(x), 0, n).clone()


@pytest.mark.parametrize("make", [
    lambda: (DeepConvSNN(num_blocks=3, channels=8), (torch.rand(4, 16, 3, 16, 16) > 0.5).float()),
    lambda: (SEWResNet18(width=0.25), torch.rand(2, 16, 3, 32, 32)),
    lambda: (Spikformer(embed_dim=32, num_heads=2, depth=1), torch.rand(2, 16, 3, 32, 32)),
    lambda: ZOO["plif_mnist"]()[0:1] + (torch.rand(4, 16, 1, 28, 28),),
    lambda: FACTORIES["snntorch_loop_in_forward_net"]()[0:1] + (torch.rand(6, 16, 1, 28, 28),),
    lambda: FACTORIES["norse_sequential_state"]()[0:1] + (torch.rand(6, 16, 1, 28, 28),),
], ids=["deepconv", "sew_resnet18", "spikformer", "sj_plif_mnist", "snntorch_loop", "norse_sequential"])
def test_shapes_at_the_meta_size_are_a_real_runs(make):
    torch.manual_seed(0)
    model, x = make()
    real = analyze(model, (x,)).annotated
    an = analyze(model, (_sample(x),))
    d = _batch_dim(x)
    carried = at_shapes(an.annotated, an.traced, model, an.stateful, (_sample(x),), d, x.shape[d])
    differ = [(n, carried[n].shape, real[n].shape, carried[n].nbytes, real[n].nbytes) for n in real.order
              if (carried[n].shape, carried[n].nbytes) != (real[n].shape, real[n].nbytes)]
    assert not differ, differ
    # everything else is the sample's decision, as on real inputs of the full size
    assert [carried[n].value_set for n in real.order] == [real[n].value_set for n in real.order]
    assert [carried[n].time_chunkable for n in real.order] == [real[n].time_chunkable for n in real.order]


def test_plan_for_meta_inputs_predicts_the_real_size_to_the_byte_and_applies_where_it_trains(tmp_path):
    torch.manual_seed(0)
    model = DeepConvSNN(num_blocks=3, channels=8)
    x = (torch.rand(4, 16, 3, 16, 16) > 0.5).float()
    reference = copy.deepcopy(model)
    for prefer in (None, "memory"):
        gm_meta, meta = fxmemopt.optimize(model, (_meta(x),), sample_inputs=(_sample(x),), prefer=prefer,
                                          return_summary=True)
        _, real = fxmemopt.optimize(model, (x,), prefer=prefer, return_summary=True)
        assert meta.predicted_peak_before == real.predicted_peak_before
        for plan in (meta.plan, real.plan):  # one plan, the same bytes on either cost graph
            assert simulate(meta.cost_graph, plan).peak_bytes == simulate(real.cost_graph, plan).peak_bytes
        assert meta.predicted_peak_after < meta.predicted_peak_before
        assert "meta device" in meta.recording and "no step ran at their size" in meta.recording
        assert "cost model: " + meta.recording in str(meta)
        assert any("judged on the predicted peaks" in n for n in meta.notes)
        # the plan file goes to the training machine: the same shapes, no warning, no search; exact there
        path = meta.save_plan(tmp_path / f"plan_{prefer}.json")
        with _no_fxmemopt_warning():
            gm, applied = fxmemopt.optimize(model, (x,), plan=path, return_summary=True)
        assert applied.plan.regions == meta.plan.regions
        reset_net(reference), reset_net(gm)  # state left by the steps of the previous preset
        report = compare_training_step(reference, gm, (x,))
        assert report.ok, report
        measured = fxmemopt.measure_step(gm, (x,), repeats=0).peak_bytes
        assert abs(measured - meta.predicted_peak_after) <= 0.10 * measured, (measured, meta.predicted_peak_after)
        # the module optimize returned for the meta inputs is the same rewrite: it trains the sample exactly
        reset_net(reference), reset_net(gm_meta)  # both hold the full batch's state from the steps above
        assert compare_training_step(reference, gm_meta, (_sample(x),)).ok


class _no_fxmemopt_warning:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings(record=True)
        self.caught = self._w.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
        bad = [str(w.message) for w in self.caught if issubclass(w.category, fxmemopt.errors.FxMemOptWarning)
               and "made for example inputs" in str(w.message)]
        assert not bad, bad
        return False


def test_a_terabyte_step_is_planned_without_allocating_it():
    """Batch 2**22 of 3x16x16 spikes at T=4: the unoptimized step would keep over a terabyte. Planned here in
    fake shapes; the budget is met in prediction, and an unreachable one names the smallest reachable peak."""
    torch.manual_seed(0)
    model = DeepConvSNN(num_blocks=2, channels=8)
    sample = (torch.rand(4, 4, 3, 16, 16) > 0.5).float()
    big = torch.empty(4, 2**22, 3, 16, 16, device="meta")
    _, s = fxmemopt.optimize(model, (big,), sample_inputs=(sample,), prefer="memory", return_summary=True)
    assert s.predicted_peak_before > 2**40
    assert s.predicted_peak_after < s.predicted_peak_before / 2
    assert s.plan.inputs == (((4, 2**22, 3, 16, 16), "float32"),)
    budget = (s.predicted_peak_after + s.predicted_peak_before) // 2
    _, b = fxmemopt.optimize(model, (big,), sample_inputs=(sample,), memory_budget=budget, return_summary=True)
    assert b.predicted_peak_after <= budget
    with pytest.raises(MemoryBudgetError, match="smallest"):
        fxmemopt.optimize(model, (big,), sample_inputs=(sample,), memory_budget=s.predicted_peak_after // 4)


class FixedBatch(nn.Module):
    """Writes its batch size into its code (as sinabs' ``IAFSqueeze(batch_size=...)`` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.sn = fxmemopt.snn.neuron.LIFNode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn(self.fc(x).reshape(4, 8, 4))


def test_misuse_is_a_typed_error_that_says_what_to_do():
    model = DeepConvSNN(num_blocks=2, channels=4)
    x = (torch.rand(2, 8, 3, 8, 8) > 0.5).float()
    with pytest.raises(InvalidInputsError, match="sample_inputs"):
        fxmemopt.optimize(model, (_meta(x),))
    with pytest.raises(InvalidOptionError, match="meta device"):
        fxmemopt.optimize(model, (x,), sample_inputs=(x[:, :4],))
    with pytest.raises(InvalidInputsError, match="one dimension"):
        fxmemopt.optimize(model, (_meta(x),), sample_inputs=(x[:, :4, :, :4, :4],))
    with pytest.raises(InvalidInputsError, match="real sample"):
        fxmemopt.optimize(model, (_meta(x),), sample_inputs=(x[:, :4].double(),))
    with pytest.raises(InvalidOptionError, match="measure"):
        fxmemopt.optimize(model, (_meta(x),), sample_inputs=(x[:, :4],), measure="worker")
    with pytest.raises(RecordingError, match="fewer than 3"):
        fxmemopt.optimize(model, (_meta(x),), sample_inputs=(x[:, :2],), prefer="memory")
    z = torch.rand(4, 8, 6)
    with pytest.raises(RecordingError, match="cannot be carried"):
        fxmemopt.optimize(FixedBatch(), (_meta(torch.rand(4, 16, 6)),), sample_inputs=(z,))
