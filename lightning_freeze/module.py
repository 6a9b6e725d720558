"""MultiBranchModule: one shared backbone, several branches, trained in stages without losing any."""

from __future__ import annotations

import copy
import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_freeze.core.checkpoint import (
    BRANCH_PREFIX,
    CheckpointMismatchError,
    branch_names_in,
    checkpoint_state_dict,
    ema_state_dict,
    load_checkpoint,
)
from lightning_freeze.core.errors import UnknownBranchError
from lightning_freeze.core.keys import MULTI_BRANCH_KEY
from lightning_freeze.core.random_stream import RandomStream, derive_seed
from lightning_freeze.core.validation import check_choice, choices_of
from lightning_freeze.instantiate import instantiate
from lightning_freeze.instantiate import is_config as _is_config

__all__ = ["CheckpointMismatchError", "MultiBranchModule", "UnknownBranchError", "check_branch_name"]

#: which weights :meth:`MultiBranchModule.init_from_checkpoint` loads
InitWeights = Literal["raw", "ema"]

# attributes of an nn.ModuleDict, of its class and of an instance (``training``, ``_modules``...): a
# branch with one of these names could not be stored in it
_RESERVED_NAMES = frozenset(dir(nn.ModuleDict)) | frozenset(vars(nn.ModuleDict()))
_MAX_KEYS_SHOWN = 8


Spec = Any  # an object, or a Hydra config (a mapping with "_target_") that builds it


class MultiBranchModule(pl.LightningModule):
    r"""A shared backbone with several branches (heads), trained one branch at a time, in stages.

    Stage 1 trains ``backbone`` + branch ``a``. Stage 2 builds a module with branches ``a`` and
    ``b``, :meth:`init_from_checkpoint` loads everything stage 1 trained (``b`` stays fresh), and
    :class:`~lightning_freeze.FreezeBackbone` freezes the backbone and every inactive branch, so
    training ``b`` leaves ``a``'s predictions bitwise unchanged. Branches trained in parallel
    from one stage-1 checkpoint are combined with ``lightning-freeze merge`` and served together
    with :meth:`forward_all` (one backbone pass, every branch).

    Only the active branch runs in ``training_step``: with the backbone and the other branches
    frozen, DDP needs no ``find_unused_parameters``. Batches are ``(x, y)`` for the active branch.
    Validation and test use the active branch too; given a dict of dataloaders keyed by branch
    name (``trainer.validate(model, {"a": loader_a, "b": loader_b})``), each loader is evaluated
    with its branch.

    Every constructor argument that builds an object (``backbone``, each branch, losses, metrics,
    ``optimizer``, ``scheduler``) may be the object itself or a Hydra config for it (a mapping with
    ``_target_``; ``optimizer``/``scheduler`` configs are instantiated as partials). Configs are
    stored in :attr:`hparams` as plain containers, so ``MultiBranchModule.load_from_checkpoint(path)``
    rebuilds the whole module from the checkpoint alone. With Hydra, instantiate the module node
    with ``_recursive_: false`` so that it receives the configs. Objects are not stored (Lightning
    saves module weights in the ``state_dict`` anyway): pass them again to ``load_from_checkpoint``.
    Every ``_target_`` of these configs must lie under the allowed module prefixes of
    :mod:`lightning_freeze.instantiate` (``torch.nn``, ``torch.optim``, ``torchvision.models``,
    ``timm``, ``torchmetrics``, ``lightning_freeze.models``, ...): a checkpoint's hyper-parameters
    cannot make loading call other code. Allow your own package with
    ``with lightning_freeze.instantiate.allow_targets("mypkg"): ...`` or
    ``LIGHTNING_FREEZE_ALLOWED_TARGETS=mypkg``.

    ``forward`` is scriptable: ``model.to_torchscript()`` / ``torch.jit.script(model)`` keep its
    ``branch`` argument (default: the branch active when scripted).

    Args:
        backbone: ``nn.Module`` (or its config) computing the features every branch takes.
        branches: ``{name: nn.Module or config}``; any module that takes the backbone's output.
            Names are ``state_dict`` prefixes (``branches.<name>.``) and log prefixes: non-empty,
            without ``.`` or ``/``, and not an attribute of ``nn.Module``/``nn.ModuleDict``
            (``training``, ``forward``, ``keys``, ...; see :func:`check_branch_name`).
        active_branch: the branch trained, validated and predicted by default; default: the first.
        losses: ``{branch: callable(output, target) -> loss}``; default ``F.cross_entropy``.
        metrics: ``{branch: Metric, MetricCollection, {name: Metric} or None}``; default
            ``{"acc": MulticlassAccuracy(num_classes, average="micro")}``, logged as
            ``<branch>/val_acc`` and ``<branch>/test_acc``. ``None`` for a branch: no metric.
            A bare ``Metric`` is logged under its class name (torchmetrics' convention).
        optimizer: ``callable(params) -> Optimizer`` (e.g. a Hydra ``_partial_: true`` node);
            default ``AdamW(lr=1e-3)``. It receives only parameters with ``requires_grad=True``.
        scheduler: optional ``callable(optimizer) -> LRScheduler`` or a Lightning scheduler dict
            (``{"scheduler": ..., "interval": "step"}``). ``ReduceLROnPlateau`` monitors
            ``<active branch>/val_loss`` unless told otherwise.
        num_classes: class count for the default accuracy, one ``int`` for every branch or
            ``{branch: int}``; default: ``out_features`` of the branch's last ``nn.Linear``.
        predict_all: ``predict_step`` returns ``{branch: output}`` for every branch instead of the
            active branch's output.
        train_branches: branches trained together on one backbone pass ("packed" branches: several
            heads, or several hyper-parameter variants of one head); ``None`` (default): only
            ``active_branch`` trains, on the same training path (a packed fit of one branch). Each
            has its own loss, metrics and optimizer param group; ``training_step`` computes the
            backbone once and returns the sum of the branch losses (each branch gets exactly the
            gradient of its own loss). Batches are ``(x, y)`` (every
            trained branch gets ``y``) or ``(x, {branch: y})``. Unkeyed validation evaluates every
            trained branch on one backbone pass. ``active_branch`` defaults to the first of them.
            With a frozen backbone the branches are independent: each ends bitwise where training
            it alone would (same batches, no randomness inside the branch). Settings that would
            couple them are handled per branch (``gradient_clip_val`` clips each branch by its own
            norm) or refused (``ReduceLROnPlateau``, a gradient scaler (``16-mixed``), an optimizer
            that cannot hold one param group per branch such as ``LBFGS``).
        branch_optimizers: ``{trained branch: {setting: value}}``: per-branch optimizer settings
            (any setting of the optimizer's param groups, e.g. ``lr``, ``weight_decay``,
            ``betas``, ``momentum``); unset settings come from ``optimizer``.
        random_streams: ``{trained branch: stream name}``. Every trained branch runs its
            ``training_step`` forward and loss inside its own random stream
            (:class:`~lightning_freeze.core.random_stream.RandomStream`), seeded at fit start from
            the run's seed (``torch.initial_seed()``, set by ``seed_everything``) and the stream
            name, saved in checkpoints and restored on resume. Its dropout therefore neither
            shifts the global stream (data shuffling, the backbone, other branches) nor depends on
            it. Default stream name: the branch's own name. Give packed variants of one head the
            head's name (``{"lr_small": "head", "lr_big": "head"}``) and each draws exactly what
            training ``head`` alone with the same seed draws.

    Raises:
        UnknownBranchError: ``active_branch``, a name in ``train_branches`` or a key of
            ``losses``/``metrics``/``num_classes``/``branch_optimizers`` is not a branch (the message
            lists the branches).
        ValueError: an invalid branch name, no branches, a class count that cannot be inferred, an
            empty or repeated ``train_branches``, ``active_branch`` outside ``train_branches``, or
            ``branch_optimizers`` for a branch that is not trained.
        lightning_freeze.instantiate.TargetNotAllowedError: a config's ``_target_`` outside the
            allow-list (a ``ValueError``; nothing was instantiated).

    Example::

        import lightning as L
        from torch import nn
        from lightning_freeze import FreezeBackbone, MultiBranchModule

        backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        # stage 1: backbone + branch "a"
        stage1 = MultiBranchModule(backbone, {"a": nn.Linear(32, 3)})
        trainer = L.Trainer(max_epochs=5)
        trainer.fit(stage1, loader_a)
        trainer.save_checkpoint("stage1.ckpt")
        # stage 2: add branch "b"; the backbone and "a" stay bitwise frozen
        stage2 = MultiBranchModule(
            nn.Sequential(nn.Linear(16, 32), nn.ReLU()),
            {"a": nn.Linear(32, 3), "b": nn.Linear(32, 5)},
            active_branch="b",
        )
        assert stage2.init_from_checkpoint("stage1.ckpt") == ["b"]
        L.Trainer(max_epochs=5, callbacks=[FreezeBackbone()]).fit(stage2, loader_b)
        outputs = stage2.forward_all(x)  # {"a": ..., "b": ...}, backbone computed once
    """

    # properties TorchScript must not compile (their setters and checks are Python-only)
    __jit_unused_properties__: list[str] = [
        *pl.LightningModule.__jit_unused_properties__,
        "active_branch",
        "branch_names",
        "losses",
        "optimizer_factory",
        "scheduler_factory",
    ]

    def __init__(
        self,
        backbone: nn.Module | Mapping[str, Any] | None = None,
        branches: Mapping[str, nn.Module | Mapping[str, Any]] | None = None,
        active_branch: str | None = None,
        losses: Mapping[str, Callable[..., torch.Tensor] | Mapping[str, Any]] | None = None,
        metrics: Mapping[str, Metric | MetricCollection | Mapping[str, Any] | None] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | Mapping[str, Any] | None = None,
        scheduler: Callable[..., Any] | Mapping[str, Any] | None = None,
        num_classes: int | Mapping[str, int] | None = None,
        predict_all: bool = False,
        train_branches: Sequence[str] | None = None,
        branch_optimizers: Mapping[str, Mapping[str, Any]] | None = None,
        random_streams: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        if backbone is None or branches is None:
            missing = [n for n, v in (("backbone", backbone), ("branches", branches)) if v is None]
            raise TypeError(
                f"MultiBranchModule needs {' and '.join(missing)}. When loading a checkpoint of a module "
                "built from nn.Module objects (not from Hydra configs), pass them again: "
                "MultiBranchModule.load_from_checkpoint(path, backbone=..., branches={...})."
            )
        if not isinstance(branches, Mapping) or not branches:
            raise ValueError(
                f"Invalid branches={branches!r}; valid choices: a non-empty mapping "
                "{name: nn.Module or config}."
            )
        for name in branches:
            check_branch_name(name)

        self.backbone = _build_module("backbone", backbone)
        self.branches = nn.ModuleDict(
            {name: _build_module(f"branches[{name!r}]", spec) for name, spec in branches.items()}
        )
        names = list(self.branches)
        self._active_branch = (
            names[0] if active_branch is None else self._check_branch(active_branch, "active_branch")
        )
        self._train_branches = self._check_train_branches(train_branches, active_branch)
        if self._train_branches is not None and active_branch is None:
            self._active_branch = self._train_branches[0]
        self._branch_optimizers = self._check_branch_optimizers(branch_optimizers)
        self._stream_names = self._check_random_streams(random_streams)
        self._streams: dict[str, RandomStream] = {}

        self._check_keys("losses", losses)
        self._check_keys("metrics", metrics)
        if isinstance(num_classes, Mapping):
            self._check_keys("num_classes", num_classes)
        self._losses: dict[str, Callable[..., torch.Tensor]] = {
            name: instantiate(spec, f"losses[{name!r}]") if _is_config(spec) else spec
            for name, spec in (losses or {}).items()
        }
        for name, fn in self._losses.items():
            if not callable(fn):
                raise TypeError(f"losses[{name!r}] must be callable(output, target) -> loss, got {fn!r}.")

        collections = {
            name: self._metric_collection(name, (metrics or {}).get(name, "default"), num_classes)
            for name in names
        }
        # separate state for validation and test; keys "<branch>/val_<metric>", "<branch>/test_<metric>"
        self.val_metrics, self.test_metrics = (
            nn.ModuleDict(
                {n: c.clone(prefix=f"{n}/{stage}_") for n, c in collections.items() if c is not None}
            )
            for stage in ("val", "test")
        )
        self._optimizer_factory = _build_factory("optimizer", optimizer)
        self._scheduler_factory = _build_factory("scheduler", scheduler)
        self.predict_all = bool(predict_all)
        self.save_hyperparameters(
            self._rebuild_args(backbone, branches, losses, metrics, optimizer, scheduler, num_classes)
        )

    # --- branches ---------------------------------------------------------------------------------
    @property
    def branch_names(self) -> list[str]:
        """Names of all branches, in order."""
        return list(self.branches)

    @property
    def active_branch(self) -> str:
        """The branch that ``training_step``, ``validation_step`` and ``forward`` use by default."""
        return self._active_branch

    @active_branch.setter
    def active_branch(self, name: str) -> None:
        self.switch_branch(name)

    @property
    def trained_branches(self) -> list[str]:
        """The branches that ``training_step`` trains: ``train_branches``, or ``[active_branch]``.

        :class:`~lightning_freeze.FreezeBackbone` freezes every other branch.
        """
        return list(self._train_branches) if self._train_branches is not None else [self._active_branch]

    @property
    def train_branches(self) -> list[str] | None:
        """The ``train_branches`` argument (``None``: only the active branch trains)."""
        return None if self._train_branches is None else list(self._train_branches)

    @property
    def losses(self) -> dict[str, Callable[..., torch.Tensor]]:
        """The loss function of each branch given one (``losses``); the others use cross-entropy."""
        return dict(self._losses)

    @property
    def optimizer_factory(self) -> Callable[..., torch.optim.Optimizer] | None:
        """The ``optimizer`` callable (instantiated from its config); ``None``: AdamW(lr=1e-3)."""
        return self._optimizer_factory

    @property
    def scheduler_factory(self) -> Callable[..., Any] | None:
        """The ``scheduler`` callable (instantiated from its config), or ``None``."""
        return self._scheduler_factory

    def _rebuild_args(
        self,
        backbone: Any,
        branches: Any,
        losses: Any,
        metrics: Any,
        optimizer: Any,
        scheduler: Any,
        num_classes: Any,
    ) -> dict[str, Any]:
        """The constructor arguments that can rebuild the module: configs and plain values, not objects."""
        out: dict[str, Any] = {"active_branch": self._active_branch, "predict_all": self.predict_all}
        for key, value in (("backbone", backbone), ("optimizer", optimizer), ("scheduler", scheduler)):
            if _is_config(value):
                out[key] = _plain(value)
        for key, value in (("branches", branches), ("losses", losses)):
            if isinstance(value, Mapping) and all(_is_config(v) for v in value.values()):
                out[key] = _plain(value)
        if isinstance(metrics, Mapping) and all(v is None or _is_config(v) for v in metrics.values()):
            out["metrics"] = _plain(metrics)
        if num_classes is not None:
            out["num_classes"] = _plain(num_classes)
        if self._train_branches is not None:
            out["train_branches"] = list(self._train_branches)
        if self._branch_optimizers:
            out["branch_optimizers"] = _plain(self._branch_optimizers)
        if self._stream_names:
            out["random_streams"] = dict(self._stream_names)
        return out

    def _check_train_branches(self, train_branches: Any, active_branch: str | None) -> list[str] | None:
        if train_branches is None:
            return None
        if isinstance(train_branches, str) or not isinstance(train_branches, Sequence) or not train_branches:
            raise ValueError(
                f"Invalid train_branches={train_branches!r}; valid choices: None (only the active branch "
                f"trains) or a non-empty list of branch names from "
                f"{', '.join(repr(n) for n in self.branches)}."
            )
        names = [self._check_branch(name, "branch in train_branches") for name in train_branches]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"train_branches={names!r} names {', '.join(repr(n) for n in repeated)} more than once; "
                "each branch trains at most once (to train variants of one head, give each its own branch)."
            )
        if active_branch is not None and active_branch not in names:
            raise ValueError(
                f"active_branch={active_branch!r} is not in train_branches={names!r}; valid choices: one of "
                f"{', '.join(repr(n) for n in names)}, or None (the first)."
            )
        return names

    def _check_branch_optimizers(self, branch_optimizers: Any) -> dict[str, dict[str, Any]]:
        if branch_optimizers is None:
            return {}
        self._check_keys("branch_optimizers", branch_optimizers)
        trained = self.trained_branches
        untrained = [name for name in branch_optimizers if name not in trained]
        if untrained:
            raise ValueError(
                f"branch_optimizers names branch(es) {', '.join(repr(n) for n in untrained)} that are not "
                f"trained; valid choices: the trained branches {', '.join(repr(n) for n in trained)}."
            )
        for name, settings in branch_optimizers.items():
            if not isinstance(settings, Mapping) or any(k in settings for k in ("_target_", "params")):
                raise TypeError(
                    f"branch_optimizers[{name!r}] must be a mapping of param-group settings such as "
                    f"{{'lr': 0.01, 'weight_decay': 0.0}} (one optimizer holds every packed branch, so "
                    f"'_target_' and 'params' are not settings), got {settings!r}."
                )
        return {name: _plain(settings) for name, settings in branch_optimizers.items()}

    def _check_random_streams(self, random_streams: Any) -> dict[str, str]:
        if random_streams is None:
            return {}
        self._check_keys("random_streams", random_streams)
        bad = {k: v for k, v in random_streams.items() if not isinstance(v, str) or not v}
        if bad:
            raise ValueError(
                f"Invalid random_streams={dict(random_streams)!r}: {bad!r} are not stream names; valid "
                "choices: {trained branch: a non-empty string}, e.g. {'lr_small': 'head', 'lr_big': 'head'}."
            )
        return {str(k): str(v) for k, v in random_streams.items()}

    def random_stream(self, branch: str) -> RandomStream:
        """The random stream ``branch`` trains in.

        Created on first use (at the first fit's start for trained branches), seeded from
        ``torch.initial_seed()`` and the branch's stream name (``random_streams``, default the
        branch name); it then continues across fits and is saved in, and restored from, checkpoints.

        Raises:
            UnknownBranchError: ``branch`` is not a branch.
        """
        name = self._check_branch(branch)
        if name not in self._streams:
            seed = derive_seed(torch.initial_seed(), self._stream_names.get(name, name))
            self._streams[name] = RandomStream(seed)
        return self._streams[name]

    def switch_branch(self, name: str) -> None:
        """Make ``name`` the active branch (between fits; not while ``Trainer.fit`` runs).

        Raises:
            UnknownBranchError: ``name`` is not a branch (the message lists the branches).
            RuntimeError: called while fitting (the frozen set and the optimizer were built for the
                current branch).
        """
        name = self._check_branch(name, "branch")
        trainer = self._trainer
        if (
            name != self._active_branch
            and trainer is not None
            and trainer.state.fn == TrainerFn.FITTING
            and trainer.state.status == TrainerStatus.RUNNING
        ):
            raise RuntimeError(
                f"Cannot switch from branch {self._active_branch!r} to {name!r} while Trainer.fit runs: "
                "the optimizer and the frozen modules were set up for the active branch. Switch before fit."
            )
        self._active_branch = name
        self.hparams["active_branch"] = name

    def _check_branch(self, name: Any, what: str = "branch") -> str:
        if not isinstance(name, str) or name not in self.branches:
            raise UnknownBranchError(
                f"Unknown {what} {name!r}; valid choices: {', '.join(repr(n) for n in self.branches)}."
            )
        return name

    def _check_keys(self, arg: str, mapping: Mapping[str, Any] | None) -> None:
        if mapping is None:
            return
        if not isinstance(mapping, Mapping):
            raise TypeError(f"{arg} must be a mapping {{branch name: ...}}, got {type(mapping).__name__}.")
        unknown = [k for k in mapping if k not in self.branches]
        if unknown:
            raise UnknownBranchError(
                f"{arg} names unknown branch(es) {', '.join(repr(k) for k in unknown)}; valid choices: "
                f"{', '.join(repr(n) for n in self.branches)}."
            )

    def _metric_collection(
        self, name: str, spec: Any, num_classes: int | Mapping[str, int] | None
    ) -> MetricCollection | None:
        if spec is None:
            return None
        if _is_config(spec):
            spec = instantiate(spec, f"metrics[{name!r}]")
        if isinstance(spec, MetricCollection):
            return spec
        if isinstance(spec, Metric):
            return MetricCollection([spec])
        if isinstance(spec, Mapping) and all(isinstance(m, Metric) for m in spec.values()):
            return MetricCollection(dict(spec)) if spec else None
        if spec != "default":
            raise TypeError(
                f"metrics[{name!r}] must be a torchmetrics Metric, MetricCollection, {{name: Metric}}, "
                f"a config for one, or None; got {spec!r}."
            )
        count = num_classes.get(name) if isinstance(num_classes, Mapping) else num_classes
        if count is None:  # out_features of the branch's last nn.Linear
            linears = [m for m in self.branches[name].modules() if isinstance(m, nn.Linear)]
            count = int(linears[-1].out_features) if linears else None
        if count is None or count < 2:
            found = "no nn.Linear" if count is None else f"a last nn.Linear with out_features={count}"
            raise ValueError(
                f"Cannot infer the class count of branch {name!r} for its default accuracy metric: it has "
                f"{found}. Pass num_classes={{{name!r}: N}} (N >= 2), metrics={{{name!r}: ...}}, or "
                f"metrics={{{name!r}: None}} for no metric."
            )
        return MetricCollection({"acc": MulticlassAccuracy(num_classes=count, average="micro")})

    # --- forward ----------------------------------------------------------------------------------
    @override
    def forward(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        """Output of ``branch`` (default: the active branch) for input ``x``.

        Scriptable: ``torch.jit.script(model)`` and ``model.to_torchscript()`` keep the ``branch``
        argument (default: the branch active when scripted); ``torch.export`` traces the active branch.
        """
        if torch.jit.is_scripting():
            # TorchScript indexes a ModuleDict only with literal keys: look the branch up by iterating
            name = self._active_branch if branch is None else branch
            features = self.backbone(x)
            for key, module in self.branches.items():
                if key == name:
                    return module(features)
            raise KeyError("Unknown branch " + name)
        name = self._active_branch if branch is None else self._check_branch(branch)
        return self.branches[name](self.backbone(x))

    def forward_all(self, x: Any, branches: Sequence[str] | None = None) -> dict[str, Any]:
        """Outputs of every branch (or of ``branches``), computing the backbone once.

        Returns:
            ``{branch name: output}`` in branch order.
        """
        names = self.branch_names if branches is None else [self._check_branch(b) for b in branches]
        features = self.backbone(x)
        return {name: self.branches[name](features) for name in names}

    # --- steps ------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The summed loss of the trained branches (one: the active branch) on one backbone pass.

        Only trained branches run: frozen inactive branches get no gradient, so DDP needs no
        ``find_unused_parameters``. Each branch runs in its own random stream (:meth:`random_stream`).
        """
        x, y = _unpack(batch)
        trained = self.trained_branches
        # one branch trains through the module's own call, so that a compiled model (``model.compile()``)
        # trains compiled (the backbone then runs in the branch's stream: frozen, it draws nothing);
        # packed branches share one backbone pass
        features = self.backbone(x) if len(trained) > 1 else None
        # the branches run where the backbone's output is (the module's device otherwise)
        source = x if features is None else features
        device = source.device if isinstance(source, torch.Tensor) else self.device
        total: torch.Tensor | None = None
        for name in trained:
            with self.random_stream(name).active(device):
                output = self(x) if features is None else self.branches[name](features)
                loss = self._loss(name, output, _target_for(name, y))
            self.log(
                f"{name}/train_loss",
                loss,
                on_step=True,
                on_epoch=True,
                prog_bar=len(trained) == 1,
                batch_size=_size(x),
            )
            # d(sum)/d(loss_b) is exactly 1 and branches share no parameter: each branch's gradient
            # is bitwise the gradient of its own loss, as if it trained alone
            total = loss if total is None else total + loss
        assert total is not None
        return total

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self._evaluate(batch, dataloader_idx, "val", self.val_metrics)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self._evaluate(batch, dataloader_idx, "test", self.test_metrics)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.forward_all(x) if self.predict_all else self(x)

    def _evaluate(self, batch: Any, dataloader_idx: int, stage: str, metrics: nn.ModuleDict) -> torch.Tensor:
        name, keyed = self._branch_for_dataloader(stage, dataloader_idx)
        trained = self.trained_branches
        # unkeyed loaders evaluate every trained branch (packed: on one backbone pass)
        names = trained if not keyed and name in trained else [name]
        x, y = _unpack(batch)
        outputs = {name: self(x, branch=name)} if len(names) == 1 else self.forward_all(x, names)
        total: torch.Tensor | None = None
        for name, output in outputs.items():
            target = _target_for(name, y)
            loss = self._loss(name, output, target)
            self.log(
                f"{name}/{stage}_loss",
                loss,
                on_epoch=True,
                prog_bar=len(names) == 1,
                sync_dist=True,
                batch_size=_size(x),
                add_dataloader_idx=not keyed,
            )
            if name in metrics:
                collection = metrics[name]
                collection.update(output, target)
                self.log_dict(
                    collection, on_epoch=True, prog_bar=len(names) == 1, add_dataloader_idx=not keyed
                )
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def _branch_for_dataloader(self, stage: str, dataloader_idx: int) -> tuple[str, bool]:
        """``(branch, keyed)``: the branch a dataloader feeds, and whether loaders are keyed by branch."""
        trainer = self._trainer
        if trainer is None:
            return self._active_branch, False
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        if not isinstance(loaders, Mapping):
            return self._active_branch, False
        unknown = [k for k in loaders if k not in self.branches]
        if unknown:
            raise UnknownBranchError(
                f"{stage} dataloaders given as a dict are matched to branches by key; unknown key(s) "
                f"{', '.join(repr(k) for k in unknown)}; valid choices: "
                f"{', '.join(repr(n) for n in self.branches)}."
            )
        return list(loaders)[dataloader_idx], True

    def _loss(self, name: str, output: Any, target: Any) -> torch.Tensor:
        fn = self._losses.get(name, F.cross_entropy)
        if isinstance(fn, nn.Module):
            fn.to(self.device)  # kept out of state_dict (not a submodule); moved lazily
        return fn(output, target)

    # --- optimizers -------------------------------------------------------------------------------
    @override
    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer()
        if self._scheduler_factory is None:
            return optimizer
        scheduler = self._scheduler_factory(optimizer)
        config = dict(scheduler) if isinstance(scheduler, Mapping) else {"scheduler": scheduler}
        if isinstance(config.get("scheduler"), torch.optim.lr_scheduler.ReduceLROnPlateau):
            if len(self.trained_branches) > 1:
                raise ValueError(
                    f"scheduler ReduceLROnPlateau cannot drive packed branches {self.trained_branches}: it "
                    "monitors one metric and lowers the learning rate of every param group, which would "
                    "couple them. Use a schedule that monitors nothing (e.g. CosineAnnealingLR, StepLR, "
                    "LambdaLR: each param group follows its own lr), or train the branches one at a time."
                )
            config.setdefault("monitor", f"{self._active_branch}/val_loss")
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _optimizer(self) -> torch.optim.Optimizer:
        """One optimizer over the ``requires_grad`` parameters.

        Packed branches (``train_branches``) get one param group each (settings from
        ``branch_optimizers``); the other trainable parameters (a single branch's fit: all of them)
        form one more group with the optimizer's own settings.
        """
        packed = self._train_branches is not None
        groups: list[dict[str, Any]] = []
        for name in self._train_branches or ():
            params = [p for p in self.branches[name].parameters() if p.requires_grad]
            if not params:
                raise ValueError(_frozen_and_trained_message([name], self._train_branches or ()))
            groups.append({"params": params, **self._branch_optimizers.get(name, {}), "branch": name})
        grouped = {id(p) for group in groups for p in group["params"]}
        shared = [p for p in self.parameters() if p.requires_grad and id(p) not in grouped]
        if shared:  # e.g. a backbone trained with packed branches (multi-task): shared, so not independent
            groups.append({"params": shared})
        if not groups:
            raise ValueError(
                f"Nothing to optimize: every parameter of {type(self).__name__} has requires_grad=False "
                f"(active branch {self._active_branch!r}). Is the active branch frozen?"
            )
        factory = self._optimizer_factory or functools.partial(torch.optim.AdamW, lr=1e-3)
        if not packed:  # the factory gets the parameter list itself, as a plain optimizer would
            return factory(shared)
        try:
            optimizer = factory(groups)
        except (ValueError, TypeError) as err:
            raise ValueError(_GLOBAL_STATE_MESSAGE.format(optimizer=factory, reason=err)) from err
        if len(optimizer.param_groups) != len(groups):
            raise ValueError(
                _GLOBAL_STATE_MESSAGE.format(
                    optimizer=type(optimizer).__name__, reason="it did not keep one param group per branch"
                )
            )
        for name, settings in self._branch_optimizers.items():
            unknown = sorted(k for k in settings if k not in optimizer.defaults)
            if unknown:
                raise ValueError(
                    f"branch_optimizers[{name!r}] sets {', '.join(repr(k) for k in unknown)}, which "
                    f"{type(optimizer).__name__} does not take per param group; valid choices: "
                    f"{', '.join(repr(k) for k in sorted(optimizer.defaults))}."
                )
        return optimizer

    @override
    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """As Lightning's, except that packed branches are norm-clipped each by its own gradient norm.

        A norm over every parameter would let one branch's gradients shrink another's.
        """
        algorithm = gradient_clip_algorithm or "norm"
        if len(self.trained_branches) < 2 or not gradient_clip_val or str(algorithm).lower() != "norm":
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        for group in optimizer.param_groups:
            # the same call, on the same parameters in the same order, as a solo run's optimizer makes
            torch.nn.utils.clip_grad_norm_(group["params"], gradient_clip_val)

    @override
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        self._check_packed_setup()
        trained = self.trained_branches
        for name in trained:
            self.random_stream(name)  # seeded now, from the run's seed (restored later on resume)
        trainable = [
            name
            for name in self.branch_names
            if name not in trained and any(p.requires_grad for p in self.branches[name].parameters())
        ]
        if trainable:
            rank_zero_warn(
                f"MultiBranchModule: inactive branch(es) {', '.join(repr(n) for n in trainable)} have "
                f"trainable parameters while {', '.join(repr(n) for n in trained)} train. Only trained "
                "branches run in training_step, so they get no gradient, and DDP fails on them unless "
                "find_unused_parameters=True. Add FreezeBackbone() (it freezes the backbone and the inactive "
                "branches) or freeze them yourself."
            )

    def _check_packed_setup(self) -> None:
        """Refuse, before training, what would make packed branches wrong or coupled."""
        if self._train_branches is None:
            return
        frozen = [
            n for n in self._train_branches if not any(p.requires_grad for p in self.branches[n].parameters())
        ]
        if frozen:
            raise ValueError(_frozen_and_trained_message(frozen, self._train_branches))
        trainer = self._trainer
        if len(self._train_branches) > 1 and getattr(
            getattr(trainer, "precision_plugin", None), "scaler", None
        ):
            raise ValueError(
                f"Packed branches {self._train_branches} cannot train with a gradient scaler "
                "(precision='16-mixed'): one branch's overflow would skip every branch's step and set one "
                "shared scale. Use precision='bf16-mixed' or '32-true', or train the branches one at a time."
            )

    # --- checkpoints ------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        section = checkpoint[MULTI_BRANCH_KEY] = {
            "active_branch": self._active_branch,
            "branch_names": self.branch_names,
        }
        if self._train_branches is not None:
            section["train_branches"] = list(self._train_branches)
        if self._streams:
            section["random_streams"] = {name: stream.state_dict() for name, stream in self._streams.items()}
        metrics = _branch_metrics(self._trainer, self.branch_names)
        if metrics:
            # the latest per-branch metrics (e.g. "b/val_acc"): `lightning-freeze select` reads them
            section["metrics"] = metrics

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        section = checkpoint.get(MULTI_BRANCH_KEY) or {}
        for name, state in (section.get("random_streams") or {}).items():
            if name in self.branches:
                self.random_stream(name).load_state_dict(state)
        saved = section.get("active_branch")
        if saved is None or saved == self._active_branch or saved not in self.branches:
            return
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            raise ValueError(
                f"This checkpoint was saved while training branch {saved!r}, but the module is set to "
                f"train {self._active_branch!r}. To resume, build the module with active_branch={saved!r}; "
                "to start a new stage from this checkpoint, call model.init_from_checkpoint(path) instead "
                "of passing ckpt_path to Trainer.fit."
            )
        self._active_branch = saved
        self.hparams["active_branch"] = saved

    def init_from_checkpoint(
        self,
        path: str | os.PathLike[str],
        *,
        weights: InitWeights = "raw",
        ema_state_key: str | None = None,
        unsafe_load: bool = False,
    ) -> list[str]:
        """Start a new stage from an earlier stage's checkpoint, losing nothing.

        Every tensor present in both the checkpoint and this module is loaded exactly (bitwise).
        Branches absent from the checkpoint stay freshly initialised. Anything else that does not
        fit is an error: a tensor of this module missing from the checkpoint (outside the new
        branches), a tensor of the checkpoint this module has no place for (a branch you did not
        include would be silently lost), or a shape/dtype mismatch.

        Args:
            path: a Lightning checkpoint (or ``lightning-freeze merge`` output) or a ``state_dict`` file.
            weights: ``"raw"`` (default): the checkpoint's ``state_dict``; ``"ema"``: the weights
                averaged by :class:`~lightning_freeze.FrozenSafeEMA` where it shadowed them (what its
                validation reported), the raw value elsewhere.
            ema_state_key: with ``weights="ema"``, which ``FrozenSafeEMA`` state when there are several.
            unsafe_load: load with ``torch.load(weights_only=False)``; only for files you trust.

        Returns:
            the names of the branches that stay fresh (not in the checkpoint), in branch order.

        Raises:
            CheckpointMismatchError: keys that do not fit, named (first few of each kind).
            lightning_freeze.core.checkpoint.CheckpointError: the file cannot be read as a checkpoint.
        """
        check_choice("weights", weights, choices_of(InitWeights))
        label = os.fspath(path)
        checkpoint = load_checkpoint(path, unsafe_load=unsafe_load)
        if weights == "ema":
            state = ema_state_dict(checkpoint, repr(label), state_key=ema_state_key)
        else:
            state = checkpoint_state_dict(checkpoint, repr(label))
        own = self.state_dict()
        in_checkpoint = branch_names_in(state)
        fresh = [n for n in self.branch_names if n not in in_checkpoint]
        lost = [n for n in in_checkpoint if n not in self.branches]
        fresh_prefixes = tuple(f"{BRANCH_PREFIX}{n}." for n in fresh)
        lost_prefixes = tuple(f"{BRANCH_PREFIX}{n}." for n in lost)

        problems = []
        if lost:
            problems.append(
                f"the checkpoint has branch(es) {', '.join(repr(n) for n in lost)} that this module lacks "
                f"(its branches: {', '.join(repr(n) for n in self.branches)}); add them to `branches` so "
                "their trained weights are kept"
            )
        missing = [k for k in own if k not in state and not k.startswith(fresh_prefixes)]
        if missing:
            problems.append(f"missing from the checkpoint: {_show(missing)}")
        unexpected = [k for k in state if k not in own and not k.startswith(lost_prefixes)]
        if unexpected:
            problems.append(f"not in this module: {_show(unexpected)}")
        mismatched = [
            f"{k} (checkpoint {_describe(state[k])}, module {_describe(v)})"
            for k, v in own.items()
            if k in state
            and isinstance(v, torch.Tensor)
            and isinstance(state[k], torch.Tensor)
            and (state[k].shape != v.shape or state[k].dtype != v.dtype)
        ]
        if mismatched:
            problems.append(f"shape/dtype differs: {_show(mismatched)}")
        if problems:
            raise CheckpointMismatchError(
                f"Cannot initialise {type(self).__name__} from {label!r}: " + "; ".join(problems) + "."
            )

        result = self.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
        # a custom _load_from_state_dict could disagree with state_dict(): check what it did
        left = [k for k in result.missing_keys if not k.startswith(fresh_prefixes)]
        left += list(result.unexpected_keys)
        if left:
            raise CheckpointMismatchError(
                f"Cannot initialise from {label!r}: load_state_dict left {_show(left)}."
            )
        loaded = sum(not k.startswith(fresh_prefixes) for k in own)
        rank_zero_info(
            f"MultiBranchModule: loaded {loaded} tensors from {label!r}"
            + (f"; fresh branch(es): {', '.join(fresh)}" if fresh else "")
        )
        return fresh


# --- helpers --------------------------------------------------------------------------------------
_GLOBAL_STATE_MESSAGE = (
    "optimizer {optimizer} cannot train packed branches ({reason}): they need one optimizer param group "
    "per branch and per-parameter state, so that no branch's step depends on another's (e.g. AdamW, Adam, "
    "SGD, RMSprop). Use such an optimizer, or train the branches one at a time."
)


def _frozen_and_trained_message(frozen: Sequence[str], trained: Sequence[str]) -> str:
    return (
        f"Branch(es) {', '.join(repr(n) for n in frozen)} are in train_branches={list(trained)!r} but every "
        "parameter of them is frozen (requires_grad=False, e.g. listed in FreezeBackbone(modules=...)). A "
        "branch cannot be both frozen and trained: remove it from train_branches or from the frozen modules."
    )


def _target_for(name: str, target: Any) -> Any:
    """The target of branch ``name``: ``target[name]`` when targets are keyed by branch, else ``target``."""
    if not isinstance(target, Mapping):
        return target
    if name not in target:
        raise UnknownBranchError(
            f"The batch's targets are a dict keyed by branch but have no target for branch {name!r}; their "
            f"keys: {', '.join(repr(k) for k in target)}. Give (x, {{branch: y}}) with every trained "
            "branch, or (x, y) for all of them."
        )
    return target[name]


def _branch_metrics(trainer: Any, branches: Sequence[str]) -> dict[str, float]:
    """Scalar ``callback_metrics`` whose key starts with a branch name (``"<branch>/..."``)."""
    if trainer is None:
        return {}
    out: dict[str, float] = {}
    for key, value in trainer.callback_metrics.items():
        if key.split("/", 1)[0] in branches and isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value)
    return out


def check_branch_name(name: Any) -> str:
    """Check that ``name`` can name a branch (a key of the ``branches`` ``nn.ModuleDict``).

    Valid: a non-empty string without ``.`` or ``/`` (``state_dict`` and log separators) that is not
    an attribute of ``nn.ModuleDict`` / ``nn.Module`` (``training``, ``forward``, ``state_dict``, ...:
    ``nn.ModuleDict`` cannot store a module under such a name).

    Returns:
        ``name``.

    Raises:
        ValueError: an invalid name, with the reason and the rule.
    """
    if not isinstance(name, str) or not name:
        reason = "not a non-empty string"
    elif "." in name or "/" in name:
        reason = "it contains '.' or '/'"
    elif name in _RESERVED_NAMES:
        reason = "it is an attribute of nn.Module/nn.ModuleDict"
    else:
        return name
    raise ValueError(
        f"Invalid branch name {name!r} ({reason}); valid choices: a non-empty string without '.' or '/' "
        "that is not an attribute of nn.Module/nn.ModuleDict (such as 'training', 'forward', 'state_dict'), "
        "e.g. 'a' or 'cls_head'."
    )


def _build_factory(what: str, spec: Any) -> Callable[..., Any] | None:
    factory = instantiate(spec, what, _partial_=True) if _is_config(spec) else spec
    if factory is not None and not callable(factory):
        raise TypeError(
            f"{what} must be a callable (e.g. functools.partial or a Hydra _partial_ node), got {factory!r}."
        )
    return factory


def _build_module(what: str, spec: Any) -> nn.Module:
    obj = instantiate(spec, what) if _is_config(spec) else spec
    if not isinstance(obj, nn.Module):
        raise TypeError(
            f"{what} must be an nn.Module or a Hydra config (with _target_) for one, got {obj!r}."
        )
    return obj


def _plain(value: Any) -> Any:
    """A config as plain dicts/lists (safe for ``torch.load(weights_only=True)``)."""
    # omegaconf not imported yet: the value cannot be one of its containers (the library does not
    # import the app's dependencies)
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is not None and isinstance(value, (omegaconf.DictConfig, omegaconf.ListConfig)):
        return omegaconf.OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def _unpack(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        f"MultiBranchModule expects batches (x, y) for the active branch, got a {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + "; override training_step/validation_step for other batch layouts."
    )


def _size(x: Any) -> int | None:
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else None


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def _show(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_KEYS_SHOWN])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_KEYS_SHOWN else "")
