"""The checkpoint runtime's invariants (NOTE [Checkpoint region invariants] in fxmemopt/runtime.py), one test each."""

from __future__ import annotations

import copy
import gc
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

import fxmemopt
from fxmemopt.errors import FxMemOptWarning, RecomputationMismatchError
from fxmemopt.profiling.measure import LiveBytesTracker
from fxmemopt.profiling.verify import compare_training_step, module_states
from fxmemopt.runtime.checkpoint import CheckpointRegion
from fxmemopt.snn import DeepConvSNN, IFNode, LIFNode, MemoryModule, SeqToANNContainer, reset_net


class MLP(nn.Module):
    """Three Linear(+BN)+IF layers over [T, N, F]; the output is the last layer's spikes."""

    def __init__(self, f: int = 16, bn: bool = False, dropout: float = 0.0):
        super().__init__()
        layers = []
        for _ in range(3):
            mods: list[nn.Module] = [nn.Linear(f, f)]
            if bn:
                mods.append(nn.BatchNorm1d(f))
            if dropout:
                mods.append(nn.Dropout(dropout))
            layers += [SeqToANNContainer(*mods), IFNode(v_threshold=0.5)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _step(module, x, loss=lambda out: (out * torch.arange(out.shape[-1])).sum()):
    out = module(x)
    loss(out).backward()
    return out


def _counting(module: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def test_recomputation_happens_in_training_only():
    model = MLP()
    x = torch.rand(4, 3, 16)
    gm = fxmemopt.optimize(model, (x,), level=1)  # whole regions (the default may slice one in time)
    calls = _counting(model.net[2][0])  # the second Linear, inside a region

    _step(gm, x)
    assert calls[0] == 2  # forward + recomputation in backward
    reset_net(gm)

    gm.eval()
    gm(x).sum().backward()
    assert calls[0] == 3  # eval: plain, no recomputation
    reset_net(gm)

    gm.train()
    with torch.no_grad():
        gm(x)
    assert calls[0] == 4
    stats = gm.fxmemopt_summary.runtime["ckpt_net_3"]
    assert (stats.checkpointed_calls, stats.plain_calls, stats.recomputations) == (1, 2, 1)


def test_regions_keep_exactly_their_packed_inputs():
    torch.manual_seed(0)
    model = MLP(f=20)
    x = torch.rand(5, 3, 20)
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    assert [r.name for r in summary.regions] == ["ckpt_net_1", "ckpt_net_3", "ckpt_net_5"]
    numel = 5 * 3 * 20
    assert [i.bits for r in summary.regions for i in r.inputs if i.node != "x"] == [1, 1]

    # Inside regions autograd keeps nothing: an outer saved_tensors_hooks never sees a region's saves ...
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.nbytes) or t, lambda t: t):
        out = gm(x)
    assert seen == []
    del out
    reset_net(model)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.nbytes) or t, lambda t: t):
        out = model(x)
    assert sum(seen) > 20 * numel  # ... while the unoptimized model saves every step's tensors
    del out
    reset_net(model)

    # ... and what stays alive after forward is exactly: packed inputs, the output, the neurons' final states.
    with LiveBytesTracker() as tracker:
        out = gm(x)
        live = tracker.live
    packed = [summary.runtime[r].packed_bytes for r in ("ckpt_net_3", "ckpt_net_5")]
    assert packed == [math.ceil(numel / 8)] * 2
    states = sum(v.nbytes for v in module_states(model).values())
    assert live == sum(packed) + out.nbytes + states
    assert summary.runtime["ckpt_net_1"].kept_bytes == x.nbytes  # the real-valued input is kept by reference
    out.sum().backward()


def test_nothing_recomputed_survives_backward():
    """Regression: recomputed tensors once stayed alive through a reference cycle via C++ autograd nodes."""
    torch.manual_seed(0)
    model = MLP(f=20)
    x = torch.rand(5, 3, 20)
    gm = fxmemopt.optimize(model, (x,))
    with LiveBytesTracker() as tracker:
        out = gm(x)
        after_forward = tracker.live
        out.sum().backward()
        grads = sum(p.grad.nbytes for p in model.parameters())
        assert tracker.live == after_forward + grads
    assert tracker.peak < after_forward + grads + 2 * 5 * 3 * 20 * 4 * 8  # one region's working set at most


class MutatesItsInput(nn.Module):
    """The region keeps the real-valued input by reference; the model then modifies it in place."""

    def __init__(self):
        super().__init__()
        self.fc = SeqToANNContainer(nn.Linear(4, 4))
        self.sn = IFNode()

    def forward(self, x):
        out = self.sn(self.fc(x) + x)
        x.mul_(2)
        return out


def test_in_place_change_of_a_kept_input_is_reported_by_name():
    model = MutatesItsInput()
    gm = fxmemopt.optimize(model, (torch.rand(3, 2, 4),))
    x = torch.rand(3, 2, 4)
    with pytest.raises(RuntimeError, match="input 'x'.*in-place"):
        gm(x).sum().backward()


def test_everything_is_freed_after_backward_and_reset():
    """Regression guard: frames must not be kept alive by reference cycles through autograd nodes."""
    model = MLP(f=20)
    x = torch.rand(5, 3, 20)
    gm = fxmemopt.optimize(model, (x,))
    with LiveBytesTracker() as tracker:
        out = gm(x)
        out.sum().backward()
        del out
        reset_net(gm)
        gc.collect()
        assert tracker.live == sum(p.grad.nbytes for p in model.parameters())


def test_final_state_update_is_not_recomputed_unless_back_propagated():
    torch.manual_seed(0)
    model = MLP(f=20)
    x = torch.rand(5, 3, 20)
    gm = fxmemopt.optimize(model, (x,))
    calls = []
    orig = fxmemopt.runtime.checkpoint._Frame.recompute

    def spy(frame, need):
        orig(frame, need)
        calls.append(sum(t is not None for t in frame.saved))

    fxmemopt.runtime.checkpoint._Frame.recompute = spy
    try:
        gm(x).sum().backward()
        kept_when_reset = list(calls)
        reset_net(gm)
        calls.clear()
        # back-propagate through the final state too: its update must be recomputed, and gradients stay exact
        for p in model.parameters():
            p.grad = None
        ref = copy.deepcopy(model)
        reset_net(ref)
        out = gm(x)
        (out.sum() + sum(v.sum() for v in module_states(model).values())).backward()
        kept_with_state = list(calls)
        out = ref(x)
        (out.sum() + sum(v.sum() for v in module_states(ref).values())).backward()
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), ref.parameters()))
    finally:
        fxmemopt.runtime.checkpoint._Frame.recompute = orig
    assert sum(kept_with_state) > sum(kept_when_reset)


def test_autograd_grad_returns_real_gradients():
    torch.manual_seed(0)
    model = MLP()
    ref = copy.deepcopy(model)
    x = torch.rand(4, 2, 16)
    gm = fxmemopt.optimize(model, (x,))
    grads = torch.autograd.grad(gm(x).sum() * 1.0 + 0.0, list(model.parameters()))
    ref_grads = torch.autograd.grad(ref(x).sum() * 1.0 + 0.0, list(ref.parameters()))
    assert all(g is not None for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert all(p.grad is None for p in model.parameters())  # no .grad side channel


def test_first_layer_without_input_grad_still_trains_its_parameters():
    model = MLP()
    x = torch.rand(4, 2, 16)  # does not require grad
    gm = fxmemopt.optimize(model, (x,))
    gm(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.net[0][0].weight.grad.abs().sum() > 0


def test_user_inputs_are_not_mutated():
    model = MLP()
    x = (torch.rand(4, 2, 16) > 0.5).float()
    before = x.clone()
    version = x._version
    gm = fxmemopt.optimize(model, (x,))
    gm(x).sum().backward()
    assert not x.requires_grad and x.grad is None and x._version == version and torch.equal(x, before)


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = SeqToANNContainer(nn.Linear(8, 8))
        self.sn = IFNode()
        self.fc2 = SeqToANNContainer(nn.Linear(8, 8))
        self.sn2 = IFNode()

    def forward(self, x):
        s = self.sn(self.fc(x))
        count = (s > 0).sum()  # integer output: never requires grad
        return self.sn2(self.fc2(s)), count, s.detach()


def test_outputs_that_do_not_require_grad_are_fine():
    model = TwoOutputs()
    ref = copy.deepcopy(model)
    x = torch.rand(3, 2, 8)
    gm = fxmemopt.optimize(model, (x,))
    report = compare_training_step(ref, gm, (x,), loss_fn=lambda out: out[0].sum())
    assert report.ok, str(report)
    out = gm(x)
    assert out[0].requires_grad and not out[1].requires_grad and not out[2].requires_grad


def test_eval_and_no_grad_run_plainly_without_packing():
    model = MLP()
    x = torch.rand(4, 2, 16)
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    with torch.no_grad():
        gm(x)
    gm.eval()
    gm(x)
    assert all(s.checkpointed_calls == 0 and s.plain_calls == 2 for s in summary.runtime.values())
    reset_net(gm)
    with torch.no_grad(), LiveBytesTracker() as plain:
        gm(x)
    reset_net(gm)
    with torch.no_grad(), LiveBytesTracker() as base:
        model(x)
    assert plain.peak == base.peak  # no packing buffers, no snapshots


def test_batchnorm_statistics_update_exactly_once():
    torch.manual_seed(0)
    model = MLP(bn=True)
    ref = copy.deepcopy(model)
    x = torch.rand(4, 3, 16)
    gm = fxmemopt.optimize(model, (x,))
    report = compare_training_step(ref, gm, (x,))
    assert report.ok, str(report)
    bn = model.net[0][1]
    assert bn.num_batches_tracked.item() == 1
    assert torch.equal(bn.running_mean, ref.net[0][1].running_mean)


def test_dropout_masks_are_replayed_even_if_rng_moves_before_backward():
    torch.manual_seed(0)
    model = MLP(dropout=0.5)
    ref = copy.deepcopy(model)
    x = torch.rand(4, 3, 16)
    gm = fxmemopt.optimize(model, (x,))
    report = compare_training_step(ref, gm, (x,), between=lambda: torch.manual_seed(123))
    assert report.ok, str(report)


def test_neuron_state_after_step_and_reset_paths():
    torch.manual_seed(0)
    model = MLP()
    ref = copy.deepcopy(model)
    x = torch.rand(4, 3, 16)
    gm = fxmemopt.optimize(model, (x,))
    for reset_target, ref_target in ((gm, ref), (model, ref)):
        report = compare_training_step(ref, gm, (x,))
        assert report.ok, str(report)
        states = module_states(model)
        assert states and all(isinstance(v, torch.Tensor) for v in states.values())
        reset_net(reset_target)
        reset_net(ref_target)
        assert all(v == 0.0 for v in module_states(model).values())


def test_returned_module_shares_parameters_and_state_dict_keys():
    model = DeepConvSNN(num_blocks=2, channels=4)
    model.register_buffer("unused_buffer", torch.zeros(2))
    model.extra = nn.Linear(2, 2)  # never called in forward: still part of the state dict
    x = torch.rand(2, 2, 3, 8, 8)
    gm = fxmemopt.optimize(model, (x,))
    assert list(gm.state_dict()) == list(model.state_dict())
    assert [id(p) for p in gm.parameters()] == [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = model.stem.conv[0].weight.clone()
    gm(x).sum().backward()
    opt.step()
    assert not torch.equal(w, model.stem.conv[0].weight)


def test_autocast_bf16_is_replayed():
    torch.manual_seed(0)
    model = MLP(bn=True)
    ref = copy.deepcopy(model)
    x = torch.rand(4, 3, 16)
    gm = fxmemopt.optimize(model, (x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = compare_training_step(ref, gm, (x,), loss_fn=lambda out: out.float().sum())
    assert report.ok, str(report)


def test_non_binary_spikes_at_run_time_are_stored_unpacked_once_warned():
    model = MLP()
    x = torch.rand(4, 2, 16)
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    ref = copy.deepcopy(model)

    # A neuron that suddenly emits 2s: the packer's check must catch it and keep the tensor as is.
    def graded(mod, args, out):
        return out * 2

    for m in (model.net[1], ref.net[1]):
        m.register_forward_hook(graded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = compare_training_step(ref, gm, (x,))
        reset_net(gm)
        reset_net(ref)
        compare_training_step(ref, gm, (x,))
    assert report.ok, str(report)
    assert summary.unpacked_fallbacks == 2
    assert len([w for w in caught if issubclass(w.category, FxMemOptWarning)]) == 1


def test_retain_graph_second_backward_recomputes_and_matches():
    torch.manual_seed(0)
    model = MLP()
    x = torch.rand(4, 2, 16)
    gm, summary = fxmemopt.optimize(model, (x,), level=1, return_summary=True)  # whole regions: one replay each
    loss = gm(x).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    loss.backward()
    assert all(torch.equal(2 * a, p.grad) for a, p in zip(first, model.parameters()))
    assert all(s.recomputations == 2 for s in summary.runtime.values())


class InPlaceNeuron(MemoryModule):
    """A neuron that mutates its state in place (bad style): Rule 5 replays it from a copy taken at entry."""

    def __init__(self):
        super().__init__()
        self.register_memory("v", 0.0)
        self.v_threshold = 1.0

    def forward(self, x):
        if not isinstance(self.v, torch.Tensor):
            self.v = torch.zeros_like(x[0])
        out = []
        for t in range(x.shape[0]):
            with torch.no_grad():
                self.v.mul_(0.5)
            h = self.v + x[t]
            s = (h >= 1.0).to(x)
            out.append(s + h - h.detach())
        return torch.stack(out)


def test_in_place_state_mutation_is_replayed_from_an_entry_copy():
    torch.manual_seed(0)
    model = nn.Sequential(SeqToANNContainer(nn.Linear(4, 4)), InPlaceNeuron(),
                          SeqToANNContainer(nn.Linear(4, 4)), InPlaceNeuron())
    x = torch.rand(3, 2, 4)
    model(x)  # v is now a tensor, mutated in place by the next forward
    ref = copy.deepcopy(model)
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    report = compare_training_step(ref, gm, (x,))
    assert report.ok, str(report)
    assert all(s.state_copies == 1 and s.recomputations == 1 for s in summary.runtime.values())


class ObservingNeuron(IFNode):
    """An IF neuron that also keeps an observation of its input as a plain attribute, with its graph: the mean
    over all steps (a ``store_v_seq``-like record: time slices would change it) or the last step's input (like
    spikingjelly's ``save_v_LIFNode.v_before_spike`` in ``spike_dhs``: the same when sliced)."""

    def __init__(self, last: bool):
        super().__init__(v_threshold=0.5)
        self.last = last

    def forward(self, x):
        self.observed = x[-1] * 2 if self.last else (x * 2).mean()
        return super().forward(x)


@pytest.mark.parametrize("last", [False, True], ids=["all-steps", "last-step"])
def test_recomputation_puts_back_every_attribute_it_rebinds(last):
    """Regression (spike_dhs, 89.0 -> 51.4 MiB): an attribute rebound during recomputation held the recomputed
    graph and everything it saved until the step ended; afterwards it must be the forward's object again, with the
    unoptimized model's value. A neuron whose observation depends on all steps is not sliced in time."""
    torch.manual_seed(0)
    f, t, n = 64, 6, 4
    model = nn.Sequential(SeqToANNContainer(nn.Linear(f, f)), ObservingNeuron(last),
                          SeqToANNContainer(nn.Linear(f, f)), ObservingNeuron(last))
    x = torch.rand(t, n, f)
    ref = copy.deepcopy(model)
    gm = fxmemopt.optimize(model, (x,), prefer="memory")
    regions = [type(m).__name__ for m in gm.modules() if isinstance(m, CheckpointRegion)]
    assert len(regions) == 2
    assert ("ChunkedRegion" in regions) == last
    neurons = [m for m in model if isinstance(m, ObservingNeuron)]
    with LiveBytesTracker() as tracker:
        out = gm(x)
        seen = [m.observed for m in neurons]
        after_forward = tracker.live
        out.sum().backward()
        assert all(m.observed is o for m, o in zip(neurons, seen))
        del out
        assert tracker.live <= after_forward + sum(p.grad.nbytes for p in model.parameters())
    ref(x).sum().backward()
    assert all(torch.equal(m.observed, r.observed)
               for m, r in zip(neurons, [r for r in ref if isinstance(r, ObservingNeuron)], strict=True))
    reset_net(gm)
    reset_net(ref)
    report = compare_training_step(ref, gm, (x,))
    assert report.ok, str(report)


_GLOBAL_CALLS = [0]


class Flaky(nn.Module):
    """Reads a global counter (not module state, so it cannot be replayed): the recomputation saves a different
    number of tensors than the forward did."""

    def forward(self, x):
        _GLOBAL_CALLS[0] += 1
        return x * x if _GLOBAL_CALLS[0] % 2 else x + 1


def test_recomputation_mismatch_is_reported():
    model = nn.Sequential(SeqToANNContainer(nn.Linear(4, 4)), Flaky(), LIFNode())
    x = torch.rand(3, 2, 4)
    # optimize's validation step meets it and leaves the region out, naming the error
    with pytest.warns(fxmemopt.FxMemOptWarning, match="ckpt_2"):
        gm, summary = fxmemopt.optimize(model, (x,), leaf_modules=(Flaky,), return_summary=True)
    (name, why), = summary.failed_regions
    # (which mismatch depends on how many calls optimize made before: the counter's parity)
    assert name == "ckpt_2" and why.startswith("RecomputationMismatchError") and "did not reproduce" in why
    # the runtime itself raises it, naming the region, when such a region runs (here placed by hand)
    manual = nn.Sequential(SeqToANNContainer(nn.Linear(4, 4)), fxmemopt.Checkpointed(nn.Sequential(Flaky(),
                                                                                                LIFNode())))
    _GLOBAL_CALLS[0] = 0
    with pytest.raises(RecomputationMismatchError, match="recomputation in backward did not reproduce"):
        manual(x).sum().backward()


def test_deepcopy_and_pickle_of_optimized_module():
    torch.manual_seed(0)
    model = MLP(bn=True)
    x = torch.rand(4, 2, 16)
    gm = fxmemopt.optimize(model, (x,))
    for clone in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert clone.net[0][0].weight is not model.net[0][0].weight
        body = clone.ckpt_net_1.body
        assert body.get_submodule("net.0.0") is clone.get_submodule("net.0.0")  # bodies follow the copy
        report = compare_training_step(copy.deepcopy(model), clone, (x,))
        assert report.ok, str(report)
