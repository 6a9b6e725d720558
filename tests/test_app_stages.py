"""Stages remember: stage N+1 starts from what stage N recorded (model, data, backbone), in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _app_stage1 import TINY, compose_app

import lightning_freeze.train as app
from lightning_freeze.core.checkpoint_io import ema_state_dict, load_checkpoint

STAGE2 = ["experiment=stage2", *TINY]


@pytest.fixture(scope="module")
def rgb_stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 1 with non-default data and model settings: 3 channels, 16x16 images, width 8, lr 0.01."""
    run_dir = tmp_path_factory.mktemp("rgb_stage1")
    overrides = [
        "experiment=stage1",
        "data.channels=3",
        "data.image_size=16",
        "data.batch_size=32",
        "model.backbone.width=8",
        "model.optimizer.lr=0.01",
        *TINY,
    ]
    return Path(app.train(compose_app(overrides, run_dir)).checkpoint)


def test_stage2_starts_from_the_data_and_model_settings_of_stage1(rgb_stage1: Path, tmp_path: Path) -> None:
    # nothing repeated: before, this failed on the input channels (3-channel backbone, 1-channel data)
    cfg = compose_app([*STAGE2, f"init_from={rgb_stage1}", "data.batch_size=16"], tmp_path)
    summary = app.train(cfg)
    assert summary.frozen_changed == 0
    assert (cfg.data.channels, cfg.data.image_size) == (3, 16)  # inherited
    assert cfg.data.half == "B"  # set by the experiment: wins
    assert cfg.data.batch_size == 16  # set on the command line: wins
    assert cfg.model.optimizer.lr == 0.01  # stage 1's optimizer
    state = torch.load(summary.checkpoint, weights_only=True)
    assert state["hyper_parameters"]["backbone"]["width"] == 8
    assert state["state_dict"]["backbone.0.weight"].shape[1] == 3
    record = state[app.RECORD_KEY]
    assert record["data"]["channels"] == 3 and record["branches"]["parity"]["data"]["half"] == "B"
    # stage 3 from stage 2: still the same settings, without repeating anything
    cfg3 = compose_app(["experiment=stage3", f"init_from={summary.checkpoint}", *TINY], tmp_path / "s3")
    assert app.train(cfg3).frozen_changed == 0
    assert (cfg3.data.channels, cfg3.data.image_size, cfg3.data.batch_size) == (3, 16, 16)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.channels=1", "data.channels=1 contradicts the frozen backbone of init_from="),
        ("model=resnet18", "model.backbone contradicts the frozen backbone of init_from="),
        ("model.backbone.width=16", "width=16 (frozen: 8)"),
    ],
)
def test_an_override_that_contradicts_the_frozen_backbone_is_one_clear_error(
    rgb_stage1: Path, override: str, message: str, tmp_path: Path
) -> None:
    cfg = compose_app([*STAGE2, f"init_from={rgb_stage1}", override], tmp_path)
    with pytest.raises(app.AppInputError, match="contradicts") as info:
        app.train(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_timm_backbone_stages_without_repeating_its_feature_size_or_weights(tmp_path: Path) -> None:
    import timm

    # a local weights file for stage 1; stage 2 must not read it again (the checkpoint has the weights)
    weights = tmp_path / "pretrained.pth"
    name = "test_resnet"  # timm's tiny test model (96 features)
    torch.manual_seed(3)
    torch.save(timm.create_model(name, pretrained=False, num_classes=0).state_dict(), weights)
    overrides = ["experiment=stage1", "model=timm", f"model.backbone.model_name={name}", "data.channels=3"]
    overrides.append(f"model.backbone.checkpoint_path={weights}")
    s1 = app.train(compose_app([*overrides, *TINY], tmp_path / "s1"))
    assert s1.branches[0]["val_acc"] is not None
    weights.unlink()
    s2 = app.train(compose_app([*STAGE2, f"init_from={s1.checkpoint}"], tmp_path / "s2"))
    assert s2.frozen_changed == 0 and s2.backbone == "frozen"
    hparams = torch.load(s2.checkpoint, weights_only=True)["hyper_parameters"]
    assert hparams["branches"]["parity"]["in_features"] == 96  # timm's num_features
    assert hparams["backbone"]["checkpoint_path"] == ""
    model = app.load_model(s2.checkpoint)
    assert model.forward_all(torch.zeros(2, 3, 8, 8))["parity"].shape == (2, 2)


def test_init_weights_ema_starts_the_next_stage_from_the_averaged_weights(tmp_path: Path) -> None:
    overrides = ["experiment=stage1", "callbacks=[default,ema]", "callbacks.ema.decay=0.5", *TINY]
    s1 = app.train(compose_app(overrides, tmp_path / "s1"))
    assert s1.weights == "ema" and "metrics: on the EMA weights" in s1.format()
    averaged = ema_state_dict(load_checkpoint(s1.checkpoint))
    raw = load_checkpoint(s1.checkpoint)["state_dict"]
    assert not torch.equal(averaged["backbone.0.weight"], raw["backbone.0.weight"])
    for weights, expected in (("ema", averaged), ("raw", raw)):
        cfg = compose_app(
            [*STAGE2, f"init_from={s1.checkpoint}", f"init_weights={weights}"], tmp_path / weights
        )
        s2 = app.train(cfg)
        state = load_checkpoint(s2.checkpoint)["state_dict"]
        frozen = [k for k in raw if k.startswith(("backbone.", "branches.digit."))]
        assert all(torch.equal(state[k], expected[k]) for k in frozen), weights
    with pytest.raises(app.AppInputError, match=r"Invalid init_weights='best'; valid choices: 'raw', 'ema'"):
        app.train(compose_app([*STAGE2, f"init_from={s1.checkpoint}", "init_weights=best"], tmp_path / "bad"))


def test_any_module_factory_plugs_in_through_allow_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_freeze.app.settings import allowed_targets
    from lightning_freeze.instantiate import allow_targets

    package = tmp_path / "h9nets"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from torch import nn\n\n"
        "def make(in_channels: int = 1, width: int = 4) -> nn.Module:\n"
        "    net = nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
        "    net.out_features = width  # or num_features: the size the heads read\n"
        "    return net\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    swap = ["~model.backbone", "+model.backbone={_target_: h9nets.make, in_channels: 1, width: 6}"]
    cfg = compose_app(["experiment=stage1", *swap, *TINY], tmp_path / "refused")
    with pytest.raises(
        app.AppInputError, match=r"Refused to instantiate model.backbone with _target_='h9nets.make'"
    ):
        app.train(cfg)
    cfg = compose_app(["experiment=stage1", *swap, "allow_targets=[h9nets]", *TINY], tmp_path / "s1")
    with allow_targets(allowed_targets(cfg)):  # what the app does with the config key allow_targets
        s1 = app.train(cfg)
        s2 = app.train(compose_app([*STAGE2, f"init_from={s1.checkpoint}"], tmp_path / "s2"))
    assert s2.frozen_changed == 0
    assert (
        torch.load(s2.checkpoint, weights_only=True)["hyper_parameters"]["branches"]["parity"]["in_features"]
        == 6
    )


def _copy_of(stage1_checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the stage-1 checkpoints folder (checkpoints and settings file), to edit."""
    import shutil

    folder = shutil.copytree(stage1_checkpoint.parent, tmp_path / "copy" / "checkpoints")
    return Path(folder) / stage1_checkpoint.name


def test_stage_settings_are_written_next_to_the_checkpoint(rgb_stage1: Path) -> None:
    from omegaconf import OmegaConf

    text = (rgb_stage1.parent / "stage_settings.yaml").read_text()
    assert text.startswith("# Written by lightning-freeze-train for stage 1: a later stage")
    saved = OmegaConf.to_container(OmegaConf.load(rgb_stage1.parent / "stage_settings.yaml"))
    assert saved["version"] == 1 and saved["stage"] == 1
    # the command line's model/data settings; the backbone (always the checkpoint's) is not one
    assert saved["set"] == ["data.batch_size", "data.channels", "data.image_size", "model.optimizer.lr"]
    assert (saved["data"]["channels"], saved["data"]["image_size"], saved["data"]["half"]) == (3, 16, "A")
    assert saved["model"]["optimizer"]["lr"] == 0.01 and "backbone" not in saved["model"]


def test_the_settings_file_decides_what_the_next_stage_inherits(rgb_stage1: Path, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    checkpoint = _copy_of(rgb_stage1, tmp_path)
    path = checkpoint.parent / "stage_settings.yaml"
    saved = OmegaConf.load(path)
    saved.set = ["data.channels", "model.optimizer.lr"]  # image_size and batch_size no longer inherited
    saved.model.optimizer.lr = 0.003  # and another value
    path.write_text(OmegaConf.to_yaml(saved))
    preset = compose_app(STAGE2)
    cfg = compose_app([*STAGE2, f"init_from={checkpoint}"], tmp_path / "s2")
    assert app.train(cfg).frozen_changed == 0
    assert cfg.data.channels == 3 and cfg.model.optimizer.lr == 0.003
    assert (cfg.data.image_size, cfg.data.batch_size) == (preset.data.image_size, preset.data.batch_size)
    assert cfg.data.half == "B"  # stage 1's experiment set "A": an experiment's settings stay its own
    written = OmegaConf.load(tmp_path / "s2" / "checkpoints" / "stage_settings.yaml")
    assert list(written.set) == ["data.channels", "model.optimizer.lr"] and written.stage == 2


def test_a_checkpoint_without_settings_file_falls_back_to_its_record(
    rgb_stage1: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = _copy_of(rgb_stage1, tmp_path)
    (checkpoint.parent / "stage_settings.yaml").unlink()  # a run of a version before the file
    cfg = compose_app([*STAGE2, f"init_from={checkpoint}", "data.batch_size=16"], tmp_path / "s2")
    with caplog.at_level("INFO", logger="lightning_freeze.app.settings"):
        assert app.train(cfg).frozen_changed == 0
    assert (
        "no stage_settings.yaml next to init_from (a checkpoint of an earlier version, or merged)"
        in caplog.text
    )
    assert (cfg.data.channels, cfg.data.image_size, cfg.data.batch_size) == (3, 16, 16)
    assert cfg.model.optimizer.lr == 0.01 and cfg.data.half == "B"


def test_a_broken_settings_file_is_one_clear_error(rgb_stage1: Path, tmp_path: Path) -> None:
    checkpoint = _copy_of(rgb_stage1, tmp_path)
    (checkpoint.parent / "stage_settings.yaml").write_text("version: 1\nset: data.channels\n")
    cfg = compose_app([*STAGE2, f"init_from={checkpoint}"], tmp_path / "s2")
    with pytest.raises(app.AppInputError) as info:
        app.train(cfg)
    assert str(info.value) == (
        f"{str(checkpoint.parent / 'stage_settings.yaml')!r} is not a stage settings file of version 1 "
        "(expected the keys version, stage, set (a list of keys), model and data, as lightning-freeze-train "
        "writes them); fix it or delete it to inherit the settings recorded in last.ckpt"
    )


def test_a_settings_file_of_another_stage_is_not_used(
    rgb_stage1: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from omegaconf import OmegaConf

    checkpoint = _copy_of(rgb_stage1, tmp_path)
    path = checkpoint.parent / "stage_settings.yaml"
    saved = OmegaConf.load(path)
    saved.stage, saved.set = 5, ["data.channels"]  # e.g. copied from another run's folder
    path.write_text(OmegaConf.to_yaml(saved))
    cfg = compose_app([*STAGE2, f"init_from={checkpoint}"], tmp_path / "s2")
    with caplog.at_level("INFO", logger="lightning_freeze.app.settings"):
        assert app.train(cfg).frozen_changed == 0
    assert (
        "stage_settings.yaml next to init_from is of stage 5, the checkpoint of stage 1: not used"
        in caplog.text
    )
    assert (cfg.data.channels, cfg.data.image_size, cfg.model.optimizer.lr) == (3, 16, 0.01)  # the record's
