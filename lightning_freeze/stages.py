"""The stage record: what a checkpoint of the training app says about the stage that wrote it.

Every checkpoint the app writes holds, under :data:`RECORD_KEY`, how to rebuild and continue the
stage: the model config (backbone, optimizer, scheduler), the data config of the stage, and per
branch its task, class count, data config and stage number. The next stage (``init_from``) starts
from this record, :func:`load_model` rebuilds a model for inference, and ``scripts/main_job.py``
scores every branch on its own data.

This module imports Lightning; the app imports it only once a run starts (``--help`` stays fast).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_freeze import instantiate
from lightning_freeze.app import AppInputError

__all__ = [
    "RECORD_KEY",
    "PreviousStage",
    "StageRecord",
    "StageSummary",
    "load_model",
    "read_checkpoint",
    "read_previous_stage",
]

#: top-level checkpoint key under which the app records how to rebuild backbone and branches
RECORD_KEY = "lightning_freeze_train"
#: 1: branches only; 2: + the stage's model and data configs
RECORD_VERSION = 2


@dataclass
class StageSummary:
    """What one run of the app produced (also written to ``summary.json``).

    Attributes:
        stage: the stage number from the config.
        trained_branch: the branch this run trained.
        branches: one row per branch: ``name``, ``task``, ``status``, ``note`` and its validation
            metrics (``val_acc``, ``val_loss``) on its own data; the trained branch also has
            ``test_acc``/``test_loss`` with ``test=true``. ``status`` is a fact about the fit,
            found by comparing every tensor before and after it (in the main process, whatever the
            strategy): ``"trained"`` (the branch this run trained), ``"frozen"`` (its tensors and
            the backbone's are bitwise unchanged, so its predictions are too) or ``"changed"``
            (``note`` says what changed, e.g. ``"backbone unfrozen at epoch 1"``).
        backbone: ``"frozen"`` (bitwise unchanged), ``"trained"`` or ``"unfrozen at epoch N"``.
        frozen_check: ``FreezeBackbone``'s last check, e.g. ``"checked 42 frozen tensors: 0 changed"``
            (``None`` without FreezeBackbone, or under ``ddp_spawn`` without a checkpoint to read
            which tensors it froze).
        frozen_check_by: who ran that check: ``"FreezeBackbone"`` (in this process) or
            ``"main process"`` (``ddp_spawn``: the callback ran in the worker processes; the main
            process compared the tensors the callback froze, as recorded in the checkpoint, before
            and after the fit); ``None`` when not checked.
            ``"not in this process"``: the callback ran, in processes whose results did not come
            back (``ddp_spawn`` without a checkpoint); ``"verify off"``: ``verify="off"``.
        frozen_changed: number of frozen tensors that changed (``None`` when not checked).
        checkpoint: the checkpoint holding the weights at the end of training (``last.ckpt``), the
            next stage's ``init_from`` (``None`` without one).
        weights: which weights the validation metrics are of: ``"raw"``, or ``"ema"`` (a
            ``FrozenSafeEMA`` with ``validate_with_ema``; the next stage starts from them with
            ``init_weights=ema``).
        tested: with ``test=true``: ``"best"`` or ``"last"``, the checkpoint the test split ran on.
        tested_checkpoint: its path.
        resumed_from: the checkpoint this run resumed from (``ckpt_path``, or the run's own
            ``last.ckpt`` after a SLURM requeue); ``None`` for a fresh run.
        output_dir: the run's output directory.
        feature_cache: with ``FeatureCache``, its statistics after the fit (and the validations the
            summary ran): ``hits``, ``misses``, ``hit_rate``, ``bytes``, ``store``,
            ``time_saved_s``, ...; ``None`` without it.
        phases: with ``FreezeBackbone(schedule=...)``: one entry per phase begun (``phase``,
            ``epoch``, ``modules``, ``lr``, and ``val``: the monitored metric per epoch);
            ``None`` without a schedule.
    """

    stage: int
    trained_branch: str
    branches: list[dict[str, Any]] = field(default_factory=list)
    backbone: str | None = None
    frozen_check: str | None = None
    frozen_check_by: str | None = None
    frozen_changed: int | None = None
    checkpoint: str | None = None
    weights: str = "raw"
    tested: str | None = None
    tested_checkpoint: str | None = None
    resumed_from: str | None = None
    output_dir: str | None = None
    feature_cache: dict[str, Any] | None = None
    phases: list[dict[str, Any]] | None = None

    def format(self) -> str:
        """The summary as printed at the end of a run."""
        title = f"lightning-freeze-train: stage {self.stage} summary (trained branch: {self.trained_branch})"
        lines = [f"== {title} =="]
        tested = any(row.get("test_acc") is not None for row in self.branches)
        header = f"{'branch':<12} {'task':<8} {'status':<8} {'val_acc':>8} {'val_loss':>9}"
        lines.append(header + (f" {'test_acc':>8}" if tested else ""))
        for row in self.branches:
            note = f"  ({row['note']})" if row.get("note") else ""
            cells = [_cell(row.get("val_acc"), 8), _cell(row.get("val_loss"), 9)]
            if tested:
                cells.append(_cell(row.get("test_acc"), 8))
            lines.append(
                f"{row['name']:<12} {row.get('task') or '-':<8} {row['status']:<8} {' '.join(cells)}{note}"
            )
        if self.weights == "ema":
            lines.append("metrics: on the EMA weights (next stage: init_weights=ema starts from them)")
        if self.backbone is not None:
            lines.append(f"backbone: {self.backbone}")
        if self.frozen_check is None:
            check = _UNCHECKED.get(self.frozen_check_by, "not checked (no FreezeBackbone callback)")
        elif self.frozen_check_by not in (None, "FreezeBackbone"):
            check = f"{self.frozen_check} (checked by the {self.frozen_check_by})"
        else:
            check = self.frozen_check
        lines.append(f"frozen tensors: {check}")
        cache = self.feature_cache
        if cache and cache.get("hits", 0) + cache.get("misses", 0):
            lines.append(
                f"feature cache: {cache.get('hit_rate', 0.0):.1%} hits ({cache['hits']} hits, "
                f"{cache['misses']} misses), {cache.get('bytes', 0) / 1024:.1f} KiB in the "
                f"{cache.get('store', '?')} store, "
                f"~{cache.get('time_saved_s', 0.0):.1f} s saved"
            )
        if self.phases:
            from lightning_freeze.core.unfreeze_schedule import format_timeline

            lines.append("fine-tuning phases:\n" + format_timeline(self.phases))
        if self.resumed_from:
            lines.append(f"resumed from: {self.resumed_from}")
        if self.tested:
            lines.append(f"tested: the {self.tested} checkpoint {self.tested_checkpoint}")
        lines.append(f"checkpoint: {self.checkpoint or '-'}")
        return "\n".join(lines)


#: StageSummary.frozen_check_by -> the summary line of a run whose frozen tensors were not checked
_UNCHECKED = {
    "not in this process": "not checked in this process (FreezeBackbone ran in the worker processes; keep "
    "the model_checkpoint callback so that the main process can check what it froze)",
    "verify off": "not checked (FreezeBackbone(verify='off'))",
}


def _cell(value: float | None, width: int) -> str:
    return f"{'-' if value is None else f'{value:.4f}':>{width}}"


@dataclass
class PreviousStage:
    """What the app needs from an ``init_from`` checkpoint.

    Attributes:
        backbone: the backbone's config (``MultiBranchModule`` hyper-parameter).
        branches: ``{name: head config}`` (``MultiBranchModule`` hyper-parameter).
        record: ``{name: {"task", "num_classes", "data", "stage"}}`` for branches trained by the
            app (empty for checkpoints without the app's record, e.g. merged ones).
        model: the model config of the stage that wrote the checkpoint (its optimizer, scheduler,
            ...; without ``backbone``, ``branches``, ``active_branch``); ``{}`` when not recorded.
        data: the data config of that stage; ``{}`` when not recorded.
        stage: that stage's number (``None`` when not recorded).
    """

    backbone: dict[str, Any]
    branches: dict[str, dict[str, Any]]
    record: dict[str, dict[str, Any]]
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    stage: int | None = None


def read_previous_stage(path: str | Path) -> PreviousStage:
    """Read backbone and branch configs (and the app's record) from a stage checkpoint.

    Args:
        path: a checkpoint written by the app, or merged from such checkpoints.

    Returns:
        the :class:`PreviousStage`.

    Raises:
        AppInputError: the file is missing or unreadable, or does not describe its backbone and
            branches as configs.
    """
    hint = "give the checkpoint of the previous stage, e.g. outputs/stage1/runs/<time>/checkpoints/last.ckpt"
    checkpoint = read_checkpoint(path, "init_from", hint)
    hparams = checkpoint.get("hyper_parameters") or {}
    backbone, branches = hparams.get("backbone"), hparams.get("branches")
    if not (isinstance(backbone, Mapping) and isinstance(branches, Mapping) and branches):
        raise AppInputError(
            f"init_from={str(path)!r} does not describe its backbone and branches as configs "
            "(hyper-parameters 'backbone' and 'branches' of a MultiBranchModule built from configs), so they "
            "cannot be rebuilt; "
            "use a checkpoint written by lightning-freeze-train or merged from such checkpoints"
        )
    record = checkpoint.get(RECORD_KEY) or {}
    branch_record = {k: dict(v) for k, v in (record.get("branches") or {}).items()}
    data = record.get("data")
    if not isinstance(data, Mapping):  # version 1: the data of the branch trained last
        latest = max(branch_record.values(), key=lambda r: r.get("stage") or 0, default={})
        data = latest.get("data") or {}
    return PreviousStage(
        backbone=dict(backbone),
        branches={k: dict(v) for k, v in branches.items()},
        record=branch_record,
        model=dict(record.get("model") or {}),
        data=dict(data),
        stage=record.get("stage"),
    )


def read_checkpoint(path: str | Path, key: str, hint: str, *, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint the config key ``key`` names, read safely (no pickled code).

    Raises:
        AppInputError: the file is missing, unreadable or not a checkpoint: ``"<key>='<path>': <why>
            (<hint>)"``.
    """
    from lightning_freeze.core.checkpoint import CheckpointError, load_checkpoint

    file = Path(path).expanduser()
    try:
        return load_checkpoint(file, mmap=mmap)
    except CheckpointError as err:
        reason = str(err).removeprefix(f"{str(file)!r}: ")
        raise AppInputError(f"{key}={str(path)!r}: {reason} ({hint})") from err


def load_model(path: str | Path, *, allow_targets: Sequence[str] = ()) -> Any:
    """Load a checkpoint of the app (or a ``lightning-freeze merge`` of such) for inference.

    Same as ``MultiBranchModule.load_from_checkpoint(path, map_location="cpu")``: the module is
    rebuilt from the configs in its hyper-parameters and every tensor is loaded exactly. Returned in
    eval mode. The configs may only name ``_target_`` values under the allowed module prefixes (see
    :mod:`lightning_freeze.instantiate`): a checkpoint is data and may not make this call run other code.

    Args:
        path: the checkpoint.
        allow_targets: more module prefixes the checkpoint's configs may instantiate (e.g.
            ``["mypkg"]`` for a backbone of your own package); only for checkpoints you trust.

    Returns:
        the :class:`~lightning_freeze.MultiBranchModule`, in eval mode, on the CPU.

    Raises:
        lightning_freeze.instantiate.TargetNotAllowedError: a ``_target_`` outside the allow-list
            (nothing was instantiated); the message names it and how to allow it.

    Example::

        model = load_model("outputs/stage2/runs/<time>/checkpoints/last.ckpt")
        logits = model.forward_all(images)  # {"digit": ..., "parity": ...}
    """
    from lightning_freeze.module import MultiBranchModule

    with instantiate.allow_targets(allow_targets):
        return MultiBranchModule.load_from_checkpoint(Path(path).expanduser(), map_location="cpu").eval()


class StageRecord(Callback):
    """Writes the stage record into every checkpoint, and makes a resume exact.

    The record (:data:`RECORD_KEY`) is written at the top level of the checkpoint. The callback's
    own state is the global random number generators' state (Python, NumPy, torch): Lightning does
    not restore it on resume, so a resumed run would shuffle its next epoch differently from the
    run it continues; with this state it shuffles identically.

    With ``settings``, the first checkpoint saved into a folder also gets
    :data:`~lightning_freeze.app.settings.SETTINGS_FILE` (``stage_settings.yaml``) written next to
    it (by rank 0): the settings a later stage started from that folder inherits.

    Args:
        record: ``{"version", "stage", "model", "data", "branches"}``.
        settings: :func:`lightning_freeze.app.settings.stage_settings` of the stage (``None``: no file).
    """

    def __init__(self, record: dict[str, Any], settings: dict[str, Any] | None = None) -> None:
        self.record = record
        self.settings = settings
        self._settings_written: set[str] = set()  # folders that have the settings file

    @override
    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RECORD_KEY] = self.record
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        if (
            self.settings is not None
            and folder
            and trainer.is_global_zero
            and folder not in self._settings_written
        ):
            from lightning_freeze.app.settings import write_stage_settings

            write_stage_settings(folder, self.settings)
            self._settings_written.add(folder)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("rng"):
            set_rng_state(state_dict["rng"])


def rng_state() -> dict[str, Any]:
    """The global random generators' state (Python, NumPy, torch CPU and CUDA), as tensors and plain values.

    Plain types only, so that a checkpoint holding it still loads with ``torch.load(weights_only=True)``.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state["numpy"] = (
        str(kind),
        torch.from_numpy(keys.astype(np.int64)),
        int(position),
        int(has_gauss),
        float(cached),
    )
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("numpy") is not None:
        kind, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
