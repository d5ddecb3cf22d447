"""StateSnapshot / ModelState / probe: the state machinery recomputation relies on."""

import torch
from torch import nn

from fxmemopt.analysis.state import ModelState, StateSnapshot, probe
from fxmemopt.snn import LIFNode, SeqToANNContainer


def test_snapshot_restore_memories_and_attrs():
    n = LIFNode()
    n.v = torch.ones(2)
    n.extra = 3.0
    snap = StateSnapshot.take(n, ("extra",))
    n.v = torch.zeros(2)
    n.extra = 4.0
    mem = n._memories
    snap.restore(n)
    assert torch.equal(n.v, torch.ones(2)) and n.extra == 3.0
    assert n._memories is mem  # the dict keeps its identity


def test_snapshot_missing_attribute_is_removed_on_restore():
    m = nn.Module()
    snap = StateSnapshot.take(m, ("v",))
    m.__dict__["v"] = torch.ones(1)
    snap.restore(m)
    assert "v" not in m.__dict__


def test_snapshot_detects_in_place_modification():
    n = LIFNode()
    n.v = torch.ones(2)
    snap = StateSnapshot.take(n, ())
    assert snap.modified_in_place() == []
    n.v.add_(1)
    assert snap.modified_in_place() == ["v"]


def test_detached_snapshot_keeps_requires_grad_but_not_history():
    n = LIFNode()
    w = torch.ones(2, requires_grad=True)
    n.v = w * 2
    d = StateSnapshot.take(n, ()).detached()
    v = d.memories["v"]
    assert v.requires_grad and v.grad_fn is None and torch.equal(v, n.v)


def test_model_state_restores_buffers_states_grads_rng_and_modes():
    model = nn.Sequential(SeqToANNContainer(nn.Linear(3, 3), nn.BatchNorm1d(3)), LIFNode())
    x = torch.rand(2, 4, 3)
    model(x).sum().backward()
    bn = model[0][1]
    mean, count, v, grad = bn.running_mean.clone(), bn.num_batches_tracked.clone(), model[1].v, bn.weight.grad
    saved = ModelState.capture(model, {"1": ()})
    rng = torch.get_rng_state()
    with saved.restored_after():
        model.eval()
        model[0][0].weight.grad = None
        model.train()
        model(x)
        torch.rand(3)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.num_batches_tracked, count)
    assert model[1].v is v and bn.weight.grad is grad and torch.equal(torch.get_rng_state(), rng)
    assert model.training


def test_probe_finds_neurons_and_mutated_buffers_without_side_effects():
    model = nn.Sequential(SeqToANNContainer(nn.Linear(3, 3), nn.BatchNorm1d(3)), LIFNode())
    x = torch.rand(2, 4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = probe(model, (x,))
    assert result.stateful == {"1": ()}
    assert {("0.1", "running_mean"), ("0.1", "num_batches_tracked")} <= set(result.mutated_buffers)
    assert result.call_counts["1"] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[1].v == 0.0


def test_probe_finds_an_attribute_a_memories_module_rebinds_beside_its_dict():
    """A ``MemoryModule`` subclass that also keeps a trace in a plain attribute: both are its state (the probe once
    took a ``_memories`` module's state from the dict alone, and recomputation started from the final trace)."""
    from fxmemopt.snn import MemoryModule

    class Traced(MemoryModule):
        def __init__(self):
            super().__init__()
            self.register_memory("v", 0.0)
            self.trace = 0.0

        def forward(self, x):
            self.v = self.v + x
            self.trace = self.trace / 2 + torch.sigmoid(self.v)
            return self.v - self.trace

    model = nn.Sequential(nn.Linear(2, 2), Traced())
    found = probe(model, (torch.ones(3, 2),))
    assert found.stateful == {"1": ("trace",)}
    assert model[1].trace == 0.0 and model[1].v == 0.0  # left as it was


# --- states rebound before use (StateWatch, ProbeResult.entry_dead) -------------------------------------------------

class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = torch.ones(2, 3)


def test_state_watch_counts_value_uses_not_metadata():
    from fxmemopt.analysis.state import StateWatch

    m = _Holder()
    original = m.s
    w = StateWatch(m, "s")
    assert w.watching and m.s is not original  # (comparing its values here would be a use)
    _ = (m.s.shape, m.s.size(0), m.s.dim(), m.s.dtype, m.s.device, m.s.stride(), torch.zeros_like(m.s))
    assert not w.finish() and m.s is original  # metadata only; not rebound: the tensor itself is put back
    w = StateWatch(m, "s")
    m.s = m.s * 2  # a use of the values, then a rebinding
    assert w.finish() and torch.equal(m.s, 2 * original) and type(m.s) is torch.Tensor


def test_state_watch_sees_views_and_escapes_and_skips_grad_tensors():
    from fxmemopt.analysis.state import StateWatch

    m = _Holder()
    w = StateWatch(m, "s")
    view = m.s[0]  # a view's later reads are invisible: the view itself counts
    assert w.finish() and type(view) is torch.Tensor
    w = StateWatch(m, "s")
    escaped = m.s
    assert w.finish(out=(escaped,))  # returned as it is: it leaves the call, a use
    m.s = torch.ones(2, 3, requires_grad=True)
    w = StateWatch(m, "s")
    assert not w.watching and w.finish()  # an alias would be a node in autograd's graph: not watched


def test_state_watch_copies_before_an_in_place_use():
    from fxmemopt.analysis.state import StateWatch

    m = _Holder()
    original = m.s
    w = StateWatch(m, "s", copy_on_use=True)
    m.s.mul_(3)  # through the alias: same storage and version counter
    assert w.finish() and torch.equal(w.copy, torch.ones(2, 3)) and original._version == 1


class _RebindsFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = torch.zeros(2, 3)

    def forward(self, x):
        if self.s.shape != x.shape:  # metadata: not a use
            self.s = torch.zeros_like(x)
        self.s = x * 2
        return self.s + 1


class _ReadsFirst(_RebindsFirst):
    def forward(self, x):
        self.s = self.s * 0.5 + x
        return self.s


def test_probe_finds_states_rebound_before_use():
    model = nn.Sequential(_RebindsFirst(), _ReadsFirst())
    found = probe(model, (torch.rand(2, 3),))
    assert found.stateful == {"0": ("s",), "1": ("s",)}
    assert found.entry_dead == {"0": ("s",)}
    assert type(model[0].s) is torch.Tensor and type(model[1].s) is torch.Tensor
