"""2-process CPU DDP fit with FeatureCache(store="disk") (run by tests/test_feature_cache_ddp.py).

Usage: python feature_cache_ddp.py OUT_DIR {cached,plain,skip}
The sampler shuffles, so each rank gets other samples every epoch: with a shared disk store every
rank hits what the other computed; "skip" adds skip_pipeline=True (epochs 2-3 load no sample).
Writes OUT_DIR/<mode>/rank{R}.pt: the state_dict and, per train epoch, this rank's (hits, misses)
of training samples.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.freeze import TinyNet, make_data

from lightning_freeze import FeatureCache, FreezeBackbone


class EpochHits(L.Callback):
    """(hits, misses) of the training batches of each epoch (validation excluded)."""

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache
        self.epochs: list[tuple[int, int]] = []

    def _now(self) -> tuple[int, int]:
        return self.cache.caches["backbone"].stats["hits"], self.cache.caches["backbone"].stats["misses"]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.epochs.append((0, 0))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = self._now()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int
    ) -> None:
        hits, misses = self._now()
        h, m = self.epochs[-1]
        self.epochs[-1] = (h + hits - self._start[0], m + misses - self._start[1])


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = TinyNet()
    callbacks: list[Any] = [FreezeBackbone("backbone")]
    if mode in ("cached", "skip"):
        cache = FeatureCache("backbone", store="disk", directory=out / "cache", skip_pipeline=mode == "skip")
        callbacks += [cache, EpochHits(cache)]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=4,
        deterministic=True,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    trainer.fit(
        model,
        DataLoader(make_data(64, 0), batch_size=8, shuffle=True),
        DataLoader(make_data(32, 1), batch_size=8),
    )
    result: dict[str, Any] = {"state_dict": model.state_dict()}
    if mode in ("cached", "skip"):
        result["skipped_epochs"] = cache.stats["skipped_epochs"]
        result["epochs"] = torch.tensor(callbacks[-1].epochs)
        result["bytes"] = cache.stats["bytes"]
    (out / mode).mkdir(exist_ok=True)
    torch.save(result, out / mode / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
