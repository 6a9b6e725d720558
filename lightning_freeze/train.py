"""The Hydra training app: ``lightning-freeze-train [overrides]`` or ``python -m lightning_freeze.train``.

One run trains one stage of staged training:

* stage 1 (``experiment=stage1``): backbone + the first branch train together;
* stage N > 1 (``experiment=stage2 init_from=<checkpoint of stage N-1>``): the backbone and every
  branch of ``init_from`` are rebuilt from the record the app wrote into that checkpoint and loaded
  exactly, the new branch (``branch=...``) is added and trained, and
  :class:`~lightning_freeze.FreezeBackbone` keeps everything else bitwise frozen and checks it.
  The stage starts from the previous stage's settings (:mod:`lightning_freeze.app.settings`).

The run ends with a summary: per-branch validation metrics (each branch on its own data), the
frozen-tensor check (``"checked N frozen tensors: 0 changed"``) and the checkpoint path; the same
is written to ``summary.json`` and ``train.log`` in the run's output directory.

Configs ship inside the package (``lightning_freeze/conf``, the repository's ``conf/``); add your
own with ``--config-dir DIR`` (a ``DIR/branch/mine.yaml`` is then ``branch=mine``).

This module imports torch and Lightning only when a run starts, so ``--help`` answers quickly.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lightning_freeze.app import AppInputError
from lightning_freeze.app import runtime as _runtime

if TYPE_CHECKING:
    from lightning_freeze.stages import (
        RECORD_KEY,
        PreviousStage,
        StageSummary,
        load_model,
        read_previous_stage,
    )

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

# the stage-record contract lives in lightning_freeze.stages (imports Lightning: loaded on first use)
_FROM_STAGES = ("RECORD_KEY", "PreviousStage", "StageSummary", "load_model", "read_previous_stage")


def __getattr__(name: str) -> Any:
    if name in _FROM_STAGES:
        return getattr(importlib.import_module("lightning_freeze.stages"), name)
    raise AttributeError(f"module 'lightning_freeze.train' has no attribute {name!r}")


def train(cfg: DictConfig) -> StageSummary:
    """Run one stage from a composed config (what ``lightning-freeze-train`` does).

    Args:
        cfg: the composed config (``conf/train.yaml`` and its groups).

    Returns:
        the :class:`~lightning_freeze.stages.StageSummary` (printed, logged and written to
        ``summary.json`` by rank 0).

    Raises:
        AppInputError: bad input (missing ``init_from``, branch name collision, missing data folder,
            a config value a factory refuses, an override that contradicts the frozen backbone),
            before anything trains.
    """
    from lightning_freeze.app import build, report

    built = build.build_stage(cfg)
    model, datamodule, trainer, callbacks = built.model, built.datamodule, built.trainer, built.callbacks
    before, after = report.fitted(trainer, model, datamodule, built.ckpt_path)
    tested = report.run_test(trainer, model, datamodule, callbacks) if cfg.get("test") else None

    summary = report.summarise(
        cfg, stage=built.stage, name=built.name, trainer=trainer, model=model, datamodule=datamodule,
        callbacks=callbacks, freezer=built.freezer, fingerprints=(before, after), tested=tested,
        resumed_from=built.ckpt_path,
    )  # fmt: skip
    if trainer.is_global_zero:
        report.write_summary(summary)
    return summary


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    """The Hydra task: one stage; returns ``optimized_metric``'s value (for sweepers)."""
    import lightning  # noqa: F401 - before routing its log handlers
    from hydra.core.hydra_config import HydraConfig

    if isinstance(sys.stderr, _runtime.HydraErrorFilter):
        sys.stderr.release()  # composing worked: Hydra's notices, if any, and the run's stderr go through
    _runtime.route_library_logs()
    if cfg.get("quiet"):
        _runtime.quiet_console()
    # Lightning-vs-torch deprecation noise, and a notice about the intended per-branch validation
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders")
    output_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    try:
        from lightning_freeze.app.report import optimized_value
        from lightning_freeze.app.settings import allowed_targets
        from lightning_freeze.instantiate import allow_targets

        with allow_targets(allowed_targets(cfg)):
            summary = train(cfg)
        return optimized_value(summary, cfg.get("optimized_metric"))
    except BaseException as err:
        if output_dir is not None:
            _runtime.remove_if_unused(output_dir)
        if not _is_config_error(err) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {_runtime.one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(1)


def _is_config_error(err: BaseException) -> bool:
    """A mistake in the config or the command line (reported in one line), not a bug."""
    if isinstance(err, (AppInputError, OmegaConfBaseException)):
        return True
    # the package's own argument checks (e.g. a FreezeBackbone pattern that matches nothing) raise
    # ValueError/KeyError subclasses defined in lightning_freeze, with the bad value and the choices
    module = type(err).__module__ or ""
    return module.startswith("lightning_freeze.") and isinstance(err, (ValueError, KeyError))


def main() -> None:
    """Console entry point ``lightning-freeze-train``: compose the config, run :func:`train`.

    Bad input is reported as one line on stderr with exit status 1, whether Hydra refuses the
    command line (an unknown key, a missing option) or the app refuses a value
    (``HYDRA_FULL_ERROR=1`` shows the traceback instead).
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        _hydra_main()
        return
    held = _runtime.HydraErrorFilter(sys.stderr)
    sys.stderr = held
    try:
        _hydra_main()
    except SystemExit as exit_:
        if sys.stderr is held:  # Hydra failed before the app started
            if exit_.code not in (0, None):
                held.flush_error()
            else:
                held.release()
        raise
    finally:
        if sys.stderr is held:
            held.release()


if __name__ == "__main__":
    main()
