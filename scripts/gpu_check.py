"""bf16-mixed fit on CUDA with FreezeBackbone, FrozenSafeEMA and MultiBranchModule; checks bitwise frozen."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_freeze import FreezeBackbone, FrozenSafeEMA, MultiBranchModule
from lightning_freeze.core import diff_fingerprints, fingerprint


def main() -> None:
    assert torch.cuda.is_available(), "run scripts/gpu_check.sh: it says 'no CUDA' instead of failing"
    L.seed_everything(0, verbose=False)
    backbone = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    model = MultiBranchModule(backbone, {"a": nn.Linear(32, 4), "b": nn.Linear(32, 3)}, active_branch="b")
    x = torch.randn(512, 3, 16, 16)
    data = DataLoader(TensorDataset(x, torch.randint(0, 3, (512,))), batch_size=64, shuffle=True)
    frozen_keys = [k for k in model.state_dict() if not k.startswith("branches.b.")]
    before = fingerprint(model, frozen_keys)
    freeze, ema = FreezeBackbone("backbone"), FrozenSafeEMA(decay=0.99)
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        precision="bf16-mixed",
        max_epochs=3,
        callbacks=[freeze, ema],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, data, data)
    diff = diff_fingerprints(before, fingerprint(model, frozen_keys))
    print(f"device: {next(model.parameters()).device}, precision: {trainer.precision}")
    print(f"FreezeBackbone: {freeze.last_check.summary()}")
    print(f"independent check of backbone + branch a: {diff.summary()}")
    if diff or freeze.last_check.changed:
        raise SystemExit("FAILED: a frozen tensor changed on CUDA")
    print("GPU check passed")


if __name__ == "__main__":
    main()
