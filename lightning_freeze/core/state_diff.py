"""Compare two state dicts tensor by tensor, bitwise, in bounded memory.

Each tensor is compared in chunks of :data:`COMPARE_CHUNK` elements, so the float64 / int64
temporaries stay a few MiB whatever the tensor's size (the tensors themselves may be memory-mapped,
see :func:`~lightning_freeze.core.checkpoint_io.load_checkpoint`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_freeze.core.bits import (
    coalesced_sparse_parts,
    is_sparse,
    quantization_equal,
    tensor_bits,
    tensors_bitwise_equal,
    ulp_distance,
)

__all__ = [
    "COMPARE_CHUNK",
    "SPARSE_DENSE_LIMIT",
    "StateDictDiff",
    "TensorDiff",
    "diff_state_dicts",
    "select_keys",
]

#: elements compared per step: bounds the temporaries (float64 / int64 copies) of one comparison to a
#: few MiB whatever the tensor's size
COMPARE_CHUNK = 1 << 16
#: sparse tensors whose indices differ are compared through a dense copy up to this many elements
SPARSE_DENSE_LIMIT = 1 << 24


@dataclass
class TensorDiff:
    """How one key differs between two state dicts (see :func:`diff_state_dicts`).

    Attributes:
        key: the ``state_dict`` key.
        status: ``"changed"`` (same dtype and shape, different bits), ``"dtype"`` (dtype changed,
            or quantized on one side only), ``"layout"`` (dense vs sparse, or another sparse layout),
            ``"shape"`` (shape changed), ``"only_a"`` / ``"only_b"`` (key on one side only).
        shape_a / shape_b, dtype_a / dtype_b: as found on each side (``None`` where absent).
        elements: number of differing elements (``changed``/``dtype``), else ``None``.
        max_abs: largest absolute difference, computed in float64 (``changed``/``dtype``).
        max_ulps: largest distance in ulps (``changed`` floating-point tensors only).
        detail: what else differs, in words (sparse layout or stored indices, quantization
            parameters), else ``None``.
    """

    key: str
    status: str
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    elements: int | None = None
    max_abs: float | None = None
    max_ulps: int | None = None
    detail: str | None = None


@dataclass
class StateDictDiff:
    """Every difference between two state dicts.

    Attributes:
        differences: one :class:`TensorDiff` per key that differs, in key order of ``a`` then ``b``.
        compared: number of keys considered (in the selection, on either side).
        identical: number of those that are bitwise identical.
    """

    differences: list[TensorDiff] = field(default_factory=list)
    compared: int = 0
    identical: int = 0

    def __bool__(self) -> bool:
        """True when anything differs."""
        return bool(self.differences)


def _short(value: torch.dtype | torch.layout) -> str:
    return str(value).removeprefix("torch.")


def select_keys(keys: Iterable[str], patterns: Sequence[str] | None) -> list[str]:
    """Keys matched by any pattern (all keys when ``patterns`` is empty or ``None``).

    A pattern matches a key when ``fnmatch`` matches it (``"branches.*.weight"``) or when the key
    lies under it as a module prefix (``"backbone"`` matches ``"backbone.0.weight"``).
    """
    keys = list(keys)
    if not patterns:
        return keys
    return [k for k in keys if any(fnmatch.fnmatchcase(k, p) or k.startswith(p + ".") for p in patterns)]


def _compare(key: str, a: torch.Tensor, b: torch.Tensor) -> TensorDiff | None:
    diff = TensorDiff(
        key=key,
        status="changed" if a.dtype == b.dtype else "dtype",
        shape_a=tuple(a.shape),
        shape_b=tuple(b.shape),
        dtype_a=_short(a.dtype),
        dtype_b=_short(b.dtype),
    )
    if a.shape != b.shape:
        diff.status = "shape"
        return diff
    if tensors_bitwise_equal(a, b):
        return None
    if is_sparse(a) or is_sparse(b):
        _sparse_stats(diff, a, b)
    elif a.is_quantized or b.is_quantized:
        _quantized_stats(diff, a, b)
    else:
        _dense_stats(diff, a, b)
    return diff


def _sparse_stats(diff: TensorDiff, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.layout != b.layout:
        diff.status = "layout"
        diff.detail = f"layout {_short(a.layout)} -> {_short(b.layout)}"
    if is_sparse(a) and is_sparse(b):
        (ia, va), (ib, vb) = coalesced_sparse_parts(a), coalesced_sparse_parts(b)
        if tensors_bitwise_equal(ia, ib) and va.shape == vb.shape:
            # same stored positions: compare the stored values, whatever the size
            _dense_stats(diff, va, vb, elements_of=va[0].numel() if va.dim() > 1 else 1)
            return
    if a.numel() <= SPARSE_DENSE_LIMIT:
        if diff.status == "changed":
            diff.detail = "stored indices differ"
        _dense_stats(diff, a.detach().cpu().to_dense(), b.detach().cpu().to_dense())
    else:
        what = diff.detail or "stored indices differ"
        diff.detail = f"{what}; not compared element-wise (over {SPARSE_DENSE_LIMIT} elements)"


def _quantized_stats(diff: TensorDiff, a: torch.Tensor, b: torch.Tensor) -> None:
    """Compare the real values a quantized tensor stands for (``max_abs`` in those units, no ulps)."""
    if a.is_quantized != b.is_quantized:
        diff.status = "dtype"
    values = TensorDiff(key=diff.key, status=diff.status)
    _dense_stats(values, a.dequantize() if a.is_quantized else a, b.dequantize() if b.is_quantized else b)
    diff.elements, diff.max_abs = values.elements, values.max_abs
    if a.is_quantized and b.is_quantized and a.dtype == b.dtype:
        if quantization_equal(a, b):  # same parameters: the integer values say which elements differ
            steps = TensorDiff(key=diff.key, status=diff.status)
            _dense_stats(steps, a.int_repr(), b.int_repr())
            diff.elements = steps.elements
        else:
            diff.detail = "quantization parameters differ (qscheme, scale or zero point)"


def _dense_stats(diff: TensorDiff, a: torch.Tensor, b: torch.Tensor, elements_of: int = 1) -> None:
    """Fill ``elements``, ``max_abs`` and (same float dtype) ``max_ulps``, chunk by chunk.

    Each step works on :data:`COMPARE_CHUNK` elements, so the float64 and int64 temporaries stay a
    few MiB even for a tensor of gigabytes (the inputs themselves may be memory-mapped).
    ``elements_of``: elements per row (sparse values with dense dimensions count by stored entry).
    """
    flat_a, flat_b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    same_dtype = a.dtype == b.dtype
    floating = same_dtype and a.is_floating_point()
    wide = torch.complex128 if (a.is_complex() or b.is_complex()) else torch.float64
    elements, max_abs, nan_mismatch, max_ulps = 0, 0.0, False, None
    step = max(COMPARE_CHUNK // elements_of, 1) * elements_of
    for start in range(0, flat_a.numel(), step):
        ca, cb = flat_a[start : start + step], flat_b[start : start + step]
        if same_dtype:
            differ = (tensor_bits(ca) != tensor_bits(cb)).reshape(ca.numel(), -1).any(dim=1)
            if not bool(differ.any()):
                continue  # bitwise equal: contributes no difference, no gap, no ulp
            elements += int(differ.reshape(-1, elements_of).any(dim=1).sum())
        da, db = ca.to(wide), cb.to(wide)
        nan_a, nan_b = da.isnan(), db.isnan()
        if not same_dtype:
            differ = (da != db) & ~(nan_a & nan_b)
            elements += int(differ.reshape(-1, elements_of).any(dim=1).sum())
        nan_mismatch |= bool((nan_a != nan_b).any())
        gap = (da - db).abs().nan_to_num(nan=0.0, posinf=math.inf)
        max_abs = max(max_abs, float(gap.max()))
        if floating:
            comparable = ~(nan_a | nan_b)
            if bool(comparable.any()):
                chunk_ulps = int(ulp_distance(ca, cb)[comparable].max())
                max_ulps = chunk_ulps if max_ulps is None else max(max_ulps, chunk_ulps)
    diff.elements = elements
    if flat_a.numel():
        diff.max_abs = math.nan if nan_mismatch else max_abs
        diff.max_ulps = max_ulps


def diff_state_dicts(
    a: Mapping[str, Any], b: Mapping[str, Any], only: Sequence[str] | None = None
) -> StateDictDiff:
    """Compare two state dicts tensor by tensor, bitwise.

    Args:
        a: the first state dict.
        b: the second.
        only: patterns (see :func:`select_keys`); only matching keys are compared.

    Returns:
        a :class:`StateDictDiff`; falsy when nothing under ``only`` differs.

    Raises:
        ValueError: a pattern in ``only`` matches no key on either side (a typo would otherwise
            "prove" that nothing changed). The message names the top-level names.
    """
    keys = list(a) + [k for k in b if k not in a]
    for pattern in only or ():
        if not select_keys(keys, [pattern]):
            tops = sorted({k.split(".", 1)[0] for k in keys})
            raise ValueError(
                f"pattern {pattern!r} matches no tensor in either checkpoint; top-level names: "
                f"{', '.join(tops)} (patterns are fnmatch patterns on state_dict keys or module "
                "prefixes, e.g. 'backbone' or 'branches.*.weight')"
            )
    result = StateDictDiff()
    for key in select_keys(keys, only):
        result.compared += 1
        va, vb = a.get(key), b.get(key)
        if key not in b:
            result.differences.append(_one_sided(key, va, "only_a"))
        elif key not in a:
            result.differences.append(_one_sided(key, vb, "only_b"))
        elif isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
            diff = _compare(key, va, vb)
            if diff is None:
                result.identical += 1
            else:
                result.differences.append(diff)
        elif _plain_equal(va, vb):
            result.identical += 1
        else:
            result.differences.append(TensorDiff(key=key, status="changed"))
    return result


def _plain_equal(x: Any, y: Any) -> bool:
    try:
        return bool(x == y)
    except Exception:
        return False


def _one_sided(key: str, value: Any, status: str) -> TensorDiff:
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
    dtype = _short(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__
    if status == "only_a":
        return TensorDiff(key=key, status=status, shape_a=shape, dtype_a=dtype)
    return TensorDiff(key=key, status=status, shape_b=shape, dtype_b=dtype)
