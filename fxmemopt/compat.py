"""Every private or changed torch API fxmemopt uses, in one place: one function each, with its fallback.

fxmemopt supports torch ``>=2.13,<2.17`` (pyproject); CI tests 2.13.0 and 2.14.1 (README "Tested torch versions").
The rest of the package imports what it needs from here, never ``torch._C`` or ``torch.utils._*`` directly, so a
torch release that renames or changes one of these breaks one function here, with a test in
``tests/test_compat.py`` pinning the behaviour fxmemopt relies on. Each function says its fallback: a public or
conservative equivalent where one exists (slower or less precise, never a wrong gradient), else
:class:`~fxmemopt.errors.UnsupportedTorchError` naming the supported range.

What changed between the versions tested, and where it is handled:
  * torch 2.14: ``torch.autograd.Function.apply`` is a ``classmethod_descriptor`` without ``__func__``
    (:func:`bind_function_apply`).
  * torch 2.14: ``fx.GraphModule(module, graph)`` copies the root's non-persistent buffer names; built from a dict
    of targets (as fxmemopt builds them) it still does not (:func:`copy_non_persistent_buffers`).
  * torch 2.14: ``torch.utils.checkpoint`` with a selective-checkpoint policy warns (``FutureWarning``) when any
    ``saved_tensors_hooks`` context is active (fxmemopt's regions push one), and a later release will pack the
    tensors it keeps with those hooks (:class:`saved_tensors_hooks`).
Unchanged, and relied on (:func:`check_saved_tensors_hooks_nesting`): a nested ``saved_tensors_hooks`` context
alone sees the tensors saved inside it, in forward and in a backward pass started inside an outer context.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .errors import UnsupportedTorchError

__all__ = [
    "SUPPORTED_TORCH",
    "TESTED_TORCH",
    "TorchDispatchMode",
    "autograd_sequence_nr",
    "queue_engine_callback",
    "bind_function_apply",
    "check_saved_tensors_hooks_nesting",
    "compiler_disable",
    "copy_non_persistent_buffers",
    "gradient_hook_count",
    "current_autograd_node",
    "current_graph_task_id",
    "node_sequence_nr",
    "original_function_apply",
    "saved_tensors_hooks",
    "storage_key",
    "tree_flatten",
    "tree_leaves",
    "tree_unflatten",
    "will_engine_execute_node",
]

#: The torch range pyproject admits, and the versions CI runs the suite on.
SUPPORTED_TORCH = ">=2.13,<2.17"
TESTED_TORCH = ("2.13.0", "2.14.1")


def _unsupported(what: str) -> UnsupportedTorchError:
    return UnsupportedTorchError(
        f"torch {torch.__version__}: {what} is missing. fxmemopt supports torch {SUPPORTED_TORCH} (tested: "
        f"{', '.join(TESTED_TORCH)}); install one of those, or report the torch version you use.")


# -- pytree and dispatch modes (private modules, no public equivalent) -------------------------------------------
try:
    from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten
except ImportError:  # pragma: no cover - every supported torch has it
    def _no_pytree(*args: Any, **kwargs: Any) -> Any:
        raise _unsupported("torch.utils._pytree")

    tree_flatten = tree_leaves = tree_unflatten = _no_pytree

try:
    from torch.utils._python_dispatch import TorchDispatchMode
except ImportError:  # pragma: no cover - every supported torch has it
    class TorchDispatchMode:  # type: ignore[no-redef]
        """Stand-in: memory measurement on CPU needs torch's dispatch modes."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise _unsupported("torch.utils._python_dispatch.TorchDispatchMode")


# -- autograd.Function.apply -------------------------------------------------------------------------------------
def original_function_apply() -> Any:
    """The raw ``apply`` attribute of ``torch.autograd.Function`` (to restore it after patching)."""
    return torch.autograd.Function.__dict__["apply"]


def bind_function_apply(descriptor: Any, cls: type) -> Callable[..., Any]:
    """``descriptor`` (``Function``'s own ``apply``) bound to the Function subclass ``cls``.

    torch <= 2.13 defines ``apply`` as a ``classmethod`` (``__func__(cls, ...)`` also works); from 2.14 it is a
    C ``classmethod_descriptor`` with no ``__func__``. ``__get__(None, cls)`` binds both.
    Fallback: ``__func__`` for a descriptor without ``__get__``; else :class:`UnsupportedTorchError`.
    """
    get = getattr(type(descriptor), "__get__", None)
    if get is not None:
        return get(descriptor, None, cls)
    func = getattr(descriptor, "__func__", None)
    if func is None:
        raise _unsupported("a bindable torch.autograd.Function.apply")
    return functools.partial(func, cls)


# -- autograd engine internals -----------------------------------------------------------------------------------
# Looked up once (some are called for every tensor autograd saves); tests replace these names to try the fallbacks.
_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)
_SEQUENCE_NR = getattr(getattr(torch._C, "_autograd", None), "_get_sequence_nr", None)
_WILL_EXECUTE = getattr(torch._C, "_will_engine_execute_node", None)
_CURRENT_NODE = getattr(torch._C, "_current_autograd_node", None)


def current_graph_task_id() -> int:
    """Identifies the running backward pass (``torch._C._current_graph_task_id``); -1 outside one.
    Fallback: -1 always (a region then recomputes what only final states need: slower, still exact)."""
    return _GRAPH_TASK_ID() if _GRAPH_TASK_ID is not None else -1


def autograd_sequence_nr() -> int:
    """The sequence number the next autograd node created on this thread will get
    (``torch._C._autograd._get_sequence_nr``). No fallback: :class:`UnsupportedTorchError`."""
    if _SEQUENCE_NR is None:
        raise _unsupported("torch._C._autograd._get_sequence_nr")
    return _SEQUENCE_NR()


def queue_engine_callback(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the running backward pass ends (``Variable._execution_engine.queue_callback``; an exception
    it raises ends the backward). Only valid inside a backward pass. No fallback: :class:`UnsupportedTorchError`."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    queue = getattr(engine, "queue_callback", None)
    if queue is None:
        raise _unsupported("torch.autograd.Variable._execution_engine.queue_callback")
    queue(fn)


def node_sequence_nr(node: Any) -> int:
    """An autograd node's sequence number (``Node._sequence_nr()``). No fallback: :class:`UnsupportedTorchError`."""
    try:
        get = node._sequence_nr
    except AttributeError:
        raise _unsupported("torch.autograd.graph.Node._sequence_nr") from None
    return get()


def will_engine_execute_node(node: Any) -> bool:
    """Will the running backward execute ``node`` (``torch._C._will_engine_execute_node``)?
    Fallback: True (conservative: the region recomputes the tensors, slower, still exact)."""
    return True if _WILL_EXECUTE is None else bool(_WILL_EXECUTE(node))


def current_autograd_node() -> Any:
    """The autograd node the engine is running on this thread, or None (``torch._C._current_autograd_node``).
    Fallback: None (the step recorder then attributes backward allocations to the node it saw last)."""
    return _CURRENT_NODE() if _CURRENT_NODE is not None else None


def storage_key(storage: Any) -> int:
    """A key identifying an untyped storage while it lives (``UntypedStorage._cdata``, the C object's address:
    the Python wrapper is made anew on every ``untyped_storage()`` call, so its ``id`` is no key).
    No fallback: :class:`UnsupportedTorchError`."""
    try:
        return storage._cdata
    except AttributeError:
        raise _unsupported("torch.UntypedStorage._cdata") from None


# -- saved-tensor hooks --------------------------------------------------------------------------------------------
@functools.cache
def _innermost_hooks_only() -> bool:
    seen: list[str] = []

    def hook(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def pack(t: torch.Tensor) -> torch.Tensor:
            seen.append(name)
            return t
        return pack

    with torch.inference_mode(False), torch.enable_grad():  # whatever the caller's mode
        x = torch.ones(2, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(hook("outer"), lambda t: t):
            with torch.autograd.graph.saved_tensors_hooks(hook("inner"), lambda t: t):
                y = x * x
            z = y * y
        del z
    return seen == ["inner", "inner", "outer", "outer"]


def check_saved_tensors_hooks_nesting() -> None:
    """Check, once per process, that a nested ``saved_tensors_hooks`` context alone sees what is saved inside it.

    A region's frame (NOTE [Checkpoint region invariants], Rule 1) and its recomputation (Rule 3) push their hooks
    inside whatever context is active (the user's ``save_on_cpu``, the step recorder's hooks, an enclosing region,
    the backward pass's inherited context); if an outer pair also saw those tensors (as torch's
    ``node_creation_hook`` calls every active hook), the frame's handles would be packed again and the recorder
    would count tensors that are never kept. Raises :class:`UnsupportedTorchError` if the running torch does that.
    """
    if not _innermost_hooks_only():
        raise UnsupportedTorchError(
            f"torch {torch.__version__}: a nested torch.autograd.graph.saved_tensors_hooks context no longer "
            f"applies alone (the enclosing context's hooks also saw the tensors saved inside it); fxmemopt's "
            f"regions rely on it. fxmemopt supports torch {SUPPORTED_TORCH} (tested: {', '.join(TESTED_TORCH)}).")


def _checkpoint_user_hooks() -> Any:
    try:  # torch >= 2.14: how torch.utils.checkpoint finds the user's hooks under its own
        from torch.utils.checkpoint import _current_user_saved_tensors_hooks
    except ImportError:
        return None
    return _current_user_saved_tensors_hooks


_USER_HOOKS = _checkpoint_user_hooks()


class saved_tensors_hooks(torch.autograd.graph.saved_tensors_hooks):
    """``torch.autograd.graph.saved_tensors_hooks(pack_hook, unpack_hook)`` for fxmemopt's own mechanics (region
    frames, recomputation, the step recorder), transparent to ``torch.utils.checkpoint``.

    From torch 2.14 a selective activation checkpoint (``checkpoint(..., context_fn=...)``, in a module the user
    wrote and fxmemopt keeps as a leaf) looks for the *user's* saved-tensor hooks around it, warns
    (``FutureWarning``) when it finds some, and a later release will pack the tensors it keeps with them. fxmemopt's
    hooks are not the user's: this context marks its pack hook the way torch marks checkpoint's own internal hooks
    (``_checkpoint_internal``, with the hooks that were visible when it was entered), so such a checkpoint sees the
    hooks the user set around the model (``save_on_cpu``), or none, exactly as without fxmemopt.
    Fallback (torch <= 2.13, which has no such lookup): torch's context unchanged.
    """

    def __init__(self, pack_hook: Callable[[torch.Tensor], Any], unpack_hook: Callable[[Any], torch.Tensor]) -> None:
        if _USER_HOOKS is not None:
            inner = pack_hook

            def pack_hook(t: torch.Tensor) -> Any:
                return inner(t)

            pack_hook._checkpoint_internal = True  # type: ignore[attr-defined]
        super().__init__(pack_hook, unpack_hook)

    def __enter__(self) -> None:
        if _USER_HOOKS is not None:
            # only while on the hooks stack: autograd's saved variables keep the pack hook alive beyond gc's sight
            self.pack_hook._user_hooks = _USER_HOOKS()  # type: ignore[attr-defined]
        super().__enter__()

    def __exit__(self, *args: object) -> None:
        if _USER_HOOKS is not None:
            del self.pack_hook._user_hooks  # type: ignore[attr-defined]
        super().__exit__(*args)


# -- fx and modules ------------------------------------------------------------------------------------------------
def copy_non_persistent_buffers(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Give ``dst`` the non-persistent buffer names of ``src`` (``Module._non_persistent_buffers_set``), so that
    ``dst.state_dict()`` leaves out what ``src.state_dict()`` leaves out.

    ``fx.GraphModule(root, graph)`` does it itself from torch 2.14 when ``root`` is a module, never when it is a
    dict of targets (how fxmemopt builds its modules), on any version. Fallback: a module without the attribute
    has no non-persistent buffers (nothing to copy).
    """
    names = getattr(src, "_non_persistent_buffers_set", None)
    if names is None:
        return
    dst._non_persistent_buffers_set = set(names)


def compiler_disable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)`` (NOTE [Checkpoint region invariants], Rule 10). Fallback: ``fn`` itself
    (a torch without ``torch.compiler`` has no compiler to exclude it from)."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return fn if disable is None else disable(fn)


def gradient_hook_count(t: torch.Tensor) -> int:
    """How many hooks ``t.register_hook`` put on a tensor (``Tensor._backward_hooks``); 0 where that is absent.
    ``copy.deepcopy`` drops them, which :func:`fxmemopt.compare_training_step` points out."""
    hooks = getattr(t, "_backward_hooks", None)
    return len(hooks) if hooks else 0
