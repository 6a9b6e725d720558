"""Nested outputs as flat tensor lists plus a JSON-able structure, and back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["Structure", "flatten", "unflatten"]

Structure = Any  # JSON-able description of an output: "T", ["tuple", [...]], ["list", [...]], ["dict", {...}]


def flatten(output: Any) -> tuple[list[torch.Tensor], Structure] | None:
    """Leaves and structure of a tensor / tuple / list / dict-of-str output; None if unsupported."""
    if isinstance(output, torch.Tensor):
        return [output], "T"
    if isinstance(output, (tuple, list)) and type(output) in (tuple, list):
        leaves: list[torch.Tensor] = []
        specs = []
        for item in output:
            flat = flatten(item)
            if flat is None:
                return None
            leaves += flat[0]
            specs.append(flat[1])
        return leaves, [type(output).__name__, specs]
    if isinstance(output, Mapping) and all(isinstance(k, str) for k in output):
        leaves, specs = [], {}
        for key, item in output.items():
            flat = flatten(item)
            if flat is None:
                return None
            leaves += flat[0]
            specs[key] = flat[1]
        return leaves, ["dict", specs]
    return None


def unflatten(leaves: Iterable[torch.Tensor], structure: Structure) -> Any:
    it = iter(leaves)

    def build(spec: Structure) -> Any:
        if spec == "T":
            return next(it)
        kind, items = spec
        if kind == "dict":
            return {k: build(s) for k, s in items.items()}
        built = [build(s) for s in items]
        return tuple(built) if kind == "tuple" else built

    return build(structure)
