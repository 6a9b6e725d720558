"""Tiny models and data shared by the FreezeBackbone tests."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.trainer import cpu_trainer

WIDTH = 8  # the head's BatchNorm has the same width as the backbone's: detection must not use widths


def make_backbone() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, WIDTH, 3, padding=1),
        nn.BatchNorm2d(WIDTH),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Conv2d(WIDTH, WIDTH, 3, padding=1),
        nn.BatchNorm2d(WIDTH),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class TinyNet(L.LightningModule):
    """Backbone (conv + BatchNorm + dropout) and a head with a BatchNorm1d of the same width."""

    def __init__(
        self, lr: float = 0.05, train_in_step: bool = False, train_at_epoch_start: bool = False
    ) -> None:
        super().__init__()
        self.backbone = make_backbone()
        self.head = nn.Sequential(
            nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(), nn.Linear(WIDTH, 3)
        )
        self.lr = lr
        self.train_in_step = train_in_step
        self.train_at_epoch_start = train_at_epoch_start
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def on_train_epoch_start(self) -> None:
        if self.train_at_epoch_start:
            self.train()  # user code that re-enables train mode everywhere

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.train_in_step:
            self.train()  # runs after every batch-start hook: only a per-forward guard holds here
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


def make_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0].mean(dim=(1, 2)) > 0.2).long()
    return TensorDataset(x, y)


def loaders(batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(make_data(64, 0), batch_size=batch_size, shuffle=True),
        DataLoader(make_data(32, 1), batch_size=batch_size),
    )


def snapshot(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer whose key starts with ``prefix``."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith(prefix)}


def changed_keys(before: dict[str, torch.Tensor], module: nn.Module) -> list[str]:
    after = module.state_dict()
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


#: the CPU trainer of these tests: 3 epochs by default
trainer = cpu_trainer
