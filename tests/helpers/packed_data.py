"""A data-module factory outside the package's default ``_target_`` allow-list (``allow_targets`` tests)."""

from __future__ import annotations

from typing import Any

from lightning_freeze.data import DigitsDataModule


def digits(**kwargs: Any) -> DigitsDataModule:
    """``DigitsDataModule(**kwargs)``, reached through a target only ``allow_targets=[helpers]`` permits."""
    return DigitsDataModule(**kwargs)
