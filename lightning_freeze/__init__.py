"""lightning_freeze: staged, frozen-backbone training for PyTorch Lightning, bitwise frozen by construction.

Every public name is imported on first use, so ``import lightning_freeze`` imports neither torch nor
Lightning, ``import lightning_freeze.core`` (pure PyTorch) does not import Lightning, and nothing here
imports the training app's Hydra/OmegaConf/joblib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_freeze import _lazy

# The one place the version is written: pyproject.toml reads it with
# `[tool.setuptools.dynamic] version = {attr = ...}` (a literal, so the build does not import the package).
__version__ = "0.1.0.dev0"

# public name -> module that defines it
_LAZY = {
    "FeatureCache": "lightning_freeze.callbacks.feature_cache",
    "FreezeBackbone": "lightning_freeze.callbacks.freeze_backbone",
    "FrozenSafeEMA": "lightning_freeze.callbacks.frozen_safe_ema",
    "FrozenStateError": "lightning_freeze.core.errors",
    "load_ema_weights": "lightning_freeze.callbacks.frozen_safe_ema",
    "MultiBranchModule": "lightning_freeze.module",
    "UnfreezePhase": "lightning_freeze.core.unfreeze_schedule",
    "UnfreezeSchedule": "lightning_freeze.core.unfreeze_schedule",
}

# the same names as _LAZY, plus __version__ (tests/test_packaging.py checks this)
__all__ = [
    "FeatureCache",
    "FreezeBackbone",
    "FrozenSafeEMA",
    "FrozenStateError",
    "MultiBranchModule",
    "UnfreezePhase",
    "UnfreezeSchedule",
    "__version__",
    "load_ema_weights",
]

if TYPE_CHECKING:
    from lightning_freeze.callbacks.feature_cache import FeatureCache
    from lightning_freeze.callbacks.freeze_backbone import FreezeBackbone
    from lightning_freeze.callbacks.frozen_safe_ema import FrozenSafeEMA, load_ema_weights
    from lightning_freeze.core.errors import FrozenStateError
    from lightning_freeze.core.unfreeze_schedule import UnfreezePhase, UnfreezeSchedule
    from lightning_freeze.module import MultiBranchModule


__getattr__, __dir__ = _lazy.lazy_attributes(globals(), _LAZY)
