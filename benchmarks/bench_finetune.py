"""Fine-tuning strategies on the bundled digits: head only, one-shot unfreeze, gradual + layer-wise lr.

Pretrain a TinyCNN backbone with a "digit" head on half A, then train a new head on half B for
another label (``--task``, default ``mod3``), from that backbone, with:

* ``head_only``: ``FreezeBackbone("backbone")`` (the backbone never trains);
* ``one_shot``: ``FreezeBackbone(unfreeze_at_epoch=K, unfreeze_lr_scale=0.1)``;
* ``gradual``: ``FreezeBackbone(schedule=UnfreezeSchedule.gradual(first_epoch=K, lr_scale=0.1,
  layer_decay=0.5))`` (one block per epoch from epoch K, head side first);
* ``lightning_bf``: Lightning's ``BackboneFinetuning(unfreeze_backbone_at_epoch=K,
  backbone_initial_ratio_lr=0.1, lambda_func=lambda e: 1.0)``: the one-shot recipe, as close as it
  can express it (it also ramps lr with ``lambda_func``; here held constant).

Three seeds each (the head's init and the data order); test accuracy of the new head and wall
time of the fine-tuning fit. Run by hand:  python benchmarks/bench_finetune.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn

from lightning_freeze import FreezeBackbone, MultiBranchModule, UnfreezeSchedule
from lightning_freeze.data import DigitsDataModule
from lightning_freeze.models import tiny_cnn

warnings.filterwarnings("ignore")


def _trainer(epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def pretrain(epochs: int, width: int) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    backbone = tiny_cnn(in_channels=1, width=width)
    model = MultiBranchModule(backbone, {"digit": nn.Linear(backbone.out_features, 10)})
    _trainer(epochs, []).fit(model, datamodule=DigitsDataModule(task="digit", half="A"))
    return copy.deepcopy(model.backbone.state_dict())


def finetune(strategy: str, seed: int, weights: dict, task: str, epochs: int, at: int, width: int):
    L.seed_everything(seed, verbose=False)
    backbone = tiny_cnn(in_channels=1, width=width)
    backbone.load_state_dict(weights)
    classes = {"digit": 10, "parity": 2, "mod3": 3, "high": 2}[task]
    model = MultiBranchModule(backbone, {"new": nn.Linear(backbone.out_features, classes)})
    callbacks = {
        "head_only": lambda: [FreezeBackbone("backbone")],
        "one_shot": lambda: [FreezeBackbone("backbone", unfreeze_at_epoch=at, unfreeze_lr_scale=0.1)],
        "gradual": lambda: [
            FreezeBackbone(
                "backbone",
                schedule=UnfreezeSchedule.gradual(
                    "backbone", every_n_epochs=1, first_epoch=at, lr_scale=0.1, layer_decay=0.5
                ),
            )
        ],
        "lightning_bf": lambda: [
            BackboneFinetuning(
                unfreeze_backbone_at_epoch=at, backbone_initial_ratio_lr=0.1, lambda_func=lambda e: 1.0
            )
        ],
    }[strategy]()
    data = DigitsDataModule(task=task, half="B")
    trainer = _trainer(epochs, callbacks)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - start
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    return result["new/test_acc"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--task", default="mod3")
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--unfreeze-at", type=int, default=2)
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    weights = pretrain(args.pretrain_epochs, args.width)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, lightning "
          f"{L.__version__}, load average {os.getloadavg()[0]:.1f}; task {args.task} on half B, "
          f"{args.epochs} epochs, unfreeze from epoch {args.unfreeze_at}, seeds {args.seeds}")  # fmt: skip
    print("| strategy | test accuracy (mean ± sd) | per seed | fit wall time (s, mean) |")
    print("|---|---|---|---|")
    for strategy in ("head_only", "one_shot", "gradual", "lightning_bf"):
        runs = [
            finetune(strategy, s, weights, args.task, args.epochs, args.unfreeze_at, args.width)
            for s in args.seeds
        ]
        accs, walls = [a for a, _ in runs], [w for _, w in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(
            f"| {strategy} | {statistics.mean(accs):.3f} ± {sd:.3f} | "
            f"{', '.join(f'{a:.3f}' for a in accs)} | {statistics.mean(walls):.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
