"""Checkpoint key names of :class:`~lightning_freeze.MultiBranchModule` and ``FrozenSafeEMA``, in one place.

Everything that reads or writes those names (merging, EMA weights, ``init_from_checkpoint``)
imports them from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "BRANCH_PREFIX",
    "EMA_STATE_PREFIX",
    "MULTI_BRANCH_KEY",
    "PER_BRANCH_HPARAMS",
    "branch_keys",
    "branch_names_in",
    "free_branch_name",
]

#: ``state_dict`` keys of a branch start with ``"branches.<name>."``
BRANCH_PREFIX = "branches."
#: callback state keys of :class:`~lightning_freeze.FrozenSafeEMA` start with this
EMA_STATE_PREFIX = "FrozenSafeEMA"
#: the checkpoint section where :class:`~lightning_freeze.MultiBranchModule` keeps its branch state
MULTI_BRANCH_KEY = "multi_branch"
#: hyper-parameters of ``MultiBranchModule`` keyed by branch name (merged as a union)
PER_BRANCH_HPARAMS = ("branches", "losses", "metrics", "num_classes")


def branch_names_in(state_dict: Iterable[str]) -> list[str]:
    """Branch names found in ``state_dict`` keys (``"branches.<name>.<...>"``), in order."""
    names: dict[str, None] = {}
    for key in state_dict:
        if key.startswith(BRANCH_PREFIX):
            names.setdefault(key[len(BRANCH_PREFIX) :].split(".", 1)[0], None)
    return list(names)


def branch_keys(state_dict: Mapping[str, Any], name: str) -> list[str]:
    """The ``state_dict`` keys of branch ``name``, in order."""
    prefix = f"{BRANCH_PREFIX}{name}."
    return [k for k in state_dict if k.startswith(prefix)]


def free_branch_name(name: str, taken: Iterable[str]) -> str:
    """A branch name like ``name`` that is not in ``taken``: ``name`` itself, else ``name_2``, ``name_3``, ...

    For error hints: a suggested rename must not collide again.

    Example::

        >>> free_branch_name("mod3", ["digit", "mod3", "mod3_2"])
        'mod3_3'
    """
    used = set(taken)
    if name not in used:
        return name
    suffix = 2
    while f"{name}_{suffix}" in used:
        suffix += 1
    return f"{name}_{suffix}"
