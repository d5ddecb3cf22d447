"""``optimize(keep_modules=...)``: kept modules stay modules (their code in a GraphModule at the same path, called by
the optimized module, their regions inside), exactly, without touching the user's model."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from fsdp_models import Block, BlockNet
from torch import nn

import fxmemopt
from fxmemopt.errors import InvalidOptionError, ShardingError
from fxmemopt.profiling.verify import compare_training_step
from fxmemopt.runtime.checkpoint import CheckpointRegion
from fxmemopt.snn import LIFNode, SeqToANNContainer, reset_net


def _example():
    torch.manual_seed(0)
    return BlockNet(c=4, n=3), torch.rand(4, 2, 3, 8, 8)


@pytest.mark.parametrize("keep", [(Block,), ("blocks.0", "blocks.2"), ("blocks",)], ids=["class", "paths", "list"])
def test_kept_modules_are_called_and_hold_their_regions_exactly(keep):
    model, x = _example()
    ref = copy.deepcopy(model)
    before = {n: id(m) for n, m in model.named_modules()}
    gm, summary = fxmemopt.optimize(model, (x,), keep_modules=keep, prefer="memory", return_summary=True)
    assert {n: id(m) for n, m in model.named_modules()} == before  # the user's model is untouched
    kept = gm.fxmemopt_units
    want = {(Block,): ("blocks.0", "blocks.1", "blocks.2"), ("blocks.0", "blocks.2"): ("blocks.0", "blocks.2"),
            ("blocks",): ()}[keep]
    assert kept == want
    if keep == ("blocks",):  # a ModuleList is never called: nothing to keep, and the summary says why
        assert any("'blocks'" in n and "never calls it" in n for n in summary.notes)
    for path in kept:
        unit = gm.get_submodule(path)
        assert isinstance(unit, torch.fx.GraphModule) and unit is not model.get_submodule(path)
        assert sum(isinstance(m, CheckpointRegion) for m in unit.children()) == 2
        assert unit.conv1 is model.get_submodule(path).conv1  # same layers, same parameters
    assert list(gm.state_dict()) == list(model.state_dict())
    assert len(summary.regions) == 7
    calls: list[str] = []
    for path in kept:
        gm.get_submodule(path).register_forward_hook(lambda m, a, o, path=path: calls.append(path))
    reset_net(gm)
    report = compare_training_step(ref, gm, (x,))
    assert report.ok, str(report)
    assert calls == list(kept)


def test_no_region_crosses_a_kept_module():
    """Every region lives in the kept module whose layers it recomputes (or in the root, recomputing none of a
    kept module's layers)."""
    model, x = _example()
    gm, summary = fxmemopt.optimize(model, (x,), keep_modules=(Block,), prefer="memory", return_summary=True)
    for r in summary.plan.regions:
        unit = next((p for p in gm.fxmemopt_units if r.anchor.startswith(p + ".")), "")
        holder = gm.get_submodule(unit) if unit else gm
        assert isinstance(holder.get_submodule(r.name), CheckpointRegion), r.name
        body = holder.get_submodule(r.name).__dict__["body"]
        paths = [str(n.target) for n in body.graph.nodes if n.op == "call_module"]
        assert all(p.startswith(unit + ".") for p in paths) if unit else \
            not any(p.startswith("blocks.") for p in paths)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block(4)

    def forward(self, x):
        return self.block(self.block(x))


def test_a_module_called_twice_is_not_kept_and_the_summary_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(SeqToANNContainer(nn.Conv2d(3, 4, 1)), LIFNode(), Twice())
    x = torch.rand(3, 2, 3, 8, 8)
    ref = copy.deepcopy(model)
    gm, summary = fxmemopt.optimize(model, (x,), keep_modules=("2.block",), return_summary=True)
    assert gm.fxmemopt_units == ()
    assert any("'2.block'" in n and "2 times" in n for n in summary.notes)
    reset_net(gm)
    assert compare_training_step(ref, gm, (x,)).ok


def test_nested_kept_modules():
    torch.manual_seed(0)
    model = nn.Sequential(SeqToANNContainer(nn.Conv2d(3, 4, 1)), LIFNode(), nn.Sequential(Block(4), Block(4)))
    x = torch.rand(3, 2, 3, 8, 8)
    ref = copy.deepcopy(model)
    gm = fxmemopt.optimize(model, (x,), keep_modules=("2", Block))
    assert set(gm.fxmemopt_units) == {"2", "2.0", "2.1"}
    assert isinstance(gm.get_submodule("2"), torch.fx.GraphModule)
    assert isinstance(gm.get_submodule("2.0"), torch.fx.GraphModule)
    assert "getattr(self, \"0\")" in gm.get_submodule("2").code or "self.0" in gm.get_submodule("2").code
    reset_net(gm)
    assert compare_training_step(ref, gm, (x,)).ok


def test_bad_keep_modules_entries_are_typed_errors():
    model, x = _example()
    with pytest.raises(InvalidOptionError, match="'blocks.9'.*names no submodule"):
        fxmemopt.optimize(model, (x,), keep_modules=["blocks.9"])
    with pytest.raises(InvalidOptionError, match="keep_modules"):
        fxmemopt.optimize(model, (x,), keep_modules=[3])


def test_kept_modules_survive_deepcopy_pickle_and_compile():
    model, x = _example()
    ref = copy.deepcopy(model)
    gm = fxmemopt.optimize(model, (x,), keep_modules=(Block,))
    for clone in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert isinstance(clone.get_submodule("blocks.1"), torch.fx.GraphModule)
        assert list(clone.state_dict()) == list(ref.state_dict())
    gm.blocks[1].compile(backend="eager")  # per-block torch.compile, as users do
    reset_net(gm)
    assert compare_training_step(ref, gm, (x,)).ok


def test_fully_shard_helper_checks_without_a_process_group():
    model, x = _example()
    with pytest.raises(ShardingError, match="is not a module fxmemopt.optimize returned"):
        fxmemopt.distributed.fully_shard(model)
    gm = fxmemopt.optimize(model, (x,))
    with pytest.raises(ShardingError, match=r"keep_modules=\['blocks.1'"):
        fxmemopt.distributed.fully_shard(gm, units=["blocks.1"])


class ConvOnly(nn.Module):
    """A block without a neuron: flat, the next neuron's region grows back into it."""

    def __init__(self):
        super().__init__()
        self.conv = SeqToANNContainer(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.conv(x)


def test_a_saved_plan_whose_regions_cross_kept_modules_is_refused():
    """A plan made without keep_modules may hold a region across a kept module's boundary (two FSDP units):
    applied with keep_modules it is refused with a PlanError that says what to do, never built."""
    from fxmemopt.errors import PlanError

    torch.manual_seed(0)
    model = nn.Sequential(ConvOnly(), LIFNode())
    x = torch.rand(3, 2, 3, 8, 8)
    _, flat = fxmemopt.optimize(copy.deepcopy(model), (x,), return_summary=True)
    assert any(n.startswith("_0_conv") for r in flat.plan.regions for n in r.nodes)  # the region took the conv
    kept = fxmemopt.optimize(copy.deepcopy(model), (x,), keep_modules=(ConvOnly,))
    assert kept.fxmemopt_units == ("0",)
    with pytest.raises(PlanError, match="crosses the boundary of a module kept"):
        fxmemopt.optimize(model, (x,), keep_modules=(ConvOnly,), plan=flat.plan)
