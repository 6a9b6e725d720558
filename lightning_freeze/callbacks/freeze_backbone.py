"""FreezeBackbone: freeze named submodules so they stay bitwise identical, and verify it."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from typing_extensions import override

from lightning_freeze.core.errors import FrozenStateError
from lightning_freeze.core.fingerprint import (
    FingerprintDiff,
    TensorFingerprint,
    diff_fingerprints,
    fingerprint,
)
from lightning_freeze.core.freeze import (
    DROPOUT_MODES,
    NORM_MODES,
    FrozenModules,
    check_choice,
    freeze,
    likely_cause,
    pin_frozen_layers,
    unfreeze,
)
from lightning_freeze.core.norm import is_pinned, is_running_stat_norm

__all__ = ["VERIFY_MODES", "FreezeBackbone"]

VERIFY_MODES: tuple[str, ...] = ("raise", "warn", "off")
_EVAL_MODE_WARNING = "Found {n} module(s) in eval mode at the start of training."


class FreezeBackbone(Callback):
    r"""Freeze submodules of the LightningModule so that they stay **bitwise** identical, and prove it.

    ``requires_grad=False`` alone is not enough: BatchNorm running statistics keep updating in
    train mode, and any ``.train()`` call (user hooks, ``LightningModule.unfreeze()``, a ``.train()``
    inside ``training_step``) puts the layer back in train mode. This callback, in ``setup`` (before
    ``configure_optimizers`` and before DDP wraps the model, so neither ever sees a frozen
    parameter):

    * sets ``requires_grad=False`` on every parameter of the selected modules;
    * handles their running-statistics norm layers as ``norm`` says, and pins their dropout layers
      to eval as ``dropout`` says. Pinned layers are re-pinned at fit start and at every train
      epoch start (layers replaced after setup, e.g. by a SyncBatchNorm conversion, are caught
      there) and guarded before every forward inside the epoch;
    * fingerprints every frozen parameter and buffer at fit start and checks them at every train
      epoch end and at fit end (``verify``).

    With a :class:`~lightning_freeze.MultiBranchModule` (any LightningModule with ``branch_names``,
    ``active_branch`` and a ``branches`` ModuleDict) every branch but the active one is frozen too
    when ``freeze_inactive_branches=True``.

    Args:
        modules: dotted submodule path(s) of the LightningModule; ``fnmatch`` patterns allowed
            (``"backbone.layer[12]"``). Default ``"backbone"``.
        norm: ``"eval"`` (default): running-statistics norm layers inside frozen modules are kept in
            eval mode whatever calls ``.train()``. ``"frozen"``: they are replaced by
            :class:`~lightning_freeze.core.norm.FrozenBatchNorm` / ``FrozenInstanceNorm`` (no
            parameters, no buffer updates, immune to ``.train()``; same ``state_dict`` keys, so
            checkpoints load both ways). ``"train"``: running statistics keep updating (explicit
            opt-in; they are then not verified).
        freeze_inactive_branches: with a multi-branch module, also freeze every branch but the
            active one. Default ``True``.
        unfreeze_at_epoch: optional epoch (0-based) at whose start ``modules`` are unfrozen and added
            to the first optimizer as a new param group. ``None`` (default): never. Refused under
            DDP-like strategies (DDP only synchronises parameters that required grad when it
            wrapped the model): train a new stage instead.
        unfreeze_lr_scale: learning rate of the new param group, as a multiple of the first param
            group's current learning rate. Default ``0.1``.
        verify: ``"raise"`` (default): raise :class:`~lightning_freeze.FrozenStateError` naming every
            changed tensor by its full ``state_dict`` key and the likely cause; ``"warn"``: warn
            instead; ``"off"``: no fingerprints.
        dropout: ``"eval"`` (default): dropout layers inside frozen modules are pinned to eval, so
            the features a branch trains on are exactly the ones it gets at inference;
            ``"train"``: they keep dropping out during training.

    Attributes:
        frozen: what :func:`~lightning_freeze.core.freeze` froze (``None`` before ``setup``).
        last_check: the latest verification (a
            :class:`~lightning_freeze.core.fingerprint.FingerprintDiff`;
            ``last_check.summary()`` reads ``"checked 12 frozen tensors: 0 changed"``).

    Example::

        import lightning as L
        from lightning_freeze import FreezeBackbone

        trainer = L.Trainer(max_epochs=3, callbacks=[FreezeBackbone("backbone")])
        trainer.fit(model)  # model.backbone is bitwise identical afterwards, or this raised
    """

    def __init__(
        self,
        modules: str | Sequence[str] = "backbone",
        norm: str = "eval",
        freeze_inactive_branches: bool = True,
        unfreeze_at_epoch: int | None = None,
        unfreeze_lr_scale: float = 0.1,
        verify: str = "raise",
        dropout: str = "eval",
    ) -> None:
        super().__init__()
        self.modules = _check_modules(modules)
        self.norm = check_choice("norm", norm, NORM_MODES)
        self.dropout = check_choice("dropout", dropout, DROPOUT_MODES)
        self.verify = check_choice("verify", verify, VERIFY_MODES)
        if unfreeze_at_epoch is not None and (
            isinstance(unfreeze_at_epoch, bool)
            or not isinstance(unfreeze_at_epoch, int)
            or unfreeze_at_epoch < 0
        ):
            raise ValueError(
                f"Invalid unfreeze_at_epoch={unfreeze_at_epoch!r}; valid choices: None (never) or an epoch "
                "number >= 0."
            )
        if (
            not isinstance(unfreeze_lr_scale, (int, float))
            or isinstance(unfreeze_lr_scale, bool)
            or not (unfreeze_lr_scale > 0)
        ):
            raise ValueError(f"Invalid unfreeze_lr_scale={unfreeze_lr_scale!r}; valid choices: a number > 0.")
        self.freeze_inactive_branches = bool(freeze_inactive_branches)
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.unfreeze_lr_scale = float(unfreeze_lr_scale)

        self.frozen: FrozenModules | None = None
        self.last_check: FingerprintDiff | None = None
        self._unfrozen = False
        self._reference: dict[str, TensorFingerprint] | None = None
        self._restored: dict[str, Any] | None = None
        self._warning_filter: tuple[Any, ...] | None = None
        self._scheduled: list[
            str
        ] = []  # frozen names that unfreeze_at_epoch unfreezes (not inactive branches)

    # ------------------------------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules, norm=self.norm)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.unfreeze_at_epoch is not None and isinstance(trainer.strategy, ParallelStrategy):
            raise ValueError(
                f"FreezeBackbone(unfreeze_at_epoch={self.unfreeze_at_epoch}) cannot unfreeze under "
                f"{type(trainer.strategy).__name__}: DDP registers only the parameters that require grad "
                "when it wraps the model, so parameters unfrozen later would never be synchronised. "
                "Use unfreeze_at_epoch=None and train the unfrozen model as a new stage "
                "(a new Trainer.fit without FreezeBackbone on these modules), or train on a single device."
            )
        names, inactive = self._names_to_freeze(pl_module)
        self.frozen = freeze(pl_module, names + inactive, norm=self.norm, dropout=self.dropout)
        self._scheduled = [n for n in self.frozen.names if n not in inactive]
        self._unfrozen = False
        if not any(p.requires_grad for p in pl_module.parameters()):
            raise ValueError(
                f"Nothing left to train: FreezeBackbone(modules={self.modules!r}) froze "
                f"{', '.join(self.frozen.names)}, and {type(pl_module).__name__} has no other trainable "
                f"parameter. Top-level children: {', '.join(n for n, _ in pl_module.named_children())}."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restored, self._restored = self._restored, None
        if restored is not None and restored.get("unfrozen"):
            self._unfreeze(trainer, pl_module)
        frozen = self._require_frozen()
        # the strategy may have replaced layers since setup (e.g. a SyncBatchNorm conversion)
        pin_frozen_layers(pl_module, self._still_frozen_names(), norm=frozen.norm, dropout=frozen.dropout)
        if self.verify != "off":
            if restored is not None and "fingerprints" in restored:
                # verify against the first run's fit start, not against what the checkpoint restored
                self._reference = _fingerprints_from_state(restored["fingerprints"])
            else:
                self._reference = fingerprint(pl_module, frozen.tensor_keys)
        self._warn_if_optimizer_holds_frozen(trainer, pl_module)
        self._explain_eval_mode_modules(pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        frozen = self._require_frozen()
        if (
            self.unfreeze_at_epoch is not None
            and not self._unfrozen
            and trainer.current_epoch >= self.unfreeze_at_epoch
        ):
            self._unfreeze(trainer, pl_module)
        # Re-pin at every epoch start (as the design card asks): catches layers replaced or put in
        # train mode since; the forward pre-hooks then hold it for the whole epoch.
        pin_frozen_layers(pl_module, self._still_frozen_names(), norm=frozen.norm, dropout=frozen.dropout)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(pl_module, trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        diff = self.check(pl_module, trainer)
        if diff is not None:
            rank_zero_info(f"FreezeBackbone: {diff.summary()}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._warning_filter is not None:
            try:
                warnings.filters.remove(self._warning_filter)
                warnings._filters_mutated()  # type: ignore[attr-defined]
            except (ValueError, AttributeError):
                pass
            self._warning_filter = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": list(self.frozen.names) if self.frozen else [],
            "norm": self.norm,
            "unfreeze_at_epoch": self.unfreeze_at_epoch,
            "unfrozen": self._unfrozen,
            "fingerprints": {
                k: [fp.digest, fp.dtype, list(fp.shape)] for k, fp in (self._reference or {}).items()
            },
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied in on_fit_start: the optimizer does not exist yet when Lightning restores callbacks
        self._restored = dict(state_dict)

    # ------------------------------------------------------------------------------------------
    # public helpers
    # ------------------------------------------------------------------------------------------
    def check(self, pl_module: torch.nn.Module, trainer: pl.Trainer | None = None) -> FingerprintDiff | None:
        """Compare every frozen tensor with its fingerprint from fit start.

        Returns:
            the :class:`~lightning_freeze.core.fingerprint.FingerprintDiff` (also kept as
            :attr:`last_check`), or ``None`` when ``verify="off"`` or before fit start.

        Raises:
            FrozenStateError: with ``verify="raise"``, when any frozen tensor changed.
        """
        if self.verify == "off" or self._reference is None:
            return None
        tensors = pl_module.state_dict(keep_vars=True)
        current = fingerprint(tensors, [k for k in self._reference if k in tensors])
        diff = diff_fingerprints(self._reference, current)
        self.last_check = diff
        if diff.changed or diff.missing:
            optimizers = trainer.optimizers if trainer is not None else []
            optimizer_params = [
                p for opt in optimizers for group in opt.param_groups for p in group["params"]
            ]
            causes = {
                key: likely_cause(pl_module, key, norm=self.norm, optimizer_params=optimizer_params)
                for key in diff.changed
            }
            causes.update({key: "the tensor disappeared from the model's state_dict" for key in diff.missing})
            lines = "\n".join(f"  - {key}: {cause}" for key, cause in causes.items())
            message = (
                f"FreezeBackbone: {len(causes)} frozen tensor(s) changed since fit start "
                f"({diff.summary()}):\n{lines}"
            )
            if self.verify == "raise":
                raise FrozenStateError(message, changed=list(causes), causes=causes)
            rank_zero_warn(message)
        return diff

    # ------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------
    def _require_frozen(self) -> FrozenModules:
        if self.frozen is None:
            raise RuntimeError(
                "FreezeBackbone was not set up: it acts during Trainer.fit (setup stage 'fit')."
            )
        return self.frozen

    def _names_to_freeze(self, pl_module: pl.LightningModule) -> tuple[list[str], list[str]]:
        """``(names from `modules`, inactive branch names)``."""
        branches = getattr(pl_module, "branches", None)
        active = getattr(pl_module, "active_branch", None)
        # MultiBranchModule(train_branches=[...]) trains several branches: keep all of them trainable
        trained = getattr(pl_module, "trained_branches", None)
        if trained is None and active is not None:
            trained = [active]
        inactive: list[str] = []
        if self.freeze_inactive_branches and isinstance(branches, torch.nn.ModuleDict) and trained:
            inactive = [f"branches.{name}" for name in branches if name not in trained]
        return list(self.modules), inactive

    def _still_frozen_names(self) -> list[str]:
        names = self._require_frozen().names
        return [n for n in names if n not in self._scheduled] if self._unfrozen else names

    def _unfreeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        frozen = self._require_frozen()
        params = unfreeze(pl_module, self._scheduled, mode=True)
        self._unfrozen = True
        prefixes = tuple(f"{n}." for n in self._scheduled)
        self.frozen = dataclasses.replace(
            frozen,
            parameter_keys=[k for k in frozen.parameter_keys if not k.startswith(prefixes)],
            tensor_keys=[k for k in frozen.tensor_keys if not k.startswith(prefixes)],
        )
        if self._reference is not None:
            self._reference = {k: v for k, v in self._reference.items() if not k.startswith(prefixes)}
        if not params:
            return
        if not trainer.optimizers:
            raise RuntimeError(
                "FreezeBackbone cannot unfreeze: the trainer has no optimizer to add parameters to."
            )
        optimizer = trainer.optimizers[0]
        lr = optimizer.param_groups[0]["lr"] * self.unfreeze_lr_scale
        optimizer.add_param_group({"params": params, "lr": lr, "initial_lr": lr})
        for config in trainer.lr_scheduler_configs:
            base_lrs = getattr(config.scheduler, "base_lrs", None)
            if isinstance(base_lrs, list) and getattr(config.scheduler, "optimizer", None) is optimizer:
                base_lrs.append(lr)
        rank_zero_info(
            f"FreezeBackbone: unfroze {', '.join(self._scheduled)} at epoch {trainer.current_epoch}: "
            f"{len(params)} parameters added to the optimizer as a new param group with lr={lr:g}"
        )

    def _warn_if_optimizer_holds_frozen(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        frozen_ids = {
            id(p): name
            for name, p in pl_module.named_parameters(remove_duplicate=False)
            if not p.requires_grad
        }
        held = [
            frozen_ids[id(p)]
            for opt in trainer.optimizers
            for group in opt.param_groups
            for p in group["params"]
            if id(p) in frozen_ids
        ]
        if held:
            shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
            rank_zero_warn(
                f"FreezeBackbone: the optimizer holds {len(held)} frozen parameter(s) ({shown}). They get "
                "no gradient, but an optimizer may still move them (e.g. weight decay in a custom optimizer) "
                "and it keeps state for them. Pass only trainable parameters in configure_optimizers: "
                "`[p for p in self.parameters() if p.requires_grad]`."
            )

    def _explain_eval_mode_modules(self, pl_module: pl.LightningModule) -> None:
        eval_modules = [name for name, m in pl_module.named_modules() if not m.training]
        if not eval_modules:
            return
        ours = [
            name
            for name, m in pl_module.named_modules()
            if not m.training and (is_pinned(m) or is_running_stat_norm(m))
        ]
        ours = [n for n in ours if any(n == f or n.startswith(f + ".") for f in self._require_frozen().names)]
        if len(ours) == len(eval_modules):
            # Lightning 2.6 warns about modules in eval mode at fit start; these are exactly the ones
            # pinned on purpose, so that warning would only puzzle the user.
            warnings.filterwarnings(
                "ignore",
                message=re.escape(_EVAL_MODE_WARNING.format(n=len(ours))),
                category=PossibleUserWarning,
            )
            self._warning_filter = warnings.filters[0]
            rank_zero_info(
                f"FreezeBackbone: {len(ours)} norm/dropout layer(s) inside frozen modules are pinned to eval "
                "mode on purpose (Lightning's 'modules in eval mode' notice is silenced for exactly these)."
            )
        elif ours:
            others = [n for n in eval_modules if n not in ours]
            rank_zero_info(
                f"FreezeBackbone: {len(ours)} of the {len(eval_modules)} modules in eval mode are pinned on "
                f"purpose; these others are not: {', '.join(others[:10])}"
            )


def _check_modules(modules: str | Sequence[str]) -> list[str]:
    names = (
        [modules] if isinstance(modules, str) else list(modules) if isinstance(modules, Sequence) else None
    )
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"Invalid modules={modules!r}; valid choices: a dotted submodule name or fnmatch pattern "
            "(e.g. 'backbone' or 'backbone.layer[12]'), or a non-empty list of them."
        )
    return names


def _fingerprints_from_state(state: dict[str, Any]) -> dict[str, TensorFingerprint]:
    return {k: TensorFingerprint(digest, dtype, tuple(shape)) for k, (digest, dtype, shape) in state.items()}
