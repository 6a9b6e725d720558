"""Merge branch checkpoints trained on one frozen backbone into one multi-branch checkpoint."""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_freeze.core.checkpoint_io import checkpoint_state_dict, ema_state_dict
from lightning_freeze.core.errors import MergeError
from lightning_freeze.core.keys import (
    BRANCH_PREFIX,
    MULTI_BRANCH_KEY,
    PER_BRANCH_HPARAMS,
    branch_keys,
    branch_names_in,
)
from lightning_freeze.core.state_diff import TensorDiff, diff_state_dicts

__all__ = ["MergeError", "MergeResult", "merge_checkpoints"]


@dataclass
class MergeResult:
    """What :func:`merge_checkpoints` built.

    Attributes:
        checkpoint: the merged checkpoint dict (``state_dict``, ``hyper_parameters``, ...).
        branches: ``{branch name: index of the first input that holds it}``.
        shared_keys: keys outside ``branches.`` (the backbone and any other shared tensor), identical
            in every input.
    """

    checkpoint: dict[str, Any]
    branches: dict[str, int]
    shared_keys: list[str]


def merge_checkpoints(
    checkpoints: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None, *, ema: bool = False
) -> MergeResult:
    """Merge branch checkpoints trained on one frozen backbone into one multi-branch checkpoint.

    Every key outside ``branches.`` (the backbone, and any other shared tensor) must be bitwise
    identical in every input. A branch may appear in several inputs (each stage-2 checkpoint holds
    the frozen stage-1 branch): it is kept once when bitwise identical everywhere, and is a
    collision otherwise. Optimizer, EMA and loop state are not carried over (the result is for
    serving and for starting new stages, not for resuming).

    Args:
        checkpoints: loaded checkpoints (see :func:`load_checkpoint`), at least two.
        names: how to call each input in error messages (default ``"input 1"``, ...).
        ema: take each input's ``FrozenSafeEMA`` weights (see :func:`ema_state_dict`) instead of
            its raw weights.

    Returns:
        a :class:`MergeResult`.

    Raises:
        MergeError: backbones (shared tensors) differ, or a branch name collides; the message names
            the inputs and the keys.
    """
    labels = list(names) if names is not None else [f"input {i + 1}" for i in range(len(checkpoints))]
    read = ema_state_dict if ema else checkpoint_state_dict
    states = [read(c, label) for c, label in zip(checkpoints, labels, strict=True)]
    if len(states) < 2:
        raise MergeError(f"merge needs at least two input checkpoints, got {len(states)}")
    for label, state in zip(labels, states, strict=True):
        if not branch_names_in(state):
            tops = sorted({k.split(".", 1)[0] for k in state})
            raise MergeError(
                f"{label} holds no branch tensors (no '{BRANCH_PREFIX}<name>.*' keys; its top-level "
                f"names: {', '.join(tops[:8])}{', ...' if len(tops) > 8 else ''}): merge combines "
                "MultiBranchModule checkpoints, each with its branches under 'branches.'"
            )

    shared_keys = [k for k in states[0] if not k.startswith(BRANCH_PREFIX)]
    for label, state in zip(labels[1:], states[1:], strict=True):
        other = [k for k in state if not k.startswith(BRANCH_PREFIX)]
        diff = diff_state_dicts({k: states[0][k] for k in shared_keys}, {k: state[k] for k in other})
        if diff:
            details = "; ".join(_describe_difference(d, labels[0], label) for d in diff.differences[:5])
            more = f" (and {len(diff.differences) - 5} more)" if len(diff.differences) > 5 else ""
            raise MergeError(
                f"backbones are not bitwise identical: {label} differs from {labels[0]} in "
                f"{len(diff.differences)} shared tensor(s): {details}{more}. Branches can share one "
                "backbone only when each was trained on the same frozen backbone "
                f"(check with: lightning-freeze diff {labels[0]} {label} --only backbone)"
            )

    owner: dict[str, int] = {}
    merged: dict[str, Any] = {k: states[0][k] for k in shared_keys}
    for index, state in enumerate(states):
        for name in branch_names_in(state):
            keys = branch_keys(state, name)
            if name in owner:
                first = states[owner[name]]
                diff = diff_state_dicts(
                    {k: first[k] for k in branch_keys(first, name)}, {k: state[k] for k in keys}
                )
                if diff:
                    raise MergeError(
                        f"branch name collision: {name!r} is in {labels[owner[name]]} and {labels[index]} "
                        f"with different weights ({len(diff.differences)} tensor(s) differ, e.g. "
                        f"{diff.differences[0].key!r}); rename one of the branches before merging"
                    )
                continue
            owner[name] = index
            merged.update({k: state[k] for k in keys})

    checkpoint = _merged_metadata(checkpoints, list(owner))
    checkpoint["state_dict"] = merged
    return MergeResult(checkpoint=checkpoint, branches=owner, shared_keys=shared_keys)


def _merged_metadata(checkpoints: Sequence[Mapping[str, Any]], branches: list[str]) -> dict[str, Any]:
    first = checkpoints[0]
    out: dict[str, Any] = {k: first[k] for k in ("pytorch-lightning_version", "hparams_name") if k in first}
    if "pytorch-lightning_version" not in out and (version := _installed_lightning_version()):
        out["pytorch-lightning_version"] = version  # LightningModule.load_from_checkpoint requires it
    hparams_list = [c.get("hyper_parameters") for c in checkpoints]
    if all(isinstance(h, Mapping) for h in hparams_list):
        hparams = copy.deepcopy(dict(hparams_list[0]))
        for entry in PER_BRANCH_HPARAMS:
            per_input = [
                _per_branch(h.get(entry), branch_names_in(checkpoint_state_dict(c)), entry)
                for h, c in zip(hparams_list, checkpoints, strict=True)
            ]
            if any(v is None for v in per_input):
                # e.g. an input built from module instances: no config describes all branches, so
                # load_from_checkpoint must be given this argument explicitly
                hparams.pop(entry, None)
            elif any(per_input):
                union: dict[str, Any] = {}
                for value in per_input:
                    for name, item in value.items():
                        union.setdefault(name, copy.deepcopy(item))
                hparams[entry] = union
        out["hyper_parameters"] = hparams
    section = first.get(MULTI_BRANCH_KEY)
    active = section.get("active_branch") if isinstance(section, Mapping) else None
    out[MULTI_BRANCH_KEY] = {
        "active_branch": active if active in branches else branches[0],
        "branch_names": list(branches),
        "merged": True,
    }
    return out


def _installed_lightning_version() -> str | None:
    try:
        return importlib.metadata.version("lightning")
    except importlib.metadata.PackageNotFoundError:
        return None


def _per_branch(value: Any, names: list[str], entry: str) -> dict[str, Any] | None:
    """A per-branch hyper-parameter as ``{branch: value}``; ``None`` when it cannot be expressed so."""
    if isinstance(value, Mapping):
        return dict(value)
    if value is None:
        return None if entry == "branches" else {}
    if entry == "num_classes" and isinstance(value, int):
        return dict.fromkeys(names, value)
    return None


def _describe_difference(diff: TensorDiff, label_a: str, label_b: str) -> str:
    if diff.status == "only_a":
        return f"{diff.key!r} only in {label_a}"
    if diff.status == "only_b":
        return f"{diff.key!r} only in {label_b}"
    if diff.status == "shape":
        return f"{diff.key!r} shape {diff.shape_a} vs {diff.shape_b}"
    if diff.status == "dtype":
        return f"{diff.key!r} dtype {diff.dtype_a} vs {diff.dtype_b}"
    if diff.max_abs is not None:
        return f"{diff.key!r} max abs diff {diff.max_abs:.3g}"
    return f"{diff.key!r} differs"
