"""Three packed branches under 2-process CPU DDP (run by tests/test_packed_ddp.py).

Usage: python packed_ddp.py OUT_DIR
Trains variants "v0", "v1", "v2" (one lr each) of a linear head together with FreezeBackbone (backbone
and branch "a" frozen) under strategy="ddp" without find_unused_parameters, then variant "v1" alone
the same way; writes OUT_DIR/rank{R}.pt.
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.multibranch import WIDTH, loader, make_backbone

from lightning_freeze import FreezeBackbone, MultiBranchModule

LRS = {"v0": 0.001, "v1": 0.02, "v2": 0.1}


def _fit(model: MultiBranchModule, out: Path) -> L.Trainer:
    L.seed_everything(1, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",  # find_unused_parameters=False: every trained branch gets a gradient every step
        max_epochs=2,
        callbacks=[FreezeBackbone()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        deterministic=True,
    )
    trainer.fit(model, loader("a"), loader("a", n=32, seed=1, shuffle=False))
    return trainer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone = make_backbone()
    heads = {name: nn.Linear(WIDTH, 3) for name in ("a", *LRS)}
    initial = {k: v.clone() for k, v in MultiBranchModule(backbone, heads).state_dict().items()}
    packed = MultiBranchModule(
        copy.deepcopy(backbone),
        copy.deepcopy(heads),
        train_branches=list(LRS),
        branch_optimizers={name: {"lr": lr} for name, lr in LRS.items()},
    )
    trainer = _fit(packed, out)
    solo = MultiBranchModule(
        copy.deepcopy(backbone),
        {"v1": copy.deepcopy(heads["v1"])},
        optimizer=functools.partial(torch.optim.AdamW, lr=LRS["v1"]),
    )
    _fit(solo, out)
    torch.save(
        {
            "initial": initial,
            "state_dict": packed.state_dict(),
            "solo_v1": solo.state_dict(),
            "find_unused_parameters": trainer.strategy._ddp_kwargs.get("find_unused_parameters", False),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
