"""Nested structures of tensors as a flat tensor list plus an exact, JSON-able description, and back.

The one structure walker of :mod:`lightning_freeze.core`. :func:`flatten` takes tensors (the leaves)
out of tuples, lists, namedtuples, dicts (also ``OrderedDict``) and dataclasses (also HuggingFace
``ModelOutput``, a dataclass that is an ``OrderedDict`` too), and describes everything else by an
exact encoding: ``None``, ``bool``, ``int``, ``float`` (its IEEE-754 bits), ``complex``, ``str``,
``bytes``, enum members, ``torch.dtype`` and ``torch.device``. Anything else raises
:class:`UnsupportedStructure`: a description that is not exact (a ``repr``, ``str(tensor)``) would
let two different values share one description.

:func:`unflatten` rebuilds the structure with other leaves; :func:`flatten_exact` also checks that
the rebuilt object has the same structure and types as the original (a class whose constructor
does not give back what it was given, e.g. a dataclass with ``init=False`` fields or attributes set
after construction, is refused).

Where no exact description is needed, the same containers are walked leniently (any other value is
a leaf, kept as it is): :func:`tensor_leaves` (the tensors), :func:`map_tensors` (the structure
rebuilt with each tensor mapped) and :func:`named_leaves` (every leaf with its path).

Example::

    >>> from collections import namedtuple
    >>> Pair = namedtuple("Pair", "a b")
    >>> leaves, spec = flatten(Pair(torch.ones(1), {"k": None, "s": 0.1}))
    >>> len(leaves), unflatten([torch.zeros(1)], spec)
    (1, Pair(a=tensor([0.]), b={'k': None, 's': 0.1}))
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "Structure",
    "UnsupportedStructure",
    "flatten",
    "flatten_exact",
    "map_tensors",
    "named_leaves",
    "tensor_leaves",
    "unflatten",
]

Structure = Any  # JSON-able: "T" (a tensor leaf), or a list whose first item names the node kind

# types seen by flatten in this process: rebuilt without an import even when defined in a function
_SEEN_TYPES: dict[str, type] = {}


class UnsupportedStructure(TypeError):
    """A value that :func:`flatten` cannot describe exactly (its message names the value's type)."""


def _type_name(cls: type) -> str:
    name = f"{cls.__module__}:{cls.__qualname__}"
    _SEEN_TYPES.setdefault(name, cls)
    return name


def _resolve(name: str, kind: str) -> type:
    """The class named ``module:qualname``: one seen by :func:`flatten` here, or an imported one.

    Never imports a module: a name from a file (the disk store) only resolves to a class the
    process has already loaded, and only to one of the ``kind`` it is described as (a namedtuple,
    a dataclass or an enum), so a crafted description cannot call any other loaded callable.
    """
    cls = _SEEN_TYPES.get(name)
    if cls is not None and _is_kind(cls, kind):
        return cls
    module_name, _, qualname = name.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None and part != "<locals>" else None
    if not isinstance(obj, type):
        raise UnsupportedStructure(f"type {name} is not loaded in this process")
    if not _is_kind(obj, kind):
        raise UnsupportedStructure(f"type {name} is not a {kind}")
    return obj


def _is_kind(cls: type, kind: str) -> bool:
    if kind == "namedtuple":
        return issubclass(cls, tuple) and hasattr(cls, "_fields")
    if kind == "dataclass":
        return dataclasses.is_dataclass(cls)
    return kind == "enum" and issubclass(cls, enum.Enum)


def _encode_constant(value: Any) -> list[Any]:
    """An exact, JSON-able encoding of a non-tensor value (raises for anything without one)."""
    if value is None:
        return ["none"]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, enum.Enum):
        return ["enum", _type_name(type(value)), value.name]
    if type(value) is int:
        return ["int", str(value)]
    if type(value) is float:
        return ["float", struct.pack("<d", value).hex()]  # the bits: -0.0 and NaN payloads kept
    if type(value) is complex:
        return ["complex", struct.pack("<dd", value.real, value.imag).hex()]
    if type(value) is str:
        return ["str", value]
    if type(value) is bytes:
        return ["bytes", value.hex()]
    if isinstance(value, torch.dtype):
        return ["dtype", str(value).removeprefix("torch.")]
    if isinstance(value, torch.device):
        return ["device", str(value)]
    raise UnsupportedStructure(
        f"a {type(value).__module__}.{type(value).__qualname__} value has no exact encoding (supported: "
        "tensors in tuples, lists, namedtuples, dicts and dataclasses; None, bool, int, float, complex, "
        "str, bytes, enum members, torch.dtype, torch.device)"
    )


def _decode_constant(code: Sequence[Any]) -> Any:
    kind = code[0]
    if kind == "none":
        return None
    if kind == "bool":
        return bool(code[1])
    if kind == "enum":
        return _resolve(code[1], "enum")[code[2]]
    if kind == "int":
        return int(code[1])
    if kind == "float":
        return struct.unpack("<d", bytes.fromhex(code[1]))[0]
    if kind == "complex":
        return complex(*struct.unpack("<dd", bytes.fromhex(code[1])))
    if kind == "str":
        return code[1]
    if kind == "bytes":
        return bytes.fromhex(code[1])
    if kind == "dtype":
        dtype = getattr(torch, code[1], None)
        if not isinstance(dtype, torch.dtype):
            raise UnsupportedStructure(f"{code[1]!r} is not a torch dtype")
        return dtype
    if kind == "device":
        return torch.device(code[1])
    raise UnsupportedStructure(f"unknown constant kind {kind!r}")


def flatten(obj: Any) -> tuple[list[torch.Tensor], Structure]:
    """The tensors of ``obj`` in a fixed order, and a JSON-able description of everything else.

    Raises:
        UnsupportedStructure: a value without an exact encoding (see the module docstring).
    """
    leaves: list[torch.Tensor] = []
    return leaves, _describe(obj, leaves)


def _describe(obj: Any, leaves: list[torch.Tensor]) -> Structure:
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return "T"
    cls = type(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [[f.name, _describe(getattr(obj, f.name), leaves)] for f in dataclasses.fields(obj)]
        # what a rebuild must give back too: the mapping keys of a dataclass that is a dict
        # (HF ModelOutput lists only its non-None fields) and the attribute names
        keys = [_encode_constant(k) for k in obj] if isinstance(obj, dict) else None
        attrs = sorted(vars(obj)) if hasattr(obj, "__dict__") else None
        return ["dataclass", _type_name(cls), fields, keys, attrs]
    if cls is tuple or cls is list:
        return [cls.__name__, [_describe(item, leaves) for item in obj]]
    if isinstance(obj, tuple) and hasattr(cls, "_fields"):  # namedtuple
        return ["namedtuple", _type_name(cls), [_describe(item, leaves) for item in obj]]
    if cls is dict or cls is OrderedDict:
        items = [[_encode_constant(k), _describe(v, leaves)] for k, v in obj.items()]
        return ["dict" if cls is dict else "odict", items]
    return ["const", _encode_constant(obj)]


def unflatten(leaves: Iterable[torch.Tensor], structure: Structure) -> Any:
    """Rebuild what :func:`flatten` described, with ``leaves`` in place of its tensors.

    Raises:
        UnsupportedStructure: a class of the description is not loaded in this process.
    """
    it = iter(leaves)
    return _build(structure, it)


def _build(spec: Structure, it: Iterator[torch.Tensor]) -> Any:
    if spec == "T":
        return next(it)
    kind = spec[0]
    if kind == "const":
        return _decode_constant(spec[1])
    if kind == "tuple":
        return tuple(_build(s, it) for s in spec[1])
    if kind == "list":
        return [_build(s, it) for s in spec[1]]
    if kind == "namedtuple":
        return _resolve(spec[1], "namedtuple")(*[_build(s, it) for s in spec[2]])
    if kind in ("dict", "odict"):
        items = [(_decode_constant(k), _build(s, it)) for k, s in spec[1]]
        return dict(items) if kind == "dict" else OrderedDict(items)
    if kind == "dataclass":
        cls = _resolve(spec[1], "dataclass")
        return cls(**{name: _build(s, it) for name, s in spec[2]})
    raise UnsupportedStructure(f"unknown structure kind {kind!r}")


def flatten_exact(obj: Any) -> tuple[list[torch.Tensor], Structure]:
    """:func:`flatten`, checking that :func:`unflatten` gives back the same structure and types.

    Raises:
        UnsupportedStructure: a value without an exact encoding, or an object whose class does not
            rebuild to the same structure (the message says which).
    """
    leaves, spec = flatten(obj)
    try:
        rebuilt = unflatten(leaves, spec)
        again = flatten(rebuilt)
    except Exception as err:  # a constructor that refuses its own fields: not rebuildable
        raise UnsupportedStructure(
            f"a {type(obj).__qualname__} cannot be rebuilt from its parts ({type(err).__name__}: {err})"
        ) from None
    if (
        again[1] != spec
        or len(again[0]) != len(leaves)
        or any(a is not b for a, b in zip(again[0], leaves, strict=True))
    ):
        raise UnsupportedStructure(
            f"a {type(obj).__qualname__} does not rebuild to the same structure from its parts"
        )
    return leaves, spec


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """The tensors of ``obj`` in :func:`flatten`'s order; other values (of any type) are skipped.

    For reading a structure that need not be described exactly (e.g. a training batch).
    """
    found: list[torch.Tensor] = []
    _collect(obj, found)
    return found


def _collect(obj: Any, found: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _collect(getattr(obj, f.name), found)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _collect(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _collect(item, found)


def _children(obj: Any) -> tuple[list[tuple[str, Any]], Callable[[list[Any]], Any]] | None:
    """A container's children (with the path suffix of each) and how to rebuild it from new ones.

    ``None`` for a leaf (a tensor, or any value that is not one of :func:`flatten`'s containers).
    """
    cls = type(obj)
    if isinstance(obj, tuple) and hasattr(cls, "_fields"):  # namedtuple
        return [(f"[{i}]", v) for i, v in enumerate(obj)], lambda new: cls(*new)
    if isinstance(obj, (tuple, list)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)], lambda new: cls(new)
    if isinstance(obj, dict):
        keys = list(obj)
        rebuild = OrderedDict if cls is OrderedDict else dict
        return [(f"[{k!r}]", obj[k]) for k in keys], lambda new: rebuild(zip(keys, new, strict=True))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = dataclasses.fields(obj)

        def rebuild_dataclass(new: list[Any]) -> Any:
            return dataclasses.replace(obj, **{f.name: v for f, v in zip(fields, new, strict=True) if f.init})

        return [(f".{f.name}", getattr(obj, f.name)) for f in fields], rebuild_dataclass
    return None


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` rebuilt with ``fn(tensor)`` in place of each tensor; any other value is kept as it is.

    Containers are rebuilt as their own type (tuples, lists, namedtuples, ``OrderedDict``,
    dataclasses); other dicts, also a dataclass that is a dict (HuggingFace ``ModelOutput``),
    become ``dict``: what ``torch.load(weights_only=True)`` reads back.

    Example::

        >>> map_tensors({"x": torch.ones(2), "n": 3}, lambda t: t * 2)
        {'x': tensor([2., 2.]), 'n': 3}
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    parts = _children(obj)
    if parts is None:
        return obj
    children, rebuild = parts
    return rebuild([map_tensors(child, fn) for _, child in children])


def named_leaves(obj: Any, root: str = "") -> list[tuple[str, Any]]:
    """Every leaf of ``obj`` (tensors and other values) with its path, in :func:`flatten`'s order.

    Example::

        >>> named_leaves((torch.ones(1), {"k": None}), "output")
        [('output[0]', tensor([1.])), ("output[1]['k']", None)]
    """
    parts = None if isinstance(obj, torch.Tensor) else _children(obj)
    if parts is None:
        return [(root, obj)]
    return [leaf for suffix, child in parts[0] for leaf in named_leaves(child, root + suffix)]
