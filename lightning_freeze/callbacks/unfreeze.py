"""The unfreeze machinery of :class:`~lightning_freeze.FreezeBackbone`, in its own unit.

What happens when frozen modules start training in the middle of a fit: their parameters join
the first optimizer as a new param group (:mod:`lightning_freeze.core.param_groups` extends the
learning-rate schedulers to it), the ``DistributedDataParallel`` wrapper is rebuilt so the new
parameters are synchronised, and under ``torch.compile`` the new parameters are watched until
they get a gradient.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_freeze._compat import is_compiled, rebuild_ddp_wrapper
from lightning_freeze.core.param_groups import add_param_group, extend_scheduler, unsupported_schedulers

__all__ = [
    "add_to_optimizer",
    "can_unfreeze_under",
    "check_compiled_gradients",
    "check_schedulers",
    "is_compiled",
    "rewrap_ddp",
]


def can_unfreeze_under(strategy: Any) -> bool:
    """Single device, or plain DDP (whose wrapper :func:`rewrap_ddp` can rebuild); not sharded/DeepSpeed."""
    if not isinstance(strategy, ParallelStrategy):
        return True
    return isinstance(strategy, DDPStrategy) and "DeepSpeed" not in type(strategy).__name__


def rewrap_ddp(trainer: pl.Trainer) -> bool:
    """Rebuild the strategy's ``DistributedDataParallel`` wrapper after parameters were unfrozen.

    DDP registers the parameters that require grad when it wraps the model (its reducer's buckets
    and autograd hooks): a parameter unfrozen later would get a local gradient only, and the ranks
    would drift apart (Lightning's ``BackboneFinetuning``, their issue #20340). A new wrapper of the
    same LightningModule, built by the strategy with its own arguments (``find_unused_parameters``,
    ``static_graph``, communication hooks), broadcasts every parameter and buffer from rank 0 (so
    the ranks start the new stage identical) and synchronises the new parameters from the next
    backward on. The old wrapper's reducer is released with it (its autograd hooks go away).

    Returns:
        ``True`` when a wrapper was rebuilt, ``False`` when the model is not wrapped in DDP.
    """
    strategy = trainer.strategy
    old = strategy.model
    if not isinstance(old, DistributedDataParallel) or not isinstance(strategy, DDPStrategy):
        return False
    module = old.module
    del old
    strategy.model = None  # drop the last reference to the old reducer before the new one is built
    rebuild_ddp_wrapper(strategy, module)
    return True


def check_schedulers(trainer: pl.Trainer, who: str) -> None:
    """Refuse (``ValueError``) a scheduler of the first optimizer that a new param group cannot join."""
    if not trainer.optimizers:
        return
    optimizer = trainer.optimizers[0]
    mine = [
        c.scheduler
        for c in trainer.lr_scheduler_configs
        if getattr(c.scheduler, "optimizer", None) is optimizer
    ]
    bad = unsupported_schedulers(mine)
    if bad:
        from lightning_freeze.core.param_groups import SUPPORTED_SCHEDULERS

        raise ValueError(
            f"{who} cannot extend the learning-rate scheduler {bad[0]} to the new param group: it may "
            "keep per-group state this callback does not know. Supported schedulers: "
            f"{', '.join(c.__name__ for c in SUPPORTED_SCHEDULERS)} (and their subclasses). "
            "Use one of them, or train the unfrozen model as a new stage."
        )


def add_to_optimizer(trainer: pl.Trainer, params: list[nn.Parameter], scale: float) -> float:
    """Add ``params`` to the first optimizer as a new group at ``scale`` x its first group's lr.

    Every scheduler of that optimizer is extended to the new group. Returns the new group's lr.
    """
    if not trainer.optimizers:
        raise RuntimeError(
            "FreezeBackbone cannot unfreeze: the trainer has no optimizer to add parameters to."
        )
    optimizer = trainer.optimizers[0]
    add_param_group(optimizer, params, scale)
    for config in trainer.lr_scheduler_configs:
        if getattr(config.scheduler, "optimizer", None) is optimizer:
            extend_scheduler(config.scheduler, optimizer, scale)
    return float(optimizer.param_groups[-1]["lr"])


def check_compiled_gradients(watch: list[nn.Parameter], reset_done: bool) -> tuple[list[nn.Parameter], bool]:
    """After an unfreeze under torch.compile: did every unfrozen parameter get a gradient?

    A compiled frame traced while they were frozen and reused after (PyTorch #139476) computes
    no gradient for them, and they would silently never train. First time: reset the compiler's
    caches (``torch.compiler.reset()``: everything recompiles at the next step, once). Still none
    after that: warn (the parameters are not used in the forward at all).

    Returns:
        ``(parameters still to watch, whether the compiler was reset)``.
    """
    missing = [p for p in watch if p.grad is None]
    if not missing:
        return [], reset_done
    if not reset_done:
        torch.compiler.reset()
        rank_zero_info(
            f"FreezeBackbone: {len(missing)} of {len(watch)} unfrozen parameters got no "
            "gradient in a compiled step (a stale compiled frame, PyTorch #139476): "
            "torch.compiler.reset(), the model recompiles at the next step."
        )
        return watch, True
    rank_zero_warn(
        f"FreezeBackbone: {len(missing)} unfrozen parameters still got no gradient after recompiling: "
        "they are not used in the forward (check the model), or the compiled model hides them."
    )
    return [], True
