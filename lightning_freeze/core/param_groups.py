"""Grow an optimizer by a param group mid-training, and extend its learning-rate schedulers to it.

Pure PyTorch (no Lightning): what :class:`~lightning_freeze.FreezeBackbone` does when it unfreezes
modules, usable from a plain training loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler as torch_lr_scheduler

from lightning_freeze import _compat

__all__ = [
    "SUPPORTED_SCHEDULERS",
    "add_param_group",
    "extend_scheduler",
    "scheduler_tree",
    "unsupported_schedulers",
]

#: The ``torch.optim.lr_scheduler`` classes (and their subclasses) that :func:`extend_scheduler`
#: extends to a new param group. Any other scheduler on the optimizer is refused before training.
SUPPORTED_SCHEDULERS: tuple[type, ...] = (
    torch_lr_scheduler.LambdaLR,
    torch_lr_scheduler.MultiplicativeLR,
    torch_lr_scheduler.StepLR,
    torch_lr_scheduler.MultiStepLR,
    torch_lr_scheduler.ConstantLR,
    torch_lr_scheduler.LinearLR,
    torch_lr_scheduler.ExponentialLR,
    torch_lr_scheduler.SequentialLR,
    torch_lr_scheduler.PolynomialLR,
    torch_lr_scheduler.CosineAnnealingLR,
    torch_lr_scheduler.ChainedScheduler,
    torch_lr_scheduler.ReduceLROnPlateau,
    torch_lr_scheduler.CyclicLR,
    torch_lr_scheduler.CosineAnnealingWarmRestarts,
    torch_lr_scheduler.OneCycleLR,
)
# per-param-group lists a scheduler keeps, and whether the new group's entry scales with the lr
_SCHEDULER_GROUP_LISTS: tuple[tuple[str, bool], ...] = (
    ("base_lrs", True),
    ("max_lrs", True),  # CyclicLR
    ("min_lrs", True),  # ReduceLROnPlateau
    ("lr_lambdas", False),  # LambdaLR, MultiplicativeLR: the first group's function
    ("base_momentums", False),  # CyclicLR
    ("max_momentums", False),
)
# per-param-group keys some schedulers store in the optimizer's groups (OneCycleLR, CyclicLR)
_SCHEDULER_GROUP_KEYS: tuple[tuple[str, bool], ...] = (
    ("max_lr", True),
    ("min_lr", True),
    ("max_momentum", False),
    ("base_momentum", False),
)


def add_param_group(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], scale: float) -> None:
    """Add ``params`` as a new group at ``scale`` x the first group's lr, moving any already held.

    The new group copies the first group's hyper-parameters (weight decay, betas, ...); its
    ``lr`` and ``initial_lr`` (and the ``max_lr``/``min_lr`` a cyclic scheduler keeps in the group)
    are the first group's times ``scale``. A parameter the optimizer already holds (an optimizer
    built over every parameter) moves into the new group.

    Example::

        >>> body, head = nn.Linear(2, 2), nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(head.parameters(), lr=0.1)
        >>> add_param_group(opt, list(body.parameters()), scale=0.5)
        >>> [g["lr"] for g in opt.param_groups]
        [0.1, 0.05]
    """
    moving = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in moving]
    first = optimizer.param_groups[0]
    lr = first["lr"] * scale
    optimizer.add_param_group(
        {"params": params, "lr": lr, "initial_lr": first.get("initial_lr", first["lr"]) * scale}
    )
    new = optimizer.param_groups[-1]
    for key, scaled in _SCHEDULER_GROUP_KEYS:
        if key in first:
            new[key] = first[key] * scale if scaled else first[key]
    # schedulers that cycle momentum set it per group: start the new group where the first one is
    for key in ("momentum", "betas"):
        if "max_momentum" in first and key in first:
            new[key] = first[key]


def scheduler_tree(scheduler: Any) -> Iterator[Any]:
    """``scheduler`` and, for ``SequentialLR``/``ChainedScheduler``, every scheduler inside it."""
    yield scheduler
    for child in _compat.child_schedulers(scheduler):
        yield from scheduler_tree(child)


def extend_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, scale: float) -> None:
    """Append the new (last) param group's entry to every per-group list a scheduler keeps.

    Entries that are learning rates (``base_lrs``, ``max_lrs``, ``min_lrs``, the last lrs) are the
    first group's times ``scale``; the others (``lr_lambdas``, momentums) are the first group's.
    """
    n_groups = len(optimizer.param_groups)
    for sched in scheduler_tree(scheduler):
        lists = [(getattr(sched, attr, None), scaled) for attr, scaled in _SCHEDULER_GROUP_LISTS]
        lists.append((_compat.last_lr_list(sched), True))
        for values, scaled in lists:
            if isinstance(values, list) and len(values) == n_groups - 1 and values:
                values.append(values[0] * scale if scaled else values[0])


def unsupported_schedulers(schedulers: Iterable[Any]) -> list[str]:
    """Class names of the schedulers (or schedulers inside them) :func:`extend_scheduler` cannot extend."""
    return [
        type(s).__name__
        for top in schedulers
        for s in scheduler_tree(top)
        if not isinstance(s, SUPPORTED_SCHEDULERS)
    ]
