"""core.validation and core.errors: one message format for bad arguments, one home per exception."""

from __future__ import annotations

import importlib
import pickle
from typing import Literal

import pytest

from lightning_freeze.core import errors
from lightning_freeze.core.errors import InvalidArgumentError, UnknownNameError
from lightning_freeze.core.validation import (
    check_choice,
    check_int,
    check_non_empty_str,
    check_number,
    check_positive_finite,
    check_str_list,
    choices_of,
)

Mode = Literal["eval", "frozen", "train"]


def test_choices_of_reads_the_literal_in_order() -> None:
    assert choices_of(Mode) == ("eval", "frozen", "train")
    with pytest.raises(TypeError, match=r"Expected a Literal\[...\] of strings, got <class 'str'>"):
        choices_of(str)
    with pytest.raises(TypeError, match=r"Expected a Literal\[...\] of strings"):
        choices_of(Literal[1, 3])


@pytest.mark.parametrize("bad", ["off", "", None, 1, ["eval"]])
def test_check_choice_names_the_value_and_every_choice(bad: object) -> None:
    assert check_choice("norm", "frozen", choices_of(Mode)) == "frozen"
    with pytest.raises(InvalidArgumentError) as err:
        check_choice("norm", bad, choices_of(Mode))
    assert str(err.value) == f"Invalid norm={bad!r}; valid choices: 'eval', 'frozen', 'train'."
    assert (err.value.name, err.value.value) == ("norm", bad)
    assert isinstance(err.value, ValueError)  # what callers already catch


@pytest.mark.parametrize(
    ("kwargs", "bad", "message"),
    [
        ({"minimum": 1}, 0, "Invalid n=0; valid choices: an integer >= 1."),
        ({"minimum": 1}, True, "Invalid n=True; valid choices: an integer >= 1."),
        ({"minimum": 0}, 1.0, "Invalid n=1.0; valid choices: an integer >= 0."),
        ({}, "3", "Invalid n='3'; valid choices: an integer."),
        ({"minimum": 1}, None, "Invalid n=None; valid choices: an integer >= 1."),
        ({"minimum": 1, "allow_none": True}, 0, "Invalid n=0; valid choices: None or an integer >= 1."),
        (
            {"minimum": 0, "valid": "None (never) or an epoch >= 0"},
            -1,
            "Invalid n=-1; valid choices: None (never) or an epoch >= 0.",
        ),
    ],
)
def test_check_int(kwargs: dict, bad: object, message: str) -> None:
    assert check_int("n", 5, **kwargs) == 5
    with pytest.raises(InvalidArgumentError) as err:
        check_int("n", bad, **kwargs)
    assert str(err.value) == message


def test_check_int_allows_none_only_when_asked() -> None:
    assert check_int("threads", None, minimum=1, allow_none=True) is None


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "0.1", None])
def test_check_positive_finite(bad: object) -> None:
    assert check_positive_finite("scale", 2) == 2.0 and isinstance(check_positive_finite("scale", 2), float)
    with pytest.raises(InvalidArgumentError, match=r"valid choices: a finite number > 0\.$") as err:
        check_positive_finite("scale", bad)
    assert str(err.value).startswith(f"Invalid scale={bad!r};")


def test_check_number_bounds_are_open_or_closed_as_asked() -> None:
    kwargs = {"low": 0.0, "high": 1.0, "high_inclusive": False, "valid": "a probability in [0, 1)"}
    assert check_number("p", 0, **kwargs) == 0.0
    assert check_number("p", 0.5, **kwargs) == 0.5
    for bad in (1.0, -0.1, 2, float("nan")):
        with pytest.raises(InvalidArgumentError, match=r"valid choices: a probability in \[0, 1\)\.$"):
            check_number("p", bad, **kwargs)
    with pytest.raises(InvalidArgumentError, match=r"Invalid decay=0; valid choices: in \(0, 1\)\."):
        check_number(
            "decay", 0, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False, valid="in (0, 1)"
        )


def test_check_strings() -> None:
    assert check_non_empty_str("name", "a") == "a"
    for bad in ("", None, 3):
        with pytest.raises(InvalidArgumentError, match=r"valid choices: a non-empty string\.$"):
            check_non_empty_str("name", bad)
    assert check_str_list("modules", "backbone") == ["backbone"]
    assert check_str_list("modules", ("a", "b.c")) == ["a", "b.c"]
    for bad in ("", [], ["a", ""], ["a", 1], 3, None):
        with pytest.raises(InvalidArgumentError) as err:
            check_str_list("modules", bad, valid="a dotted name, or a non-empty list of them")
        assert (
            str(err.value)
            == f"Invalid modules={bad!r}; valid choices: a dotted name, or a non-empty list of them."
        )


def test_invalid_argument_error_survives_pickling() -> None:
    # errors raised in DDP workers / dataloader workers travel pickled
    err = pickle.loads(pickle.dumps(InvalidArgumentError("norm", "off", "'eval', 'train'")))
    assert str(err) == "Invalid norm='off'; valid choices: 'eval', 'train'."
    assert (err.name, err.value, err.valid) == ("norm", "off", "'eval', 'train'")
    refused = pickle.loads(pickle.dumps(errors.TargetNotAllowedError("Refused os.system", "os.system")))
    assert (str(refused), refused.target) == ("Refused os.system", "os.system")


@pytest.mark.parametrize("cls", [errors.ModuleSelectionError, errors.UnknownBranchError])
def test_name_errors_are_key_errors_whose_str_is_the_message(cls: type[UnknownNameError]) -> None:
    err = cls("Unknown branch 'z'; valid choices: 'a', 'b'.")
    assert isinstance(err, KeyError) and isinstance(err, UnknownNameError)
    # a plain KeyError would print the message quoted: "\"Unknown branch 'z'; ...\""
    assert str(err) == "Unknown branch 'z'; valid choices: 'a', 'b'."
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("lightning_freeze.core", "ModuleSelectionError"),
        ("lightning_freeze.core", "FrozenStateError"),
        ("lightning_freeze.module", "UnknownBranchError"),
        ("lightning_freeze.module", "CheckpointMismatchError"),
        ("lightning_freeze.core.checkpoint", "CheckpointError"),
        ("lightning_freeze.core.checkpoint", "CheckpointMismatchError"),
        ("lightning_freeze.core.checkpoint", "MergeError"),
        ("lightning_freeze.core.checkpoint_io", "CheckpointError"),
        ("lightning_freeze.core.merge", "MergeError"),
        ("lightning_freeze.instantiate", "ConfigInstantiationError"),
        ("lightning_freeze.instantiate", "TargetNotAllowedError"),
        ("lightning_freeze.core.freeze", "check_choice"),
    ],
)
def test_public_names_stay_importable_where_they_were(module: str, name: str) -> None:
    home = errors if name != "check_choice" else importlib.import_module("lightning_freeze.core.validation")
    assert getattr(importlib.import_module(module), name) is getattr(home, name)
