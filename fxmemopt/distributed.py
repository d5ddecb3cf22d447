"""Optimizing under ``torch.distributed``: plan once, broadcast the plan, apply it on every rank, then wrap in DDP.

Every rank must run the *same* rewritten graph, or DistributedDataParallel's gradient buckets would not line up.
Searching on every rank could pick different plans (the search is deterministic, but examples and predicted times
differ per rank), so :func:`optimize_distributed` searches on one rank and sends the plan, as JSON text, to the
others, which apply it without searching (:func:`fxmemopt.optimize` with ``plan=``)::

    dist.init_process_group("nccl")                      # or "gloo"
    model = build_model().to(device)
    gm = fxmemopt.distributed.optimize_distributed(model, (example_x,), prefer="memory")
    ddp = torch.nn.parallel.DistributedDataParallel(gm, device_ids=[local_rank])   # no static_graph needed
    for x, y in loader:
        loss = criterion(ddp(x).mean(0), y); loss.backward(); opt.step(); opt.zero_grad()
        functional.reset_net(ddp)                         # or fxmemopt.snn.reset_net

Why it works with DDP: fxmemopt's checkpoint regions are non-reentrant (Rule 1 in :mod:`fxmemopt.runtime.checkpoint`):
the
forward records autograd's graph as usual and recomputation in backward only refills saved tensors, so each
parameter's gradient is produced once per backward, in the order DDP expects ("marked ready twice" cannot
happen, and ``static_graph``/``find_unused_parameters`` are not required).

A plan file works the same way without this helper: ``summary.save_plan("plan.json")`` once, then every rank calls
``fxmemopt.optimize(model, example_inputs, plan="plan.json")``.

FSDP2 per block: optimize with ``keep_modules=`` and shard with :func:`fully_shard`;
:func:`predicted_peak_per_rank` predicts one rank's peak under that sharding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import fx, nn

from .errors import FxMemOptError, InvalidOptionError, ShardingError, format_error

__all__ = ["optimize_distributed", "fully_shard", "predicted_peak_per_rank"]

#: Search options that only the planning rank uses (the others apply its plan).
_SEARCH_ONLY = ("level", "prefer", "profile", "memory_budget", "checkpoint_budget", "max_gc_wrapped_modules",
                "gc_target_budget_ratio", "temporal_split_factor", "max_split_rounds", "max_candidates_per_round",
                "allow_expensive_profiling", "warmup_in_profile_workers", "measure", "measure_timeout_s", "exact",
                "never_worse", "targets")


def optimize_distributed(model: nn.Module, example_inputs: Sequence[Any], *, src: int = 0, group: Any = None,
                         **optimize_kwargs: Any) -> fx.GraphModule:
    """:func:`fxmemopt.optimize` on rank ``src``, the same plan applied on every other rank of ``group``.

    Collective: every rank of ``group`` must call it (with its own copy of the same architecture and example
    inputs of the same shapes). If planning fails on ``src``, every rank raises (``src`` its own error, the others
    an :class:`~fxmemopt.errors.FxMemOptError` quoting it) instead of waiting.

    Args:
        model: this rank's model (not yet wrapped in DDP).
        example_inputs: as for :func:`fxmemopt.optimize`.
        src: the rank that searches.
        group: the process group (default: the world).
        **optimize_kwargs: passed to :func:`fxmemopt.optimize` on ``src``; the other ranks get only those that do
            not concern the search (``leaf_modules``, ``stateful_modules``, ``compress``, ``predict``...).

    Returns:
        This rank's optimized module; wrap it in ``DistributedDataParallel``.
    """
    import torch.distributed as dist

    from .api import optimize

    if not (dist.is_available() and dist.is_initialized()):
        raise FxMemOptError(format_error("optimize_distributed", "needs an initialized default process group",
                                         fix="Call torch.distributed.init_process_group(...) first, or use "
                                             "fxmemopt.optimize in a single process."))
    if optimize_kwargs.get("return_summary") or "plan" in optimize_kwargs:
        raise FxMemOptError(format_error("optimize_distributed", "takes neither return_summary nor plan",
                                         fix="Read gm.fxmemopt_summary for the summary; to apply a plan file on "
                                             "every rank, call fxmemopt.optimize(..., plan=path) directly."))
    rank = dist.get_rank(group)
    message: list[Any] = [None]
    gm = None
    error: BaseException | None = None
    if rank == src:
        try:
            gm = optimize(model, example_inputs, **optimize_kwargs)
            message[0] = ("plan", gm.fxmemopt_summary.plan.to_json(indent=None))
        except BaseException as e:  # every rank must hear about it, or they would wait for a plan that never comes
            error = e
            message[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(message, src=dist.get_global_rank(group, src) if group is not None else src,
                               group=group)
    kind, payload = message[0]
    if rank == src:
        if error is not None:
            raise error
        return gm
    if kind == "error":
        raise FxMemOptError(format_error(f"optimize_distributed (rank {rank})",
                                         f"planning failed on rank {src}: {payload}",
                                         fix="Fix the error reported on that rank; every rank stopped with it."))
    apply_kwargs = {k: v for k, v in optimize_kwargs.items() if k not in _SEARCH_ONLY}
    return optimize(model, example_inputs, plan=payload, **apply_kwargs)


def fully_shard(module: nn.Module, units: Iterable[str] | None = None, **fsdp_kwargs: Any) -> nn.Module:
    """FSDP2 per block on an optimized module: ``torch.distributed.fsdp.fully_shard`` on each kept module, innermost
    first, then on the root (the usual recipe, on the module :func:`fxmemopt.optimize` returned).

    The blocks must have been kept as modules when optimizing (``keep_modules=``): a traced block's code is
    otherwise inlined into its parent, which never calls the block, so FSDP2's hooks on it would never gather its
    parameters. With ``keep_modules``, each block is a ``GraphModule`` at its own path holding its regions, and no
    region crosses a block's boundary, so a region's recomputation in backward finds its block's parameters
    gathered (FSDP2's pre-backward hook runs before any of the block's backward), with ``reshard_after_forward``
    True or False. Gradients are bitwise those of the unoptimized model sharded the same way.

    Example::

        gm = fxmemopt.optimize(model, (x,), keep_modules=(Block,))       # or optimize_distributed(...)
        fxmemopt.distributed.fully_shard(gm, mesh=mesh)                   # each Block, then the root

    Args:
        module: the optimized module (not yet sharded).
        units: paths to shard before the root (default: every kept module, ``module.fxmemopt_units``).
        **fsdp_kwargs: passed to every ``fully_shard`` call (``mesh``, ``reshard_after_forward``, ``mp_policy``...).

    Returns:
        ``module``, sharded in place (as ``fully_shard`` does).

    Raises:
        ShardingError: ``module`` is not an optimized module, or a path in ``units`` is not a kept module.
    """
    from torch.distributed.fsdp import fully_shard as fsdp_fully_shard

    kept = getattr(module, "fxmemopt_units", None)
    if kept is None:
        raise ShardingError(format_error(
            f"fxmemopt.distributed.fully_shard({type(module).__name__})", "is not a module fxmemopt.optimize returned",
            fix="Optimize first (gm = fxmemopt.optimize(model, (x,), keep_modules=...)), then shard gm; or call "
                "torch.distributed.fsdp.fully_shard on a model fxmemopt did not touch."))
    if isinstance(units, str):
        raise InvalidOptionError(format_error("fully_shard(units=...)", "takes a list of module paths",
                                              got=repr(units), fix=f"Pass units=[{units!r}]."))
    wanted = tuple(kept) if units is None else tuple(units)
    for path in wanted:
        if path not in kept:
            raise ShardingError(format_error(
                f"module {path!r}", "is not a module the optimized module calls: its code was traced into its "
                "parent, so FSDP2's hooks on it would never run",
                expected=f"one of the kept modules {list(kept) or '(none)'}",
                got=repr(path),
                fix=f"Optimize with keep_modules=[{path!r}, ...] (or keep_modules=(BlockClass,)) and shard again."))
    for path in sorted(wanted, key=lambda p: -p.count(".")):
        fsdp_fully_shard(module.get_submodule(path), **fsdp_kwargs)
    fsdp_fully_shard(module, **fsdp_kwargs)
    return module


def predicted_peak_per_rank(module: nn.Module, world_size: int, *, reshard_after_forward: bool = True) -> int:
    """The predicted peak bytes of one rank's training step once ``module`` is sharded with FSDP2 over
    ``world_size`` ranks (:func:`fully_shard`: each kept module, then the root), from its cost model.

    ``summary.predicted_peak_after`` is one rank's step on its own batch with every parameter whole. Sharded, a
    rank holds ``1/W`` of each parameter and gradient, and gathers a unit's parameters whole while the unit runs
    (forward and backward, with the all-gather buffer FSDP2 holds and the next unit prefetched in backward; from
    forward to the end of its backward with ``reshard_after_forward=False``); the root's own parameters stay
    gathered. :func:`fxmemopt.planning.sharding.sharded_peak` replays those rules on the predicted timeline; it
    leaves out a backend's own collective temporaries (see there). Measured against the CPU storage tracker on 2
    gloo ranks (``tests/test_fsdp.py``): within -1% to +7% (README, FSDP2).

    Args:
        module: a module :func:`fxmemopt.optimize` returned, sharded or not yet (parameter sizes are read whole).
        world_size: ranks the parameters are sharded over.
        reshard_after_forward: as given to :func:`fully_shard` for the kept modules.

    Returns:
        Predicted peak live bytes of one training step on one rank (the same quantity as ``measure_step``).

    Raises:
        FxMemOptError: ``module`` has no cost model (not optimized, or optimized with ``predict=False``), or makes a
            step of several calls (``calls_per_step``).
    """
    from .planning.costgraph import simulate
    from .planning.sharding import sharded_peak

    summary = getattr(module, "fxmemopt_summary", None)
    where = f"predicted_peak_per_rank({type(module).__name__})"
    if summary is None or summary.cost_graph is None:
        raise FxMemOptError(format_error(where, "has no cost model to predict from",
                                         fix="Pass a module fxmemopt.optimize returned, optimized with predictions "
                                             "on (the default)."))
    if summary.calls_per_step != 1:
        raise FxMemOptError(format_error(where, "predicts a step of one call only",
                                         got=f"calls_per_step={summary.calls_per_step}",
                                         fix="Measure the sharded step instead (fxmemopt.measure_step)."))
    if world_size < 1:
        raise InvalidOptionError(format_error(where, "needs world_size >= 1", got=repr(world_size)))
    units = tuple(getattr(module, "fxmemopt_units", ()))
    owned = {u: 0 for u in units}
    grads = {u: 0 for u in units}
    root = 0
    for name, p in module.named_parameters():
        nbytes = p.numel() * p.element_size()  # a DTensor's numel is the whole parameter's
        owner = max((u for u in units if name.startswith(u + ".")), key=len, default=None)
        if owner is None:
            root += nbytes
            continue
        owned[owner] += nbytes
        grads[owner] += nbytes if p.requires_grad else 0
    timeline = simulate(summary.cost_graph, summary.plan, with_timeline=True).timeline
    region_node = {r.name: r.nodes[-1] for r in summary.plan.regions}
    return sharded_peak(timeline, region_node, summary.unit_chains, owned, grads, root, world_size,
                        reshard_after_forward)
