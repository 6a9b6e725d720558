"""Exceptions raised by :mod:`lightning_freeze`.

They subclass the built-in exception a caller would catch anyway (``KeyError`` for names that do
not exist, ``ValueError`` for bad values, ``RuntimeError`` for a broken invariant) so that code
written against plain PyTorch keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["FrozenStateError", "ModuleSelectionError"]


class ModuleSelectionError(KeyError):
    """A module name or pattern that does not resolve to any submodule.

    ``str(err)`` is the full message (``KeyError`` would otherwise quote it).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class FrozenStateError(RuntimeError):
    """A tensor that was frozen changed.

    Attributes:
        changed: the full ``state_dict`` keys of the tensors that changed.
        causes: for each key in ``changed``, the most likely cause in words.
    """

    def __init__(self, message: str, changed: Sequence[str] = (), causes: dict[str, str] | None = None):
        super().__init__(message)
        self.changed = list(changed)
        self.causes = dict(causes or {})
