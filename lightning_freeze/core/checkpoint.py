"""Read, compare and merge checkpoints (pure PyTorch): the names of the modules that do each job.

Kept so that ``from lightning_freeze.core.checkpoint import ...`` keeps working; each job has its own
module:

- :mod:`lightning_freeze.core.checkpoint_io`: reading (integrity check, safe loading, mmap) and
  atomic writing;
- :mod:`lightning_freeze.core.bits`: bitwise equality and ulp distance;
- :mod:`lightning_freeze.core.state_diff`: state-dict diffing in bounded memory;
- :mod:`lightning_freeze.core.merge`: merging branch checkpoints;
- :mod:`lightning_freeze.core.keys`: the checkpoint key names of ``MultiBranchModule`` and
  ``FrozenSafeEMA``.
"""

from __future__ import annotations

from lightning_freeze.core.bits import tensors_bitwise_equal, ulp_distance
from lightning_freeze.core.checkpoint_io import (
    CheckpointError,
    CheckpointMismatchError,
    checkpoint_state_dict,
    ema_state_dict,
    load_checkpoint,
    save_checkpoint_atomic,
)
from lightning_freeze.core.keys import BRANCH_PREFIX, EMA_STATE_PREFIX, branch_names_in
from lightning_freeze.core.merge import MergeError, MergeResult, merge_checkpoints
from lightning_freeze.core.state_diff import StateDictDiff, TensorDiff, diff_state_dicts, select_keys

__all__ = [
    "BRANCH_PREFIX",
    "EMA_STATE_PREFIX",
    "CheckpointError",
    "CheckpointMismatchError",
    "MergeError",
    "MergeResult",
    "StateDictDiff",
    "TensorDiff",
    "branch_names_in",
    "checkpoint_state_dict",
    "diff_state_dicts",
    "ema_state_dict",
    "load_checkpoint",
    "merge_checkpoints",
    "save_checkpoint_atomic",
    "select_keys",
    "tensors_bitwise_equal",
    "ulp_distance",
]
