"""Tiny multi-branch models, data and stage runners shared by the MultiBranchModule/CLI tests."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.trainer import cpu_trainer
from lightning_freeze import FreezeBackbone, MultiBranchModule

IN_FEATURES = 6
WIDTH = 16
CLASSES = {"a": 3, "b": 2, "c": 4, "d": 5}


def make_backbone() -> nn.Sequential:
    """MLP with BatchNorm and dropout: both change outputs/buffers unless really frozen."""
    return nn.Sequential(
        nn.Linear(IN_FEATURES, WIDTH),
        nn.BatchNorm1d(WIDTH),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
    )


def make_branch(name: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(), nn.Linear(WIDTH, CLASSES[name])
    )


def make_module(names: list[str], active: str | None = None, **kwargs) -> MultiBranchModule:
    return MultiBranchModule(
        make_backbone(), {n: make_branch(n) for n in names}, active_branch=active, **kwargs
    )


def make_data(branch: str, n: int = 96, seed: int = 0) -> TensorDataset:
    """Learnable synthetic labels: a fixed linear rule per branch; ``seed`` draws the inputs."""
    rule = torch.Generator().manual_seed(100 + sorted(CLASSES).index(branch))
    w = torch.randn(IN_FEATURES, CLASSES[branch], generator=rule)
    x = torch.randn(n, IN_FEATURES, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x @ w).argmax(dim=1))


def loader(branch: str, n: int = 96, seed: int = 0, shuffle: bool = True) -> DataLoader:
    return DataLoader(make_data(branch, n, seed), batch_size=16, shuffle=shuffle)


def fixed_batch(n: int = 32) -> torch.Tensor:
    return torch.randn(n, IN_FEATURES, generator=torch.Generator().manual_seed(1234))


def trainer(root: Path, **kwargs) -> L.Trainer:
    """:func:`~helpers.trainer.cpu_trainer` with 2 epochs and no sanity validation by default."""
    return cpu_trainer(root, **{"max_epochs": 2, "num_sanity_val_steps": 0, **kwargs})


@torch.no_grad()
def outputs(model: MultiBranchModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    return model.forward_all(x)


def run_stage1(root: Path, optimizer=None) -> Path:
    """Backbone + branch "a", trained on data a; returns the checkpoint path."""
    torch.manual_seed(0)
    model = make_module(["a"], optimizer=optimizer or functools.partial(torch.optim.AdamW, lr=0.02))
    fit = trainer(root / "stage1", max_epochs=3)
    fit.fit(model, loader("a"), loader("a", n=32, seed=1, shuffle=False))
    path = root / "stage1.ckpt"
    fit.save_checkpoint(path)
    return path


@dataclass
class Stage:
    model: MultiBranchModule
    path: Path
    initial_state: dict[str, torch.Tensor]  # right after init_from_checkpoint, before fit
    initial_val_loss: float
    val_loss: float


def val_loss(model: MultiBranchModule, branch: str, n: int = 32, seed: int = 1) -> float:
    """Mean cross-entropy of ``branch`` on held-out data, in eval mode (mode restored after)."""
    data = make_data(branch, n, seed)
    mode = model.training
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(data.tensors[0], branch=branch), data.tensors[1])
    model.train(mode)
    return float(loss)


def run_stage2(root: Path, stage1: Path, new: str, seed: int = 1, **fit_kwargs) -> Stage:
    """Stage 2: branches "a" + ``new`` (active) from the stage-1 checkpoint, trained with FreezeBackbone."""
    torch.manual_seed(seed)
    model = make_module(["a", new], active=new, optimizer=functools.partial(torch.optim.AdamW, lr=0.02))
    assert model.init_from_checkpoint(stage1) == [new]
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = val_loss(model, new)
    fit = trainer(root / f"stage2_{new}", callbacks=[FreezeBackbone()], max_epochs=3, **fit_kwargs)
    fit.fit(model, loader(new, seed=seed), loader(new, n=32, seed=1, shuffle=False))
    path = root / f"stage2_{new}.ckpt"
    fit.save_checkpoint(path)
    return Stage(model, path, initial, before, val_loss(model, new))
