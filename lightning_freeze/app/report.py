"""What a fit did, in facts (tensors compared before and after, each branch on its own data); the summary."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_freeze.app import AppInputError
from lightning_freeze.app.build import Stage, instantiate_node, metric
from lightning_freeze.callbacks.feature_cache import FeatureCache
from lightning_freeze.callbacks.freeze_backbone import FreezeBackbone
from lightning_freeze.core.fingerprint import TensorFingerprint, diff_fingerprints, fingerprint
from lightning_freeze.stages import StageSummary

__all__ = [
    "FitFacts",
    "branch_row",
    "check_optimized_metric",
    "fit_facts",
    "interrupted",
    "run_test",
    "summarise",
    "validate_branch",
    "write_summary",
]

log = logging.getLogger(__name__)


@dataclass
class FitFacts:
    """What the fit did to the model, found in the main process (see :func:`fit_facts`)."""

    changed: set[str]  # state_dict keys whose bits changed during the fit
    unfrozen_at_epoch: int | None  # FreezeBackbone's unfreeze_at_epoch, when it unfroze
    check: Any  # FingerprintDiff of FreezeBackbone's frozen tensors, or None
    check_by: str | None  # StageSummary.frozen_check_by

    def _changed(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.changed)

    def backbone_status(self) -> str:
        """``"frozen"``, ``"trained"`` or ``"unfrozen at epoch N"``."""
        if not self._changed("backbone."):
            return "frozen"
        if self.unfrozen_at_epoch is not None:
            return f"unfrozen at epoch {self.unfrozen_at_epoch}"
        return "trained"

    def branch_status(self, branch: str) -> tuple[str, str | None]:
        """``("frozen", None)``: branch and backbone bitwise unchanged; else ``("changed", why)``."""
        reasons = []
        if self._changed(f"branches.{branch}."):
            reasons.append("its weights changed")
        if self._changed("backbone."):
            reasons.append(f"backbone {self.backbone_status()}")
        return ("changed", "; ".join(reasons)) if reasons else ("frozen", None)

    def summary_fields(self) -> dict[str, Any]:
        """The :class:`~lightning_freeze.stages.StageSummary` fields of these facts."""
        return {
            "backbone": self.backbone_status(),
            "frozen_check": self.check.summary() if self.check is not None else None,
            "frozen_check_by": self.check_by,
            "frozen_changed": len(self.check.changed) if self.check is not None else None,
        }


def fitted(trainer: L.Trainer, model: Any, datamodule: Any, ckpt_path: str | None) -> tuple[dict, dict]:
    """``trainer.fit`` between two fingerprints of the model, taken in this (the main) process.

    Under ``ddp_spawn`` the callbacks run in the workers and only the weights come back, so the
    facts of the summary come from here, in every strategy.
    """
    before = fingerprint(model)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return before, fingerprint(model)


def fit_facts(
    model: Any,
    freezer: FreezeBackbone | None,
    before: Mapping[str, TensorFingerprint],
    after: Mapping[str, TensorFingerprint],
    checkpoint: str | None,
) -> FitFacts:
    """Compare the model before and after the fit, and find FreezeBackbone's record of it.

    The callback's record comes from the callback when it ran in this process, else (``ddp_spawn``:
    it ran in the workers) from its state in the checkpoint the workers wrote; the check is then
    redone here on the tensors it lists, against the weights the workers returned.
    """
    changed = set(diff_fingerprints(before, after).changed)
    if freezer is None:
        return FitFacts(changed, None, None, None)
    if freezer.frozen is not None:  # it ran in this process
        state, check, check_by = freezer.state_dict(), freezer.last_check, "FreezeBackbone"
    else:
        state, check, check_by = _callback_state(checkpoint, freezer.state_key), None, "main process"
        keys = [k for k in (state or {}).get("fingerprints") or {} if k in before and k in after]
        if keys:
            check = diff_fingerprints({k: before[k] for k in keys}, {k: after[k] for k in keys})
    if check is None:
        check_by = "verify off" if freezer.verify == "off" else "not in this process"
    unfrozen_at = freezer.unfreeze_at_epoch if (state or {}).get("unfrozen") else None
    return FitFacts(changed, unfrozen_at, check, check_by)


def _callback_state(checkpoint: str | None, state_key: str) -> dict[str, Any] | None:
    if not checkpoint:
        return None
    from lightning_freeze.core.checkpoint import CheckpointError, load_checkpoint

    try:
        state = (load_checkpoint(checkpoint).get("callbacks") or {}).get(state_key)
    except CheckpointError:
        return None
    return state if isinstance(state, dict) else None


def checkpoints(callbacks: list[Callback]) -> tuple[str | None, str | None]:
    """``(last, best)``: the checkpoint of the weights at the end of training, and the best by ``monitor``.

    ``last`` is ``last.ckpt`` (``save_last``), or the latest top-k file when nothing is monitored;
    ``best`` is ``None`` without a monitored metric.
    """
    callback = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    if callback is None:
        return None, None
    best = callback.best_model_path or None
    last = callback.last_model_path or None
    if last is None and callback.save_last and callback.dirpath:
        # ddp_spawn: only best_model_path comes back from the workers; last.ckpt is on disk
        on_disk = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        last = str(on_disk) if on_disk.is_file() else None
    if last is None and callback.monitor is None:
        last = best
    return last, (best if callback.monitor is not None else None)


def weights_validated(callbacks: list[Callback]) -> str:
    """``"ema"`` when a FrozenSafeEMA validates with its averaged weights, else ``"raw"``."""
    from lightning_freeze.callbacks.frozen_safe_ema import FrozenSafeEMA

    ema = next((c for c in callbacks if isinstance(c, FrozenSafeEMA)), None)
    return "ema" if ema is not None and getattr(ema, "validate_with_ema", False) else "raw"


def run_test(
    trainer: L.Trainer, model: Any, datamodule: Any, callbacks: list[Callback]
) -> tuple[dict, str, str]:
    """The test split of the trained branch on the best checkpoint (``monitor`` set) or the last one.

    Returns:
        ``(metrics, "best" | "last", checkpoint path)``.

    Raises:
        AppInputError: no checkpoint to test (no ModelCheckpoint, or ``fast_dev_run``), or no test split.
    """
    last, best = checkpoints(callbacks)
    which, path = ("best", best) if best else ("last", last)
    if not path:
        raise AppInputError(
            "test=true needs a checkpoint to test: keep callbacks.model_checkpoint (callbacks=[default,...])"
        )
    results = trainer.test(model, datamodule=datamodule, ckpt_path=path, verbose=False)
    return (results[0] if results else {}), which, str(Path(path).absolute())


def summarise(
    built: Stage,
    fingerprints: tuple[Mapping[str, TensorFingerprint], Mapping[str, TensorFingerprint]],
    tested: tuple[Mapping[str, Any], str, str] | None,
) -> StageSummary:
    """The facts of the fit, and every branch scored on its own data (the record holds each branch's data).

    Args:
        built: the stage, fitted.
        fingerprints: the model's fingerprints before and after the fit (:func:`fitted`).
        tested: what :func:`run_test` returned, ``None`` without ``test=true``.
    """
    name, trainer, model, callbacks = built.name, built.trainer, built.model, built.callbacks
    freezer = built.freezer
    last, _ = checkpoints(callbacks)
    facts = fit_facts(model, freezer, *fingerprints, last)
    cache = next((c for c in callbacks if isinstance(c, FeatureCache)), None)
    cache_stats = {k: v for k, v in cache.stats.items() if k != "modules"} if cache is not None else None
    rows = []
    for branch in model.branch_names:
        entry = built.record.record["branches"].get(branch) or {}
        metrics = validate_branch(trainer, model, branch, entry, built.datamodule if branch == name else None)
        status, note = ("trained", None) if branch == name else facts.branch_status(branch)
        row = branch_row(branch, entry.get("task"), status, note, metrics)
        if branch == name and tested:
            row["test_acc"] = metric(tested[0], f"{name}/test_acc")
            row["test_loss"] = metric(tested[0], f"{name}/test_loss")
        rows.append(row)
    model.switch_branch(name)
    output_dir = built.cfg.paths.output_dir if built.cfg.get("paths") else None
    return StageSummary(
        stage=built.stage,
        trained_branch=name,
        branches=rows,
        **facts.summary_fields(),
        checkpoint=str(Path(last).absolute()) if last else None,
        weights=weights_validated(callbacks),
        tested=tested[1] if tested else None,
        tested_checkpoint=tested[2] if tested else None,
        resumed_from=str(Path(built.ckpt_path).absolute()) if built.ckpt_path else None,
        output_dir=str(Path(output_dir).resolve()) if output_dir else None,
        feature_cache=cache_stats,
        phases=freezer.phases.timeline if freezer is not None and freezer.phases is not None else None,
    )


def validate_branch(
    trainer: L.Trainer, model: Any, branch: str, entry: Mapping[str, Any], datamodule: Any = None
) -> Mapping[str, Any]:
    """``branch`` validated on ``datamodule``, or on the data of its record ``entry`` (``{}`` without any).

    Leaves ``branch`` active in ``model``.
    """
    if datamodule is None and entry.get("data"):
        # other branches' data configs come from the init_from checkpoint: checked like the model's
        datamodule = instantiate_node(entry["data"], f"data of {branch}", check=True)
    if datamodule is None:
        return {}
    model.switch_branch(branch)
    results = trainer.validate(model, datamodule=datamodule, verbose=False)
    return results[0] if results else {}


def branch_row(
    branch: str, task: str | None, status: str, note: str | None, metrics: Mapping[str, Any]
) -> dict[str, Any]:
    """One row of :attr:`~lightning_freeze.stages.StageSummary.branches` (its ``val_*`` from ``metrics``)."""
    return {
        "name": branch,
        "task": task,
        "status": status,
        "note": note,
        "val_acc": metric(metrics, f"{branch}/val_acc"),
        "val_loss": metric(metrics, f"{branch}/val_loss"),
    }


def interrupted(trainer: L.Trainer, callbacks: list[Callback]) -> None:
    """Say, as a warning (shown with ``quiet=true`` too), that the fit was interrupted and how to resume."""
    last, _ = checkpoints(callbacks)
    if last and Path(last).is_file():
        hint = f"resume it: the same command + ckpt_path={Path(last).absolute()}"
    else:
        hint = "no checkpoint was written yet: run the command again to start over"
    log.warning("interrupted (Ctrl-C) in epoch %d; %s", trainer.current_epoch + 1, hint)


def write_summary(summary: StageSummary) -> None:
    """``summary.json`` in the output directory; the summary on stdout and in the run's log files."""
    if summary.output_dir:
        Path(summary.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(summary.output_dir) / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    text = summary.format()
    print(text, flush=True)
    from lightning_freeze.app.runtime import log_to_files

    log_to_files(log, text)


def check_optimized_metric(key: str | None, branches: list[str], trained: str, *, test: bool) -> None:
    """Refuse an ``optimized_metric`` that no run of this stage can report, before anything trains.

    Raises:
        AppInputError: the key is not ``<branch>/<metric>`` of this model (the message lists them).
    """
    if key is None:
        return
    metrics = ("val_acc", "val_loss")
    valid = [f"{b}/{m}" for b in branches for m in metrics]
    if test:
        valid += [f"{trained}/test_acc", f"{trained}/test_loss"]
    if key not in valid:
        raise AppInputError(f"Invalid optimized_metric={key!r}; valid choices: {', '.join(sorted(valid))}")


def optimized_value(summary: StageSummary, key: str | None) -> float | None:
    """The value of ``optimized_metric`` (``"<branch>/val_acc"``, ``"<branch>/test_loss"``, ...) for sweepers.

    Raises:
        AppInputError: a key that is not among the summary's metrics (the message lists them).
    """
    if key is None:
        return None
    values = {
        f"{row['name']}/{m}": row[m]
        for row in summary.branches
        for m in ("val_acc", "val_loss", "test_acc", "test_loss")
        if row.get(m) is not None
    }
    if key not in values:
        raise AppInputError(
            f"Invalid optimized_metric={key!r}; valid choices: "
            f"{', '.join(sorted(values)) or 'none (no metrics)'}"
        )
    return values[key]
