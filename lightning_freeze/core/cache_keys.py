"""Keys of the feature cache: one per sample (its input bits) and one per module state.

* :func:`sample_keys`: one key per row of a batch, over the row's exact bits, its dtype and its
  per-sample shape.
* :func:`tensor_digest` / :func:`module_state_key`: everything about a module that determines its
  output bits (every parameter and buffer, submodule types, modes, precision flags).
"""

from __future__ import annotations

import hashlib
import os
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import xxhash
from torch import nn

from lightning_freeze import _compat
from lightning_freeze.core.bits import raw_bytes
from lightning_freeze.core.fingerprint import fingerprint

__all__ = [
    "FORMAT_VERSION",
    "KEY_BYTES",
    "RowDigestMemo",
    "combine_row_digests",
    "context_flags",
    "key_throughput",
    "key_throughput_line",
    "module_modes",
    "module_state_key",
    "row_digests",
    "sample_keys",
    "tensor_digest",
    "tensor_key",
]

KEY_BYTES = 16  # 128-bit keys
# Version of the key and store format: mixed into every sample key and module key (and named by
# the disk store's file magic), so entries written under another format are never found or served.
# v1: BLAKE2b-128 sample keys; v2: XXH3-128 sample keys, exact argument encoding.
FORMAT_VERSION = 2
_FORMAT = b"lightning_freeze.feature_cache.v%d" % FORMAT_VERSION


def row_digests(tensor: torch.Tensor) -> list[bytes]:
    """One 16-byte XXH3-128 digest per row (along dim 0) of ``tensor``: its dtype, per-sample shape and bits.

    The per-tensor half of :func:`sample_keys`, computed where a batch is born (on the host, before
    it moves to an accelerator) and combined later by :func:`combine_row_digests`. Large tensors are
    hashed on several threads (XXH3 releases the GIL), with the same digests.

    Raises:
        ValueError: a 0-dim tensor.
    """
    if tensor.dim() == 0:
        raise ValueError("row_digests needs a tensor with a batch dimension (dim 0).")
    batch = tensor.shape[0]
    meta = f"{tensor.dtype}|{tuple(tensor.shape[1:])}".encode()
    prefix = xxhash.xxh3_128(_FORMAT + len(meta).to_bytes(8, "little") + meta)
    raw = raw_bytes(tensor)
    row = len(raw) // batch if batch else 0

    def digests(start: int, stop: int) -> list[bytes]:
        out = []
        for i in range(start, stop):
            h = prefix.copy()
            h.update(raw[i * row : (i + 1) * row])
            out.append(h.digest())
        return out

    workers = min(torch.get_num_threads(), batch)
    if workers > 1 and len(raw) >= _PARALLEL_HASH_BYTES:
        # XXH3 releases the GIL on large buffers: hash the samples on torch's intra-op threads, one
        # contiguous range of rows per thread (one task per row costs more than it saves)
        bounds = [batch * w // workers for w in range(workers + 1)]
        chunks = _hash_pool(workers).map(digests, bounds[:-1], bounds[1:])
        return [d for chunk in chunks for d in chunk]
    return digests(0, batch)


def tensor_key(tensor: torch.Tensor) -> bytes:
    """16-byte XXH3-128 digest of a whole tensor: its dtype, shape and bits (an argument without a batch)."""
    meta = f"{tensor.dtype}|{tuple(tensor.shape)}".encode()
    h = xxhash.xxh3_128(_FORMAT + len(meta).to_bytes(8, "little") + meta)
    h.update(raw_bytes(tensor))
    return h.digest()


def combine_row_digests(per_tensor: Sequence[Sequence[bytes]], context: bytes = b"") -> list[bytes]:
    """Sample keys from the :func:`row_digests` of every tensor of a call and the call's ``context``.

    Key ``i`` is XXH3-128 over the format version, ``context`` (length-prefixed) and row ``i``'s
    digest of every tensor, in order.

    Raises:
        ValueError: no tensor, or tensors with different batch sizes.
    """
    if not per_tensor:
        raise ValueError("sample_keys needs tensors with a batch dimension (dim 0).")
    batch = len(per_tensor[0])
    if any(len(d) != batch for d in per_tensor):
        raise ValueError(f"Tensors with different batch sizes: {[len(d) for d in per_tensor]}.")
    prefix = xxhash.xxh3_128(_FORMAT)
    prefix.update(len(context).to_bytes(8, "little"))
    prefix.update(context)
    prefix.update(len(per_tensor).to_bytes(8, "little"))
    keys = []
    for rows in zip(*per_tensor, strict=True):
        h = prefix.copy()
        h.update(b"".join(rows))
        keys.append(h.digest())
    return keys


def sample_keys(tensors: Sequence[torch.Tensor], context: bytes = b"") -> list[bytes]:
    """One 16-byte key per sample (row along dim 0) of ``tensors``.

    The key covers the format version, ``context`` and, for every tensor, its dtype, its
    per-sample shape and the raw bytes of row ``i`` (bits, not values: ``-0.0`` and ``0.0``
    differ): XXH3-128 over the XXH3-128 digest of each tensor's row (:func:`row_digests`,
    :func:`combine_row_digests`). Tensors on an accelerator are copied to the host first: key them
    where they are born (``FeatureCache`` does, before the batch moves to the device).

    Args:
        tensors: tensors with the same size along dim 0 (the batch).
        context: bytes mixed into every key (e.g. the exact encoding of the other arguments).

    Returns:
        ``len(tensors[0])`` keys.

    Raises:
        ValueError: no tensor, a 0-dim tensor, or tensors with different batch sizes.

    Example::

        >>> x = torch.zeros(2, 3)
        >>> a, b = sample_keys([x])
        >>> a == b, a == sample_keys([torch.zeros(1, 3, dtype=torch.float64)])[0]
        (True, False)
    """
    if not tensors or any(t.dim() == 0 for t in tensors):
        raise ValueError("sample_keys needs tensors with a batch dimension (dim 0).")
    if any(t.shape[0] != tensors[0].shape[0] for t in tensors):
        raise ValueError(f"Tensors with different batch sizes: {[t.shape[0] for t in tensors]}.")
    return combine_row_digests([row_digests(t) for t in tensors], context)


class RowDigestMemo:
    """Row digests of a batch's host tensors, found again by the tensor that carries those rows.

    ``remember(host, moved)`` files a host tensor under ``moved`` (the same values after a move to
    the device, or the host tensor itself); ``lookup(t)`` returns the row digests of the host tensor
    for that very tensor object, only while the shape, dtype, device and version counter of both are
    what they were (an in-place write to the batch makes it hash again). The rows are hashed at the
    first lookup, on the host (a tensor the module is never called on, such as the target, or a
    batch a skipped epoch serves from the store, is never hashed), and kept for later lookups.
    Inference tensors (moved under ``torch.inference_mode``, e.g. by Lightning's evaluation loops on
    an accelerator) have no version counter: they are not remembered and hash at the call. Holds the
    latest batch only (its host tensors stay alive until :meth:`clear`).
    """

    def __init__(self) -> None:
        # id(moved) -> (weakref to moved, its token, host tensor, its token, digests once hashed)
        self._rows: dict[int, list[Any]] = {}

    def clear(self) -> None:
        """Forget every remembered tensor."""
        self._rows.clear()

    def remember(self, host: torch.Tensor, moved: torch.Tensor) -> None:
        """File ``host`` (a CPU tensor) under ``moved`` (same values); hashed at the first lookup."""
        if host.dim() == 0 or host.shape != moved.shape or host.dtype != moved.dtype:
            return
        token = self._token(moved)
        if token[-1] is None:  # an inference tensor has no version counter: writes would go unseen
            return
        self._rows[id(moved)] = [weakref.ref(moved), token, host, self._token(host), None]

    def lookup(self, tensor: torch.Tensor) -> list[bytes] | None:
        """The row digests of the host tensor filed under ``tensor`` (hashed now if not yet), or ``None``."""
        found = self._rows.get(id(tensor))
        if found is None or found[0]() is not tensor or found[1] != self._token(tensor):
            return None
        if found[4] is None:
            host = found[2]
            if self._token(host) != found[3]:  # the host tensor was written in place since the move
                return None
            found[4] = row_digests(host)
        return found[4]

    @staticmethod
    def _token(tensor: torch.Tensor) -> tuple[Any, ...]:
        return (
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
            tensor.device,
            _compat.tensor_version(tensor),
        )


_PARALLEL_HASH_BYTES = 1 << 20
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _hash_pool(workers: int) -> ThreadPoolExecutor:
    # keyed by process id too: a forked child (DataLoader worker, multiprocessing) has no threads
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="lightning_freeze_hash")
    return _POOLS[key]


def module_modes(module: nn.Module) -> tuple[bool, ...]:
    """The train/eval mode of every submodule, in ``module.modules()`` order."""
    return tuple(m.training for m in module.modules())


def context_flags(device_type: str) -> tuple[Any, ...]:
    """Global settings that change a module's output bits on ``device_type``."""
    try:
        autocast = (torch.is_autocast_enabled(device_type), str(torch.get_autocast_dtype(device_type)))
    except (RuntimeError, TypeError):  # a device type without autocast support
        autocast = (False, "")
    return (
        device_type,
        autocast,
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.__version__,
    )


def tensor_digest(module: nn.Module) -> bytes:
    """BLAKE2b-128 over the fingerprint (bits, dtype, shape) of every parameter and buffer of ``module``.

    Non-persistent buffers count too (they change the output as much as the others).
    """
    h = hashlib.blake2b(_FORMAT, digest_size=KEY_BYTES)
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    for key, fp in fingerprint(tensors).items():
        h.update(f"{key}|{fp.digest}|{fp.dtype}|{fp.shape}\n".encode())
    return h.digest()


def module_state_key(module: nn.Module, device_type: str = "cpu", tensors: bytes | None = None) -> bytes:
    """16-byte key of everything about ``module`` that determines its output bits.

    Covers every parameter and buffer (bits, dtype, shape: :func:`tensor_digest`), the type,
    ``extra_repr`` and mode of every submodule, and the global state that changes results on
    ``device_type`` (autocast enabled/dtype, float32 matmul precision, TF32 and cuDNN flags,
    deterministic algorithms, the torch version).

    Args:
        module: the module.
        device_type: where it computes (``"cpu"``, ``"cuda"``, ...).
        tensors: a :func:`tensor_digest` of ``module`` computed earlier (saves hashing the weights).

    Example::

        >>> net = nn.Linear(2, 2)
        >>> before = module_state_key(net)
        >>> with torch.no_grad():
        ...     _ = net.bias.add_(1)
        >>> before == module_state_key(net), before == module_state_key(net.eval())
        (False, False)
    """
    h = hashlib.blake2b(tensors if tensors is not None else tensor_digest(module), digest_size=KEY_BYTES)
    for name, sub in module.named_modules():
        cls = type(sub)
        h.update(f"{name}|{cls.__module__}.{cls.__qualname__}|{sub.extra_repr()}|{sub.training}\n".encode())
    h.update(repr(context_flags(device_type)).encode())
    return h.digest()


def key_throughput(
    batch: int = 64, sample_shape: Sequence[int] = (3, 224, 224), rounds: int = 3
) -> dict[str, float]:
    """Measure :func:`sample_keys` against ``tensor.clone()`` on one float32 CPU batch, in GB/s.

    Both are timed in the same rounds (interleaved); the best round of each counts. A reference for
    what a cache hit costs per byte of input next to a plain memory copy.

    Args:
        batch: samples per batch.
        sample_shape: shape of one sample.
        rounds: timed rounds (after one warm-up).

    Returns:
        ``{"sample_keys_gb_s": ..., "clone_gb_s": ..., "bytes": ..., "threads": ...}``.
    """
    x = torch.randn(batch, *sample_shape)
    size = x.numel() * x.element_size()
    sample_keys([x])
    x.clone()
    best_keys = best_clone = float("inf")
    for _ in range(max(1, rounds)):
        start = time.perf_counter()
        sample_keys([x])
        best_keys = min(best_keys, time.perf_counter() - start)
        start = time.perf_counter()
        x.clone()
        best_clone = min(best_clone, time.perf_counter() - start)
    return {
        "sample_keys_gb_s": size / best_keys / 1e9,
        "clone_gb_s": size / best_clone / 1e9,
        "bytes": float(size),
        "threads": float(torch.get_num_threads()),
    }


def key_throughput_line(**kwargs: Any) -> str:
    """One printable line of :func:`key_throughput` with the load average (for benchmarks and docs).

    Example: ``python -c "from lightning_freeze.core.cache_keys import key_throughput_line as k; print(k())"``
    """
    result = key_throughput(**kwargs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"sample_keys {result['sample_keys_gb_s']:.2f} GB/s, tensor.clone() {result['clone_gb_s']:.2f} GB/s "
        f"({result['bytes'] / 1e6:.1f} MB float32 batch, {int(result['threads'])} threads, "
        f"load average {load:.2f})"
    )
