"""Argument checks shared by every public entry point, with one message format.

Each check returns the value (normalised where it says so) or raises
:class:`~lightning_freeze.core.errors.InvalidArgumentError` (a ``ValueError``) whose message names
the argument, the bad value and what is valid::

    Invalid norm='off'; valid choices: 'eval', 'frozen', 'train'.

Choice arguments are typed with ``Literal[...]`` (so IDEs and LightningCLI/jsonargparse see the
choices) and checked at run time against the same ``Literal``: :func:`choices_of` derives the
tuple of choices from it, so each set of choices is written once.

Example::

    >>> from typing import Literal
    >>> Mode = Literal["eval", "train"]
    >>> check_choice("mode", "eval", choices_of(Mode))
    'eval'
    >>> check_choice("mode", "off", choices_of(Mode))
    Traceback (most recent call last):
    ...
    lightning_freeze.core.errors.InvalidArgumentError: Invalid mode='off'; valid choices: 'eval', 'train'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any, Literal, get_args, overload

from lightning_freeze.core.errors import InvalidArgumentError

__all__ = [
    "check_choice",
    "check_int",
    "check_non_empty_str",
    "check_number",
    "check_positive_finite",
    "check_str_list",
    "choices_of",
]


def choices_of(literal: Any) -> tuple[str, ...]:
    """The values of a ``Literal[...]`` type, in order (``Literal["a", "b"]`` -> ``("a", "b")``).

    Raises:
        TypeError: ``literal`` is not a ``Literal`` of strings.
    """
    values = get_args(literal)
    if not values or not all(isinstance(v, str) for v in values):
        raise TypeError(f"Expected a Literal[...] of strings, got {literal!r}.")
    return values


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``.

    Args:
        name: the argument's name, for the message.
        value: the value given.
        choices: the valid values (e.g. ``choices_of(NormMode)``).

    Returns:
        ``value``.

    Raises:
        InvalidArgumentError: ``value`` is not one of ``choices`` (the message lists them).
    """
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(name, value, ", ".join(repr(c) for c in choices))
    return value


@overload
def check_int(
    name: str,
    value: object,
    minimum: int | None = ...,
    *,
    allow_none: Literal[False] = ...,
    valid: str | None = ...,
) -> int: ...


@overload
def check_int(
    name: str, value: object, minimum: int | None = ..., *, allow_none: bool, valid: str | None = ...
) -> int | None: ...


def check_int(
    name: str,
    value: object,
    minimum: int | None = None,
    *,
    allow_none: bool = False,
    valid: str | None = None,
) -> int | None:
    """Return ``value`` if it is an integer (not a ``bool``) ``>= minimum``, or ``None`` with ``allow_none``.

    Args:
        name: the argument's name, for the message.
        value: the value given.
        minimum: the smallest valid value; ``None``: any integer.
        allow_none: ``None`` is valid too.
        valid: what is valid, in words, for the message (default: ``"an integer >= {minimum}"``,
            preceded by ``"None or "`` with ``allow_none``).

    Returns:
        ``value``.

    Raises:
        InvalidArgumentError: anything else.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        if valid is None:
            valid = "an integer" + (f" >= {minimum}" if minimum is not None else "")
            valid = f"None or {valid}" if allow_none else valid
        raise InvalidArgumentError(name, value, valid)
    return value


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    valid: str,
) -> float:
    """Return ``value`` as a ``float`` if it is a finite real number (not a ``bool``) within the bounds.

    Args:
        name: the argument's name, for the message.
        value: the value given.
        low: the lower bound, or ``None``.
        high: the upper bound, or ``None``.
        low_inclusive: ``low`` itself is valid.
        high_inclusive: ``high`` itself is valid.
        valid: what is valid, in words, for the message (``"a probability in [0, 1)"``).

    Returns:
        ``float(value)``.

    Raises:
        InvalidArgumentError: anything else (NaN and infinities included).
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise InvalidArgumentError(name, value, valid)
    number = float(value)
    if low is not None and (number < low or (number == low and not low_inclusive)):
        raise InvalidArgumentError(name, value, valid)
    if high is not None and (number > high or (number == high and not high_inclusive)):
        raise InvalidArgumentError(name, value, valid)
    return number


def check_positive_finite(name: str, value: object) -> float:
    """Return ``value`` as a ``float`` if it is a finite number ``> 0``.

    Raises:
        InvalidArgumentError: anything else (``0``, negatives, NaN, infinities, ``bool``, strings).
    """
    return check_number(name, value, low=0.0, low_inclusive=False, valid="a finite number > 0")


def check_non_empty_str(name: str, value: object, valid: str = "a non-empty string") -> str:
    """Return ``value`` if it is a non-empty string.

    Args:
        name: the argument's name, for the message.
        value: the value given.
        valid: what is valid, in words, for the message.

    Raises:
        InvalidArgumentError: anything else.
    """
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(name, value, valid)
    return value


def check_str_list(
    name: str, value: object, valid: str = "a non-empty string or a non-empty list of them"
) -> list[str]:
    """Return ``value`` as a list of non-empty strings: one string, or a non-empty sequence of them.

    Args:
        name: the argument's name, for the message.
        value: the value given.
        valid: what is valid, in words, for the message.

    Returns:
        ``[value]`` for a string, else ``list(value)``.

    Raises:
        InvalidArgumentError: an empty string or sequence, a non-string item, or another type.
    """
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else None
    if not items or not all(isinstance(item, str) and item for item in items):
        raise InvalidArgumentError(name, value, valid)
    return items
