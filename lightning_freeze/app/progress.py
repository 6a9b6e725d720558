"""One log line per training epoch: progress that reaches ``train.log`` and parallel jobs' consoles."""

from __future__ import annotations

import logging
import time

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["EpochProgress"]

log = logging.getLogger(__name__)


class EpochProgress(Callback):
    """Logs ``stage S, branch B: epoch E/N train_loss .. val_loss .. val_acc .. (T s)`` after each epoch.

    A progress bar is for one job on a terminal; this line is for the log file and for jobs that run
    side by side (a joblib multirun), where each line names its branch. Rank 0 only.

    Args:
        stage: the stage number.
        branch: the trained branch (its metrics are ``<branch>/train_loss``, ``<branch>/val_acc``, ...).
    """

    def __init__(self, stage: int, branch: str) -> None:
        self.stage = stage
        self.branch = branch
        self._started = time.perf_counter()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        values = {
            n: trainer.callback_metrics.get(f"{self.branch}/{n}")
            for n in ("train_loss", "val_loss", "val_acc")
        }
        shown = [f"{n} {float(v):.4f}" for n, v in values.items() if v is not None]
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else "?"
        log.info(
            "stage %d, branch %s: epoch %d/%s %s (%.1f s)",
            self.stage,
            self.branch,
            trainer.current_epoch + 1,
            epochs,
            " ".join(shown),
            time.perf_counter() - self._started,
        )
