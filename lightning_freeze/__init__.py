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
    "FeatureCache": "lightning_freeze.callbacks.feature_cache",
    "FreezeBackbone": "lightning_freeze.callbacks.freeze_backbone",
    "FrozenSafeEMA": "lightning_freeze.callbacks.frozen_safe_ema",
    "load_ema_weights": "lightning_freeze.callbacks.frozen_safe_ema",
    "MultiBranchModule": "lightning_freeze.module",
}

# keep in sync with _LAZY
__all__ = [
    "FeatureCache",
    "FreezeBackbone",
    "FrozenSafeEMA",
    "FrozenStateError",
    "MultiBranchModule",
    "__version__",
    "load_ema_weights",
]

if TYPE_CHECKING:
    from lightning_freeze.callbacks.feature_cache import FeatureCache
    from lightning_freeze.callbacks.freeze_backbone import FreezeBackbone
    from lightning_freeze.callbacks.frozen_safe_ema import FrozenSafeEMA, load_ema_weights
    from lightning_freeze.module import MultiBranchModule


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_freeze' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
