"""Fine-tuning schedules: which frozen modules start training when, and at what learning rate.

Pure PyTorch (no Lightning). :class:`UnfreezeSchedule` describes the phases;
:class:`~lightning_freeze.FreezeBackbone` (``schedule=...``) carries them out during a fit. Phase 0
is the start of the fit (everything ``FreezeBackbone`` froze is frozen); each
:class:`UnfreezePhase` after it unfreezes more modules, as a new param group of the optimizer.

Two ways to write a schedule:

* **explicit**: a list of :class:`UnfreezePhase` (or dicts with the same keys, e.g. from YAML);
* **implicit** (:meth:`UnfreezeSchedule.gradual`): one phase per top-level block of a module,
  from the head side down (ULMFiT's gradual unfreezing, fastai's ``freeze_to``), optionally with
  layer-wise learning-rate decay (each deeper block's lr is ``layer_decay`` x the one above).

A phase starts at a given epoch, or when the previous phase's monitored validation metric stops
improving (``patience``, ``min_delta``), or after ``max_epochs_per_phase`` epochs, whichever is
first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from lightning_freeze.core.norm import is_running_stat_norm
from lightning_freeze.core.selection import resolve_modules
from lightning_freeze.core.validation import (
    check_choice,
    check_int,
    check_non_empty_str,
    check_number,
    check_positive_finite,
    check_str_list,
    choices_of,
)

__all__ = [
    "PHASE_NORM_MODES",
    "PlateauTracker",
    "UnfreezePhase",
    "UnfreezeSchedule",
    "format_timeline",
    "split_frozen_names",
    "top_level_blocks",
]

PhaseNorm = Literal["train", "eval"]
PHASE_NORM_MODES: tuple[str, ...] = choices_of(PhaseNorm)
MonitorMode = Literal["min", "max"]
MONITOR_MODES: tuple[str, ...] = choices_of(MonitorMode)


@dataclass
class UnfreezePhase:
    """One phase of a fine-tuning schedule: the modules it unfreezes and how they train.

    Args:
        modules: dotted submodule name(s) or ``fnmatch`` patterns, inside what ``FreezeBackbone``
            froze (``"backbone.layer4"``, ``["backbone.6", "backbone.7"]``).
        epoch: the epoch (0-based) at whose start the phase begins. ``None``: when the previous
            phase ends by the schedule's ``monitor``/``max_epochs_per_phase`` rule.
        lr: the learning rate of the phase's param group (absolute). Exclusive with ``lr_scale``.
        lr_scale: the phase's lr as a multiple of the optimizer's first param group's lr when the
            phase begins (and of its scheduler's base/max/min lr). Default ``0.1`` when ``lr`` is
            ``None``.
        warmup_steps: the group's lr ramps linearly from ``1/warmup_steps`` of its value to its
            value over its first ``warmup_steps`` optimizer steps (applied around each step, on top
            of any scheduler). ``0`` (default): no warm-up.
        norm: running-statistics norm layers inside the modules: ``"train"`` (default): their
            running statistics start updating with the phase; ``"eval"``: they stay pinned in eval
            mode (their statistics stay bitwise as they are and are verified; their affine
            weights train).
    """

    modules: str | list[str]
    epoch: int | None = None
    lr: float | None = None
    lr_scale: float | None = None
    warmup_steps: int = 0
    norm: PhaseNorm = "train"

    def __post_init__(self) -> None:
        self.modules = check_str_list(
            "UnfreezePhase.modules",
            self.modules,
            valid="a dotted submodule name or fnmatch pattern, or a non-empty list of them",
        )
        self.epoch = check_int(
            "UnfreezePhase.epoch", self.epoch, minimum=0, allow_none=True, valid="None or an epoch >= 0"
        )
        if self.lr is not None and self.lr_scale is not None:
            raise ValueError(
                f"UnfreezePhase(modules={self.modules!r}): give lr={self.lr!r} or "
                f"lr_scale={self.lr_scale!r}, "
                "not both (lr is absolute, lr_scale a multiple of the first param group's lr)."
            )
        if self.lr is not None:
            self.lr = check_positive_finite("UnfreezePhase.lr", self.lr)
        else:
            self.lr_scale = check_positive_finite(
                "UnfreezePhase.lr_scale", 0.1 if self.lr_scale is None else self.lr_scale
            )
        self.warmup_steps = check_int("UnfreezePhase.warmup_steps", self.warmup_steps, minimum=0)
        self.norm = check_choice("UnfreezePhase.norm", self.norm, PHASE_NORM_MODES)  # type: ignore[assignment]

    def scale_for(self, first_lr: float) -> float:
        """The multiple of ``first_lr`` (the first param group's current lr) this phase's group gets."""
        return self.lr / first_lr if self.lr is not None else float(self.lr_scale)  # type: ignore[arg-type]


@dataclass
class _Gradual:
    module: str
    every_n_epochs: int | None
    first_epoch: int | None
    lr_scale: float
    layer_decay: float | None
    warmup_steps: int
    norm: PhaseNorm


class UnfreezeSchedule:
    """A fine-tuning schedule for :class:`~lightning_freeze.FreezeBackbone` (``schedule=...``).

    Args:
        phases: the phases after the start, in order: :class:`UnfreezePhase` objects or dicts of
            their arguments (Hydra YAML).
        monitor: a logged validation metric (``"val_loss"``); a phase without ``epoch`` begins when
            it has not improved by more than ``min_delta`` for ``patience`` validations in a row.
            Under DDP, rank 0's decision is broadcast (log the metric with ``sync_dist=True`` so it
            is the ranks' mean).
        mode: ``"min"`` (default) or ``"max"``: the direction in which ``monitor`` improves.
        patience: validations without improvement that end a phase. Default ``2``.
        min_delta: the smallest change that counts as an improvement. Default ``0.0``.
        max_epochs_per_phase: a phase without ``epoch`` begins at the latest this many epochs after
            the previous one began (with or without ``monitor``).
        restore_best: with ``monitor``: before the next phase begins, the trainable tensors (and the
            optimizer's per-parameter state) are put back to where they were at the phase's best
            validation. The scheduler and the epoch counter run on.

    Attributes:
        implicit: the settings of an implicit schedule made by :meth:`gradual` (its phases come
            from the module's blocks when :meth:`resolve` sees the model); ``None`` for explicit phases.

    Example::

        >>> schedule = UnfreezeSchedule([
        ...     UnfreezePhase("backbone.layer4", epoch=2, lr_scale=0.1),
        ...     {"modules": "backbone.layer3", "epoch": 4, "lr": 1e-4, "norm": "eval"},
        ... ])
        >>> [p.modules for p in schedule.phases]
        [['backbone.layer4'], ['backbone.layer3']]
    """

    def __init__(
        self,
        phases: Sequence[UnfreezePhase | Mapping[str, Any]] = (),
        *,
        monitor: str | None = None,
        mode: MonitorMode = "min",
        patience: int = 2,
        min_delta: float = 0.0,
        max_epochs_per_phase: int | None = None,
        restore_best: bool = False,
    ) -> None:
        if isinstance(phases, (str, Mapping)) or not isinstance(phases, Sequence):
            raise ValueError(
                f"UnfreezeSchedule(phases={phases!r}): expected a list of UnfreezePhase or of dicts with "
                "its arguments (modules, epoch, lr, lr_scale, warmup_steps, norm)."
            )
        self.phases: list[UnfreezePhase] = [
            p if isinstance(p, UnfreezePhase) else _phase_from_mapping(p, i) for i, p in enumerate(phases)
        ]
        self.monitor = None if monitor is None else check_non_empty_str("monitor", monitor)
        self.mode: MonitorMode = check_choice("mode", mode, MONITOR_MODES)  # type: ignore[assignment]
        self.patience = check_int("patience", patience, minimum=1)
        self.min_delta = check_number("min_delta", min_delta, low=0.0, valid="a finite number >= 0")
        self.max_epochs_per_phase = check_int(
            "max_epochs_per_phase", max_epochs_per_phase, minimum=1, allow_none=True
        )
        self.restore_best = bool(restore_best)
        if self.restore_best and self.monitor is None:
            raise ValueError(
                "UnfreezeSchedule(restore_best=True) needs monitor=<a logged validation metric>: the best "
                "weights of a phase are the ones with the best monitored value."
            )
        self.implicit: _Gradual | None = None
        for i, phase in enumerate(self.phases, start=1):
            if phase.epoch is None and self.monitor is None and self.max_epochs_per_phase is None:
                raise ValueError(
                    f"UnfreezeSchedule: phase {i} ({phase.modules}) has epoch=None and the schedule has no "
                    "monitor and no max_epochs_per_phase: nothing would ever start it. Give the phase an "
                    "epoch, or the schedule monitor='val_loss' (plateau) or max_epochs_per_phase=N."
                )

    @classmethod
    def gradual(
        cls,
        module: str = "backbone",
        *,
        every_n_epochs: int | None = 1,
        first_epoch: int | None = None,
        lr_scale: float = 0.1,
        layer_decay: float | None = None,
        warmup_steps: int = 0,
        norm: PhaseNorm = "train",
        monitor: str | None = None,
        mode: MonitorMode = "min",
        patience: int = 2,
        min_delta: float = 0.0,
        max_epochs_per_phase: int | None = None,
        restore_best: bool = False,
    ) -> UnfreezeSchedule:
        """The implicit schedule: one phase per top-level block of ``module``, from the head side down.

        The blocks are ``module``'s children with parameters, in reverse order (a norm layer or a
        child without parameters, e.g. a ReLU or pooling, joins the block before it: see
        :func:`top_level_blocks`). Phase ``i``
        (``0``: the block nearest the head) gets ``lr_scale * layer_decay**i`` of the first param
        group's lr (layer-wise learning-rate decay; ``None``: no decay).

        Args:
            module: the dotted name of the module whose blocks unfreeze one by one.
            every_n_epochs: phase ``i`` begins at epoch ``first_epoch + i * every_n_epochs``.
                ``None``: phases begin by the ``monitor`` / ``max_epochs_per_phase`` rule instead.
            first_epoch: the epoch of the first phase. Default ``every_n_epochs``.
            lr_scale: the first phase's lr as a multiple of the first param group's. Default ``0.1``.
            layer_decay: each deeper block's lr multiple is this times the one above (``0.5``).
            warmup_steps: warm-up of each phase (see :class:`UnfreezePhase`).
            norm: ``"train"`` or ``"eval"`` for each phase (see :class:`UnfreezePhase`).
            monitor: the transition rule's metric (see :class:`UnfreezeSchedule`).
            mode: see :class:`UnfreezeSchedule`.
            patience: see :class:`UnfreezeSchedule`.
            min_delta: see :class:`UnfreezeSchedule`.
            max_epochs_per_phase: see :class:`UnfreezeSchedule`.
            restore_best: see :class:`UnfreezeSchedule`.
        """
        every_n_epochs = check_int("every_n_epochs", every_n_epochs, minimum=1, allow_none=True)
        first = check_int("first_epoch", first_epoch, minimum=0, allow_none=True)
        if layer_decay is not None:
            layer_decay = check_number(
                "layer_decay", layer_decay, low=0.0, high=1.0, low_inclusive=False, valid="a number in (0, 1]"
            )
        if every_n_epochs is None and monitor is None and not max_epochs_per_phase:
            raise ValueError(
                "UnfreezeSchedule.gradual(every_n_epochs=None) needs monitor=... or max_epochs_per_phase=... "
                "to know when each phase begins."
            )
        schedule = cls(
            (),
            monitor=monitor,
            mode=mode,
            patience=patience,
            min_delta=min_delta,
            max_epochs_per_phase=max_epochs_per_phase,
            restore_best=restore_best,
        )
        schedule.implicit = _Gradual(
            module=check_non_empty_str("module", module),
            every_n_epochs=every_n_epochs,
            first_epoch=first if first is not None else every_n_epochs,
            lr_scale=check_positive_finite("lr_scale", lr_scale),
            layer_decay=layer_decay,
            warmup_steps=check_int("warmup_steps", warmup_steps, minimum=0),
            norm=check_choice("norm", norm, PHASE_NORM_MODES),  # type: ignore[arg-type]
        )
        return schedule

    def resolve(self, root: nn.Module) -> list[UnfreezePhase]:
        """The phases on ``root``, each with concrete dotted module names (patterns and blocks resolved)."""
        if self.implicit is None:
            # lr_scale is None wherever lr is set (see UnfreezePhase.__post_init__)
            return [
                dataclasses.replace(p, modules=list(resolve_modules(root, p.modules))) for p in self.phases
            ]
        g = self.implicit
        return [
            UnfreezePhase(
                modules=names,
                epoch=None if g.every_n_epochs is None else g.first_epoch + i * g.every_n_epochs,  # type: ignore[operator]
                lr_scale=g.lr_scale * (g.layer_decay**i if g.layer_decay is not None else 1.0),
                warmup_steps=g.warmup_steps,
                norm=g.norm,
            )
            for i, names in enumerate(reversed(top_level_blocks(root, g.module)))
        ]

    def __repr__(self) -> str:
        if self.implicit is not None:
            return f"UnfreezeSchedule.gradual({self.implicit})"
        return f"UnfreezeSchedule(phases={self.phases!r}, monitor={self.monitor!r})"


def _phase_from_mapping(phase: Mapping[str, Any], index: int) -> UnfreezePhase:
    if not isinstance(phase, Mapping):
        raise ValueError(
            f"UnfreezeSchedule: phase {index + 1} is {phase!r}; expected an UnfreezePhase or a dict with its "
            "arguments (modules, epoch, lr, lr_scale, warmup_steps, norm)."
        )
    valid = ("modules", "epoch", "lr", "lr_scale", "warmup_steps", "norm")
    unknown = [k for k in phase if k not in valid]
    if unknown:
        raise ValueError(
            f"UnfreezeSchedule: phase {index + 1} has unknown key(s) {unknown}; "
            f"valid keys: {', '.join(valid)}."
        )
    return UnfreezePhase(**dict(phase))


def top_level_blocks(root: nn.Module, name: str) -> list[list[str]]:
    """The blocks of ``root.get_submodule(name)`` for gradual unfreezing, input side first.

    Each block is a list of dotted child names: a child with parameters, followed by the
    norm layers and parameter-less children after it (a convolution, its BatchNorm and its ReLU
    are one block; leading parameter-less children join the first block).

    Raises:
        ValueError: the module has fewer than one child with parameters.
    """
    module = resolve_modules(root, name)[name] if name else root
    blocks: list[list[str]] = []
    pending: list[str] = []
    for child_name, child in module.named_children():
        full = f"{name}.{child_name}"
        if any(True for _ in child.parameters()) and not (_is_norm(child) and blocks):
            blocks.append([*pending, full])
            pending = []
        elif blocks:
            blocks[-1].append(full)
        else:
            pending.append(full)
    if not blocks:
        raise ValueError(
            f"UnfreezeSchedule.gradual(module={name!r}): {type(module).__name__} has no child with "
            "parameters "
            f"to unfreeze block by block; its children: {[n for n, _ in module.named_children()]}."
        )
    blocks[-1].extend(pending)
    return blocks


def _is_norm(module: nn.Module) -> bool:
    return is_running_stat_norm(module) or isinstance(
        module,
        (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
    )


def split_frozen_names(root: nn.Module, frozen: Sequence[str], targets: Sequence[str]) -> list[str]:
    """The names to freeze so that each of ``targets`` is one of them (or lies outside all of them).

    A frozen module that contains a target is replaced by its children, recursively, until every
    target is a frozen name of its own: the phases can then unfreeze it alone.

    Raises:
        ValueError: a target outside every frozen module, or a module to split that holds parameters
            or buffers of its own (not in a child).
    """
    for target in targets:
        if not any(target == f or target.startswith(f + ".") for f in frozen):
            raise ValueError(
                f"UnfreezeSchedule: a phase unfreezes {target!r}, which FreezeBackbone does not freeze; "
                f"frozen modules: {', '.join(frozen)}."
            )
    out: list[str] = []
    stack = list(reversed(frozen))
    while stack:
        name = stack.pop()
        if name in targets or not any(t.startswith(name + ".") for t in targets):
            out.append(name)
            continue
        module = root.get_submodule(name)
        own = [n for n, _ in module.named_parameters(recurse=False)] + [
            n for n, _ in module.named_buffers(recurse=False)
        ]
        if own:
            raise ValueError(
                f"UnfreezeSchedule: cannot unfreeze part of {name!r}: it holds tensors of its own "
                f"({', '.join(own)}) "
                "besides its children. Unfreeze it whole, or a module that contains it."
            )
        stack.extend(reversed([f"{name}.{c}" for c, _ in module.named_children()]))
    return out


@dataclass
class PlateauTracker:
    """Early-stopping bookkeeping for one phase: the best value and validations since it improved."""

    mode: MonitorMode = "min"
    min_delta: float = 0.0
    best: float | None = None
    wait: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)

    def update(self, epoch: int, value: float) -> bool:
        """Record a validation; ``True`` when it improved on the phase's best."""
        self.history.append((epoch, value))
        better = not math.isnan(value) and (
            self.best is None
            or (self.mode == "min" and value < self.best - self.min_delta)
            or (self.mode == "max" and value > self.best + self.min_delta)
        )
        self.best, self.wait = (value, 0) if better else (self.best, self.wait + 1)
        return better

    def reset(self) -> None:
        """A new phase begins: no best yet (the history is kept)."""
        self.best, self.wait = None, 0


def format_timeline(timeline: Sequence[Mapping[str, Any]]) -> str:
    """The phases of a fit as text, one line each, with the monitored metric per epoch.

    ``timeline``: entries with ``phase``, ``epoch``, ``modules``, optionally ``lr`` and ``val``
    (``[(epoch, value), ...]``), as ``FreezeBackbone(schedule=...).phases.timeline`` records them.

    Example::

        >>> print(format_timeline([{"phase": 0, "epoch": 0, "modules": [], "val": [(0, 0.9)]},
        ...                        {"phase": 1, "epoch": 1, "modules": ["backbone.7"], "lr": 0.01}]))
          phase 0 from epoch 0: (start) | e0 0.9
          phase 1 from epoch 1: backbone.7 lr=0.01
    """
    lines = []
    for entry in timeline:
        vals = " ".join(f"e{e} {v:.4g}" for e, v in entry.get("val", []))
        what = ", ".join(entry["modules"]) if entry["modules"] else "(start)"
        lr = f" lr={entry['lr']:g}" if "lr" in entry else ""
        lines.append(
            f"  phase {entry['phase']} from epoch {entry['epoch']}: {what}{lr}"
            + (f" | {vals}" if vals else "")
        )
    return "\n".join(lines)
