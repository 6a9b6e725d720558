"""Stage 2 of a MultiBranchModule under 2-process CPU DDP (run by tests/test_module_ddp.py).

Usage: python module_ddp_stage2.py STAGE1_CKPT OUT_DIR
Trains branch "b" with FreezeBackbone (backbone and branch "a" frozen) under strategy="ddp" without
find_unused_parameters; writes OUT_DIR/rank{R}.pt (each rank, after fit) and OUT_DIR/stage2.ckpt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.multibranch import loader, make_module

from lightning_freeze import FreezeBackbone


def main(stage1: Path, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = make_module(["a", "b"], active="b")
    fresh = model.init_from_checkpoint(stage1)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    callback = FreezeBackbone()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",  # find_unused_parameters=False: only branch "b" requires grad, and only it runs
        max_epochs=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, loader("b"), loader("b", n=32, seed=1, shuffle=False))
    trainer.save_checkpoint(out / "stage2.ckpt")
    torch.save(
        {
            "fresh": fresh,
            "initial": initial,
            "state_dict": model.state_dict(),
            "find_unused_parameters": trainer.strategy._ddp_kwargs.get("find_unused_parameters", False),
            "summary": callback.last_check.summary(),
            "val_loss": float(trainer.callback_metrics["b/val_loss"]),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
