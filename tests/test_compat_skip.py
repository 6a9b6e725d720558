"""The Lightning internal that ``skip_pipeline`` reaches through ``lightning_freeze._compat`` (skip)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from helpers.freeze import TinyNet, make_data
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from lightning_freeze._compat import fit_loop_combined_loader

VERSION = f"Lightning {L.__version__}, torch {torch.__version__}"


class Swap(L.Callback):
    """At epoch 1 start, replaces what the fit loop iterates through the CombinedLoader's ``flattened``."""

    def __init__(self, other: DataLoader) -> None:
        self.other = other
        self.seen: list[Any] = []
        self.sizes: dict[int, list[int]] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        combined = fit_loop_combined_loader(trainer)
        self.seen.append((combined, list(combined.flattened)))
        if trainer.current_epoch == 1:
            combined.flattened = [self.other]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.sizes.setdefault(trainer.current_epoch, []).append(len(batch[0]))


def test_fit_loop_combined_loader_is_what_the_epoch_iterates() -> None:
    loader, other = DataLoader(make_data(32), batch_size=8), DataLoader(make_data(12), batch_size=4)
    swap = Swap(other)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        callbacks=[swap],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(TinyNet(), loader)
    first, flattened = swap.seen[0]
    assert isinstance(first, CombinedLoader), (
        f"{VERSION}: trainer.fit_loop._combined_loader is {type(first).__name__}, not a CombinedLoader; "
        "update lightning_freeze._compat.fit_loop_combined_loader"
    )
    assert flattened == [loader], f"{VERSION}: the fit loop's CombinedLoader no longer holds the loader"
    assert swap.sizes == {0: [8] * 4, 1: [4] * 3}, (
        f"{VERSION}: setting CombinedLoader.flattened in on_train_epoch_start no longer changes what the "
        f"epoch iterates ({swap.sizes}); skip_pipeline needs another route"
    )
