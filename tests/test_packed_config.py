"""``launcher=packed`` config and the rule that decides which sweeps are packed (no training here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import lightning_freeze
from lightning_freeze.packing import why_not_packable

CONF = Path(lightning_freeze.__file__).resolve().parent / "conf"


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "train", overrides=["experiment=stage2", "init_from=x.ckpt", *overrides], return_hydra_config=True
        )


def test_launcher_packed_selects_the_plugin_and_the_plugin_is_discovered() -> None:
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    cfg = _compose("launcher=packed")
    target = "hydra_plugins.lightning_freeze_packed_launcher.packed_launcher.PackedLauncher"
    assert cfg.hydra.launcher._target_ == target and cfg.hydra.launcher.pack is True
    assert target in {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}


@pytest.mark.parametrize(
    ("sweep", "reason"),
    [
        (["model.optimizer.lr=0.1", "model.optimizer.lr=0.01", "model.optimizer.lr=1.0"], None),
        (["model.optimizer.weight_decay=0", "model.optimizer.weight_decay=0.1"], None),
        (["branch.head.num_classes=2", "+branch.extra=1"], None),
        (
            ["trainer.max_epochs=1", "trainer.max_epochs=2"],
            "the jobs differ in trainer.max_epochs, not only in branch-level settings (model.optimizer.* "
            "except _target_, branch.* except branch.name)",
        ),
        (["branch.name=p1", "branch.name=p2"], "the jobs differ in branch.name, not only"),
        (
            ["model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=0.1"],
            "the jobs differ in model.optimizer._target_, not only",
        ),
        (["seed=0", "seed=1"], "the jobs differ in seed, not only"),
        (["model.optimizer.lr=0.1"], "1 job(s): nothing to pack"),
    ],
)
def test_only_sweeps_over_branch_level_settings_are_packed(sweep: list[str], reason: str | None) -> None:
    configs = [_compose(override) for override in sweep]
    result = why_not_packable(configs)
    if reason is None:
        assert result is None
    else:
        assert result is not None and reason in result, result
