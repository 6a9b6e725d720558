"""Shared by the app's tests: compose the packaged config in-process, and one stage-1 run per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import lightning_freeze.train as app

CONF = Path(app.__file__).parent / "conf"
#: a stage in seconds: one epoch of two batches
TINY = ["quiet=true", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]


def compose_app(overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    """The config ``lightning-freeze-train <overrides>`` composes (``run_dir``: its output directory)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
    return cfg


def options(group: str) -> list[str]:
    """The shipped options of a config group (``"trainer/precision"`` for nested groups)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def shared_stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``checkpoints/last.ckpt`` of one tiny in-process stage 1, trained once per test session."""
    run_dir = tmp_path_factory.getbasetemp() / "shared_stage1"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        summary = app.train(compose_app(["experiment=stage1", *TINY], run_dir))
        assert summary.checkpoint == str(checkpoint)
    return checkpoint
