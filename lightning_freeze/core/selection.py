"""Resolve dotted submodule names and ``fnmatch`` patterns to submodules, with clear errors."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

from lightning_freeze.core.errors import ModuleSelectionError

__all__ = ["is_pattern", "resolve_modules"]

_PATTERN_CHARS = frozenset("*?[")


def is_pattern(name: str) -> bool:
    """Whether ``name`` contains ``fnmatch`` wildcards (``*``, ``?``, ``[...]``)."""
    return any(ch in _PATTERN_CHARS for ch in name)


def _as_list(names: str | Iterable[str]) -> list[str]:
    if isinstance(names, str):
        return [names]
    out = list(names)
    for name in out:
        if not isinstance(name, str):
            raise TypeError(f"Module names must be strings, got {name!r} ({type(name).__name__}).")
    return out


def _describe_choices(root: nn.Module, names: Sequence[str], bad: str) -> str:
    children = [name for name, _ in root.named_children()]
    close = difflib.get_close_matches(bad, names, n=3, cutoff=0.6)
    parts = []
    if close:
        parts.append("closest valid names: " + ", ".join(repr(c) for c in close))
    parts.append("top-level children: " + (", ".join(repr(c) for c in children) or "(none)"))
    return "; ".join(parts)


def resolve_modules(root: nn.Module, names: str | Iterable[str]) -> dict[str, nn.Module]:
    """Resolve dotted names and ``fnmatch`` patterns to submodules of ``root``.

    Names are the keys of ``root.named_modules()`` (``"backbone"``, ``"backbone.layer1.0"``);
    patterns use :mod:`fnmatch` syntax on the same keys (``"backbone.layer[12]"``, ``"branches.*"``).
    Overlaps are removed: a module inside another selected module is dropped, and a module
    selected twice is kept once.

    Args:
        root: the module to search.
        names: one name or pattern, or several.

    Returns:
        ``{dotted_name: module}`` in the order of ``root.named_modules()``, outermost modules only.

    Raises:
        ModuleSelectionError: a name that is not a submodule (the message names it, the closest
            valid names and the top-level children), or a pattern that matches nothing.
        ValueError: ``names`` is empty.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> list(resolve_modules(net, "0"))
        ['0']
    """
    wanted = _as_list(names)
    if not wanted:
        raise ValueError("Expected at least one module name or pattern, got an empty selection.")
    all_modules = dict(root.named_modules())
    all_modules.pop("", None)  # the root itself is never a valid target: nothing would be left to train
    all_names = list(all_modules)

    selected: set[str] = set()
    for name in wanted:
        if is_pattern(name):
            matches = fnmatch.filter(all_names, name)
            if not matches:
                raise ModuleSelectionError(
                    f"Pattern {name!r} matches no submodule of {type(root).__name__}; "
                    + _describe_choices(root, all_names, name)
                )
            selected.update(matches)
        elif name in all_modules:
            selected.add(name)
        else:
            raise ModuleSelectionError(
                f"{type(root).__name__} has no submodule {name!r}; "
                + _describe_choices(root, all_names, name)
            )

    # keep only the outermost selected modules (a child of a selected module is already covered)
    outermost = [
        name
        for name in all_names
        if name in selected and not any(name.startswith(other + ".") for other in selected if other != name)
    ]
    # the same module object reachable under two names is kept once
    seen: set[int] = set()
    result: dict[str, nn.Module] = {}
    for name in outermost:
        module = all_modules[name]
        if id(module) not in seen:
            seen.add(id(module))
            result[name] = module
    return result
