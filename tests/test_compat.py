"""fxmemopt.compat: one test (or more) per torch change fxmemopt depends on, each failing without its shim.

Run on every torch CI tests (2.13.0 and 2.14.1; README "Tested torch versions"). A test that pins a change made in
one version fails, with the shim removed, on that version (noted on each test); the others fail on both.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import fxmemopt
from fxmemopt import compat
from fxmemopt.analysis.trace import make_graph_module, trace
from fxmemopt.errors import UnsupportedTorchError
from fxmemopt.profiling.verify import compare_training_step
from fxmemopt.snn import LIFNode, reset_net
from fxmemopt.snn.surrogate import ATanSpike


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


# -- torch.autograd.Function.apply (torch 2.14: a classmethod_descriptor without __func__) ---------------------------
def test_function_apply_binds_a_classmethod_descriptor_and_a_classmethod():
    # dict.fromkeys is a C classmethod_descriptor on every Python: what Function.apply is from torch 2.14
    descriptor = dict.__dict__["fromkeys"]
    assert not hasattr(descriptor, "__func__")
    assert compat.bind_function_apply(descriptor, dict)("ab") == {"a": None, "b": None}

    class A:
        @classmethod
        def make(cls, x):
            return cls, x

    assert compat.bind_function_apply(A.__dict__["make"], A)(1) == (A, 1)
    x = torch.ones(3)
    assert torch.equal(compat.bind_function_apply(compat.original_function_apply(), _Double)(x), x * 2)


def test_tracing_calls_a_custom_function_on_concrete_values_and_restores_apply():
    # Fails on torch 2.14 with the old `Function.__dict__["apply"].__func__` (every spikingjelly neuron).
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.sn = LIFNode()

        def forward(self, x):
            # concrete values inside the trace: the real apply runs
            scale = float(_Double.apply(torch.ones(1))) + float(ATanSpike.apply(torch.zeros(1), 2.0))
            return self.sn(x * scale)

    before = torch.autograd.Function.__dict__["apply"]
    cap = trace(M(), (torch.rand(2, 3),), stateful_paths=["sn"])  # the neuron runs on examples
    assert torch.autograd.Function.__dict__["apply"] is before
    assert [n.target for n in cap.graph.nodes if n.op == "call_module"] == ["sn"]


# -- saved-tensor hook order (unchanged in 2.13 and 2.14; regions and the step recorder rely on it) ----------------
def test_a_nested_saved_tensors_hooks_context_alone_sees_what_is_saved_inside_it():
    seen = []

    def pack(name):
        return lambda t: (seen.append(name), t)[1]

    x = torch.ones(3, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack("outer"), lambda t: t):
        with compat.saved_tensors_hooks(pack("inner"), lambda t: t):
            y = x * x
        (y * y).sum().backward()
    assert seen == ["inner", "inner", "outer", "outer"]
    # recomputation pushes its hooks inside a backward started under the user's context (which it inherits)
    seen.clear()

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return a.clone()

        @staticmethod
        def backward(ctx, g):
            (a,) = ctx.saved_tensors
            with torch.enable_grad(), compat.saved_tensors_hooks(pack("recompute"), lambda t: t):
                b = a.detach().requires_grad_()
                b * b
            return g

    with torch.autograd.graph.saved_tensors_hooks(pack("outer"), lambda t: t):
        Recompute.apply(x).sum().backward()
    assert seen == ["outer", "recompute", "recompute"]


def test_the_nesting_check_passes_here_whatever_the_callers_grad_mode():
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        compat._innermost_hooks_only.cache_clear()
        with mode():
            compat.check_saved_tensors_hooks_nesting()


def test_optimize_refuses_a_torch_whose_nested_hooks_do_not_apply_alone(monkeypatch):
    # Without compat's check, optimize would build regions whose saved tensors an outer context also packs.
    monkeypatch.setattr(compat, "_innermost_hooks_only", lambda: False)
    with pytest.raises(UnsupportedTorchError, match="saved_tensors_hooks"):
        fxmemopt.optimize(nn.Sequential(nn.Linear(3, 3), LIFNode()), (torch.rand(2, 3),))


def test_an_optimized_step_under_the_users_save_on_cpu_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), LIFNode(), nn.Linear(8, 8), LIFNode())
    x = torch.rand(4, 2, 8)
    gm = fxmemopt.optimize(model, (x,), prefer="memory")
    grads = []
    for m in (model, gm):
        reset_net(m)
        m.zero_grad()
        with torch.autograd.graph.save_on_cpu():
            m(x).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


# -- torch.utils.checkpoint's respect_saved_tensors_hooks warning (torch 2.14) -------------------------------------
def _sac_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    saved = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


class _SelectiveBlock(nn.Module):
    """A user's block with a selective activation checkpoint inside (kept a leaf, so fxmemopt's hooks are around it)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

        return checkpoint(lambda z: self.fc(z).sin(), x, use_reentrant=False,
                          context_fn=functools.partial(create_selective_checkpoint_contexts, _sac_policy))


def test_a_selective_checkpoint_inside_fxmemopts_hooks_sees_only_the_users_hooks():
    # Fails on torch 2.14 with torch's context in place of compat.saved_tensors_hooks: its FutureWarning says a
    # later release will pack the tensors the checkpoint keeps with fxmemopt's hooks.
    x = torch.rand(2, 8, requires_grad=True)
    block = _SelectiveBlock()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with compat.saved_tensors_hooks(lambda t: t, lambda t: t):
            out = block(x)
        out.sum().backward()
    # the user's own context, outside fxmemopt's, is still the one torch's checkpoint reports on (torch 2.14)
    if compat._USER_HOOKS is not None:
        user = (lambda t: t, lambda t: t)
        with torch.autograd.graph.saved_tensors_hooks(*user), compat.saved_tensors_hooks(lambda t: t, lambda t: t):
            assert compat._USER_HOOKS() == user


def test_a_region_around_a_selective_checkpoint_is_exact_and_silent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), LIFNode(), _SelectiveBlock(), LIFNode())
    x = torch.rand(4, 2, 8)
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        gm, summary = fxmemopt.optimize(model, (x,), leaf_modules=(_SelectiveBlock,), return_summary=True)
        assert any("_2" in r.nodes for r in summary.regions), summary  # the block is inside a region
        report = compare_training_step(reference, gm, (x,))
    assert report.ok, report


# -- non-persistent buffers in GraphModules --------------------------------------------------------------------------
class _WithNonPersistent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)
        self.register_buffer("shift", torch.zeros(3))

    def forward(self, x):
        return self.fc(x) * self.scale + self.shift


def test_graph_modules_leave_out_non_persistent_buffers_like_the_model():
    # fx.GraphModule built from a dict of targets (as fxmemopt builds them) makes every buffer persistent on
    # 2.13 and 2.14 alike (2.14 copies the names only from a root module); compat copies them.
    model = _WithNonPersistent()
    x = torch.rand(2, 3)
    gm = make_graph_module(model, trace(model, (x,)).graph, "M")
    assert list(gm.state_dict()) == list(model.state_dict()) == ["shift", "fc.weight", "fc.bias"]
    optimized = fxmemopt.optimize(nn.Sequential(model, LIFNode()), (x,))
    assert "0.scale" not in optimized.state_dict() and "0.shift" in optimized.state_dict()
    dst = nn.Module()
    compat.copy_non_persistent_buffers(dst, model)
    assert dst._non_persistent_buffers_set == {"scale"}


# -- the other private names: fallbacks -------------------------------------------------------------------------------
def test_fallbacks_when_private_names_are_absent(monkeypatch):
    for name in ("_GRAPH_TASK_ID", "_WILL_EXECUTE", "_CURRENT_NODE", "_SEQUENCE_NR"):
        monkeypatch.setattr(compat, name, None)
    assert compat.current_graph_task_id() == -1
    assert compat.will_engine_execute_node(object()) is True
    assert compat.current_autograd_node() is None
    with pytest.raises(UnsupportedTorchError, match=r"_get_sequence_nr.*supports torch >=2\.13"):
        compat.autograd_sequence_nr()
    with pytest.raises(UnsupportedTorchError, match="_sequence_nr"):
        compat.node_sequence_nr(object())
    with pytest.raises(UnsupportedTorchError, match="_cdata"):
        compat.storage_key(object())
    assert compat.compiler_disable(len) is not None


def test_the_private_names_exist_on_this_torch():
    x = torch.ones(2, requires_grad=True)
    y = x * 2
    assert compat.node_sequence_nr(y.grad_fn) < compat.autograd_sequence_nr()
    assert compat.current_graph_task_id() == -1  # outside a backward pass
    assert compat.storage_key(y.untyped_storage()) == compat.storage_key(y.untyped_storage())
    assert compat.tree_leaves(((1, [2]), {"a": 3})) == [1, 2, 3]
    assert compat.TorchDispatchMode is not None


def test_no_module_but_compat_reaches_private_torch_names():
    import pathlib
    import re

    package = pathlib.Path(fxmemopt.__file__).parent
    private = re.compile(r"torch\._C\b|torch\.utils\._|\._cdata\b|\._sequence_nr\(|__func__"
                         r"|\._non_persistent_buffers_set|_python_dispatch|_pytree")
    users = {str(p.relative_to(package)): [m.group(0) for m in private.finditer(p.read_text(encoding="utf-8"))]
             for p in package.rglob("*.py") if p.name != "compat.py"}
    assert {k: v for k, v in users.items() if v} == {}


# -- pyproject's filterwarnings: fxmemopt's own warnings fail the tests (FxMemOptWarning excepted) --------------------
@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning, UserWarning])
def test_a_warning_attributed_to_fxmemopt_fails_the_tests(category):
    code = compile(f"import warnings\nwarnings.warn('deprecated here', {category.__name__})", "fxmemopt/x.py", "exec")
    with pytest.raises(category, match="deprecated here"):
        exec(code, {"__name__": "fxmemopt.api"})
    with pytest.warns(category, match="deprecated here"):  # elsewhere: a warning, as before
        exec(code, {"__name__": "some_library"})


def test_fxmemopts_own_warning_stays_a_warning():
    code = compile("import warnings\nfrom fxmemopt.errors import FxMemOptWarning\n"
                   "warnings.warn('handled', FxMemOptWarning)", "fxmemopt/x.py", "exec")
    with pytest.warns(fxmemopt.FxMemOptWarning):
        exec(code, {"__name__": "fxmemopt.api"})
    with warnings.catch_warnings(record=True) as caught:  # the configured filters, not pytest.warns's "always"
        exec(code, {"__name__": "fxmemopt.runtime.checkpoint"})
    assert [w.category for w in caught] == [fxmemopt.FxMemOptWarning]
