"""One rank's tensor corrupted on purpose under 2-process CPU DDP (run by tests/test_freeze_backbone_ddp.py).

Usage: python ranks_ddp.py OUT_DIR
One launch, two fits in the same two processes:

* ``freeze``: rank 1 changes a frozen weight after DDP wrapped the model and before FreezeBackbone
  fingerprints it, so rank 1's own check passes: only the cross-rank comparison can see it;
* ``ema``: rank 1 changes its EMA shadow of a trainable weight after the last update of epoch 0;
  FrozenSafeEMA(check_ranks=True) compares the shadows at the epoch end.

Writes OUT_DIR/rank{R}.pt: for each fit, the error type, message, ``changed`` and ``causes`` (or None).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.freeze import TinyNet, loaders

from lightning_freeze import FreezeBackbone, FrozenSafeEMA


class CorruptFrozen(Callback):
    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.backbone[0].weight[0, 0, 0, 0] += 1e-3


class CorruptShadow(Callback):
    def __init__(self, ema: FrozenSafeEMA) -> None:
        self.ema = ema

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int
    ) -> None:
        if trainer.global_rank == 1 and i == 1:  # the last batch of an epoch (32 samples per rank / 16)
            self.ema.ema.shadow["head.0.weight"][0, 0] += 1e-6


def fit(out: Path, callbacks: list[Callback]) -> dict[str, Any] | None:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    train, val = loaders()
    try:
        trainer.fit(TinyNet(), train, val)
    except Exception as err:
        return {
            "type": type(err).__name__,
            "message": str(err),
            "changed": list(getattr(err, "changed", [])),
            "causes": dict(getattr(err, "causes", {})),
            "epoch": trainer.current_epoch,
        }
    return None


def main(out: Path) -> None:
    torch.set_num_threads(1)
    result = {"freeze": fit(out, [CorruptFrozen(), FreezeBackbone("backbone")])}
    ema = FrozenSafeEMA(decay=0.9, check_ranks=True)
    result["ema"] = fit(out, [FreezeBackbone("backbone"), ema, CorruptShadow(ema)])
    rank = torch.distributed.get_rank()
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
