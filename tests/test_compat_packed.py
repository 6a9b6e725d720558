"""lightning_freeze._compat, section "packed": each wrapped Lightning internal still means the same."""

from __future__ import annotations

from datetime import timedelta

import lightning
import torch
from helpers.multibranch import make_module
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_freeze import _compat

VERSION = f"lightning {lightning.__version__}"


def test_model_checkpoint_triggers_as_given() -> None:
    steps = ModelCheckpoint(every_n_train_steps=5)
    timed = ModelCheckpoint(train_time_interval=timedelta(minutes=3))
    plain = ModelCheckpoint()
    try:
        assert _compat.model_checkpoint_every_n_train_steps(steps) == 5, VERSION
        assert _compat.model_checkpoint_every_n_train_steps(plain) == 0, VERSION
        assert _compat.model_checkpoint_train_time_interval(timed) == timedelta(minutes=3), VERSION
        assert _compat.model_checkpoint_train_time_interval(plain) is None, VERSION
    except AttributeError as err:
        raise AssertionError(
            f"{VERSION} changed ModelCheckpoint's private trigger attributes: {err}"
        ) from err


def test_model_checkpoint_save_moment(tmp_path) -> None:
    trainer = Trainer(default_root_dir=tmp_path, logger=False, check_val_every_n_epoch=1)
    deferred = Trainer(default_root_dir=tmp_path, logger=False, check_val_every_n_epoch=2)
    try:
        assert _compat.model_checkpoint_saves_on_train_epoch_end(ModelCheckpoint(), deferred) is False, (
            VERSION
        )
        explicit = ModelCheckpoint(save_on_train_epoch_end=True)
        assert _compat.model_checkpoint_saves_on_train_epoch_end(explicit, trainer) is True, VERSION
    except AttributeError as err:
        raise AssertionError(
            f"{VERSION} removed ModelCheckpoint._should_save_on_train_epoch_end: {err}"
        ) from err


class _Data(LightningDataModule):
    def __init__(self, size: int = 7) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_attach_datamodule_puts_its_hyperparameters_in_checkpoints(tmp_path) -> None:
    trainer = Trainer(default_root_dir=tmp_path, logger=False)
    model = make_module(["a"])
    try:
        _compat.attach_datamodule(trainer, model, _Data())
    except AttributeError as err:
        raise AssertionError(f"{VERSION} changed Trainer._data_connector.attach_data: {err}") from err
    assert isinstance(trainer.datamodule, _Data), VERSION
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "x.ckpt", weights_only=False)
    checkpoint = torch.load(tmp_path / "x.ckpt", weights_only=False)
    assert checkpoint["datamodule_hyper_parameters"] == {"size": 7}, VERSION
