"""Packed sweeps: the jobs of a multirun that differ only in branch-level settings, trained in one process.

Used by the Hydra launcher ``launcher=packed`` (``hydra_plugins.lightning_freeze_packed_launcher``),
which composes every job's config and asks :func:`why_not_packable`. When the jobs differ only in
``model.optimizer.*`` (not its ``_target_``) and ``branch.*`` (not ``branch.name``), each job is built
with the app's own :func:`lightning_freeze.app.build.build_stage` (:func:`build_job`: nothing is
copied from the app, so each variant starts exactly where its job would), its branch trains as one
packed variant of a :class:`~lightning_freeze.MultiBranchModule` on one backbone pass per batch
(:func:`train_packed`), and its checkpoints, ``summary.json`` and objective are written as the job
alone writes them (:func:`write_job`).

Each job's branch weights are bitwise those the job writes when run alone with the basic launcher
(CPU, same seed, ``trainer.deterministic=true``): the backbone is frozen, so the variants share no
parameter and the summed loss gives each exactly its own gradient; each variant runs in a random
stream seeded as the job's branch is seeded alone (``random_streams``), so a head with dropout draws
the same masks as in its job and does not shift its siblings' or the data's random numbers.

Jobs are not packed (they run one after another, after one line saying why) when they differ in
more than branch-level settings, resume a checkpoint, save checkpoints by a monitored metric, steps
or time, or carry a callback that monitors a metric (:func:`adopt`: each variant logs under its own
name, and one fit cannot stop per variant). The Lightning internals this needs are in
``lightning_freeze/_compat.py``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from lightning_freeze import _compat
from lightning_freeze.app import AppInputError, report
from lightning_freeze.app.build import Stage, build_stage, build_trainer
from lightning_freeze.app.settings import allowed_targets
from lightning_freeze.callbacks.freeze_backbone import FreezeBackbone
from lightning_freeze.core.state_diff import diff_state_dicts
from lightning_freeze.instantiate import ConfigInstantiationError, allow_targets, check_targets
from lightning_freeze.stages import StageRecord, StageSummary, rng_state, set_rng_state

__all__ = [
    "BRANCH_LEVEL_KEYS",
    "JobBuild",
    "PackedRun",
    "adopt",
    "build_job",
    "train_packed",
    "why_not_packable",
    "write_job",
]

log = logging.getLogger(__name__)

#: config keys that may differ between the jobs of a packed sweep (dotted prefixes)
BRANCH_LEVEL_KEYS = ("model.optimizer.", "branch.")
_NOT_BRANCH_LEVEL = ("model.optimizer._target_", "model.optimizer._partial_", "branch.name")
_MAX_SHOWN = 5


# ------------------------------------------------------------------------------------------------
# which sweeps can be packed
# ------------------------------------------------------------------------------------------------
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def differing_keys(configs: Sequence[DictConfig]) -> list[str]:
    """Dotted keys whose (unresolved) value is not the same in every config; ``hydra`` is ignored."""
    flat = []
    for cfg in configs:
        container = OmegaConf.to_container(cfg, resolve=False)
        assert isinstance(container, dict)
        container.pop("hydra", None)
        flat.append(_flatten(container))
    keys = list(dict.fromkeys(k for f in flat for k in f))
    missing = object()
    return [k for k in keys if any(f.get(k, missing) != flat[0].get(k, missing) for f in flat[1:])]


def why_not_packable(configs: Sequence[DictConfig]) -> str | None:
    """Why these job configs cannot train as packed variants, or ``None`` when they can.

    Packable: at least two jobs, differing only in branch-level settings: ``model.optimizer.*``
    (not its ``_target_``/``_partial_``: one optimizer holds every variant) and ``branch.*``
    (not ``branch.name``).
    """
    if len(configs) < 2:
        return f"{len(configs)} job(s): nothing to pack"
    other = [
        k
        for k in differing_keys(configs)
        if not k.startswith(BRANCH_LEVEL_KEYS) or k in _NOT_BRANCH_LEVEL or k.startswith("branch.name.")
    ]
    if other:
        shown = ", ".join(other[:_MAX_SHOWN]) + (
            f", ... ({len(other)} in all)" if len(other) > _MAX_SHOWN else ""
        )
        return (
            f"the jobs differ in {shown}, not only in branch-level settings "
            "(model.optimizer.* except _target_, branch.* except branch.name)"
        )
    return None


# ------------------------------------------------------------------------------------------------
# 1. build each job with the app, up to Trainer.fit
# ------------------------------------------------------------------------------------------------
def _same_rng_state(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two :func:`~lightning_freeze.stages.rng_state` values (nested tensors and plain values) are equal."""
    return apply_to_collection(a, torch.Tensor, torch.Tensor.tolist) == apply_to_collection(
        b, torch.Tensor, torch.Tensor.tolist
    )


class _RestoreRandomState(Callback):
    """First callback of the packed fit: the jobs' random state at the same hook."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.state = state

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            set_rng_state(self.state)


@dataclass
class JobBuild(Stage):
    """What the app built for one job (:func:`~lightning_freeze.app.build.build_stage`), not yet fitted.

    Attributes:
        rng: the random state (:func:`~lightning_freeze.stages.rng_state`) the job's fit starts from.
        output_dir: the job's output directory.
    """

    rng: dict[str, Any]
    output_dir: str | None


def build_job(cfg: DictConfig) -> JobBuild:
    """Build one job as the app does (:func:`lightning_freeze.app.build.build_stage`), without fitting.

    Call it inside the job's Hydra context (``hydra.core.utils.run_job``), so that the job's
    output directory is set. The random state is taken right after the build: it is the state the
    job's ``Trainer.fit`` starts from (Lightning draws no random numbers before the first hook).
    """
    # the app's allow-list extension (the run's ``allow_targets`` key), as lightning_freeze.train applies it
    with allow_targets(allowed_targets(cfg)):
        stage = build_stage(cfg)
        # the earlier branches' data configs come from init_from: checked now, so that a refused
        # target fails the build (the jobs then run one after another; the first one reports it)
        for branch, entry in stage.record.record["branches"].items():
            if branch != stage.name and entry.get("data"):
                try:
                    check_targets(entry["data"], f"data of {branch}")
                except ConfigInstantiationError as err:
                    raise AppInputError(str(err)) from err
    output_dir = cfg.paths.output_dir if cfg.get("paths") else None
    return JobBuild(
        **vars(stage), rng=rng_state(), output_dir=str(Path(output_dir).resolve()) if output_dir else None
    )


# ------------------------------------------------------------------------------------------------
# 2. one packed fit
# ------------------------------------------------------------------------------------------------
@dataclass
class PackedRun:
    """The packed training of a sweep's jobs.

    Attributes:
        model: the packed module (``train_branches`` = one variant per job).
        trainer: the trainer that fitted it.
        variants: per job, the variant's branch name in :attr:`model`.
        metrics: per job, the variant's logged metrics renamed to the job's branch (``"b/val_acc"``).
        frozen_rows: validation of the earlier (frozen) branches, identical for every job.
        callback_states: ``{state_key: state}`` of the packed trainer's callbacks.
        optimizer_state: the packed optimizer's ``state_dict`` (one param group per variant).
        scheduler_states: the packed schedulers' ``state_dict``s.
        loop_states: the loop counters and random state at the moments a job's checkpoint is saved.
        fingerprints: the packed module's fingerprints before and after the fit.
    """

    model: Any
    trainer: Any
    variants: list[str]
    metrics: list[dict[str, float]] = field(default_factory=list)
    frozen_rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    callback_states: dict[str, Any] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    scheduler_states: list[dict[str, Any]] = field(default_factory=list)
    loop_states: Any = None
    fingerprints: tuple[Any, Any] | None = None


class _LoopState(Callback):
    """Loop counters at the moments a job's ModelCheckpoint saves (validation end, train epoch end)."""

    def __init__(self) -> None:
        self.at_validation_end: dict[str, Any] = {}
        self.at_train_epoch_end: dict[str, Any] = {}

    @staticmethod
    def _snapshot(trainer: L.Trainer) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                # what Lightning's checkpoints store under "loops"
                "loops": {
                    f"{n}_loop": getattr(trainer, f"{n}_loop").state_dict()
                    for n in ("fit", "validate", "test", "predict")
                },
                # what the job's StageRecord saves there (the global random state)
                "rng": rng_state(),
            }
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.at_validation_end = self._snapshot(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at_train_epoch_end = self._snapshot(trainer)


def _shared_state(model: Any, branch: str) -> dict[str, torch.Tensor]:
    prefix = f"branches.{branch}."
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}


def adopt(first: JobBuild, build: JobBuild, index: int) -> str | None:
    """Check that ``build`` can share one packed fit with ``first``, and share ``first``'s modules.

    On success ``build.model`` holds ``first``'s backbone and earlier branches (bitwise equal, so
    one copy in memory for the whole sweep) and only its own branch.

    Returns:
        why the job cannot be packed with ``first``, or ``None``.
    """
    reason = _unsupported_callbacks(build)
    if reason is not None:
        return f"job {index}: {reason}"
    if build.ckpt_path is not None:
        return f"job {index} resumes from {build.ckpt_path}; packed jobs start fresh"
    if build is first:
        return None
    if build.name != first.name:
        return f"job {index} trains branch {build.name!r}, the first job {first.name!r}"
    diff = diff_state_dicts(_shared_state(first.model, first.name), _shared_state(build.model, build.name))
    if diff:
        return (
            f"job {index} does not start from bitwise the same backbone and earlier branches as the first "
            f"job (e.g. {diff.differences[0].key})"
        )
    if not _same_rng_state(first.rng, build.rng):
        return (
            f"job {index} reaches Trainer.fit with another random state than the first job (e.g. a head of"
            " another size draws more random numbers), so its batches would come in another order"
        )
    build.model.backbone = first.model.backbone
    for name in first.model.branch_names:
        if name != first.name:
            build.model.branches[name] = first.model.branches[name]
    return None


def _unsupported_callbacks(build: JobBuild) -> str | None:
    """Refuse callbacks a packed fit cannot run per job.

    Packed jobs write one checkpoint each, at the end: ModelCheckpoints that do more are refused. A
    callback that monitors a metric (``EarlyStopping``) would read the job's ``"<branch>/..."``
    metric, which the packed fit logs per variant (``"<branch>__v<k>/..."``), and would stop or
    pick checkpoints for every variant at once.
    """
    for cb in build.trainer.callbacks:
        monitor = getattr(cb, "monitor", None)
        if not isinstance(cb, ModelCheckpoint) and monitor is not None:
            return (
                f"its {type(cb).__name__} monitors {monitor!r}, which each packed variant logs under its own "
                f"name ({build.name}__v0/..., {build.name}__v1/...); one packed fit cannot stop or keep "
                "checkpoints per variant"
            )
        if isinstance(cb, ModelCheckpoint) and (
            cb.monitor is not None
            or cb.save_last not in (None, False, True)
            or cb.save_top_k not in (0, 1)
            or _compat.model_checkpoint_every_n_train_steps(cb)
            or _compat.model_checkpoint_train_time_interval(cb) is not None
            or cb.every_n_epochs != 1
        ):
            return (
                "its ModelCheckpoint saves by a monitored metric, by steps or time, more than one epoch's "
                "checkpoint or links last.ckpt; packed jobs write their checkpoints after training "
                "(monitor=null, save_top_k=0 or 1, save_last=true or false)"
            )
    return None


def _optimizer_settings(model: Any) -> dict[str, Any]:
    config = model.hparams.get("optimizer")
    if not isinstance(config, Mapping):
        return {}
    return {k: v for k, v in config.items() if not str(k).startswith("_")}


def train_packed(builds: Sequence[JobBuild], root: str | Path) -> PackedRun:
    """Train every job's branch as one packed variant, on one backbone pass per batch.

    Args:
        builds: the jobs, from :func:`build_job` (each checked with :func:`adopt`).
        root: directory for the packed fit's own logs (``<root>/csv`` with a variant per column).

    Returns:
        the :class:`PackedRun`; each job's module (``builds[k].model``) now holds its trained branch
        (the packed module trains the jobs' own branch modules).

    Raises:
        ValueError: the jobs cannot share one fit (see :func:`adopt`).
    """
    from lightning_freeze.module import MultiBranchModule

    first = builds[0]
    name = first.name
    base = first.model
    for index, build in enumerate(builds[1:], start=1):
        reason = adopt(first, build, index) if build.model.backbone is not base.backbone else None
        if reason is not None:
            raise ValueError(f"cannot pack these jobs: {reason}")
    variants = _variant_names(name, base.branch_names, len(builds))
    earlier = [b for b in base.branch_names if b != name]
    # (branch in the packed module, the module that holds it, its name there)
    parts = [(b, base, b) for b in earlier] + [
        (v, b.model, name) for v, b in zip(variants, builds, strict=True)
    ]
    packed = MultiBranchModule(
        base.backbone,
        {p: model.branches[b] for p, model, b in parts},
        losses={p: model.losses[b] for p, model, b in parts if b in model.losses},
        metrics={
            p: copy.deepcopy(model.val_metrics[b]) if b in model.val_metrics else None
            for p, model, b in parts
        },
        optimizer=base.optimizer_factory,
        scheduler=base.scheduler_factory,
        train_branches=variants,
        branch_optimizers={p: _optimizer_settings(model) for p, model, _ in parts[len(earlier) :]},
        # each variant draws (dropout) exactly what the job's branch draws when the job runs alone
        random_streams=dict.fromkeys(variants, name),
    )

    callbacks = [cb for cb in first.trainer.callbacks if not isinstance(cb, (ModelCheckpoint, StageRecord))]
    loggers = []
    if first.trainer.loggers:
        from lightning.pytorch.loggers import CSVLogger

        loggers.append(CSVLogger(str(root), name="csv"))
    loops = _LoopState()
    trainer = build_trainer(
        first.cfg,
        [_RestoreRandomState(first.rng), *callbacks, loops],
        loggers,
        quiet=bool(first.cfg.get("quiet")),
        default_root_dir=str(root),
        enable_checkpointing=False,  # each job's checkpoint is written by write_job
    )
    fingerprints = report.fitted(trainer, packed, first.datamodule, None)
    after_fit = _scalars(trainer)
    run = PackedRun(
        model=packed, trainer=trainer, variants=variants, loop_states=loops, fingerprints=fingerprints
    )
    results = trainer.validate(packed, datamodule=first.datamodule, verbose=False)
    measured = {**after_fit, **_scalars(trainer), **(results[0] if results else {})}
    run.metrics = [
        {f"{name}/{k.removeprefix(f'{v}/')}": float(x) for k, x in measured.items() if k.startswith(f"{v}/")}
        for v in variants
    ]
    for variant, build in zip(variants, builds, strict=True):
        # where the variant's random stream got to: the job's checkpoint carries it, as the job's own does
        build.model.random_stream(name).load_state_dict(packed.random_stream(variant).state_dict())
    # each earlier (frozen) branch on its own recorded data (checked), as the app's summary does; the
    # jobs share allow_targets (not a branch-level key)
    with allow_targets(allowed_targets(first.cfg)):
        for branch in earlier:
            entry = first.record.record["branches"].get(branch) or {}
            metrics = report.validate_branch(trainer, packed, branch, entry)
            run.frozen_rows[branch] = report.branch_row(branch, entry.get("task"), "frozen", None, metrics)
    packed.switch_branch(variants[0])
    run.callback_states = {cb.state_key: cb.state_dict() for cb in trainer.callbacks}
    run.optimizer_state = trainer.optimizers[0].state_dict() if trainer.optimizers else None
    run.scheduler_states = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
    return run


def _variant_names(name: str, taken: Sequence[str], count: int) -> list[str]:
    names = [f"{name}__v{k}" for k in range(count)]
    clash = [n for n in names if n in taken]
    if clash:
        raise ValueError(f"branch name(s) {clash} already exist; rename the branch (branch.name=...)")
    return names


def _scalars(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


# ------------------------------------------------------------------------------------------------
# 3. each job's outputs
# ------------------------------------------------------------------------------------------------
def _for_variant(state: Any, variant: str, name: str, others: Sequence[str]) -> Any:
    """``state`` with the tensors of ``variant`` renamed to branch ``name`` and other variants dropped."""
    if not isinstance(state, Mapping):
        return state
    own, dropped = f"branches.{variant}.", tuple(f"branches.{o}." for o in others)
    out = {}
    for key, value in state.items():
        if isinstance(key, str) and key.startswith(dropped):
            continue
        if isinstance(key, str) and key.startswith(own):
            key = f"branches.{name}." + key.removeprefix(own)
        out[key] = _for_variant(value, variant, name, others)
    return out


def _slice_optimizer(state: Mapping[str, Any], index: int) -> dict[str, Any]:
    group = dict(state["param_groups"][index])
    ids = list(group["params"])
    group.pop("branch", None)
    group["params"] = list(range(len(ids)))
    return {
        "state": {i: state["state"][pid] for i, pid in enumerate(ids) if pid in state["state"]},
        "param_groups": [group],
    }


def _slice_scheduler(state: Mapping[str, Any], index: int, groups: int) -> dict[str, Any]:
    return {
        k: [v[index]] if isinstance(v, list) and len(v) == groups else v
        for k, v in state.items()
        if k != "optimizer"
    }


def _attached(build: JobBuild) -> L.Trainer:
    """The job's trainer with its module and data attached, as ``Trainer.fit`` attaches them.

    Its checkpoints (``trainer.save_checkpoint``) are then the job's own: its module's state and
    ``on_save_checkpoint``, its datamodule's hyper-parameters, its callbacks.
    """
    from lightning.pytorch.trainer.states import TrainerFn

    trainer, model = build.trainer, build.model
    trainer.state.fn = TrainerFn.FITTING
    _compat.attach_datamodule(trainer, model, build.datamodule)
    trainer.strategy.connect(model)
    model.trainer = trainer
    return trainer


class _PackedFitState(Callback):
    """While :func:`write_job` saves a job's checkpoint: the packed fit's states, cut down to the job.

    Appended last to the job's trainer, so that its ``on_save_checkpoint`` runs after every other
    callback's: the loop counters, callback states, optimizer and scheduler states of the packed fit
    replace what the unfitted job trainer would write.
    """

    def __init__(self, updates: Mapping[str, Any], callback_states: Mapping[str, Any]) -> None:
        self.updates = updates
        self.callback_states = callback_states

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint.update(copy.deepcopy(dict(self.updates)))
        callbacks = checkpoint.get("callbacks", {})
        for key, state in self.callback_states.items():
            if key in callbacks:
                callbacks[key] = copy.deepcopy(state)


def write_job(build: JobBuild, run: PackedRun, index: int) -> float | None:
    """Write job ``index``'s checkpoints, ``summary.json`` and printed summary, as the job alone would.

    The job's ``ModelCheckpoint`` (``monitor=null``) writes, as after its last epoch, the top-k file
    (``save_top_k=1``) and ``last.ckpt`` (``save_last=true``): the same content, the job's own
    module, hyper-parameters and record, with the loop, callback, optimizer, scheduler and random
    states of the packed fit cut down to this variant.

    Returns:
        the job's objective, as the app's task returns it: the value of ``optimized_metric``
        (``None`` without one).
    """
    name = build.name
    variant = run.variants[index]
    others = [v for v in run.variants if v != variant]
    metrics = run.metrics[index]
    trainer = _attached(build)
    checkpoint_cb = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    last_path = None
    if checkpoint_cb is not None and checkpoint_cb.dirpath:
        loops = run.loop_states
        on_epoch_end = _compat.model_checkpoint_saves_on_train_epoch_end(checkpoint_cb, run.trainer)
        saved = copy.deepcopy(loops.at_train_epoch_end if on_epoch_end else loops.at_validation_end)
        rng = saved.pop("rng")
        logged = {k: torch.tensor(v) for k, v in metrics.items()}
        trainer.callback_metrics.clear()
        trainer.callback_metrics.update(logged)
        candidates = {
            **logged,
            "epoch": torch.tensor(saved["epoch"]),
            "step": torch.tensor(saved["global_step"]),
        }
        topk = checkpoint_cb.format_checkpoint_name(candidates) if checkpoint_cb.save_top_k else None
        last = (
            checkpoint_cb.format_checkpoint_name(candidates, checkpoint_cb.CHECKPOINT_NAME_LAST)
            if checkpoint_cb.save_last
            else None
        )
        # what the job's ModelCheckpoint records as it saves its last epoch: the top-k file first
        # (last_model_path still the previous epoch's last.ckpt), then last.ckpt
        if topk is not None:
            checkpoint_cb.best_model_path = topk
        previous_last = last if last is not None and saved["epoch"] > 0 else ""
        groups = len(run.variants)
        updates = {
            **saved,
            "lr_schedulers": [_slice_scheduler(s, index, groups) for s in run.scheduler_states],
        }
        if run.optimizer_state is not None:
            updates["optimizer_states"] = [_slice_optimizer(run.optimizer_state, index)]
        states = {
            key: _for_variant(state, variant, name, others)
            for key, state in run.callback_states.items()
            if key != checkpoint_cb.state_key
        }
        states.update({cb.state_key: {"rng": rng} for cb in trainer.callbacks if isinstance(cb, StageRecord)})
        packed_state = _PackedFitState(updates, states)
        trainer.callbacks.append(packed_state)
        try:
            for path in (p for p in (topk, last) if p is not None):
                checkpoint_cb.last_model_path = last if path == last else previous_last
                trainer.save_checkpoint(path, weights_only=False)
        finally:
            trainer.callbacks.remove(packed_state)
        last_path = last or topk

    freezer = next((c for c in run.trainer.callbacks if isinstance(c, FreezeBackbone)), None)
    facts = report.fit_facts(run.model, freezer, *(run.fingerprints or ({}, {})), None)
    rows = []
    for branch in build.model.branch_names:
        if branch == name:
            task = (build.record.record["branches"].get(name) or {}).get("task")
            rows.append(report.branch_row(name, task, "trained", None, metrics))
        else:
            status, note = facts.branch_status(branch)
            rows.append({**run.frozen_rows[branch], "status": status, "note": note})
    summary = StageSummary(
        stage=build.stage,
        trained_branch=name,
        branches=rows,
        **facts.summary_fields(),
        checkpoint=str(Path(last_path).absolute()) if last_path else None,
        weights=report.weights_validated(list(trainer.callbacks)),
        output_dir=build.output_dir,
    )
    report.write_summary(summary)
    return report.optimized_value(summary, build.cfg.get("optimized_metric"))
