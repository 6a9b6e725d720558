"""The one ``L.Trainer`` factory of the tests: CPU, one device, nothing written but what a test asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


def cpu_trainer(root: str | Path, *, max_epochs: int = 3, **kwargs: Any) -> L.Trainer:
    """A quiet single-process CPU trainer rooted at ``root``.

    No logger, no checkpointing, no progress bar or model summary; ``kwargs`` override any of it
    (``callbacks=[...]``, ``enable_checkpointing=True``, ``num_sanity_val_steps=0``, ...).

    Args:
        root: ``default_root_dir``.
        max_epochs: epochs to fit. Default 3.
        **kwargs: any other ``L.Trainer`` argument.
    """
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
    }
    settings.update(kwargs)
    return L.Trainer(**settings)
