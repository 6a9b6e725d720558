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

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lightning_freeze import _lazy
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
__getattr__ = _lazy.lazy_attributes(globals(), dict.fromkeys(_FROM_STAGES, "lightning_freeze.stages"))[0]


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
    report.check_optimized_metric(
        cfg.get("optimized_metric"), model.branch_names, built.name, test=bool(cfg.get("test"))
    )
    try:
        before, after = report.fitted(trainer, model, datamodule, built.ckpt_path)
    except (KeyboardInterrupt, SystemExit):
        if trainer.interrupted:  # Ctrl-C: Lightning stopped the fit (its notice is an INFO line)
            report.interrupted(trainer, callbacks)
        raise
    tested = report.run_test(trainer, model, datamodule, callbacks) if cfg.get("test") else None

    summary = report.summarise(built, (before, after), tested)
    if trainer.is_global_zero:
        report.write_summary(summary)
    return summary


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    """The Hydra task: one stage; returns ``optimized_metric``'s value (for sweepers)."""
    from hydra.core.hydra_config import HydraConfig

    _runtime.start_app(cfg)
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
    command line (an unknown key, a missing option or plugin, an output directory it cannot create)
    or the app refuses a value (``HYDRA_FULL_ERROR=1`` shows the traceback instead). Hydra raises
    what goes wrong before the app starts (:func:`lightning_freeze.app.runtime.report_errors_in_one_line`)
    and this prints it; nothing stands in for ``sys.stderr``.
    """
    if not _runtime.report_errors_in_one_line():
        _hydra_main()  # HYDRA_FULL_ERROR=1: Hydra's tracebacks, as the user asked
        return
    try:
        _hydra_main()
    except Exception as err:  # Hydra composing or launching the run; the app reports its own errors
        print(f"Error: {_runtime.describe(err)}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        _runtime.hydra_reports_errors_again()


if __name__ == "__main__":
    main()
