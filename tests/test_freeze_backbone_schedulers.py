"""unfreeze_at_epoch with every torch learning-rate scheduler, any optimizer and LearningRateMonitor."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import pytest
import torch
from helpers.freeze import TinyNet, changed_keys, loaders, snapshot, trainer
from lightning.pytorch.callbacks import LambdaCallback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch.optim import lr_scheduler as S

from lightning_freeze import FreezeBackbone
from lightning_freeze.callbacks.freeze_backbone import SUPPORTED_SCHEDULERS

STEPS = 4  # batches per epoch (64 samples, batch 16)
EPOCHS = 3
SCALE = 0.5


def _chain(o: torch.optim.Optimizer) -> list[S.LRScheduler]:
    return [S.ConstantLR(o, factor=0.5, total_iters=1), S.ExponentialLR(o, gamma=0.9)]


# one sensible construction of every scheduler class in torch.optim.lr_scheduler, and its interval
SCHEDULERS: dict[str, tuple[Callable[[torch.optim.Optimizer], object], str]] = {
    "LambdaLR": (lambda o: S.LambdaLR(o, lambda epoch: 0.9**epoch), "epoch"),
    "MultiplicativeLR": (lambda o: S.MultiplicativeLR(o, lambda epoch: 0.95), "epoch"),
    "StepLR": (lambda o: S.StepLR(o, step_size=1, gamma=0.5), "epoch"),
    "MultiStepLR": (lambda o: S.MultiStepLR(o, milestones=[1, 2], gamma=0.5), "epoch"),
    "ConstantLR": (lambda o: S.ConstantLR(o, factor=0.5, total_iters=2), "epoch"),
    "LinearLR": (lambda o: S.LinearLR(o, start_factor=0.5, total_iters=2), "epoch"),
    "ExponentialLR": (lambda o: S.ExponentialLR(o, gamma=0.9), "epoch"),
    "SequentialLR": (lambda o: S.SequentialLR(o, _chain(o), milestones=[1]), "epoch"),
    "PolynomialLR": (lambda o: S.PolynomialLR(o, total_iters=EPOCHS + 1), "epoch"),
    "CosineAnnealingLR": (lambda o: S.CosineAnnealingLR(o, T_max=EPOCHS), "epoch"),
    "ChainedScheduler": (lambda o: S.ChainedScheduler(_chain(o)), "epoch"),
    "ReduceLROnPlateau": (lambda o: S.ReduceLROnPlateau(o, patience=0, threshold=1.0), "epoch"),
    "CyclicLR": (lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3), "step"),
    "CosineAnnealingWarmRestarts": (lambda o: S.CosineAnnealingWarmRestarts(o, T_0=2), "epoch"),
    "OneCycleLR": (lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=STEPS * EPOCHS), "step"),
}


class Scheduled(TinyNet):
    def __init__(self, scheduler: str, all_parameters: bool = False) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.all_parameters = all_parameters

    def configure_optimizers(self):
        params = (
            self.parameters() if self.all_parameters else [p for p in self.parameters() if p.requires_grad]
        )
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        build, interval = SCHEDULERS[self.scheduler]
        config = {"scheduler": build(optimizer), "interval": interval, "monitor": "val_loss"}
        return {"optimizer": optimizer, "lr_scheduler": config}


def _fit(model: L.LightningModule, tmp_path, callbacks: list, **kwargs) -> L.Trainer:
    train, val = loaders()
    t = trainer(tmp_path, callbacks=callbacks, max_epochs=EPOCHS, **kwargs)
    t.fit(model, train, val)
    return t


def test_every_torch_scheduler_is_covered_and_supported() -> None:
    classes = {
        name
        for name, cls in vars(S).items()
        if isinstance(cls, type)
        and issubclass(cls, (S.LRScheduler, S.ReduceLROnPlateau))
        and cls not in (S.LRScheduler, S._LRScheduler)
    }
    assert classes == set(SCHEDULERS)
    assert {cls.__name__ for cls in SUPPORTED_SCHEDULERS} == set(SCHEDULERS)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_unfreeze_at_epoch_extends_every_scheduler_to_the_new_group(tmp_path, name: str) -> None:
    model = Scheduled(name)
    before = snapshot(model, "backbone.")
    lrs: list[list[float]] = []
    record = LambdaCallback(
        on_train_batch_end=lambda t, *_: lrs.append([g["lr"] for g in t.optimizers[0].param_groups])
    )
    t = _fit(model, tmp_path, [FreezeBackbone(unfreeze_at_epoch=1, unfreeze_lr_scale=SCALE), record])
    assert len(t.optimizers[0].param_groups) == 2
    assert "backbone.0.weight" in changed_keys(before, model)
    after = [pair for pair in lrs if len(pair) == 2]
    assert len(after) == STEPS * (EPOCHS - 1)
    # the new group follows the first group's schedule at SCALE x its learning rate, step by step
    assert [b for _, b in after] == pytest.approx([SCALE * a for a, _ in after], rel=1e-9)
    assert len({pair[0] for pair in lrs}) > 1  # the schedule did move the learning rate


def test_an_optimizer_over_all_parameters_gets_them_moved_to_the_new_group(tmp_path) -> None:
    model = Scheduled("StepLR", all_parameters=True)
    backbone = {id(p) for p in model.backbone.parameters()}
    t = _fit(model, tmp_path, [FreezeBackbone(unfreeze_at_epoch=1, unfreeze_lr_scale=SCALE)])
    first, new = t.optimizers[0].param_groups
    assert not backbone & {id(p) for p in first["params"]}
    assert {id(p) for p in new["params"]} == backbone
    assert new["lr"] == pytest.approx(SCALE * first["lr"])


def test_an_unknown_scheduler_is_refused_at_fit_start_naming_the_supported_ones(tmp_path) -> None:
    class Halving(S.LRScheduler):
        def get_lr(self) -> list[float]:
            return [group["lr"] * 0.5 for group in self.optimizer.param_groups]

    class Custom(TinyNet):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            return {"optimizer": optimizer, "lr_scheduler": Halving(optimizer)}

    model = Custom()
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"FreezeBackbone\(unfreeze_at_epoch=1\) cannot extend the learning-rate scheduler Halving to "
        r"the new param group: .* Supported schedulers: LambdaLR, MultiplicativeLR, StepLR, .*OneCycleLR",
    ):
        _fit(model, tmp_path, [FreezeBackbone(unfreeze_at_epoch=1)])
    assert changed_keys(before, model) == []  # refused before any step


def test_learning_rate_monitor_logs_the_new_group(tmp_path) -> None:
    monitor = LearningRateMonitor(logging_interval="step")
    _fit(
        Scheduled("StepLR"),
        tmp_path,
        [FreezeBackbone(unfreeze_at_epoch=1, unfreeze_lr_scale=SCALE), monitor],
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    assert set(monitor.lrs) == {"lr-SGD/pg1", "lr-SGD/pg2"}
    assert len(monitor.lrs["lr-SGD/pg2"]) == STEPS * (EPOCHS - 1)
    assert monitor.lrs["lr-SGD/pg2"] == pytest.approx([SCALE * lr for lr in monitor.lrs["lr-SGD/pg1"][-8:]])
