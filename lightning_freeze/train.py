"""The Hydra training app: ``lightning-freeze-train [overrides]`` or ``python -m lightning_freeze.train``.

One run trains one stage of staged training:

* stage 1 (``experiment=stage1``): backbone + the first branch train together;
* stage N > 1 (``experiment=stage2 init_from=<checkpoint of stage N-1>``): the backbone and every
  branch of ``init_from`` are rebuilt from the record the app wrote into that checkpoint and loaded
  exactly, the new branch (``branch=...``) is added and trained, and
  :class:`~lightning_freeze.FreezeBackbone` keeps everything else bitwise frozen and checks it.

The run ends with a summary: per-branch validation metrics (each branch on its own data), the
frozen-tensor check (``"checked N frozen tensors: 0 changed"``) and the checkpoint path; the same
is written to ``summary.json`` in the run's output directory.

Configs ship inside the package (``lightning_freeze/conf``, the repository's ``conf/``); add your
own with ``--config-dir DIR`` (a ``DIR/branch/mine.yaml`` is then ``branch=mine``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from typing_extensions import override

from lightning_freeze.callbacks.freeze_backbone import FreezeBackbone
from lightning_freeze.core.fingerprint import TensorFingerprint, diff_fingerprints, fingerprint
from lightning_freeze.core.keys import free_branch_name
from lightning_freeze.instantiate import ConfigInstantiationError, allow_targets, instantiate
from lightning_freeze.module import check_branch_name

__all__ = [
    "RECORD_KEY",
    "AppInputError",
    "PreviousStage",
    "StageSummary",
    "load_model",
    "main",
    "read_previous_stage",
    "train",
]

#: top-level checkpoint key under which the app records how to rebuild backbone and branches
RECORD_KEY = "lightning_freeze_train"
_RECORD_VERSION = 1
log = logging.getLogger(__name__)


class AppInputError(ValueError):
    """Bad input to the app (config value, missing file, name collision): reported as one line."""


@dataclass
class StageSummary:
    """What one run of the app produced (also written to ``summary.json``).

    Attributes:
        stage: the stage number from the config.
        trained_branch: the branch this run trained.
        branches: one row per branch: ``name``, ``task``, ``status``, ``note`` and its validation
            metrics (``val_acc``, ``val_loss``) on its own data. ``status`` is a fact about the fit,
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
        frozen_changed: number of frozen tensors that changed (``None`` when not checked).
        checkpoint: path of the checkpoint written at the end of training (``None`` without one).
        output_dir: the run's output directory.
    """

    stage: int
    trained_branch: str
    branches: list[dict[str, Any]] = field(default_factory=list)
    backbone: str | None = None
    frozen_check: str | None = None
    frozen_check_by: str | None = None
    frozen_changed: int | None = None
    checkpoint: str | None = None
    output_dir: str | None = None

    def format(self) -> str:
        """The summary as printed at the end of a run."""
        title = f"lightning-freeze-train: stage {self.stage} summary (trained branch: {self.trained_branch})"
        lines = [f"== {title} =="]
        header = f"{'branch':<12} {'task':<8} {'status':<8} {'val_acc':>8} {'val_loss':>9}"
        lines.append(header)
        for row in self.branches:
            acc = row.get("val_acc")
            loss = row.get("val_loss")
            note = f"  ({row['note']})" if row.get("note") else ""
            lines.append(
                f"{row['name']:<12} {row.get('task') or '-':<8} {row['status']:<8} "
                f"{'-' if acc is None else f'{acc:.4f}':>8} {'-' if loss is None else f'{loss:.4f}':>9}{note}"
            )
        if self.backbone is not None:
            lines.append(f"backbone: {self.backbone}")
        if self.frozen_check is None:
            check = "not checked (no FreezeBackbone callback)"
        elif self.frozen_check_by not in (None, "FreezeBackbone"):
            check = f"{self.frozen_check} (checked by the {self.frozen_check_by})"
        else:
            check = self.frozen_check
        lines.append(f"frozen tensors: {check}")
        lines.append(f"checkpoint: {self.checkpoint or '-'}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# what a checkpoint says about its model
# ----------------------------------------------------------------------------------------------
@dataclass
class PreviousStage:
    """What the app needs from an ``init_from`` checkpoint.

    Attributes:
        backbone: the backbone's config (``MultiBranchModule`` hyper-parameter).
        branches: ``{name: head config}`` (``MultiBranchModule`` hyper-parameter).
        record: ``{name: {"task", "num_classes", "data", "stage"}}`` for branches trained by the
            app (empty for checkpoints without the app's record, e.g. merged ones).
    """

    backbone: dict[str, Any]
    branches: dict[str, dict[str, Any]]
    record: dict[str, dict[str, Any]]


def read_previous_stage(path: str | Path) -> PreviousStage:
    """Read backbone and branch configs (and the app's record) from a stage checkpoint.

    Raises:
        AppInputError: the file is missing or unreadable, or does not describe its backbone and
            branches as configs.
    """
    from lightning_freeze.core.checkpoint import CheckpointError, load_checkpoint

    try:
        checkpoint = load_checkpoint(Path(path).expanduser())
    except CheckpointError as err:
        reason = str(err).removeprefix(f"{str(Path(path).expanduser())!r}: ")
        raise AppInputError(
            f"init_from={str(path)!r}: {reason} (give the checkpoint of the previous stage, "
            "e.g. outputs/stage1/runs/<time>/checkpoints/last.ckpt)"
        ) from err
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
    return PreviousStage(
        backbone=dict(backbone),
        branches={k: dict(v) for k, v in branches.items()},
        record=dict(record.get("branches") or {}),
    )


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

    Raises:
        lightning_freeze.instantiate.TargetNotAllowedError: a ``_target_`` outside the allow-list
            (nothing was instantiated); the message names it and how to allow it.

    Example::

        model = load_model("outputs/stage2/runs/<time>/checkpoints/last.ckpt")
        logits = model.forward_all(images)  # {"digit": ..., "parity": ...}
    """
    from lightning_freeze.module import MultiBranchModule

    with _allow(allow_targets):
        return MultiBranchModule.load_from_checkpoint(Path(path).expanduser(), map_location="cpu").eval()


_allow = allow_targets  # load_model's argument shadows the context manager's name


def _instantiate(node: Any, key: str, *, check: bool = False, **kwargs: Any) -> Any:
    """:func:`lightning_freeze.instantiate.instantiate`, its errors as one-line :class:`AppInputError`.

    ``check=True`` for configs that become part of the model (they may come from ``init_from``);
    the app's own trainer/callbacks/logger/data nodes are the user's config and are not checked.
    """
    try:
        return instantiate(node, key, check=check, **kwargs)
    except ConfigInstantiationError as err:
        raise AppInputError(str(err)) from err


def _without_weights(backbone_cfg: Mapping[str, Any]) -> dict[str, Any]:
    cfg = dict(backbone_cfg)
    if cfg.get("weights") is not None:
        cfg["weights"] = None  # checkpoints hold the weights: a rebuild downloads and reads nothing
    return cfg


class _AppRecord(Callback):
    """Writes the app's per-branch record (task, data config, stage) into every checkpoint."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    @override
    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RECORD_KEY] = self.record


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------
def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _check_stage(cfg: DictConfig) -> tuple[int, str | None]:
    stage = cfg.get("stage", 1)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 1:
        raise AppInputError(f"Invalid stage={stage!r}; valid choices: an integer >= 1")
    init_from = cfg.get("init_from")
    if stage > 1 and init_from in (None, ""):
        raise AppInputError(
            f"Missing mandatory value: init_from (stage={stage} starts from the checkpoint of the previous "
            "stage: init_from=outputs/stage1/runs/<time>/checkpoints/last.ckpt)"
        )
    return stage, (str(init_from) if init_from not in (None, "") else None)


def _check_multirun_ddp(trainer: L.Trainer) -> None:
    """Lightning's DDP launcher re-runs ``sys.argv``: inside a local multirun that is the whole sweep."""
    try:
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
    except ImportError:  # pragma: no cover - other Lightning versions
        return
    launcher = getattr(trainer.strategy, "launcher", None)
    if (
        isinstance(launcher, _SubprocessScriptLauncher)
        and HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
    ):
        raise AppInputError(
            "trainer.strategy=ddp (subprocess launcher) cannot run inside a local multirun (-m): Lightning "
            "re-runs the command line in each child process, i.e. the whole sweep. Run the jobs one by one, "
            "or use launcher=submitit_slurm (SLURM starts the processes), or trainer.strategy=ddp_spawn"
        )


def train(cfg: DictConfig) -> StageSummary:
    """Run one stage from a composed config (what ``lightning-freeze-train`` does).

    Args:
        cfg: the composed config (``conf/train.yaml`` and its groups).

    Returns:
        the :class:`StageSummary` (printed and written to ``summary.json`` by rank 0).

    Raises:
        AppInputError: bad input (missing ``init_from``, branch name collision, missing data folder,
            a config value a factory refuses), before anything trains.
    """
    stage, init_from = _check_stage(cfg)
    quiet = bool(cfg.get("quiet", False))
    if quiet:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning_freeze"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    previous = read_previous_stage(init_from) if init_from else None
    branch_cfg = cfg.branch
    name = branch_cfg.get("name")
    try:
        check_branch_name(name)
    except ValueError as err:
        raise AppInputError(f"branch.name: {err}") from err
    if previous is not None and name in previous.branches:
        shipped = sorted(p.stem for p in (Path(__file__).parent / "conf" / "branch").glob("*.yaml"))
        free = [option for option in shipped if option not in previous.branches]
        example = f" (shipped options not taken: {', '.join(free)})" if free else ""
        raise AppInputError(
            f"branch.name={name!r} collides with a branch of init_from={init_from!r} "
            f"(its branches: {', '.join(previous.branches)}); choose a new branch{example} or "
            f"rename this one: branch.name={free_branch_name(name, previous.branches)}"
        )

    datamodule = _instantiate(cfg.data, "data")
    data_classes = getattr(datamodule, "num_classes", None)
    if OmegaConf.is_missing(branch_cfg, "num_classes"):
        if data_classes is None:
            raise AppInputError("Missing mandatory value: branch.num_classes")
        branch_cfg.num_classes = data_classes
    num_classes = branch_cfg.num_classes
    if data_classes is not None and data_classes != num_classes:
        raise AppInputError(
            f"branch.num_classes={num_classes} but the data ({type(datamodule).__name__}) has "
            f"{data_classes} classes; valid choice: branch.num_classes={data_classes}"
        )

    # The module is built from configs (stored in its hyper-parameters, so merged checkpoints and
    # MultiBranchModule.load_from_checkpoint can rebuild it); pretrained weights are copied in after.
    if previous is not None:
        backbone_cfg = _without_weights(previous.backbone)
        config_target = cfg.model.backbone.get("_target_")
        if config_target != backbone_cfg.get("_target_"):
            log.warning(
                "model.backbone (%s) is ignored: the backbone of init_from (%s) is used",
                config_target,
                backbone_cfg.get("_target_"),
            )
        pretrained = None
    else:
        backbone_cfg = _container(cfg.model.backbone)
        pretrained = _instantiate(backbone_cfg, "model.backbone", check=True)
    probe = pretrained if pretrained is not None else _instantiate(backbone_cfg, "model.backbone", check=True)

    head_cfg = _container(branch_cfg.head)
    if head_cfg.get("in_features") is None:
        in_features = getattr(probe, "out_features", None)
        if isinstance(in_features, bool) or not isinstance(in_features, int):
            raise AppInputError(
                f"model.backbone ({backbone_cfg.get('_target_')}) has no integer `out_features` attribute; "
                "set branch.head.in_features to the size of its feature vector"
            )
        head_cfg["in_features"] = in_features
    _instantiate(head_cfg, "branch.head", check=True)  # refuse a bad head config here, in one line
    branches = {**(previous.branches if previous is not None else {}), name: head_cfg}
    record_branches = dict(previous.record) if previous is not None else {}
    record_branches[name] = {
        "task": branch_cfg.get("task"),
        "num_classes": num_classes,
        "data": _container(cfg.data),
        "stage": stage,
    }

    model_cfg = OmegaConf.create({k: v for k, v in cfg.model.items() if k != "backbone"})
    model = _instantiate(
        model_cfg,
        "model",
        backbone=_without_weights(backbone_cfg),
        branches=branches,
        active_branch=name,
        _recursive_=False,
    )
    if pretrained is not None and backbone_cfg.get("weights") is not None:
        model.backbone.load_state_dict(pretrained.state_dict(), strict=True)
    if init_from is not None:
        try:
            fresh = model.init_from_checkpoint(init_from)
        except (KeyError, ValueError) as err:
            raise AppInputError(f"init_from={init_from!r}: {err}") from err
        if list(fresh) != [name]:
            raise AppInputError(
                f"init_from={init_from!r}: expected only {name!r} to be new, got {list(fresh)}"
            )
    del probe, pretrained

    callbacks = [
        _instantiate(node, f"callbacks.{key}")
        for key, node in (cfg.get("callbacks") or {}).items()
        if node is not None and "_target_" in node
    ]
    loggers = [
        _instantiate(node, f"logger.{key}")
        for key, node in (cfg.get("logger") or {}).items()
        if node is not None and "_target_" in node
    ]
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if quiet:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    freezer = next((c for c in callbacks if isinstance(c, FreezeBackbone)), None)
    if init_from is not None and freezer is None:
        log.warning(
            "stage %d without a FreezeBackbone callback: the backbone and earlier branches will train", stage
        )
    callbacks.append(_AppRecord({"version": _RECORD_VERSION, "branches": record_branches}))

    trainer_kwargs: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False}
    if quiet:
        trainer_kwargs.update(enable_progress_bar=False, enable_model_summary=False)
    trainer = _instantiate(cfg.trainer, "trainer", **trainer_kwargs)
    _check_multirun_ddp(trainer)

    # Facts for the summary come from the main process, in every strategy: under ddp_spawn the
    # callbacks run in the workers and only the weights come back.
    before = fingerprint(model)
    trainer.fit(model, datamodule=datamodule)
    after = fingerprint(model)

    checkpoint_cb = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    checkpoint = None
    if checkpoint_cb is not None:
        checkpoint = checkpoint_cb.last_model_path or checkpoint_cb.best_model_path or None
    facts = _fit_facts(model, freezer, before, after, checkpoint)

    # every branch on its own data (the app records each branch's data config)
    rows = []
    for branch_name in model.branch_names:
        entry = record_branches.get(branch_name) or {}
        metrics: Mapping[str, Any] = {}
        if branch_name == name or entry.get("data"):
            data_module = (
                datamodule
                if branch_name == name
                # read from the init_from checkpoint's record: checked like the model's configs
                else _instantiate(entry["data"], f"data of {branch_name}", check=True)
            )
            model.switch_branch(branch_name)
            results = trainer.validate(model, datamodule=data_module, verbose=False)
            metrics = results[0] if results else {}
        status, note = ("trained", None) if branch_name == name else facts.branch_status(branch_name)
        rows.append(
            {
                "name": branch_name,
                "task": entry.get("task"),
                "status": status,
                "note": note,
                "val_acc": _metric(metrics, f"{branch_name}/val_acc"),
                "val_loss": _metric(metrics, f"{branch_name}/val_loss"),
            }
        )
    model.switch_branch(name)

    output_dir = cfg.paths.output_dir if cfg.get("paths") else None
    summary = StageSummary(
        stage=stage,
        trained_branch=name,
        branches=rows,
        backbone=facts.backbone_status(),
        frozen_check=facts.check.summary() if facts.check is not None else None,
        frozen_check_by=facts.check_by if facts.check is not None else None,
        frozen_changed=len(facts.check.changed) if facts.check is not None else None,
        checkpoint=str(Path(checkpoint).resolve()) if checkpoint else None,
        output_dir=str(Path(output_dir).resolve()) if output_dir else None,
    )
    if trainer.is_global_zero:
        if summary.output_dir:
            Path(summary.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(summary.output_dir) / "summary.json").write_text(
                json.dumps(asdict(summary), indent=2) + "\n"
            )
        print(summary.format(), flush=True)
    return summary


@dataclass
class _FitFacts:
    """What the fit did to the model, found in the main process (see :func:`_fit_facts`)."""

    changed: set[str]  # state_dict keys whose bits changed during the fit
    unfrozen_at_epoch: int | None  # FreezeBackbone's unfreeze_at_epoch, when it unfroze
    check: Any  # FingerprintDiff of FreezeBackbone's frozen tensors, or None
    check_by: str | None

    def _changed(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.changed)

    def backbone_status(self) -> str:
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


def _fit_facts(
    model: Any,
    freezer: FreezeBackbone | None,
    before: Mapping[str, TensorFingerprint],
    after: Mapping[str, TensorFingerprint],
    checkpoint: str | None,
) -> _FitFacts:
    """Compare the model before and after the fit, and find FreezeBackbone's record of it.

    The callback's record comes from the callback when it ran in this process, else (``ddp_spawn``:
    it ran in the workers) from its state in the checkpoint the workers wrote; the check is then
    redone here on the tensors it lists, against the weights the workers returned.
    """
    changed = set(diff_fingerprints(before, after).changed)
    if freezer is None:
        return _FitFacts(changed, None, None, None)
    if freezer.frozen is not None:  # it ran in this process
        state, check, check_by = freezer.state_dict(), freezer.last_check, "FreezeBackbone"
    else:
        state, check, check_by = _callback_state(checkpoint, freezer.state_key), None, "main process"
        keys = [k for k in (state or {}).get("fingerprints") or {} if k in before and k in after]
        if keys:
            check = diff_fingerprints({k: before[k] for k in keys}, {k: after[k] for k in keys})
    unfrozen_at = freezer.unfreeze_at_epoch if (state or {}).get("unfrozen") else None
    return _FitFacts(changed, unfrozen_at, check, check_by)


def _callback_state(checkpoint: str | None, state_key: str) -> dict[str, Any] | None:
    if not checkpoint:
        return None
    from lightning_freeze.core.checkpoint import CheckpointError, load_checkpoint

    try:
        state = (load_checkpoint(checkpoint).get("callbacks") or {}).get(state_key)
    except CheckpointError:
        return None
    return state if isinstance(state, dict) else None


def _metric(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def _allowed_targets(cfg: DictConfig) -> list[str]:
    """The config key ``allow_targets``: more ``_target_`` prefixes the model's configs may use."""
    value = _container(cfg.get("allow_targets")) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AppInputError(
            f"Invalid allow_targets={value!r}; valid choices: a list of module prefixes, "
            "e.g. allow_targets=[mypkg]"
        )
    return value


# what Hydra writes into a run directory before the app starts
_HYDRA_FILES = frozenset({"config.yaml", "hydra.yaml", "overrides.yaml"})


def _remove_if_unused(output_dir: Path) -> None:
    """Remove a failed run's output directory when it holds only what Hydra put there.

    Hydra creates the directory (its ``.hydra/`` record and the job's ``.log`` file) before the app
    runs; a run that fails before writing anything of its own leaves no directory behind. A
    directory with anything else in it (a checkpoint, logs, the user's files) is kept as it is.
    """
    if not output_dir.is_dir():
        return
    entries = list(output_dir.iterdir())
    hydra_dir = output_dir / ".hydra"
    for entry in entries:
        if entry == hydra_dir and entry.is_dir() and not entry.is_symlink():
            if not all(f.is_file() and f.name in _HYDRA_FILES for f in entry.iterdir()):
                return
        elif not (entry.is_file() and not entry.is_symlink() and entry.suffix == ".log"):
            return
    for entry in entries:
        if entry == hydra_dir:
            for item in entry.iterdir():
                item.unlink()
            entry.rmdir()
        else:
            entry.unlink()
    output_dir.rmdir()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Console entry point ``lightning-freeze-train``: compose the config, run :func:`train`.

    Bad input is reported as one line on stderr with exit status 1 (``HYDRA_FULL_ERROR=1`` shows
    the traceback). Returns the trained branch's validation accuracy (for Hydra sweepers).
    """
    # Lightning-vs-torch deprecation noise, and a notice about the intended per-branch validation
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders")
    output_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    try:
        with allow_targets(_allowed_targets(cfg)):
            summary = train(cfg)
    except BaseException as err:
        if output_dir is not None:
            _remove_if_unused(output_dir)
        if not isinstance(err, (AppInputError, OmegaConfBaseException)):
            raise
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = str(err).splitlines()[0] if isinstance(err, OmegaConfBaseException) else str(err)
        print(f"Error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    trained = next((row for row in summary.branches if row["status"] == "trained"), None)
    return trained.get("val_acc") if trained else None


if __name__ == "__main__":
    main()
