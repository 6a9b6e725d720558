"""Exact, device-independent fingerprints of parameters and buffers, and their diff.

A fingerprint is a 128-bit digest of a tensor's raw bytes plus its dtype and shape: two tensors get
the same fingerprint exactly when they are bitwise equal (up to a ~2**-128 chance per tensor that an
accidental change goes unseen), whatever device they live on and whatever their memory layout.
``-0.0`` and ``0.0`` differ, NaNs with different payloads differ: this is about bits, not values.

Algorithms (the digest string says which one made it):

* ``"xxh3-128"`` (default): XXH3 128-bit from the ``xxhash`` package, digests written
  ``"xxh3-128:<32 hex digits>"``. Not cryptographic, but built for exactly this job (detecting any
  accidental change): it passes SMHasher's collision and avalanche tests as an ideal 128-bit hash,
  runs near memory bandwidth (about 10 GB/s per core here, 20x BLAKE2b) and releases the GIL, so
  tensors are hashed in parallel threads.
* ``"blake2b-128"``: BLAKE2b with a 16-byte digest (hashlib), written as bare hex without a prefix:
  the format of version 0.1, so fingerprints stored in older checkpoints are read as this algorithm.
  Choose it when the threat is deliberate forgery rather than accidental change.

A reference fingerprint is always checked with its own algorithm: :func:`verify_fingerprints` (or
``fingerprint(..., like=reference)``) recomputes each tensor with the algorithm of its reference, so
a checkpoint written by an older version still verifies.

Example::

    >>> net = nn.Linear(2, 2)
    >>> ref = fingerprint(net)
    >>> ref["bias"].algorithm
    'xxh3-128'
    >>> verify_fingerprints(ref, net).summary()
    'checked 2 frozen tensors: 0 changed'
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import xxhash
from torch import nn

from lightning_freeze.core.bits import dense_cpu, tensor_bits
from lightning_freeze.core.validation import check_int

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "FingerprintDiff",
    "TensorFingerprint",
    "diff_fingerprints",
    "fingerprint",
    "fingerprints_from_plain",
    "tensor_bytes",
    "tensor_fingerprint",
    "verify_fingerprints",
]

Algorithm = Literal["xxh3-128", "blake2b-128"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
DEFAULT_ALGORITHM: Algorithm = "xxh3-128"
Buffer = Any  # anything with the buffer protocol (here: a uint8 numpy view of a tensor's bytes)
_LEGACY_ALGORITHM: Algorithm = "blake2b-128"  # digests without a prefix (version 0.1 checkpoints)

# tensors at least this large are hashed in the thread pool (smaller ones cost more to hand over)
_PARALLEL_MIN_BYTES = 256 << 10


def _blake2b_128(raw: Buffer) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


_HASHERS: dict[str, Callable[[Buffer], str]] = {
    "xxh3-128": xxhash.xxh3_128_hexdigest,
    "blake2b-128": _blake2b_128,
}


def _check_algorithm(algorithm: str, what: str = "algorithm") -> None:
    if algorithm not in _HASHERS:
        raise ValueError(f"Unknown fingerprint {what} {algorithm!r}; valid choices: {', '.join(ALGORITHMS)}.")


@dataclass(frozen=True)
class TensorFingerprint:
    """Digest, dtype and shape of one tensor.

    ``digest`` is ``"<algorithm>:<hex>"``, or bare hex for ``"blake2b-128"`` (the format of
    version 0.1 checkpoints; a ``"blake2b-128:"`` prefix is accepted and dropped, so both spellings
    compare equal).
    """

    digest: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        prefix = f"{_LEGACY_ALGORITHM}:"
        if self.digest.startswith(prefix):
            object.__setattr__(self, "digest", self.digest[len(prefix) :])

    @property
    def algorithm(self) -> str:
        """The algorithm that made :attr:`digest` (``"blake2b-128"`` for an unprefixed digest)."""
        algorithm, sep, _ = self.digest.rpartition(":")
        return algorithm if sep else _LEGACY_ALGORITHM


@dataclass
class FingerprintDiff:
    """What differs between two fingerprints (see :func:`diff_fingerprints`).

    Attributes:
        changed: keys present in both whose bits differ (values, dtype or shape).
        missing: keys only in ``before``.
        added: keys only in ``after``.
        checked: number of keys present in both.
    """

    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    checked: int = 0

    def __bool__(self) -> bool:
        """True when anything differs."""
        return bool(self.changed or self.missing or self.added)

    def summary(self) -> str:
        """One line, e.g. ``"checked 12 frozen tensors: 0 changed"``."""
        text = f"checked {self.checked} frozen tensors: {len(self.changed)} changed"
        if self.missing:
            text += f", {len(self.missing)} missing"
        if self.added:
            text += f", {len(self.added)} added"
        return text


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, in row-major element order, as a flat contiguous ``uint8`` CPU tensor.

    A view without copying when the tensor is a contiguous CPU tensor; otherwise only the viewed
    elements are copied (on the tensor's device first, then to the host). Lazy conjugate/negative
    views are resolved, complex tensors give their (real, imag) pairs, and bf16/fp8/bool need no
    numpy dtype.

    Raises:
        TypeError: a sharded ``DTensor`` (pass its ``to_local()`` shard on each rank).

    Example::

        >>> tensor_bytes(torch.tensor([1.0], dtype=torch.bfloat16)).tolist()
        [128, 63]
    """
    return tensor_bits(tensor).view(torch.uint8)


# dtype -> does Tensor.numpy() support it (bf16 and fp8 have no numpy dtype: hashed via a uint8 view)
_NUMPY_DTYPES: dict[torch.dtype, bool] = {}
_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _host_buffer(tensor: torch.Tensor) -> Buffer:
    """The bytes of :func:`tensor_bytes` as a zero-copy numpy view, with fewer torch calls."""
    data = dense_cpu(tensor)
    supported = _NUMPY_DTYPES.get(data.dtype)
    if supported is None:
        try:
            data.reshape(-1)[:0].numpy()
            supported = True
        except TypeError:
            supported = False
        _NUMPY_DTYPES[data.dtype] = supported
    return data.numpy() if supported else data.reshape(-1).view(torch.uint8).numpy()


def _digest(tensor: torch.Tensor, algorithm: str) -> TensorFingerprint:
    hexdigest = _HASHERS[algorithm](_host_buffer(tensor))
    digest = hexdigest if algorithm == _LEGACY_ALGORITHM else f"{algorithm}:{hexdigest}"
    dtype = tensor.dtype
    name = _DTYPE_NAMES.get(dtype) or _DTYPE_NAMES.setdefault(dtype, str(dtype).removeprefix("torch."))
    return TensorFingerprint(digest, name, tuple(tensor.shape))


def tensor_fingerprint(tensor: torch.Tensor, algorithm: Algorithm = DEFAULT_ALGORITHM) -> TensorFingerprint:
    """Fingerprint one tensor (any device, any dtype, contiguous or not).

    Args:
        tensor: the tensor.
        algorithm: ``"xxh3-128"`` (default) or ``"blake2b-128"`` (see the module docstring).

    Returns:
        its :class:`TensorFingerprint`.

    Raises:
        ValueError: an unknown ``algorithm`` (the message lists the valid choices).
        TypeError: a sharded ``DTensor`` (fingerprint its ``to_local()`` shard on each rank).

    Example::

        >>> tensor_fingerprint(torch.zeros(2)) == tensor_fingerprint(torch.zeros(2, 2)[:, 0])
        True
        >>> tensor_fingerprint(torch.zeros(1)) == tensor_fingerprint(-torch.zeros(1))
        False
    """
    _check_algorithm(algorithm)
    return _digest(tensor, algorithm)


def _default_threads() -> int:
    # torch's intra-op thread count: what the user (or a launcher: torchrun sets OMP_NUM_THREADS=1
    # per rank) allows this process; more than 8 threads do not help a memory-bound hash
    return max(1, min(8, torch.get_num_threads()))


def fingerprint(
    source: nn.Module | Mapping[str, torch.Tensor],
    keys: Iterable[str] | None = None,
    *,
    algorithm: Algorithm = DEFAULT_ALGORITHM,
    like: Mapping[str, TensorFingerprint] | None = None,
    threads: int | None = None,
) -> dict[str, TensorFingerprint]:
    """Fingerprint the parameters and buffers of a module (or any ``{name: tensor}`` mapping).

    Tensors are hashed in parallel threads (the hash and the device-to-host copies release the GIL);
    the digests do not depend on the number of threads.

    Args:
        source: a module (its ``state_dict(keep_vars=True)`` is used, so keys are the usual
            ``state_dict`` keys, e.g. ``"backbone.5.running_var"``) or a mapping of tensors.
        keys: only these keys (default: all). A key that is not in ``source`` raises ``KeyError``
            naming it.
        algorithm: ``"xxh3-128"`` (default) or ``"blake2b-128"``.
        like: reference fingerprints: a key found in ``like`` is hashed with the algorithm of its
            reference (so the result can be compared with a reference read from an older checkpoint);
            other keys use ``algorithm``.
        threads: hashing threads (default: ``torch.get_num_threads()``, at most 8); ``1`` hashes in
            the calling thread.

    Returns:
        ``{key: TensorFingerprint}``, in the order of ``keys`` (or of ``source``).

    Raises:
        KeyError: a key that is not in ``source``.
        ValueError: an unknown ``algorithm``, an unknown algorithm in a ``like`` digest, or
            ``threads < 1``.
        TypeError: a sharded ``DTensor`` (fingerprint ``{key: t.to_local()}`` on each rank).
    """
    _check_algorithm(algorithm)
    check_int("threads", threads, minimum=1, allow_none=True)
    tensors = source.state_dict(keep_vars=True) if isinstance(source, nn.Module) else source
    if keys is None:
        selected = list(tensors)
    else:
        selected = list(keys)
        unknown = [k for k in selected if k not in tensors]
        if unknown:
            raise KeyError(f"No tensor named {unknown[0]!r} to fingerprint ({len(unknown)} unknown key(s)).")
    jobs: list[tuple[str, torch.Tensor, str]] = []
    for key in selected:
        tensor = tensors[key]
        if not isinstance(tensor, torch.Tensor):
            continue
        key_algorithm = algorithm
        if like is not None and key in like:
            key_algorithm = like[key].algorithm
            _check_algorithm(key_algorithm, f"algorithm of the reference digest for {key!r}:")
        jobs.append((key, tensor, key_algorithm))
    # Only large tensors go to the thread pool: hashing them releases the GIL; small ones are mostly
    # Python overhead, cheaper in the calling thread (meanwhile) than handed around between threads.
    large = [i for i, (_, t, _) in enumerate(jobs) if t.numel() * t.element_size() >= _PARALLEL_MIN_BYTES]
    workers = min(threads or _default_threads(), len(large))
    if workers > 1:
        large.sort(key=lambda i: -jobs[i][1].numel() * jobs[i][1].element_size())  # longest first
        with ThreadPoolExecutor(workers, thread_name_prefix="fingerprint") as pool:
            futures = {i: pool.submit(_digest, jobs[i][1], jobs[i][2]) for i in large}
            done = {i: _digest(t, a) for i, (_, t, a) in enumerate(jobs) if i not in futures}
        done.update({i: future.result() for i, future in futures.items()})
        return {key: done[i] for i, (key, _, _) in enumerate(jobs)}
    return {key: _digest(tensor, key_algorithm) for key, tensor, key_algorithm in jobs}


def diff_fingerprints(
    before: Mapping[str, TensorFingerprint], after: Mapping[str, TensorFingerprint]
) -> FingerprintDiff:
    """Compare two fingerprints key by key.

    Args:
        before: the reference.
        after: the current fingerprints, made with the same algorithm per key (use
            ``fingerprint(..., like=before)`` or :func:`verify_fingerprints` when ``before`` may come
            from an older checkpoint).

    Returns:
        the :class:`FingerprintDiff`.

    Raises:
        ValueError: a key whose two digests were made by different algorithms (they cannot be
            compared; the message names the key and both algorithms).

    Example::

        >>> net = nn.Linear(2, 2)
        >>> ref = fingerprint(net)
        >>> with torch.no_grad():
        ...     _ = net.bias.add_(1)
        >>> diff_fingerprints(ref, fingerprint(net)).changed
        ['bias']
    """
    result = FingerprintDiff()
    for key, fp in before.items():
        if key not in after:
            result.missing.append(key)
            continue
        result.checked += 1
        if after[key].algorithm != fp.algorithm:
            raise ValueError(
                f"Cannot compare fingerprints of {key!r}: the reference was made with "
                f"{fp.algorithm!r}, the current one with {after[key].algorithm!r}. Fingerprint the "
                "current tensors with fingerprint(..., like=reference) or use verify_fingerprints()."
            )
        if after[key] != fp:
            result.changed.append(key)
    result.added = [k for k in after if k not in before]
    return result


def verify_fingerprints(
    reference: Mapping[str, TensorFingerprint],
    source: nn.Module | Mapping[str, torch.Tensor],
    *,
    threads: int | None = None,
) -> FingerprintDiff:
    """Check the tensors of ``source`` against a reference, each with its reference's algorithm.

    Args:
        reference: fingerprints from earlier (e.g. fit start, or read from a checkpoint of any
            version of this package).
        source: the module (``state_dict`` keys) or mapping of tensors to check now.
        threads: see :func:`fingerprint`.

    Returns:
        the :class:`FingerprintDiff` (``added`` is always empty: only reference keys are checked;
        a reference key absent from ``source`` is ``missing``).

    Example::

        >>> net = nn.Linear(2, 2)
        >>> old = fingerprint(net, algorithm="blake2b-128")  # e.g. from a version 0.1 checkpoint
        >>> verify_fingerprints(old, net).changed
        []
    """
    tensors = source.state_dict(keep_vars=True) if isinstance(source, nn.Module) else source
    present = [k for k in reference if k in tensors and isinstance(tensors[k], torch.Tensor)]
    return diff_fingerprints(reference, fingerprint(tensors, present, like=reference, threads=threads))


def fingerprints_from_plain(
    plain: Mapping[str, tuple[str, str, Iterable[int]] | list[Any]],
) -> dict[str, TensorFingerprint]:
    """Fingerprints from their plain form ``{key: [digest, dtype, shape]}`` (checkpoints, collectives).

    Example::

        >>> fingerprints_from_plain({"w": ["xxh3-128:" + "0" * 32, "torch.float32", [2]]})["w"].shape
        (2,)
    """
    return {
        key: TensorFingerprint(digest, dtype, tuple(shape)) for key, (digest, dtype, shape) in plain.items()
    }
