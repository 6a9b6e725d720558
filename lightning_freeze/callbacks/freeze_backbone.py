"""FreezeBackbone: freeze named submodules so they stay bitwise identical, and verify it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_freeze import _compat
from lightning_freeze.callbacks.unfreeze import (
    PhaseRunner,
    add_to_optimizer,
    can_unfreeze_under,
    check_compiled_gradients,
    check_schedulers,
    rewrap_ddp,
)
from lightning_freeze.core.fingerprint import FingerprintDiff
from lightning_freeze.core.freeze import (
    DROPOUT_MODES,
    NORM_MODES,
    DropoutMode,
    FrozenModules,
    NormMode,
    freeze,
    pin_frozen_layers,
    unfreeze,
)
from lightning_freeze.core.norm import find_running_stat_norms, pin_eval, running_stat_buffer_names
from lightning_freeze.core.param_groups import SUPPORTED_SCHEDULERS
from lightning_freeze.core.probe import OutputProbe, ProbeMismatch
from lightning_freeze.core.unfreeze_schedule import UnfreezeSchedule
from lightning_freeze.core.validation import check_choice, check_int, check_positive_finite, check_str_list
from lightning_freeze.core.verifier import VERIFY_MODES, FrozenVerifier, ProbeMode, VerifyMode

__all__ = ["SUPPORTED_SCHEDULERS", "VERIFY_MODES", "FreezeBackbone"]


class FreezeBackbone(Callback):
    r"""Freeze submodules of the LightningModule during a fit: **bitwise** identical, and proven so.

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
      epoch end and at fit end (``verify``);
    * records each frozen module's output on a small probe input (the first two samples that
      reach it in the first training batch) and checks that the module still reproduces it: a
      replaced ``forward``, a layer left in train mode, a changed buffer or a conversion that
      computes something else are caught even when no tensor changed. The probe (one forward of
      the module on two samples) runs at fit end, on demand (:meth:`check`), and at a train epoch
      end only when a frozen tensor changed or the module's
      :func:`~lightning_freeze.core.probe.function_token` did (its modules, classes, forwards,
      hooks, simple attributes, non-persistent buffers, global flags): so a change of function is
      caught at the end of the epoch it happened in, except a replaced function the module calls
      (a monkeypatched library function), caught at fit end. The check
      consumes no random number, changes no buffer and builds no autograd graph (see
      :mod:`lightning_freeze.core.probe`); it is bitwise on CPU (and on any device with
      ``torch.use_deterministic_algorithms(True)``), within ``1e-5 + 1e-3 * max|output|`` otherwise.

    **Lifecycle.** The freeze lasts for one ``Trainer.fit``. When the fit ends (normally or with an
    exception) the callback gives the model back as it found it:
    :func:`~lightning_freeze.core.unfreeze` removes every hook it installed, converts frozen norm
    layers back (tensors bitwise equal), and restores each parameter's ``requires_grad`` and each
    module's train/eval flag as they were before ``setup``. A later fit without this callback
    trains the whole model normally, and the model scripts and exports like any other. To keep a
    module frozen outside a fit, call :func:`lightning_freeze.core.freeze` yourself.

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
            to the first optimizer as a new param group (parameters the optimizer already held are
            moved into it). Applied wherever the run is, also when it resumes into that epoch or a
            later one. Learning-rate schedulers of that optimizer are extended to the new group
            (see :data:`SUPPORTED_SCHEDULERS`; any other scheduler is refused at fit start).
            ``None`` (default): never. Under DDP every rank unfreezes the same tensors and the
            ``DistributedDataParallel`` wrapper is rebuilt (by the strategy, with its own arguments;
            ``find_unused_parameters`` stays off), so the ranks stay identical; crash-resume
            across the unfreeze works too. Refused under sharded strategies (FSDP, model parallel,
            DeepSpeed): train the unfrozen model as a new stage there.
        unfreeze_lr_scale: learning rate of the new param group, as a multiple of the first param
            group's (its current lr, and its scheduler's base/max/min lr). A finite number > 0.
            Default ``0.1``.
        schedule: an :class:`~lightning_freeze.UnfreezeSchedule`: phases that unfreeze parts of
            ``modules`` one after the other (by epoch or on a validation plateau), each as a new
            param group with its own learning rate, warm-up and norm handling; what is still frozen
            stays verified at every phase. Exclusive with ``unfreeze_at_epoch``. See
            ``docs/finetuning.md``.
        verify: ``"raise"`` (default): raise :class:`~lightning_freeze.FrozenStateError` naming every
            changed tensor by its full ``state_dict`` key and every module whose probe output changed;
            ``"warn"``: warn instead; ``"off"``: no fingerprints, no probes.
        dropout: ``"eval"`` (default): dropout layers inside frozen modules are pinned to eval, so
            the features a branch trains on are exactly the ones it gets at inference;
            ``"train"``: they keep dropping out during training.

    Attributes:
        verifier: the :class:`~lightning_freeze.core.verifier.FrozenVerifier` that holds the reference
            fingerprints and the probes and runs every check (pure PyTorch); :attr:`last_check`,
            :attr:`probes`, :attr:`last_probe_check`, :attr:`probes_skipped` and
            :attr:`last_rank_check` read its results.
        frozen: what :func:`~lightning_freeze.core.freeze` froze (``None`` before ``setup``; kept
            after the fit as a record, although the model has been given back).
        last_check: the latest verification of the tensors (a
            :class:`~lightning_freeze.core.fingerprint.FingerprintDiff`;
            ``last_check.summary()`` reads ``"checked 12 frozen tensors: 0 changed"``).
        probes: ``{module name: OutputProbe}`` recorded in the first training batch (modules that do
            not run in training, e.g. inactive branches, have none and are checked by fingerprint).
        last_probe_check: the probe mismatches of the latest verification (empty: all reproduced).
        probes_skipped: the modules whose probe the latest verification skipped (an epoch end at
            which no frozen tensor and no :func:`~lightning_freeze.core.probe.function_token`
            changed since the probe last passed).
        last_rank_check: ``{rank: [keys]}`` of the ranks whose frozen tensors differed from the
            others' at the latest verification (empty: all ranks agree, or a single process).
        phases: with ``schedule=...``, the :class:`~lightning_freeze.callbacks.unfreeze.PhaseRunner`
            carrying it out (``None`` otherwise): ``phases.timeline`` lists each phase begun (its
            epoch, modules, lr and the monitored metric), ``phases.summary()`` as text.

    Example::

        import lightning as L
        from lightning_freeze import FreezeBackbone

        trainer = L.Trainer(max_epochs=3, callbacks=[FreezeBackbone("backbone")])
        trainer.fit(model)  # model.backbone was bitwise frozen during the fit, or this raised
    """

    def __init__(
        self,
        modules: str | Sequence[str] = "backbone",
        norm: NormMode = "eval",
        freeze_inactive_branches: bool = True,
        unfreeze_at_epoch: int | None = None,
        unfreeze_lr_scale: float = 0.1,
        verify: VerifyMode = "raise",
        dropout: DropoutMode = "eval",
        schedule: UnfreezeSchedule | None = None,
    ) -> None:
        super().__init__()
        self.modules = check_str_list(
            "modules",
            modules,
            valid="a dotted submodule name or fnmatch pattern (e.g. 'backbone' or 'backbone.layer[12]'), "
            "or a non-empty list of them",
        )
        self.norm: NormMode = check_choice("norm", norm, NORM_MODES)  # type: ignore[assignment]
        self.dropout: DropoutMode = check_choice("dropout", dropout, DROPOUT_MODES)  # type: ignore[assignment]
        # the verification (fingerprints, probes, cross-rank checks) is core's, Lightning-free
        self.verifier = FrozenVerifier(verify, owner="FreezeBackbone", since="fit start", warn=rank_zero_warn)
        self.unfreeze_at_epoch = check_int(
            "unfreeze_at_epoch",
            unfreeze_at_epoch,
            minimum=0,
            allow_none=True,
            valid="None (never) or an epoch number >= 0",
        )
        self.unfreeze_lr_scale = check_positive_finite("unfreeze_lr_scale", unfreeze_lr_scale)
        self.freeze_inactive_branches = bool(freeze_inactive_branches)
        if schedule is not None and not isinstance(schedule, UnfreezeSchedule):
            raise ValueError(
                f"FreezeBackbone(schedule={schedule!r}): expected None or an UnfreezeSchedule "
                "(UnfreezeSchedule([...phases]) or UnfreezeSchedule.gradual('backbone'))."
            )
        if schedule is not None and self.unfreeze_at_epoch is not None:
            raise ValueError(
                f"FreezeBackbone(unfreeze_at_epoch={self.unfreeze_at_epoch}, schedule=...): give one of "
                "them; "
                "unfreeze_at_epoch=N is the one-phase schedule UnfreezeSchedule([UnfreezePhase(modules, "
                "epoch=N, lr_scale=unfreeze_lr_scale)])."
            )
        self.schedule = schedule
        self.phases: PhaseRunner | None = None

        self.frozen: FrozenModules | None = None
        self._unfrozen = False
        self._released: list[str] = []  # frozen names unfrozen since setup
        self._restored: dict[str, Any] | None = None
        self._scheduled: list[
            str
        ] = []  # frozen names that unfreeze_at_epoch unfreezes (not inactive branches)
        self._shown_as_training: list[nn.Module] = []
        self._holding = False  # between setup and the end of the fit: the model is ours to give back
        self._grad_watch: list[nn.Parameter] = []  # unfrozen under torch.compile: must get gradients
        self._dynamo_reset = False

    # ------------------------------------------------------------------------------------------
    # the verifier's results (read-only views of :attr:`verifier`)
    # ------------------------------------------------------------------------------------------
    @property
    def verify(self) -> VerifyMode:
        """``"raise"``, ``"warn"`` or ``"off"`` (the :attr:`verifier`'s mode; settable)."""
        return self.verifier.verify

    @verify.setter
    def verify(self, value: VerifyMode) -> None:
        self.verifier.verify = check_choice("verify", value, VERIFY_MODES)  # type: ignore[assignment]

    @property
    def last_check(self) -> FingerprintDiff | None:
        """The latest verification of the frozen tensors (see the class docstring)."""
        return self.verifier.last_check

    @property
    def probes(self) -> dict[str, OutputProbe]:
        """``{module name: OutputProbe}`` recorded in the first training batch."""
        return self.verifier.probes

    @property
    def last_probe_check(self) -> list[ProbeMismatch]:
        """The probe mismatches of the latest verification (empty: all reproduced)."""
        return self.verifier.last_probe_check

    @property
    def probes_skipped(self) -> list[str]:
        """The modules whose probe the latest verification skipped."""
        return self.verifier.probes_skipped

    @property
    def last_rank_check(self) -> dict[int, list[str]]:
        """``{rank: [keys]}`` of the ranks that differed at the latest verification."""
        return self.verifier.last_rank_check

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
        unfreezes = self.unfreeze_at_epoch is not None or self.schedule is not None
        if unfreezes and not can_unfreeze_under(trainer.strategy):
            what = f"unfreeze_at_epoch={self.unfreeze_at_epoch}" if self.schedule is None else "schedule=..."
            raise ValueError(
                f"FreezeBackbone({what}) cannot unfreeze under "
                f"{type(trainer.strategy).__name__}: a sharded or engine-managed strategy builds its "
                "parameter groups (flat parameters, shards) once, from what requires grad at setup. "
                "Supported: single device and DDPStrategy ('ddp', 'ddp_spawn', 'ddp_fork', "
                "'ddp_notebook'). Otherwise use unfreeze_at_epoch=None and train the unfrozen model as a "
                "new stage (a new Trainer.fit without FreezeBackbone on these modules)."
            )
        # a callback object reused for a second fit starts from scratch
        self.verifier.reset()
        names, inactive = self._names_to_freeze(pl_module)
        if self.schedule is not None:
            self.phases = PhaseRunner(self.schedule)
            names = self.phases.names_to_freeze(pl_module, names)
        self.frozen = freeze(pl_module, names + inactive, norm=self.norm, dropout=self.dropout)
        self._holding = True
        self._scheduled = [n for n in self.frozen.names if n not in inactive]
        self._unfrozen, self._released = False, []
        if not any(p.requires_grad for p in pl_module.parameters()):
            frozen_names = self.frozen.names
            # nothing requires grad now: parameters outside what we froze were frozen before we came
            already = sorted(
                {
                    n.rsplit(".", 1)[0]
                    for n, _ in pl_module.named_parameters()
                    if not any(n.startswith(f + ".") for f in frozen_names)
                }
            )
            before = (
                f" Already frozen before FreezeBackbone (requires_grad=False): {', '.join(already)}."
                if already
                else ""
            )
            raise ValueError(
                f"Nothing left to train: FreezeBackbone(modules={self.modules!r}) froze "
                f"{', '.join(frozen_names)}, and {type(pl_module).__name__} has no other trainable "
                f"parameter.{before} Top-level children: "
                f"{', '.join(n for n, _ in pl_module.named_children())}."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restored, self._restored = self._restored, None
        if self.unfreeze_at_epoch is not None or self.phases is not None:
            self._check_schedulers(trainer)
        if restored is not None and restored.get("unfrozen"):
            self._unfreeze(
                trainer, pl_module, when="on resume (the checkpoint was written after the unfreeze)"
            )
        if self.phases is not None:
            self.phases.attach(trainer)
            if restored is not None and restored.get("schedule"):
                for index in range(int(restored["schedule"]["begun"])):
                    self._begin_phase(trainer, pl_module, index, resumed=True)
                self.phases.load_state_dict(restored["schedule"])
        frozen = self._require_frozen()
        # the strategy may have replaced layers since setup (e.g. a SyncBatchNorm conversion)
        pin_frozen_layers(pl_module, self._still_frozen_names(), norm=frozen.norm, dropout=frozen.dropout)
        if self.verifier.enabled:
            # verify against the first run's fit start, not against what the checkpoint restored
            if restored is None or not self.verifier.load_state_dict(restored, self._still_frozen_names()):
                self.verifier.record(pl_module, frozen.tensor_keys)
        self._warn_if_optimizer_holds_frozen(trainer, pl_module)
        self._warn_about_weight_averaging(trainer)
        self._explain_eval_mode_modules(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's eval-mode notice has run (see _explain_eval_mode_modules): pin them back now
        for module in self._shown_as_training:
            module.training = False
        self._shown_as_training = []
        self._unfreeze_if_due(trainer, pl_module)
        frozen = self._require_frozen()
        # a frozen module whose norm layers or dropout keep training computes something new at every
        # call: its tensors are still fingerprinted, but there is no fixed output to check
        if frozen.norm != "train" and frozen.dropout != "train":
            self.verifier.capture(pl_module, self._still_frozen_names())

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        frozen = self._require_frozen()
        self._unfreeze_if_due(trainer, pl_module)
        # Re-pin at every epoch start (as the design card asks): catches layers replaced or put in
        # train mode since; the forward pre-hooks then hold it for the whole epoch.
        pin_frozen_layers(pl_module, self._still_frozen_names(), norm=frozen.norm, dropout=frozen.dropout)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Lightning skips on_train_epoch_start for the epoch a run resumes into when the checkpoint
        # was written at the last batch of the previous epoch: apply the schedule here too.
        self._unfreeze_if_due(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._grad_watch:
            self._check_compiled_gradients()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.verifier.capturing:
            self.verifier.record_probes(pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phases is not None:
            self.phases.record_validation(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phases is not None:
            self.phases.take_pending_best()
        # the probe (a forward) only where cheap evidence says the function may have changed
        self.check(pl_module, trainer, probe="if_changed")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        diff = self.check(pl_module, trainer)
        if diff is not None:
            probes = (
                f"; {len(self.probes)} module output(s) reproduced on the probe input" if self.probes else ""
            )
            rank_zero_info(f"FreezeBackbone: {diff.summary()}{probes}")
        if self.phases is not None and self.phases.timeline:
            rank_zero_info("FreezeBackbone: fine-tuning phases:\n" + self.phases.summary())

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning calls no teardown hook after an exception: give the model back here
        self._release(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": list(self.frozen.names) if self.frozen else [],
            "norm": self.norm,
            "unfreeze_at_epoch": self.unfreeze_at_epoch,
            "unfrozen": self._unfrozen,
            **self.verifier.state_dict(),  # "fingerprints", "probes"
            "schedule": self.phases.state_dict() if self.phases is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied in on_fit_start: the optimizer does not exist yet when Lightning restores callbacks
        self._restored = dict(state_dict)

    # ------------------------------------------------------------------------------------------
    # public helpers
    # ------------------------------------------------------------------------------------------
    def check(
        self,
        pl_module: torch.nn.Module,
        trainer: pl.Trainer | None = None,
        across_ranks: bool = True,
        probe: ProbeMode = "always",
    ) -> FingerprintDiff | None:
        """Compare every frozen tensor with its fingerprint from fit start, each probe output and each rank.

        In a ``torch.distributed`` job (DDP and the like) the fingerprints of this rank's frozen
        tensors are also compared with every other rank's
        (:func:`~lightning_freeze.core.distributed.compare_across_ranks`: one 16-byte
        ``all_gather`` per rank when they agree). That comparison is a collective: every rank must
        call :meth:`check` at the same point (the callback's hooks do); pass ``across_ranks=False``
        when calling it on one rank only.

        Args:
            pl_module: the LightningModule being trained.
            trainer: the trainer (to name an optimizer holding a frozen tensor as the likely cause).
            across_ranks: also compare with the other ranks (a collective). Default ``True``.
            probe: ``"always"`` (default): rerun every module on its probe input;
                ``"if_changed"``: skip a module's probe when no frozen tensor changed and its
                :func:`~lightning_freeze.core.probe.function_token` equals the one taken when its
                probe last passed (listed in :attr:`probes_skipped`).

        Returns:
            the :class:`~lightning_freeze.core.fingerprint.FingerprintDiff` of this rank (also kept as
            :attr:`last_check`; probe mismatches are kept as :attr:`last_probe_check`, ranks that
            differ as :attr:`last_rank_check`), or ``None`` when ``verify="off"`` or before fit start.

        Raises:
            FrozenStateError: with ``verify="raise"``, when any frozen tensor changed, a frozen module
                no longer reproduces its output on the probe input, or a rank holds other frozen
                tensors than the others (raised on every rank, naming the rank and the tensors).
        """
        optimizers = trainer.optimizers if trainer is not None else []
        return self.verifier.check(
            pl_module,
            self._still_frozen_names() if self.frozen is not None else (),
            norm=self.norm,
            optimizer_params=[p for opt in optimizers for group in opt.param_groups for p in group["params"]],
            across_ranks=across_ranks,
            probe=probe,
        )

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
        return [n for n in self._require_frozen().names if n not in self._released]

    def _release(self, pl_module: pl.LightningModule) -> None:
        """Give the model back as setup found it (idempotent): no hook, flags as before."""
        self.verifier.stop_capture()
        if self.phases is not None:
            self.phases.detach()
        for module in self._shown_as_training:
            module.training = False
        self._shown_as_training = []
        if self._holding and self.frozen is not None:
            self._holding = False
            unfreeze(pl_module, self.frozen, mode=None)

    def _unfreeze_if_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phases is not None:
            for index in self.phases.due(trainer):
                self._begin_phase(trainer, pl_module, index)
            return
        if (
            self.unfreeze_at_epoch is not None
            and not self._unfrozen
            and trainer.current_epoch >= self.unfreeze_at_epoch
        ):
            self._unfreeze(trainer, pl_module)

    def _begin_phase(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, resumed: bool = False
    ) -> None:
        """Phase ``index`` of the schedule begins: restore the best weights (``restore_best``), unfreeze."""
        runner = self.phases
        assert runner is not None
        phase = runner.phases[index]
        if not resumed and trainer.optimizers and runner.restore_best_into(pl_module, trainer.optimizers[0]):
            rank_zero_info(f"FreezeBackbone: phase {index}'s best weights restored before phase {index + 1}")
        first_lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else 1.0
        when = "on resume" if resumed else f"at epoch {trainer.current_epoch} (phase {index + 1})"
        lr = self._unfreeze(
            trainer,
            pl_module,
            when=when,
            names=list(phase.modules),
            scale=phase.scale_for(first_lr),
            lr=phase.lr,
            pin_norms=phase.norm == "eval",
        )
        if not resumed:
            # no parameter joined (a phase of parameter-less modules): no group, nothing to warm up
            group = len(trainer.optimizers[0].param_groups) - 1 if trainer.optimizers and lr else None
            count = sum(p.numel() for m in phase.modules for p in pl_module.get_submodule(m).parameters())
            runner.begin(index, trainer.current_epoch, trainer.global_step, group, lr, count)

    def _unfreeze(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        when: str = "",
        names: list[str] | None = None,
        scale: float | None = None,
        lr: float | None = None,
        pin_norms: bool = False,
    ) -> float:
        """Unfreeze ``names`` (default: what ``unfreeze_at_epoch`` unfreezes) into a new param group.

        ``pin_norms``: their running-statistics layers stay pinned in eval mode, and their running
        statistics stay verified. Returns the new group's lr (``0.0`` when no parameter joined).
        """
        frozen = self._require_frozen()
        legacy = names is None
        names = list(self._scheduled) if names is None else names
        scale = self.unfreeze_lr_scale if scale is None else scale
        params = unfreeze(pl_module, frozen.subset(names), mode=True)
        kept: set[str] = set()
        if pin_norms:
            for name in names:
                layers = find_running_stat_norms(pl_module.get_submodule(name), prefix=name)
                pin_eval(list(layers.values()))
                kept.update(
                    f"{n}.{b}" for n, layer in layers.items() for b in running_stat_buffer_names(layer)
                )
        self._unfrozen = self._unfrozen or legacy
        self._released.extend(names)
        prefixes = tuple(f"{n}." for n in names)
        self.frozen = dataclasses.replace(
            frozen,
            parameter_keys=[k for k in frozen.parameter_keys if not k.startswith(prefixes)],
            tensor_keys=[k for k in frozen.tensor_keys if not k.startswith(prefixes) or k in kept],
        )
        self.verifier.release(names, keep=kept)
        if not params:
            return 0.0
        if not trainer.optimizers:
            raise RuntimeError(
                "FreezeBackbone cannot unfreeze: the trainer has no optimizer to add parameters to."
            )
        rewrapped = rewrap_ddp(trainer)
        if _compat.is_compiled(pl_module):
            self._grad_watch, self._dynamo_reset = list(params), False
            rank_zero_info(
                "FreezeBackbone: the model is compiled (torch.compile): dynamo recompiles the graphs that "
                "depend on requires_grad at the next step; the unfrozen parameters are checked to get "
                "gradients at the first optimizer step (a stale compiled frame, PyTorch #139476, resets "
                "dynamo once)."
            )
        lr = add_to_optimizer(trainer, params, scale, lr=lr)
        when = when or f"at epoch {trainer.current_epoch}"
        rank_zero_info(
            f"FreezeBackbone: unfroze {', '.join(names)} {when}: "
            f"{len(params)} parameters in a new param group with lr={lr:g}"
            + (
                "; DistributedDataParallel rebuilt so it synchronises their gradients (parameters "
                "broadcast from rank 0)"
                if rewrapped
                else ""
            )
        )
        return lr

    def _check_compiled_gradients(self) -> None:
        """After an unfreeze under torch.compile: see :func:`.unfreeze.check_compiled_gradients`."""
        self._grad_watch, self._dynamo_reset = check_compiled_gradients(self._grad_watch, self._dynamo_reset)

    def _check_schedulers(self, trainer: pl.Trainer) -> None:
        what = f"unfreeze_at_epoch={self.unfreeze_at_epoch}" if self.phases is None else "schedule=..."
        check_schedulers(trainer, f"FreezeBackbone({what})")

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

    def _warn_about_weight_averaging(self, trainer: pl.Trainer) -> None:
        try:
            from lightning.pytorch.callbacks import WeightAveraging
        except ImportError:  # Lightning < 2.6
            return
        for callback in trainer.callbacks:
            if isinstance(callback, WeightAveraging):
                rank_zero_warn(
                    f"FreezeBackbone: {type(callback).__name__} averages every parameter, frozen ones "
                    "included, and copies its average into the model at train end: its average of a frozen "
                    "weight drifts by rounding, so it will overwrite frozen weights and the check at fit end "
                    "fails. Use "
                    "lightning_freeze.FrozenSafeEMA instead: it averages trainable tensors only and never "
                    "writes a frozen one."
                )

    def _explain_eval_mode_modules(self, pl_module: pl.LightningModule) -> None:
        eval_modules = [(name, m) for name, m in pl_module.named_modules() if not m.training]
        if not eval_modules:
            return
        frozen_names = self._still_frozen_names()
        ours = [
            (name, m)
            for name, m in eval_modules
            if any(name == f or name.startswith(f + ".") for f in frozen_names)
        ]
        if len(ours) == len(eval_modules):
            # Lightning warns about modules in eval mode when training starts (after on_fit_start
            # and the sanity check, before on_train_start). These are exactly the ones pinned on
            # purpose, so that notice would only puzzle the user. Rather than touching the global
            # warning filters, let them read as training until on_train_start puts them back in
            # eval: their pins force eval mode before any forward in between anyway.
            self._shown_as_training = [m for _, m in ours]
            for module in self._shown_as_training:
                module.training = True
            rank_zero_info(
                f"FreezeBackbone: {len(ours)} module(s) inside frozen modules run in eval mode on purpose "
                "(pinned; Lightning's 'modules in eval mode' notice is not shown for them)."
            )
        elif ours:
            others = [n for n, _ in eval_modules if (n, _) not in ours]
            rank_zero_info(
                f"FreezeBackbone: {len(ours)} of the {len(eval_modules)} modules in eval mode are pinned on "
                f"purpose; these others are not: {', '.join(others[:10])}"
            )
