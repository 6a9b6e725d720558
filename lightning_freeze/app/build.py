"""Instantiation helpers of the training app: data, model, callbacks, loggers and trainer from the config.

Every object is built with :func:`lightning_freeze.instantiate.instantiate` (the allow-listed one);
its errors become one-line :class:`~lightning_freeze.app.AppInputError`\\ s.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf

from lightning_freeze.app import AppInputError
from lightning_freeze.app.settings import has_weights, model_settings, to_container, without_weights
from lightning_freeze.callbacks.freeze_backbone import FreezeBackbone
from lightning_freeze.core.keys import free_branch_name
from lightning_freeze.instantiate import ConfigInstantiationError, instantiate
from lightning_freeze.module import check_branch_name
from lightning_freeze.stages import RECORD_VERSION, PreviousStage, StageRecord, read_checkpoint

__all__ = [
    "Stage",
    "build_callbacks",
    "build_datamodule",
    "build_loggers",
    "build_model",
    "build_stage",
    "build_trainer",
    "check_accelerator",
    "check_new_branch",
    "check_optimizer",
    "check_trainer",
    "feature_size",
    "instantiate_node",
]

log = logging.getLogger(__name__)
#: backbone attributes that give the size of its feature vector (torchvision/ours, timm)
FEATURE_ATTRIBUTES = ("out_features", "num_features")


def instantiate_node(node: Any, key: str, *, check: bool = False, **kwargs: Any) -> Any:
    """:func:`lightning_freeze.instantiate.instantiate`, its errors as one-line :class:`AppInputError`.

    ``check=True`` for configs that become part of the model (they may come from ``init_from``);
    the app's own trainer/callbacks/logger/data nodes are the user's config and are not checked.
    """
    try:
        return instantiate(node, key, check=check, **kwargs)
    except ConfigInstantiationError as err:
        raise AppInputError(str(err)) from err


def check_new_branch(name: Any, previous: PreviousStage | None, init_from: str | None) -> str:
    """The new branch's name: valid, and not one of ``init_from``'s branches."""
    try:
        check_branch_name(name)
    except ValueError as err:
        raise AppInputError(f"branch.name: {err}") from err
    if previous is not None and name in previous.branches:
        shipped = sorted(p.stem for p in (Path(__file__).parent.parent / "conf" / "branch").glob("*.yaml"))
        free = [option for option in shipped if option not in previous.branches]
        example = f" (shipped options not taken: {', '.join(free)})" if free else ""
        raise AppInputError(
            f"branch.name={name!r} collides with a branch of init_from={init_from!r} "
            f"(its branches: {', '.join(previous.branches)}); choose a new branch{example} or "
            f"rename this one: branch.name={free_branch_name(name, previous.branches)}"
        )
    return name


def build_datamodule(cfg: DictConfig) -> tuple[L.LightningDataModule, int]:
    """The data module, and the branch's class count (``branch.num_classes``, ``???``: the data's)."""
    datamodule = instantiate_node(cfg.data, "data")
    data_classes = getattr(datamodule, "num_classes", None)
    branch_cfg = cfg.branch
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
    return datamodule, num_classes


def feature_size(backbone: Any, target: Any) -> int:
    """The size of the backbone's feature vector: its ``out_features`` or (timm) ``num_features``."""
    for attribute in FEATURE_ATTRIBUTES:
        value = getattr(backbone, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise AppInputError(
        f"model.backbone ({target}) has no integer `out_features` or `num_features` attribute; "
        "set branch.head.in_features to the size of its feature vector"
    )


def build_model(
    cfg: DictConfig,
    name: str,
    num_classes: int,
    backbone_cfg: dict[str, Any] | None,
    previous: PreviousStage | None,
    init_from: str | None,
    init_weights: str,
    stage: int,
) -> tuple[Any, StageRecord]:
    """The :class:`~lightning_freeze.MultiBranchModule` of this stage, and the record its checkpoints get.

    Stage 1 (``previous is None``): the backbone from ``model.backbone``, pretrained weights (if
    any) loaded once and copied in. Later stages: ``backbone_cfg`` (the previous stage's) and every
    branch of ``init_from``, loaded exactly (its ``init_weights``: raw or EMA), plus the new branch.
    """
    if previous is None:
        backbone_cfg = to_container(cfg.model.backbone)
    assert backbone_cfg is not None
    probe = instantiate_node(backbone_cfg, "model.backbone", check=True)
    pretrained = probe if previous is None and has_weights(backbone_cfg) else None

    head_cfg = to_container(cfg.branch.head)
    if head_cfg.get("in_features") is None:
        head_cfg["in_features"] = feature_size(probe, backbone_cfg.get("_target_"))
    instantiate_node(head_cfg, "branch.head", check=True)  # refuse a bad head config here, in one line
    branches = {**(previous.branches if previous is not None else {}), name: head_cfg}

    model = instantiate_node(
        OmegaConf.create(model_settings(cfg, resolve=True)),
        "model",
        backbone=without_weights(backbone_cfg),
        branches=branches,
        active_branch=name,
        _recursive_=False,
    )
    if pretrained is not None:
        model.backbone.load_state_dict(pretrained.state_dict(), strict=True)
    if init_from is not None:
        try:
            fresh = model.init_from_checkpoint(init_from, weights=init_weights)
        except (KeyError, ValueError) as err:
            raise AppInputError(f"init_from={init_from!r}: {err}") from err
        if list(fresh) != [name]:
            raise AppInputError(
                f"init_from={init_from!r}: expected only {name!r} to be new, got {list(fresh)}"
            )

    record_branches = dict(previous.record) if previous is not None else {}
    record_branches[name] = {
        "task": cfg.branch.get("task"),
        "num_classes": num_classes,
        "data": to_container(cfg.data),
        "stage": stage,
    }
    record = {
        "version": RECORD_VERSION,
        "stage": stage,
        # unresolved: ${trainer.max_epochs} follows the next stage's trainer
        "model": model_settings(cfg, resolve=False),
        "data": to_container(cfg.data),
        "branches": record_branches,
    }
    return model, StageRecord(record)


def _nodes(cfg: DictConfig, key: str) -> list[tuple[str, Any]]:
    return [(k, node) for k, node in (cfg.get(key) or {}).items() if node is not None and "_target_" in node]


def build_callbacks(cfg: DictConfig, *, has_logger: bool, quiet: bool) -> list[Callback]:
    """The ``callbacks`` group (LR monitor only with a logger, no progress bar when ``quiet``)."""
    callbacks = [instantiate_node(node, f"callbacks.{key}") for key, node in _nodes(cfg, "callbacks")]
    if not has_logger:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if quiet:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The ``logger`` group."""
    return [instantiate_node(node, f"logger.{key}") for key, node in _nodes(cfg, "logger")]


#: Trainer arguments that take an integer (or null), and those that take a number (or null)
_TRAINER_INTS = (
    "max_epochs", "min_epochs", "max_steps", "min_steps", "check_val_every_n_epoch",
    "log_every_n_steps", "accumulate_grad_batches", "num_nodes", "num_sanity_val_steps",
)  # fmt: skip
_TRAINER_NUMBERS = (
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
    "overfit_batches", "val_check_interval", "gradient_clip_val",
)  # fmt: skip


def check_trainer(trainer_cfg: Any) -> None:
    """Refuse a trainer value of the wrong type in one line (Lightning would fail mid-fit, e.g. on an
    ``assert`` for ``trainer.max_epochs=abc``)."""
    for key in (*_TRAINER_INTS, *_TRAINER_NUMBERS):
        value = trainer_cfg.get(key) if trainer_cfg is not None else None
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in _TRAINER_INTS and not (number and isinstance(value, int)):
            raise AppInputError(f"Invalid trainer.{key}={value!r}; valid choices: an integer, or null")
        if not number:
            raise AppInputError(
                f"Invalid trainer.{key}={value!r}; valid choices: an integer (batches), a float "
                "(a fraction), or null"
            )


def check_accelerator(trainer_cfg: Any) -> None:
    """Refuse ``trainer.accelerator=gpu`` on a machine without a GPU, saying what runs here instead."""
    import torch

    accelerator = trainer_cfg.get("accelerator") if trainer_cfg is not None else None
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise AppInputError(
            f"trainer.accelerator={accelerator!r} but this machine has no GPU (torch.cuda.is_available() "
            "is False); run on the CPU: trainer=cpu, or trainer=ddp_cpu for DDP"
        )


def check_optimizer(cfg: DictConfig) -> None:
    """Build ``model.optimizer`` once on a probe parameter: a bad value (``lr=-1``) is one line now,
    not a traceback from ``configure_optimizers`` once the fit has started."""
    import torch

    node = cfg.model.get("optimizer")
    if node is None or "_target_" not in node:
        return
    factory = instantiate_node(node, "model.optimizer", check=True)
    if not callable(factory):
        return
    try:
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise AppInputError(f"model.optimizer ({node.get('_target_')}): {err}") from err


def build_trainer(
    cfg: DictConfig, callbacks: list[Callback], loggers: list[Any], *, quiet: bool, **kwargs: Any
) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the callbacks and loggers (refuses DDP in a local multirun).

    ``kwargs`` are more ``Trainer`` arguments (the packed fit's ``default_root_dir``, ...).
    """
    check_trainer(cfg.get("trainer"))
    check_accelerator(cfg.get("trainer"))
    kwargs.update(callbacks=callbacks, logger=loggers or False)
    if quiet:
        kwargs.update(enable_progress_bar=False, enable_model_summary=False)
    trainer = instantiate_node(cfg.trainer, "trainer", **kwargs)
    _check_multirun_ddp(trainer)
    return trainer


def resume_checkpoint(cfg: DictConfig, trainer: L.Trainer) -> str | None:
    """The checkpoint ``trainer.fit`` resumes from: ``ckpt_path``, or after a SLURM requeue the run's own."""
    from lightning_freeze.app.runtime import requeued_checkpoint

    if cfg.get("ckpt_path"):
        path = str(cfg.ckpt_path)
        if not Path(path).expanduser().is_file():
            raise AppInputError(f"ckpt_path={path!r}: no such file (the checkpoint of the run to resume)")
        # read safely (no pickled code) before Lightning does: a bad file is one line
        hint = "give the checkpoint of the run to resume: <run>/checkpoints/last.ckpt"
        loaded = read_checkpoint(path, "ckpt_path", hint, mmap=True)
        if "state_dict" not in loaded:
            raise AppInputError(
                f"ckpt_path={path!r} is not a Lightning checkpoint (no 'state_dict'); give the checkpoint "
                "of the run to resume: <run>/checkpoints/last.ckpt"
            )
        return path
    checkpoint_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
    return requeued_checkpoint(trainer.default_root_dir, checkpoint_dir)


def freeze_callback(callbacks: list[Callback], stage: int) -> FreezeBackbone | None:
    """The FreezeBackbone among ``callbacks`` (a warning at a later stage without one)."""
    freezer = next((c for c in callbacks if isinstance(c, FreezeBackbone)), None)
    if stage > 1 and freezer is None:
        log.warning(
            "stage %d without a FreezeBackbone callback: the backbone and earlier branches will train", stage
        )
    return freezer


def _check_multirun_ddp(trainer: L.Trainer) -> None:
    """Lightning's DDP launcher re-runs ``sys.argv``: inside a local multirun that is the whole sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lightning_freeze import _compat

    launcher = getattr(trainer.strategy, "launcher", None)
    if (
        _compat.is_subprocess_script_launcher(launcher)
        and HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
    ):
        raise AppInputError(
            "trainer.strategy=ddp (subprocess launcher) cannot run inside a local multirun (-m): Lightning "
            "re-runs the command line in each child process, i.e. the whole sweep. Run the jobs one by one, "
            "or use launcher=submitit_slurm (SLURM starts the processes), or trainer.strategy=ddp_spawn"
        )


def metric(metrics: Mapping[str, Any], key: str) -> float | None:
    """``metrics[key]`` as a float, ``None`` when absent."""
    value = metrics.get(key)
    return None if value is None else float(value)


@dataclass
class Stage:
    """Everything one run of the app trains with, built from the config, ready for ``Trainer.fit``.

    Attributes:
        cfg: the composed config.
        stage: the stage number.
        name: the branch this stage trains (``model.active_branch``).
        model: the :class:`~lightning_freeze.MultiBranchModule`.
        datamodule: the trained branch's data.
        trainer: the trainer (with :attr:`callbacks` and the loggers).
        callbacks: the trainer's callbacks, the :class:`~lightning_freeze.stages.StageRecord` among them.
        record: that :class:`~lightning_freeze.stages.StageRecord`.
        freezer: the :class:`~lightning_freeze.FreezeBackbone` among them, if any.
        ckpt_path: the checkpoint ``Trainer.fit`` resumes from (``None``: a fresh run).
    """

    cfg: DictConfig
    stage: int
    name: str
    model: Any
    datamodule: L.LightningDataModule
    trainer: L.Trainer
    callbacks: list[Callback]
    record: StageRecord
    freezer: FreezeBackbone | None
    ckpt_path: str | None


def build_stage(cfg: DictConfig) -> Stage:
    """Seed, read ``init_from``, and build the stage's data, model, callbacks and trainer (no fit).

    The global random state afterwards is the one ``Trainer.fit`` starts from (the packed launcher
    relies on it: :mod:`lightning_freeze.packing`).

    Args:
        cfg: the composed config (``conf/train.yaml`` and its groups).

    Returns:
        the :class:`Stage`.

    Raises:
        AppInputError: bad input (missing ``init_from``, branch name collision, missing data folder,
            a config value a factory refuses, an override that contradicts the frozen backbone).
    """
    from lightning_freeze.app import settings
    from lightning_freeze.app.progress import EpochProgress
    from lightning_freeze.stages import read_previous_stage

    stage, init_from, init_weights = settings.check_stage(cfg)
    quiet = bool(cfg.get("quiet", False))
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    previous = read_previous_stage(init_from) if init_from else None
    name = check_new_branch(cfg.branch.get("name"), previous, init_from)
    backbone, inherited = (
        settings.inherit_previous_stage(cfg, previous, init_from) if previous else (None, [])
    )
    check_trainer(cfg.get("trainer"))
    check_optimizer(cfg)
    datamodule, num_classes = build_datamodule(cfg)
    model, record = build_model(cfg, name, num_classes, backbone, previous, init_from, init_weights, stage)
    record.settings = settings.stage_settings(cfg, stage, inherited)  # written next to every checkpoint

    loggers = build_loggers(cfg)
    callbacks = [
        *build_callbacks(cfg, has_logger=bool(loggers), quiet=quiet),
        record,
        EpochProgress(stage, name),
    ]
    freezer = freeze_callback(callbacks, stage)
    trainer = build_trainer(cfg, callbacks, loggers, quiet=quiet)
    ckpt_path = resume_checkpoint(cfg, trainer)
    return Stage(cfg, stage, name, model, datamodule, trainer, callbacks, record, freezer, ckpt_path)
