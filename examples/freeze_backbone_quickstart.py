"""Quick start: train a head on a frozen backbone and print the frozen-tensor check.

Runs on CPU in seconds, on synthetic data (no download). The user code below calls
``self.train()`` at every epoch start, the classic way a "frozen" BatchNorm starts moving again;
``FreezeBackbone`` keeps every backbone tensor bitwise identical anyway and says so.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_freeze import FreezeBackbone


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def on_train_epoch_start(self) -> None:
        self.train()  # the trap: this would put the backbone's BatchNorm back in train mode

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def main() -> None:
    L.seed_everything(0)
    x = torch.randn(512, 1, 8, 8)
    y = (x[:, :, :4].mean(dim=(1, 2, 3)) > x[:, :, 4:].mean(dim=(1, 2, 3))).long()
    model = Classifier()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    freeze = FreezeBackbone("backbone")
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", callbacks=[freeze], logger=False, enable_checkpointing=False
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))
    unchanged = all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())
    print(freeze.last_check.summary())
    print(f"backbone bitwise identical to before training: {unchanged}")


if __name__ == "__main__":
    main()
