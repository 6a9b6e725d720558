"""Lightning callbacks, one per file, thin adapters over :mod:`lightning_freeze.core`.

Each name is imported on first use: importing one callback's module does not import the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_freeze import _lazy

# public name -> module that defines it
_LAZY = {
    "FeatureCache": "lightning_freeze.callbacks.feature_cache",
    "FreezeBackbone": "lightning_freeze.callbacks.freeze_backbone",
    "FrozenSafeEMA": "lightning_freeze.callbacks.frozen_safe_ema",
    "load_ema_weights": "lightning_freeze.callbacks.frozen_safe_ema",
}

# the same names as _LAZY (tests/test_packaging.py checks this)
__all__ = ["FeatureCache", "FreezeBackbone", "FrozenSafeEMA", "load_ema_weights"]

if TYPE_CHECKING:
    from lightning_freeze.callbacks.feature_cache import FeatureCache
    from lightning_freeze.callbacks.freeze_backbone import FreezeBackbone
    from lightning_freeze.callbacks.frozen_safe_ema import FrozenSafeEMA, load_ema_weights


__getattr__, __dir__ = _lazy.lazy_attributes(globals(), _LAZY)
