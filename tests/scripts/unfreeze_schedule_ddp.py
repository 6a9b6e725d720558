"""A two-phase fine-tuning schedule under 2-process CPU DDP, straight and resumed.

Run by tests/test_unfreeze_ddp_finetune.py. Usage: python unfreeze_schedule_ddp.py OUT_DIR
One launch, three fits in the same two processes (the second Trainer finds the process group):

* ``straight``: 3 epochs, FreezeBackbone(schedule=...): phase 1 (backbone.4-8) at epoch 1, phase 2
  (backbone.0-3) when val_loss stalls or after one epoch (rank 0 decides, broadcast), a checkpoint
  after every epoch;
* ``resume_before``: from the checkpoint of epoch 0 (all frozen), right before phase 1;
* ``resume_after``: from the checkpoint of epoch 1 (phase 1 begun), right before phase 2.

Writes OUT_DIR/rank{R}.pt: for each fit, the parameters at every train epoch end, the number of
param groups, whether DDP's find_unused_parameters was on and the last check's summary; and the
parameters before the fit (``start``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.freeze import TinyNet, loaders

from lightning_freeze import FreezeBackbone, UnfreezePhase, UnfreezeSchedule


class Record(Callback):
    """Parameters at every train epoch end; the dropout RNG seeded per batch (resume-exact)."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(1000 * trainer.current_epoch + batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.epochs[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}


def fit(out: Path, name: str, ckpt_path: Path | None, checkpoints: bool) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    model = TinyNet()
    record = Record()
    schedule = UnfreezeSchedule(
        [
            UnfreezePhase(["backbone.4", "backbone.5"], epoch=1, lr_scale=0.5, warmup_steps=2),
            UnfreezePhase(["backbone.0", "backbone.1"], lr_scale=0.25),
        ],
        monitor="val_loss",
        patience=1,
        max_epochs_per_phase=1,
    )
    freeze = FreezeBackbone("backbone", schedule=schedule)
    callbacks: list[Callback] = [freeze, record]
    if checkpoints:
        callbacks.append(
            ModelCheckpoint(dirpath=out / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",  # find_unused_parameters stays False
        max_epochs=3,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=checkpoints,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out / name,
    )
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    train, val = loaders()
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return {
        "start": start,
        "epochs": record.epochs,
        "param_groups": len(trainer.optimizers[0].param_groups),
        "find_unused_parameters": trainer.strategy._ddp_kwargs.get("find_unused_parameters", False),
        "summary": freeze.last_check.summary(),
        "phases": [(e["phase"], e["epoch"]) for e in freeze.phases.timeline],
        "rank": trainer.global_rank,
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    result = {"straight": fit(out, "straight", None, checkpoints=True)}
    result["resume_before"] = fit(out, "resume_before", out / "ckpt" / "epoch=0.ckpt", checkpoints=False)
    result["resume_after"] = fit(out, "resume_after", out / "ckpt" / "epoch=1.ckpt", checkpoints=False)
    torch.save(result, out / f"rank{result['straight']['rank']}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
