"""What FreezeBackbone's output probe costs in an all-hit FeatureCache epoch, side by side in one run.

A frozen torchvision ResNet-18 + linear head, 256 images of 3x64x64, batch 32, shuffled,
``FeatureCache(store="memory")``: the later (all-hit) epochs timed with the probe skipped at epoch
ends where nothing changed (the default) and with the probe forced at every epoch end (what it did
before), in interleaved rounds. Each epoch's time includes FreezeBackbone's epoch-end check.

Run by hand:  python benchmarks/bench_probe_cost.py [--rounds 2] [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_freeze import FeatureCache, FreezeBackbone


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torchvision.models.resnet18(num_classes=10)
        self.backbone.fc = nn.Identity()
        self.head = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.01)


class ProbeEveryEpoch(FreezeBackbone):
    """The behaviour before: the probe (a forward) at every train epoch end."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(pl_module, trainer, probe="always")


class EpochTimer(Callback):
    """Last in the callback list: its epoch end comes after FreezeBackbone's check."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times.append(time.perf_counter() - self.start)


def later_epochs(freeze: FreezeBackbone, epochs: int) -> list[float]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 3, 64, 64, generator=g), torch.randint(0, 10, (256,), generator=g))
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[freeze, FeatureCache(), timer],
    )
    trainer.fit(Net(), DataLoader(data, batch_size=32, shuffle=True))
    return timer.times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"probe when changed (default)": [], "probe every epoch (before)": []}
    for _ in range(args.rounds):
        results["probe every epoch (before)"] += later_epochs(ProbeEveryEpoch(), args.epochs)
        results["probe when changed (default)"] += later_epochs(FreezeBackbone(), args.epochs)
    print(
        f"load average {os.getloadavg()[0]:.1f} (1 min), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    for name, times in results.items():
        print(f"{name:32s} all-hit epoch median {statistics.median(times):.3f} s  ({len(times)} epochs)")


if __name__ == "__main__":
    main()
