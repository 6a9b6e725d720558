"""Read, compare and merge checkpoints tensor by tensor (pure PyTorch, no Lightning import).

The building blocks of ``lightning-freeze diff`` / ``merge`` and of
:meth:`~lightning_freeze.MultiBranchModule.init_from_checkpoint`. A "checkpoint" is either a
Lightning checkpoint (a dict with a ``"state_dict"``) or a plain ``state_dict`` file
(``{name: tensor}``). Every comparison is on the raw bits: ``-0.0`` and ``0.0`` differ, a NaN equals
only a NaN with the same payload.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import importlib.metadata
import math
import os
import re
import stat
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "MergeError",
    "MergeResult",
    "StateDictDiff",
    "TensorDiff",
    "branch_names_in",
    "checkpoint_state_dict",
    "diff_state_dicts",
    "ema_state_dict",
    "load_checkpoint",
    "merge_checkpoints",
    "save_checkpoint_atomic",
    "select_keys",
    "tensors_bitwise_equal",
    "ulp_distance",
]

BRANCH_PREFIX = "branches."
EMA_STATE_PREFIX = "FrozenSafeEMA"  # callback state keys of lightning_freeze.FrozenSafeEMA
# hyper_parameters entries of MultiBranchModule that are keyed by branch name: merged as a union
_PER_BRANCH_HPARAMS = ("branches", "losses", "metrics", "num_classes")


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint (missing, not a checkpoint, corrupt, truncated).

    ``str(err)`` is one line that names the file and what is wrong with it.
    """


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit a module (names the keys that do not fit)."""


class MergeError(ValueError):
    """Checkpoints that cannot be merged (different backbones, colliding branch names)."""


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike[str], *, unsafe_load: bool = False) -> dict[str, Any]:
    """Load a checkpoint file onto the CPU.

    Args:
        path: a Lightning ``.ckpt`` or a file written by ``torch.save(state_dict)``.
        unsafe_load: load with ``torch.load(weights_only=False)``, which runs pickled code: only for
            files you trust (needed when a checkpoint pickles objects such as a ``functools.partial``
            or an OmegaConf ``DictConfig`` in its hyper-parameters).

    Returns:
        the loaded dict.

    Raises:
        CheckpointError: the file is missing, unreadable, not a ``torch.save`` file, corrupt (the
            CRC-32 of every zip entry is checked: ``torch.load`` alone would load flipped bits
            silently) or truncated, needs ``unsafe_load``, or does not hold a dict. One line.
    """
    file = Path(path)
    name = repr(str(file))
    if not file.exists():
        raise CheckpointError(f"{name}: no such file")
    if file.is_dir():
        raise CheckpointError(f"{name}: is a directory, not a checkpoint file")
    try:
        with open(file, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise CheckpointError(f"{name}: cannot read ({err.strerror or err})") from None
    if not head:
        raise CheckpointError(f"{name}: empty file, not a checkpoint")
    if head == _ZIP_MAGIC:
        _check_zip_integrity(file, name)
    try:
        # mmap (zip format only): tensor data stays in the page cache instead of being copied, so
        # comparing two large checkpoints costs about their size, not a multiple of it
        obj = torch.load(file, map_location="cpu", weights_only=not unsafe_load, mmap=head == _ZIP_MAGIC)
    except Exception as err:  # torch.load raises many types for bad files; all mean "cannot use it"
        text = " ".join(str(err).split())
        refused = _refused_global(text)
        if refused is not None:
            raise CheckpointError(
                f"{name}: it pickles Python objects that weights_only loading refuses "
                f"({refused}): loading them would import and run code named in the file; only if you "
                "trust this file, load it with unsafe_load=True (CLI: --unsafe-load)"
            ) from None
        if head == _ZIP_MAGIC:
            raise CheckpointError(f"{name}: corrupt or truncated checkpoint ({_reason(err, text)})") from None
        if head[:1] == _PICKLE_PROTOCOL:
            raise CheckpointError(
                f"{name}: corrupt or truncated checkpoint (legacy torch.save format: {_reason(err, text)})"
            ) from None
        raise CheckpointError(f"{name}: not a checkpoint (not a file written by torch.save)") from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{str(file)!r}: not a checkpoint: holds a {type(obj).__name__}, expected a dict "
            "(a Lightning checkpoint or a state_dict)"
        )
    return obj


def checkpoint_state_dict(
    checkpoint: Mapping[str, Any], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: its ``"state_dict"``, or the dict itself when it is a state_dict.

    Raises:
        CheckpointError: neither a ``"state_dict"`` entry nor a mapping of tensors.
    """
    if "state_dict" in checkpoint:
        state = checkpoint["state_dict"]
        if not isinstance(state, Mapping):
            raise CheckpointError(
                f"{source}: its 'state_dict' is a {type(state).__name__}, expected a mapping of tensors"
            )
    else:
        state = checkpoint
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors and state is not checkpoint:
        raise CheckpointError(f"{source}: its 'state_dict' holds no tensors")
    if not tensors:
        keys = ", ".join(repr(k) for k in list(checkpoint)[:8]) or "(none)"
        raise CheckpointError(
            f"{source}: not a checkpoint: no 'state_dict' entry and no tensors (top-level keys: {keys})"
        )
    return dict(state) if state is not checkpoint else tensors


def ema_state_dict(
    checkpoint: Mapping[str, Any], source: str = "checkpoint", state_key: str | None = None
) -> dict[str, Any]:
    """The checkpoint's ``state_dict`` with the weights averaged by ``FrozenSafeEMA`` swapped in.

    Every tensor the EMA shadowed (the tensors that were trainable) is replaced by its average,
    cast to the raw tensor's dtype; every other tensor (frozen ones) keeps its raw value, which the
    EMA never touched.

    Args:
        checkpoint: a loaded Lightning checkpoint written with a ``FrozenSafeEMA`` callback.
        source: how to call the checkpoint in error messages.
        state_key: which ``FrozenSafeEMA`` state when it holds several; default: the only one.

    Raises:
        CheckpointError: no (or several, without ``state_key``) ``FrozenSafeEMA`` state, or a shadow
            that does not fit the ``state_dict``.
    """
    state = checkpoint_state_dict(checkpoint, source)
    callbacks = checkpoint.get("callbacks") or {}
    found = {k: v for k, v in callbacks.items() if isinstance(k, str) and k.startswith(EMA_STATE_PREFIX)}
    if state_key is not None and state_key not in found:
        raise CheckpointError(
            f"{source}: no EMA state {state_key!r}; valid choices: {sorted(found) or 'none'}"
        )
    if state_key is None and len(found) != 1:
        hint = (
            "pass the state key of one of them" if found else "was it trained with a FrozenSafeEMA callback?"
        )
        raise CheckpointError(f"{source}: holds {len(found)} FrozenSafeEMA states {sorted(found)}; {hint}")
    entry = found[state_key] if state_key is not None else next(iter(found.values()))
    ema = entry.get("ema") if isinstance(entry, Mapping) else None
    if not isinstance(ema, Mapping) or not isinstance(ema.get("shadow"), Mapping):
        raise CheckpointError(
            f"{source}: its FrozenSafeEMA state holds no averaged weights (saved before fit?)"
        )
    out = dict(state)
    averaged_by_view: dict[tuple[Any, ...], torch.Tensor] = {}
    for key, value in ema["shadow"].items():
        raw = out.get(key)
        if not isinstance(raw, torch.Tensor) or raw.shape != value.shape:
            raise CheckpointError(f"{source}: EMA tensor {key!r} does not fit its state_dict")
        out[key] = averaged_by_view[_view_id(raw)] = value.to(raw.dtype)
    # a tied weight appears under several keys (views of one storage) but is shadowed under one only
    for key, raw in state.items():
        if isinstance(raw, torch.Tensor) and _view_id(raw) in averaged_by_view:
            out[key] = averaged_by_view[_view_id(raw)]
    return out


def _view_id(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
    )


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTOCOL = b"\x80"  # legacy torch.save format starts with a pickle protocol opcode


def _check_zip_integrity(file: Path, name: str) -> None:
    """Check the CRC-32 of every entry: ``torch.load`` does not, so flipped bits would load silently."""
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{name}: corrupt or truncated checkpoint ({type(err).__name__}: {err})"
        ) from None
    if bad is not None:
        raise CheckpointError(f"{name}: corrupt checkpoint (CRC-32 mismatch in entry {bad!r})")


def _reason(err: BaseException, text: str) -> str:
    """A short reason for a load failure, without torch's multi-paragraph advice."""
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation", 1)[0].strip()
    else:
        text = text.split(". ", 1)[0]
    text = text[:120] + ("..." if len(text) > 120 else "")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _refused_global(text: str) -> str | None:
    """What the safe unpickler refused, from ``torch.load``'s message; ``None`` for other errors.

    torch < 2.14 says ``Unsupported global: GLOBAL functools.partial was not an allowed global``;
    torch 2.14 says ``unsupported GLOBAL posix.system whose module posix is blocked`` for modules
    it never allows (``os``, ``subprocess``, ...).
    """
    allowed = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if allowed:
        return f"global {allowed.group(1)} is not on the allow-list"
    blocked = re.search(r"unsupported GLOBAL (\S+) whose module (\S+) is blocked", text)
    if blocked:
        return f"global {blocked.group(1)} from module {blocked.group(2)}, which is blocked"
    return None


# ------------------------------------------------------------------------------------------------
# comparing
# ------------------------------------------------------------------------------------------------
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
#: elements compared per step: bounds the temporaries (float64 / int64 copies) of one comparison to a
#: few MiB whatever the tensor's size
COMPARE_CHUNK = 1 << 16
#: sparse tensors whose indices differ are compared through a dense copy up to this many elements
SPARSE_DENSE_LIMIT = 1 << 24


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a dense, non-quantized tensor as a flat integer tensor (CPU)."""
    data = tensor.detach()
    if data.is_complex():
        data = torch.view_as_real(data)
    data = data.contiguous().cpu().reshape(-1)
    if data.dtype == torch.bool:
        return data.view(torch.uint8)
    return data.view(_INT_VIEW[data.element_size()])


def _qparams(tensor: torch.Tensor) -> tuple[Any, ...]:
    """A quantized tensor's scheme and parameters (per-channel scales/zero points as tensors)."""
    scheme = tensor.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return (scheme, torch.tensor([tensor.q_scale()], dtype=torch.float64), tensor.q_zero_point())
    return (
        scheme,
        tensor.q_per_channel_scales(),
        tensor.q_per_channel_zero_points(),
        tensor.q_per_channel_axis(),
    )


def _qparams_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    pa, pb = _qparams(a), _qparams(b)
    return len(pa) == len(pb) and all(
        tensors_bitwise_equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(pa, pb, strict=True)
    )


def _sparse_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coalesced COO indices and values of any sparse layout (one canonical form per tensor)."""
    coo = tensor.detach().cpu()
    if coo.layout != torch.sparse_coo:
        coo = coo.to_sparse_coo()
    coo = coo.coalesce()
    return coo.indices(), coo.values()


def _is_sparse(tensor: torch.Tensor) -> bool:
    return tensor.layout != torch.strided


def tensors_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, layout, shape and the same bits (``-0.0 != 0.0``; NaN equal to an identical NaN).

    Sparse tensors are equal when their coalesced indices and values are; quantized tensors when
    their scheme, scale(s), zero point(s) and integer values are.
    """
    if a.dtype != b.dtype or a.shape != b.shape or a.layout != b.layout or a.is_quantized != b.is_quantized:
        return False
    if _is_sparse(a):
        (ia, va), (ib, vb) = _sparse_parts(a), _sparse_parts(b)
        return tensors_bitwise_equal(ia, ib) and tensors_bitwise_equal(va, vb)
    if a.is_quantized:
        return _qparams_equal(a, b) and torch.equal(_bits(a.int_repr()), _bits(b.int_repr()))
    return torch.equal(_bits(a), _bits(b))


def _ordered(bits: torch.Tensor, nbits: int) -> torch.Tensor:
    """Map float bit patterns (as signed ints) to int64 so that consecutive floats are consecutive ints.

    ``+0.0 -> 0`` and ``-0.0 -> -1``: every distinct bit pattern gets a distinct number, so two
    tensors that differ bitwise are at least 1 ulp apart.
    """
    wide = bits.to(torch.int64)
    magnitude = wide & ((1 << (nbits - 1)) - 1)
    return torch.where(wide < 0, -magnitude - 1, magnitude)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise distance in units in the last place between two float tensors of one dtype.

    The number of representable values of that dtype between ``a`` and ``b`` (``nextafter``
    steps), counting ``-0.0`` and ``+0.0`` as neighbours. Saturates at ``2**63 - 1`` (float64
    values of opposite sign and huge magnitude). NaNs give their bit-pattern distance, which is
    meaningless; check for NaN separately.

    Args:
        a: floating-point tensor.
        b: same dtype and shape as ``a``.

    Returns:
        an ``int64`` tensor of ``a``'s shape.

    Example::

        >>> x = torch.tensor([1.0, -0.0])
        >>> ulp_distance(x, torch.tensor([torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)), 0.0]))
        tensor([1, 1])
    """
    if not a.is_floating_point() or a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(
            f"ulp_distance needs two floating-point tensors of one dtype and shape; got {a.dtype} "
            f"{tuple(a.shape)} and {b.dtype} {tuple(b.shape)}"
        )
    nbits = a.element_size() * 8
    oa, ob = _ordered(_bits(a), nbits), _ordered(_bits(b), nbits)
    if nbits < 64:
        return (oa - ob).abs().reshape(a.shape)
    # int64 could overflow when the signs differ: |oa - ob| = |oa| + |ob| there, saturated
    limit = torch.iinfo(torch.int64).max
    same_sign = (oa < 0) == (ob < 0)
    small = (oa - ob).abs()
    ma, mb = oa.abs(), ob.abs()  # ordered values are > -2**63, so abs() is exact
    cross = torch.where(ma > limit - mb, torch.full_like(ma, limit), ma + mb)
    return torch.where(same_sign, small, cross).reshape(a.shape)


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


def _describe_dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _describe_layout(tensor: torch.Tensor) -> str:
    return str(tensor.layout).removeprefix("torch.")


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
        dtype_a=_describe_dtype(a),
        dtype_b=_describe_dtype(b),
    )
    if a.shape != b.shape:
        diff.status = "shape"
        return diff
    if tensors_bitwise_equal(a, b):
        return None
    if _is_sparse(a) or _is_sparse(b):
        _sparse_stats(diff, a, b)
    elif a.is_quantized or b.is_quantized:
        _quantized_stats(diff, a, b)
    else:
        _dense_stats(diff, a, b)
    return diff


def _sparse_stats(diff: TensorDiff, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.layout != b.layout:
        diff.status = "layout"
        diff.detail = f"layout {_describe_layout(a)} -> {_describe_layout(b)}"
    same_structure = False
    if _is_sparse(a) and _is_sparse(b):
        (ia, va), (ib, vb) = _sparse_parts(a), _sparse_parts(b)
        same_structure = tensors_bitwise_equal(ia, ib) and va.shape == vb.shape
        if same_structure:  # same stored positions: compare the stored values, whatever the size
            _dense_stats(diff, va, vb, elements_of=va[0].numel() if va.dim() > 1 else 1)
            return
    if a.numel() <= SPARSE_DENSE_LIMIT:
        if not same_structure and diff.status == "changed":
            diff.detail = "stored indices differ"
        _dense_stats(diff, a.detach().cpu().to_dense(), b.detach().cpu().to_dense())
    else:
        diff.detail = f"stored indices differ; not compared element-wise (over {SPARSE_DENSE_LIMIT} elements)"


def _quantized_stats(diff: TensorDiff, a: torch.Tensor, b: torch.Tensor) -> None:
    """Compare the real values a quantized tensor stands for (``max_abs`` in those units, no ulps)."""
    if a.is_quantized != b.is_quantized:
        diff.status = "dtype"
    values = TensorDiff(key=diff.key, status=diff.status)
    _dense_stats(values, a.dequantize() if a.is_quantized else a, b.dequantize() if b.is_quantized else b)
    diff.elements, diff.max_abs = values.elements, values.max_abs
    if a.is_quantized and b.is_quantized and a.dtype == b.dtype:
        if _qparams_equal(a, b):  # same parameters: the integer values say which elements differ
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
    elements, max_abs, nan_mismatch, max_ulps = 0, None, False, None
    step = max(COMPARE_CHUNK // elements_of, 1) * elements_of
    for start in range(0, flat_a.numel(), step):
        ca, cb = flat_a[start : start + step], flat_b[start : start + step]
        if same_dtype:
            differ = (_bits(ca) != _bits(cb)).reshape(ca.numel(), -1).any(dim=1)
            if not bool(differ.any()):
                continue  # bitwise equal: contributes no difference, no gap, no ulp
            elements += int(differ.reshape(-1, elements_of).any(dim=1).sum())
        da, db = ca.to(wide), cb.to(wide)
        nan_a, nan_b = da.isnan(), db.isnan()
        if not same_dtype:
            differ = (da != db) & ~(nan_a & nan_b)
            elements += int(differ.reshape(-1, elements_of).any(dim=1).sum())
        if bool((nan_a != nan_b).any()):
            nan_mismatch = True
        gap = (da - db).abs()
        gap = torch.where(gap.isnan(), torch.zeros_like(gap), gap)
        chunk_max = float(gap.max()) if gap.numel() else 0.0
        max_abs = chunk_max if max_abs is None else max(max_abs, chunk_max)
        if floating:
            comparable = ~(nan_a | nan_b)
            if bool(comparable.any()):
                chunk_ulps = int(ulp_distance(ca, cb)[comparable].max())
                max_ulps = chunk_ulps if max_ulps is None else max(max_ulps, chunk_ulps)
    diff.elements = elements
    if flat_a.numel():
        diff.max_abs = math.nan if nan_mismatch else (max_abs if max_abs is not None else 0.0)
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
    dtype = _describe_dtype(value) if isinstance(value, torch.Tensor) else type(value).__name__
    if status == "only_a":
        return TensorDiff(key=key, status=status, shape_a=shape, dtype_a=dtype)
    return TensorDiff(key=key, status=status, shape_b=shape, dtype_b=dtype)


# ------------------------------------------------------------------------------------------------
# merging
# ------------------------------------------------------------------------------------------------
def branch_names_in(state_dict: Iterable[str]) -> list[str]:
    """Branch names found in ``state_dict`` keys (``"branches.<name>.<...>"``), in order."""
    names: dict[str, None] = {}
    for key in state_dict:
        if key.startswith(BRANCH_PREFIX):
            names.setdefault(key[len(BRANCH_PREFIX) :].split(".", 1)[0], None)
    return list(names)


def _branch_keys(state_dict: Mapping[str, Any], name: str) -> list[str]:
    prefix = f"{BRANCH_PREFIX}{name}."
    return [k for k in state_dict if k.startswith(prefix)]


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
            keys = _branch_keys(state, name)
            if name in owner:
                first = states[owner[name]]
                diff = diff_state_dicts(
                    {k: first[k] for k in _branch_keys(first, name)}, {k: state[k] for k in keys}
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
    out: dict[str, Any] = {}
    for key in ("pytorch-lightning_version", "hparams_name"):
        if key in first:
            out[key] = first[key]
    if "pytorch-lightning_version" not in out and (version := _installed_lightning_version()):
        out["pytorch-lightning_version"] = version  # LightningModule.load_from_checkpoint requires it
    hparams_list = [c.get("hyper_parameters") for c in checkpoints]
    if all(isinstance(h, Mapping) for h in hparams_list):
        hparams = copy.deepcopy(dict(hparams_list[0]))
        for entry in _PER_BRANCH_HPARAMS:
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
    section = first.get("multi_branch")
    active = section.get("active_branch") if isinstance(section, Mapping) else None
    out["multi_branch"] = {
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


def save_checkpoint_atomic(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it onto ``path``.

    A crash or an error while writing leaves no partial file at ``path`` (and removes the
    temporary file). The file gets the mode a plain ``open(path, "wb")`` would give it: the mode
    of the file it replaces, else ``0o666`` minus the umask.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:  # an overwritten file keeps its mode, as with open(path, "wb")
        mode = stat.S_IMODE(target.stat().st_mode)
    except OSError:
        mode = 0o666 & ~_current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, mode)  # mkstemp creates 0600; a plain file create respects the umask
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(checkpoint), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(mask)
    return mask
