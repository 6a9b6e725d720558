"""The unfreeze machinery of :class:`~lightning_freeze.FreezeBackbone`, in its own unit.

What happens when frozen modules start training in the middle of a fit: their parameters join
the first optimizer as a new param group (:mod:`lightning_freeze.core.param_groups` extends the
learning-rate schedulers to it), the ``DistributedDataParallel`` wrapper is rebuilt so the new
parameters are synchronised, and under ``torch.compile`` the new parameters are watched until
they get a gradient.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_freeze import _compat
from lightning_freeze.core.param_groups import (
    SUPPORTED_SCHEDULERS,
    add_param_group,
    extend_scheduler,
    unsupported_schedulers,
)
from lightning_freeze.core.selection import resolve_modules
from lightning_freeze.core.unfreeze_schedule import (
    PlateauTracker,
    UnfreezePhase,
    UnfreezeSchedule,
    format_timeline,
    split_frozen_names,
)

__all__ = [
    "PhaseRunner",
    "add_to_optimizer",
    "can_unfreeze_under",
    "check_compiled_gradients",
    "check_schedulers",
    "rewrap_ddp",
]


def can_unfreeze_under(strategy: Any) -> bool:
    """Single device, or plain DDP (whose wrapper :func:`rewrap_ddp` can rebuild); not sharded/DeepSpeed."""
    ddp = isinstance(strategy, DDPStrategy) and "DeepSpeed" not in type(strategy).__name__
    return ddp or not isinstance(strategy, ParallelStrategy)


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
    _compat.rebuild_ddp_wrapper(strategy, module)
    return True


def check_schedulers(trainer: pl.Trainer, who: str) -> None:
    """Refuse (``ValueError``) a scheduler of the first optimizer that a new param group cannot join."""
    bad = unsupported_schedulers(_schedulers_of(trainer)) if trainer.optimizers else []
    if bad:
        raise ValueError(
            f"{who} cannot extend the learning-rate scheduler {bad[0]} to the new param group: it may "
            "keep per-group state this callback does not know. Supported schedulers: "
            f"{', '.join(c.__name__ for c in SUPPORTED_SCHEDULERS)} (and their subclasses). "
            "Use one of them, or train the unfrozen model as a new stage."
        )


def _schedulers_of(trainer: pl.Trainer) -> list[Any]:
    """The learning-rate schedulers of the first optimizer."""
    optimizer = trainer.optimizers[0]
    return [
        c.scheduler
        for c in trainer.lr_scheduler_configs
        if getattr(c.scheduler, "optimizer", None) is optimizer
    ]


def add_to_optimizer(
    trainer: pl.Trainer, params: list[nn.Parameter], scale: float, lr: float | None = None
) -> float:
    """Add ``params`` to the first optimizer as a new group at ``scale`` x its first group's lr.

    Every scheduler of that optimizer is extended to the new group (at ``scale`` x the first
    group's entries). ``lr``: the new group's lr exactly (``scale`` should then be ``lr`` over the
    first group's lr). Returns the new group's lr.
    """
    if not trainer.optimizers:
        raise RuntimeError(
            "FreezeBackbone cannot unfreeze: the trainer has no optimizer to add parameters to."
        )
    optimizer = trainer.optimizers[0]
    add_param_group(optimizer, params, scale)
    if lr is not None:
        optimizer.param_groups[-1]["lr"] = lr
    for scheduler in _schedulers_of(trainer):
        extend_scheduler(scheduler, optimizer, scale)
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


class PhaseRunner:
    """Carries out an :class:`~lightning_freeze.core.unfreeze_schedule.UnfreezeSchedule` during a fit.

    :class:`~lightning_freeze.FreezeBackbone` owns one when given ``schedule=...``: it asks
    :meth:`names_to_freeze` at setup, :meth:`due` at every train epoch start (and first batch),
    unfreezes each due phase's modules, and feeds :meth:`record_validation` after validation.
    The runner keeps the bookkeeping a resume needs (:meth:`state_dict`): phases begun, when, the
    plateau counters, the best weights of the phase (``restore_best``), and the warm-ups.
    """

    def __init__(self, schedule: UnfreezeSchedule) -> None:
        self.schedule = schedule
        self.phases: list[UnfreezePhase] = []
        self.begun = 0  # phases begun (0: only the start)
        self.phase_epoch = 0  # epoch at which the current phase began
        self.decided_epoch = -1  # the epoch whose transition decision was made
        self.tracker = PlateauTracker(schedule.mode, schedule.min_delta)
        self.timeline: list[dict[str, Any]] = []  # one entry per phase begun
        self.warmups: list[tuple[int, int, int]] = []  # (param group, first global step, steps)
        self.best: dict[str, Any] | None = None  # restore_best: {"tensors": ..., "optimizer": ...}
        self._pending_best = False
        self._hooks: list[Any] = []
        self._trainer: pl.Trainer | None = None
        self._module: nn.Module | None = None
        self._unscaled: dict[int, float] = {}

    # --- setup ------------------------------------------------------------------------------
    def names_to_freeze(self, pl_module: nn.Module, names: list[str]) -> list[str]:
        """Resolve the phases on ``pl_module`` and split ``names`` so each phase's modules are their own."""
        self._module = pl_module
        roots = list(resolve_modules(pl_module, names))
        self.phases = self.schedule.resolve(pl_module)
        seen: dict[str, int] = {}  # module -> the phase that unfreezes it
        for i, phase in enumerate(self.phases, start=1):
            for m in phase.modules:  # type: ignore[union-attr]
                if m in seen:
                    raise ValueError(
                        f"UnfreezeSchedule: {m!r} is unfrozen by phase {seen[m]} and phase {i} again."
                    )
                seen[m] = i
        names = split_frozen_names(pl_module, roots, list(seen))
        for i, phase in enumerate(self.phases, start=1):
            for m in phase.modules:  # type: ignore[union-attr]
                outer = next((n for n in names if m.startswith(n + ".")), None)
                if outer is not None:
                    raise ValueError(
                        f"UnfreezeSchedule: phase {i} unfreezes {m!r}, inside {outer!r} that phase "
                        f"{seen[outer]} unfreezes whole; a module can begin training in one phase only."
                    )
        return names

    def attach(self, trainer: pl.Trainer) -> None:
        """Hook the warm-ups onto the first optimizer (around each of its steps)."""
        self._trainer = trainer
        if self._hooks or not trainer.optimizers:
            return
        optimizer = trainer.optimizers[0]
        self._hooks = [
            optimizer.register_step_pre_hook(self._warm_up),
            optimizer.register_step_post_hook(self._cool_down),
        ]

    def detach(self) -> None:
        """Remove the optimizer hooks (end of the fit)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # --- transitions ------------------------------------------------------------------------
    def due(self, trainer: pl.Trainer) -> list[int]:
        """The indices of the phases that begin now (decided once per epoch; rank 0 decides under DDP)."""
        epoch = trainer.current_epoch
        if epoch <= self.decided_epoch or self.begun >= len(self.phases):
            return []
        self.decided_epoch = epoch
        out: list[int] = []
        start = self.phase_epoch
        for k, phase in enumerate(self.phases[self.begun :], start=self.begun):
            if phase.epoch is not None:
                go = epoch >= phase.epoch
            else:
                stalled = self.schedule.monitor is not None and self.tracker.wait >= self.schedule.patience
                limit = self.schedule.max_epochs_per_phase
                go = (stalled and not out) or (limit is not None and epoch - start >= limit)
            if not go:
                break
            out.append(k)
            start = epoch
        if self.schedule.monitor is not None and trainer.world_size > 1:
            out = trainer.strategy.broadcast(out, src=0)
        return out

    def begin(
        self, index: int, epoch: int, global_step: int, group: int | None, lr: float, params: int
    ) -> None:
        """Book phase ``index`` as begun (its param group ``group`` at ``lr``; ``None``: no group)."""
        phase = self.phases[index]
        self.begun = index + 1
        self.phase_epoch = epoch
        self.tracker.reset()
        self._pending_best = False
        self.best = None
        if phase.warmup_steps and group is not None:
            self.warmups.append((group, global_step, phase.warmup_steps))
        self.timeline.append(
            {
                "phase": index + 1,
                "epoch": epoch,
                "modules": list(phase.modules),
                "lr": lr,
                "parameters": params,
            }
        )

    def restore_best_into(self, pl_module: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """``restore_best``: put the phase's best trainable tensors and optimizer state back."""
        self.take_pending_best()
        if not self.schedule.restore_best or self.best is None:
            return False
        state = pl_module.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, value in self.best["tensors"].items():
                state[key].copy_(value)
        optimizer.load_state_dict({**optimizer.state_dict(), "state": self.best["optimizer"]})
        return True

    # --- validation -------------------------------------------------------------------------
    def record_validation(self, trainer: pl.Trainer) -> None:
        """Feed the monitored metric of the validation that just ended to the plateau rule."""
        monitor = self.schedule.monitor
        if monitor is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return  # not a validation of the fit (trainer.validate after it, the sanity check)
        metrics = trainer.callback_metrics
        if monitor not in metrics:
            raise KeyError(
                f"UnfreezeSchedule(monitor={monitor!r}): no such logged metric after validation; logged: "
                f"{', '.join(sorted(metrics)) or 'none'}."
            )
        value = float(metrics[monitor])
        improved = self.tracker.update(trainer.current_epoch, value)
        if not self.timeline:
            self.timeline.append({"phase": 0, "epoch": 0, "modules": []})
        self.timeline[-1].setdefault("val", []).append((trainer.current_epoch, value))
        if improved and self.schedule.restore_best:
            self._pending_best = True  # taken once the raw weights are back (an EMA may be swapped in now)

    def take_pending_best(self) -> None:
        """Snapshot the trainable tensors and optimizer state of a new best (raw weights in the model)."""
        if not self._pending_best or self._module is None or self._trainer is None:
            return
        self._pending_best = False
        trainable = {k for k, p in self._module.named_parameters(remove_duplicate=False) if p.requires_grad}
        prefixes = tuple(k.rsplit(".", 1)[0] + "." for k in trainable)
        tensors = {
            k: v.detach().clone()
            for k, v in self._module.state_dict(keep_vars=True).items()
            if k in trainable or k.startswith(prefixes)
        }
        optimizer = self._trainer.optimizers[0]
        self.best = {"tensors": tensors, "optimizer": copy.deepcopy(optimizer.state_dict()["state"])}

    # --- warm-up ----------------------------------------------------------------------------
    def _warm_up(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._trainer is None:
            return
        step = self._trainer.global_step
        self._unscaled = {}
        for group, first, steps in self.warmups:
            done = step - first
            if done < steps:
                lr = optimizer.param_groups[group]["lr"]
                self._unscaled[group] = lr
                optimizer.param_groups[group]["lr"] = lr * (done + 1) / steps

    def _cool_down(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group, lr in self._unscaled.items():
            optimizer.param_groups[group]["lr"] = lr
        self._unscaled = {}

    # --- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resume needs, bitwise (the best weights included)."""
        self.take_pending_best()
        return {
            "begun": self.begun,
            "phase_epoch": self.phase_epoch,
            "decided_epoch": self.decided_epoch,
            "best_value": self.tracker.best,
            "wait": self.tracker.wait,
            "history": list(self.tracker.history),
            "timeline": copy.deepcopy(self.timeline),
            "warmups": [list(w) for w in self.warmups],
            "best": self.best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the phases themselves are re-applied by the callback)."""
        self.begun = int(state["begun"])
        self.phase_epoch = int(state["phase_epoch"])
        self.decided_epoch = int(state["decided_epoch"])
        self.tracker.best, self.tracker.wait = state["best_value"], int(state["wait"])
        self.tracker.history = [tuple(h) for h in state["history"]]  # type: ignore[misc]
        self.timeline = copy.deepcopy(state["timeline"])
        self.warmups = [tuple(w) for w in state["warmups"]]  # type: ignore[misc]
        self.best = state["best"]

    def summary(self) -> str:
        """A text timeline of the phases begun, with the monitored metric (see :func:`format_timeline`)."""
        return format_timeline(self.timeline)
