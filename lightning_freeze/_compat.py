"""The one module that reaches private names of Lightning and torch.

Everything else in the package uses public APIs only. Each function here wraps one private use that
has no public route, names what it wraps, and is tested in ``tests/test_compat_*.py`` so that a
Lightning or torch release that changes the internal fails loudly, naming the version.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

# --- packed ---
# lightning_freeze.packing: a packed sweep's per-job checkpoints and which ModelCheckpoints it can honour


def model_checkpoint_every_n_train_steps(callback: Any) -> int:
    """``ModelCheckpoint(every_n_train_steps=...)``; wraps ``ModelCheckpoint._every_n_train_steps``."""
    return int(callback._every_n_train_steps or 0)


def model_checkpoint_train_time_interval(callback: Any) -> timedelta | None:
    """``ModelCheckpoint(train_time_interval=...)``; wraps ``ModelCheckpoint._train_time_interval``."""
    return callback._train_time_interval


def model_checkpoint_saves_on_train_epoch_end(callback: Any, trainer: Any) -> bool:
    """Whether ``callback`` saves at the train epoch end (``True``) or at validation end.

    Wraps ``ModelCheckpoint._should_save_on_train_epoch_end(trainer)``.
    """
    return bool(callback._should_save_on_train_epoch_end(trainer))


def attach_datamodule(trainer: Any, model: Any, datamodule: Any) -> None:
    """Attach ``datamodule`` to ``trainer`` as ``Trainer.fit(model, datamodule=...)`` does, without fitting.

    Its checkpoints then carry the datamodule's hyper-parameters and state. Wraps
    ``trainer._data_connector.attach_data(model, datamodule=...)``.
    """
    trainer._data_connector.attach_data(model, datamodule=datamodule)
