"""Lightning callbacks, one per file, thin adapters over :mod:`lightning_freeze.core`."""

from lightning_freeze.callbacks.freeze_backbone import FreezeBackbone
from lightning_freeze.callbacks.frozen_safe_ema import FrozenSafeEMA, load_ema_weights

__all__ = ["FreezeBackbone", "FrozenSafeEMA", "load_ema_weights"]
