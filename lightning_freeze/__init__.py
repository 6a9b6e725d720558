"""lightning_freeze: staged, frozen-backbone training for PyTorch Lightning, bitwise frozen by construction.

The Lightning-facing names are imported lazily, so ``import lightning_freeze.core`` (pure PyTorch)
does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_freeze.core.errors import FrozenStateError

__version__ = "0.1.0.dev0"

_LAZY = {
    "FreezeBackbone": "lightning_freeze.callbacks.freeze_backbone",
}

__all__ = ["FreezeBackbone", "FrozenStateError", "__version__"]  # keep in sync with _LAZY

if TYPE_CHECKING:
    from lightning_freeze.callbacks.freeze_backbone import FreezeBackbone


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_freeze' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
