"""``hydra/launcher=packed``: train the jobs of a sweep over branch-level settings in one process.

Selected with ``launcher=packed`` (``lightning_freeze/conf/launcher/packed.yaml``)::

    lightning-freeze-train -m experiment=stage2 init_from=stage1.ckpt \\
        model.optimizer.lr=1e-3,1e-2,1e-1 launcher=packed

When the jobs of ``lightning_freeze.train`` differ only in branch-level settings
(:func:`lightning_freeze.packing.why_not_packable`), their branches train as packed variants of one
module (:mod:`lightning_freeze.packing`); each job still gets its own output directory,
``summary.json``, checkpoint and return value (for the sweeper). Otherwise the jobs run one after
another, as with the basic launcher, after one log line saying why. Hydra's plugin discovery imports
this module in every Hydra app: it imports nothing heavy until it launches.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

#: the task function whose jobs can be packed (the app's ``main``)
APP_MODULE = "lightning_freeze.train"


def _build_or_error(cfg: DictConfig) -> Any:
    """The job built for packing (:func:`lightning_freeze.packing.build_job`), or the error raised."""
    from lightning_freeze import packing
    from lightning_freeze.app.runtime import start_app

    try:
        start_app(cfg)  # quiet=true, each log line once, no noise (run_job configured the job's logging)
        return packing.build_job(cfg)
    except Exception as err:  # reported in the one fallback line; the job then runs alone and says more
        return err


class PackedLauncher(Launcher):
    """Hydra launcher: packs a sweep's jobs into one training when they differ only per branch.

    Args:
        pack: ``False`` runs every sweep one job after another (the basic launcher's behaviour).
    """

    def __init__(self, pack: bool = True, **kwargs: Any) -> None:
        self.pack = bool(pack)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        configs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            configs.append(sweep_config)
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")

        reason = self._why_not_packed(configs)
        if reason is None:
            from lightning_freeze import packing
            from lightning_freeze.app.runtime import start_app

            builds: list[Any] = []
            for index, cfg in enumerate(configs):
                built = self._run(_build_or_error, cfg).return_value
                if isinstance(built, Exception):
                    reason = f"job {index} could not be built ({built})"
                    break
                builds.append(built)
                # one backbone in memory for the whole sweep, as each job is built
                reason = packing.adopt(builds[0], builds[-1], index)
                if reason is not None:
                    break
            if reason is None:
                start_app(configs[0])  # each job's build reconfigured the console (run_job)
                log.info(f"launcher=packed: training {len(configs)} jobs as packed variants in one process")
                run = packing.train_packed(builds, sweep_dir / f"packed_{initial_job_idx}")
                returns = [
                    self._run(lambda _cfg, b=build, i=index: packing.write_job(b, run, i), cfg)
                    for index, (build, cfg) in enumerate(zip(builds, configs, strict=True))
                ]
            del builds
        if reason is not None:
            log.info(f"launcher=packed: running {len(configs)} job(s) one after another: {reason}")
            returns = [self._run(self.task_function, cfg) for cfg in configs]
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns

    def _why_not_packed(self, configs: Sequence[DictConfig]) -> str | None:
        if not self.pack:
            return "hydra.launcher.pack=false"
        module = getattr(self.task_function, "__module__", None)
        if module == "__main__":  # python -m lightning_freeze.train
            module = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", module)
        if module != APP_MODULE:
            return f"the task ({module}) is not the lightning_freeze training app ({APP_MODULE})"
        from lightning_freeze.packing import why_not_packable

        return why_not_packable(configs)

    def _run(self, task: TaskFunction, config: DictConfig) -> JobReturn:
        assert self.hydra_context is not None
        return run_job(
            hydra_context=self.hydra_context,
            task_function=task,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
