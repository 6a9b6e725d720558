"""2-process CPU DDP fit with FreezeBackbone and FrozenSafeEMA (run by tests/test_freeze_ema_ddp.py).

Usage: python freeze_ema_ddp.py OUT_DIR
Writes OUT_DIR/start.pt (rank 0, before fit) and OUT_DIR/rank{R}.pt (each rank, after fit).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.freeze import TinyNet, loaders

from lightning_freeze import FreezeBackbone, FrozenSafeEMA


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = TinyNet(train_in_step=True)  # calls self.train() inside every training_step
    freeze = FreezeBackbone("backbone")
    ema = FrozenSafeEMA(decay=0.9, check_ranks=True)  # the shadows are compared at every epoch end
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",  # find_unused_parameters stays False: DDP never sees the frozen parameters
        max_epochs=2,
        callbacks=[ema, freeze],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), out / "start.pt")
    train, val = loaders()
    trainer.fit(model, train, val)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "find_unused_parameters": trainer.strategy._ddp_kwargs.get("find_unused_parameters", False),
            "summary": freeze.last_check.summary(),
            "shadow": {k: v.clone() for k, v in ema.ema.shadow.items()},
            "num_updates": ema.num_updates,
            "world_size": trainer.world_size,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
