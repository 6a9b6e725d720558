"""Bit-level tensor comparison: raw bit views, bitwise equality, distance in ulps.

Every comparison is on the raw bits: ``-0.0`` and ``0.0`` differ, a NaN equals only a NaN with the
same payload. Sparse tensors compare by their coalesced indices and values, quantized tensors by
their quantization scheme, parameters and integer values.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "coalesced_sparse_parts",
    "dense_cpu",
    "is_sharded",
    "is_sparse",
    "quantization_equal",
    "raw_bytes",
    "tensor_bits",
    "tensors_bitwise_equal",
    "ulp_distance",
]

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def dense_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with the same elements: the tensor itself when it already is one.

    Lazy conjugate/negative views are resolved and complex tensors become their (real, imag) pairs
    (``torch.view_as_real``), so the result's raw bytes are the tensor's values. The one byte view
    under :func:`tensor_bits` and :func:`~lightning_freeze.core.fingerprint.tensor_bytes`.

    Raises:
        TypeError: a sharded ``DTensor`` (pass its ``to_local()`` shard on each rank).
    """
    data = tensor.detach()
    if type(data) is not torch.Tensor and is_sharded(data):
        raise TypeError(
            f"Cannot read the bytes of a sharded {type(data).__name__} of global shape "
            f"{tuple(data.shape)}: pass its local shard (tensor.to_local()) on each rank."
        )
    # cheap checks only: per-tensor Python overhead adds up on models with many small tensors
    if data.is_complex():
        data = torch.view_as_real(data.resolve_conj())
    if data.is_neg():
        data = data.resolve_neg()
    if not data.is_contiguous():
        data = data.contiguous()
    if not data.is_cpu:
        data = data.cpu()
    return data


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as a flat byte view (row-major; no copy for a contiguous CPU tensor).

    The bytes of :func:`dense_cpu`: complex tensors give (real, imag) pairs, lazy views are resolved,
    tensors elsewhere are copied to the host.
    """
    return memoryview(dense_cpu(tensor).reshape(-1).view(torch.uint8).numpy())


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2, tensor parallel): its elements live on several ranks."""
    return isinstance(tensor, torch.Tensor) and callable(getattr(tensor, "to_local", None))


def tensor_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a dense, non-quantized tensor as a flat integer tensor (CPU), in row-major order.

    Same element size (bool and 1-byte floats as ``uint8``/``int8``), no copy for a contiguous CPU
    tensor; complex tensors give their real and imaginary parts as two elements, and lazy
    conjugate/negative views are resolved first (see :func:`dense_cpu`).

    Raises:
        TypeError: a sharded ``DTensor``.

    Example::

        >>> tensor_bits(torch.tensor([1.0, -0.0])).tolist()
        [1065353216, -2147483648]
    """
    data = dense_cpu(tensor).reshape(-1)
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


def quantization_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two quantized tensors with the same scheme, scale(s), zero point(s) and axis, bitwise."""
    pa, pb = _qparams(a), _qparams(b)
    return len(pa) == len(pb) and all(
        tensors_bitwise_equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(pa, pb, strict=True)
    )


def coalesced_sparse_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coalesced COO indices and values of any sparse layout (one canonical form per tensor)."""
    coo = tensor.detach().cpu()
    if coo.layout != torch.sparse_coo:
        coo = coo.to_sparse_coo()
    coo = coo.coalesce()
    return coo.indices(), coo.values()


def is_sparse(tensor: torch.Tensor) -> bool:
    """Any sparse layout (COO, CSR, CSC, BSR, BSC)."""
    return tensor.layout != torch.strided


def tensors_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, layout, shape and the same bits (``-0.0 != 0.0``; NaN equal to an identical NaN).

    Sparse tensors are equal when their coalesced indices and values are; quantized tensors when
    their scheme, scale(s), zero point(s) and integer values are.
    """
    if a.dtype != b.dtype or a.shape != b.shape or a.layout != b.layout or a.is_quantized != b.is_quantized:
        return False
    if is_sparse(a):
        (ia, va), (ib, vb) = coalesced_sparse_parts(a), coalesced_sparse_parts(b)
        return tensors_bitwise_equal(ia, ib) and tensors_bitwise_equal(va, vb)
    if a.is_quantized:
        return quantization_equal(a, b) and torch.equal(tensor_bits(a.int_repr()), tensor_bits(b.int_repr()))
    return torch.equal(tensor_bits(a), tensor_bits(b))


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
    oa, ob = _ordered(tensor_bits(a), nbits), _ordered(tensor_bits(b), nbits)
    if nbits < 64:
        return (oa - ob).abs().reshape(a.shape)
    # int64 could overflow when the signs differ: |oa - ob| = |oa| + |ob| there, saturated
    limit = torch.iinfo(torch.int64).max
    same_sign = (oa < 0) == (ob < 0)
    small = (oa - ob).abs()
    ma, mb = oa.abs(), ob.abs()  # ordered values are > -2**63, so abs() is exact
    cross = torch.where(ma > limit - mb, torch.full_like(ma, limit), ma + mb)
    return torch.where(same_sign, small, cross).reshape(a.shape)
