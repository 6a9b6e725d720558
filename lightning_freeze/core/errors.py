"""Exceptions raised by :mod:`lightning_freeze`: every class in one place.

They subclass the built-in exception a caller would catch anyway (``KeyError`` for names that do
not exist, ``ValueError`` for bad values, ``RuntimeError`` for a broken invariant) so that code
written against plain PyTorch keeps working. Each is also importable from the module that raises
it (``lightning_freeze.module.UnknownBranchError``, ``lightning_freeze.core.checkpoint.CheckpointError``,
...).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "ConfigInstantiationError",
    "FrozenStateError",
    "InvalidArgumentError",
    "MergeError",
    "ModuleSelectionError",
    "TargetNotAllowedError",
    "UnknownBranchError",
    "UnknownNameError",
]


class UnknownNameError(KeyError):
    """A name that does not exist here (a submodule, a branch, a key).

    ``str(err)`` is the full message: a plain ``KeyError`` would show it quoted, as ``repr``.

    Attributes:
        message: the message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ModuleSelectionError(UnknownNameError):
    """A module name or pattern that does not resolve to any submodule."""


class UnknownBranchError(UnknownNameError):
    """A branch name that is not one of a :class:`~lightning_freeze.MultiBranchModule`'s branches."""


class InvalidArgumentError(ValueError):
    """An argument outside its valid values.

    ``str(err)`` is ``"Invalid {name}={value!r}; valid choices: {valid}."``.

    Attributes:
        name: the argument's name.
        value: the value given.
        valid: the valid values, in words (``"'eval', 'train'"``, ``"an integer >= 1"``).
    """

    def __init__(self, name: str, value: object, valid: str) -> None:
        super().__init__(f"Invalid {name}={value!r}; valid choices: {valid}.")
        self.name = name
        self.value = value
        self.valid = valid

    def __reduce__(self) -> tuple[type, tuple[str, object, str]]:
        return type(self), (self.name, self.value, self.valid)


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


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint (missing, not a checkpoint, corrupt, truncated).

    ``str(err)`` is one line that names the file and what is wrong with it.
    """


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit a module (names the keys that do not fit)."""


class MergeError(ValueError):
    """Checkpoints that cannot be merged (different backbones, colliding branch names)."""


class ConfigInstantiationError(ValueError):
    """A config that cannot be instantiated; ``str(err)`` is one line naming the config and its target."""


class TargetNotAllowedError(ConfigInstantiationError):
    """A ``_target_`` outside the allow-list (see :func:`~lightning_freeze.instantiate.allowed_targets`).

    Attributes:
        target: the refused ``_target_`` string.
    """

    def __init__(self, message: str, target: str) -> None:
        super().__init__(message)
        self.target = target

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (str(self), self.target)
