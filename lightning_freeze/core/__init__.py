"""Pure PyTorch building blocks (no Lightning import): usable from a plain training loop."""

from lightning_freeze.core.ema import TrainableEMA, effective_decay, trainable_tensors
from lightning_freeze.core.errors import FrozenStateError, ModuleSelectionError
from lightning_freeze.core.feature_cache import OutputCache, UncacheableModuleError
from lightning_freeze.core.fingerprint import (
    FingerprintDiff,
    TensorFingerprint,
    diff_fingerprints,
    fingerprint,
    tensor_fingerprint,
)
from lightning_freeze.core.freeze import FrozenModules, freeze, frozen_tensor_keys, unfreeze
from lightning_freeze.core.norm import (
    FrozenBatchNorm,
    FrozenInstanceNorm,
    convert_from_frozen_norm,
    convert_to_frozen_norm,
    find_running_stat_norms,
    is_running_stat_norm,
    pin_eval,
    unpin_eval,
)
from lightning_freeze.core.selection import resolve_modules
from lightning_freeze.core.verifier import FrozenVerifier

__all__ = [
    "FingerprintDiff",
    "FrozenBatchNorm",
    "FrozenInstanceNorm",
    "FrozenModules",
    "FrozenStateError",
    "FrozenVerifier",
    "ModuleSelectionError",
    "OutputCache",
    "TensorFingerprint",
    "TrainableEMA",
    "UncacheableModuleError",
    "convert_from_frozen_norm",
    "convert_to_frozen_norm",
    "diff_fingerprints",
    "effective_decay",
    "find_running_stat_norms",
    "fingerprint",
    "freeze",
    "frozen_tensor_keys",
    "is_running_stat_norm",
    "pin_eval",
    "resolve_modules",
    "tensor_fingerprint",
    "trainable_tensors",
    "unfreeze",
    "unpin_eval",
]
