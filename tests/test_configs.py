"""Every config composes; every experiment runs (fast_dev_run) in-process from its composed config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

import lightning_freeze.train as app

CONF = Path(app.__file__).parent / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
    return cfg


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_repository_conf_is_the_packaged_conf() -> None:
    top = Path(app.__file__).parent.parent / "conf"
    if top.exists():  # a checkout (not an installed wheel)
        assert top.resolve() == CONF.resolve()
    assert {"stage1", "stage2", "stage3"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    cfg = _compose([f"experiment={experiment}", "init_from=prev.ckpt"])
    assert cfg.stage >= 1 and cfg.task_name == experiment
    callbacks = {node._target_ for node in cfg.callbacks.values()}
    if cfg.stage == 1:
        assert cfg.branch.name == "digit" and cfg.data.half == "A"
        assert "lightning_freeze.FreezeBackbone" not in callbacks
    else:
        assert cfg.data.half == "B" and cfg.branch.name != "digit"
        assert "lightning_freeze.FreezeBackbone" in callbacks
        assert cfg.callbacks.freeze_backbone.freeze_inactive_branches is True
    assert cfg.data.task == cfg.branch.task  # the data follows the branch


@pytest.mark.parametrize(
    ("group", "key"),
    [
        ("model", "model"),
        ("branch", "branch"),
        ("data", "data"),
        ("trainer", "trainer"),
        ("logger", "logger"),
    ],
)
def test_every_group_option_composes(group: str, key: str) -> None:
    for option in _options(group):
        cfg = _compose([f"{group}={option}"])
        node = cfg.get(key)
        if option not in ("none",):
            assert node, (group, option)


def test_model_backbones_instantiate_with_their_feature_size() -> None:
    expected = {"tiny_cnn": 64, "resnet18": 512, "mobilenet_v3_small": 576}
    assert set(_options("model")) == set(expected)
    for option, features in expected.items():
        cfg = _compose([f"model={option}"])
        assert cfg.model._target_ == "lightning_freeze.MultiBranchModule"
        assert cfg.model.optimizer._partial_ is True
        backbone = instantiate(cfg.model.backbone).eval()
        assert backbone.out_features == features
        assert backbone(torch.randn(2, 1, 8, 8)).shape == (2, features)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer=cpu"], {"accelerator": "cpu", "devices": 1, "precision": "32-true"}),
        (["trainer=gpu", "trainer/precision=bf16_mixed"], {"accelerator": "gpu", "precision": "bf16-mixed"}),
        (["trainer=ddp"], {"accelerator": "gpu", "strategy": "ddp", "sync_batchnorm": True}),
        (
            ["trainer=ddp_cpu", "trainer/precision=64_true"],
            {"accelerator": "cpu", "strategy": "ddp", "devices": 2},
        ),
    ],
)
def test_trainer_presets(overrides: list[str], expected: dict) -> None:
    trainer = _compose(overrides).trainer
    assert trainer._target_ == "lightning.pytorch.Trainer"
    for key, value in expected.items():
        assert trainer[key] == value, key


def test_callback_lists_and_rich_replaces_tqdm() -> None:
    cfg = _compose(["experiment=stage2", "callbacks=[default,freeze_backbone,ema,rich_progress_bar]"])
    assert set(cfg.callbacks) == {"model_checkpoint", "progress_bar", "lr_monitor", "freeze_backbone", "ema"}
    assert cfg.callbacks.progress_bar._target_.endswith("RichProgressBar")
    assert cfg.callbacks.ema._target_ == "lightning_freeze.FrozenSafeEMA"


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("basic", "hydra._internal.core_plugins.basic_launcher.BasicLauncher"),
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
def test_launcher_presets_compose_even_without_the_plugin(launcher: str, target: str) -> None:
    extra = ["hydra.launcher.timeout_min=30"] if launcher == "submitit_slurm" else []
    cfg = _compose([f"launcher={launcher}", *extra])
    assert cfg.hydra.launcher._target_ == target
    if launcher == "joblib":
        assert cfg.hydra.launcher.n_jobs == 2
    if launcher == "submitit_slurm":
        assert cfg.hydra.launcher.timeout_min == 30 and "partition" in cfg.hydra.launcher


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("stage1")
    cfg = _compose(
        [
            "experiment=stage1",
            "quiet=true",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
        ],
        run_dir,
    )
    summary = app.train(cfg)
    assert summary.checkpoint is not None
    return Path(summary.checkpoint)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_of_every_experiment(experiment: str, stage1_checkpoint: Path, tmp_path: Path) -> None:
    overrides = [f"experiment={experiment}", "trainer.fast_dev_run=true", "quiet=true"]
    if experiment != "stage1":
        overrides.append(f"init_from={stage1_checkpoint}")
    cfg = _compose(overrides, tmp_path)
    summary = app.train(cfg)
    names = [row["name"] for row in summary.branches]
    assert names[-1] == cfg.branch.name
    assert all(row["val_acc"] is not None and 0.0 <= row["val_acc"] <= 1.0 for row in summary.branches)
    if experiment != "stage1":
        assert names == ["digit", cfg.branch.name]
        assert summary.frozen_changed == 0
        assert summary.frozen_check.startswith("checked ") and summary.frozen_check.endswith(": 0 changed")
    assert (tmp_path / "summary.json").is_file()


def test_summary_tells_a_branch_changed_when_unfreeze_at_epoch_unfroze_the_backbone(
    stage1_checkpoint: Path, tmp_path: Path
) -> None:
    overrides = [
        "experiment=stage2",
        f"init_from={stage1_checkpoint}",
        "callbacks.freeze_backbone.unfreeze_at_epoch=1",
        "quiet=true",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
    ]
    summary = app.train(_compose(overrides, tmp_path))
    before = torch.load(stage1_checkpoint, weights_only=True)["state_dict"]
    after = torch.load(summary.checkpoint, weights_only=True)["state_dict"]
    backbone = [k for k in before if k.startswith("backbone.")]
    digit = [k for k in before if k.startswith("branches.digit.")]
    # the facts: the digit head is untouched, but the backbone it reads trained from epoch 1 on
    assert all(torch.equal(before[k], after[k]) for k in digit)
    assert any(not torch.equal(before[k], after[k]) for k in backbone)
    rows = {row["name"]: row for row in summary.branches}
    assert (rows["digit"]["status"], rows["digit"]["note"]) == ("changed", "backbone unfrozen at epoch 1")
    assert summary.backbone == "unfrozen at epoch 1"
    # what stayed frozen (the digit head) was still checked
    assert summary.frozen_check == f"checked {len(digit)} frozen tensors: 0 changed"
    text = summary.format()
    assert "digit" in text and "changed" in text and "(backbone unfrozen at epoch 1)" in text
    assert "backbone: unfrozen at epoch 1" in text


def test_init_from_checkpoint_cannot_instantiate_arbitrary_targets(
    stage1_checkpoint: Path, tmp_path: Path
) -> None:
    created = tmp_path / "created_by_the_checkpoint.txt"
    ckpt = torch.load(stage1_checkpoint, weights_only=True)
    ckpt["hyper_parameters"]["backbone"] = {"_target_": "builtins.open", "file": str(created), "mode": "w"}
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    cfg = _compose(["experiment=stage2", f"init_from={evil}", "quiet=true"], tmp_path / "run")
    with pytest.raises(
        app.AppInputError, match=r"Refused to instantiate model.backbone with _target_='builtins.open'"
    ):
        app.train(cfg)
    assert not created.exists()


def test_branch_names_that_are_nn_module_attributes_are_refused_before_anything_runs(tmp_path: Path) -> None:
    cfg = _compose(["branch.name=training", "quiet=true"], tmp_path)
    with pytest.raises(app.AppInputError) as info:
        app.train(cfg)
    assert str(info.value).startswith(
        "branch.name: Invalid branch name 'training' (it is an attribute of nn.Module/nn.ModuleDict); "
        "valid choices: a non-empty string without '.' or '/'"
    )
