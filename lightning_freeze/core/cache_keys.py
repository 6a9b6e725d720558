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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import xxhash
from torch import nn

from lightning_freeze.core.bits import raw_bytes
from lightning_freeze.core.fingerprint import fingerprint

__all__ = [
    "FORMAT_VERSION",
    "KEY_BYTES",
    "context_flags",
    "key_throughput",
    "module_modes",
    "module_state_key",
    "sample_keys",
    "tensor_digest",
]

KEY_BYTES = 16  # 128-bit keys
# Version of the key and store format: mixed into every sample key and module key (and named by
# the disk store's file magic), so entries written under another format are never found or served.
# v1: BLAKE2b-128 sample keys; v2: XXH3-128 sample keys, exact argument encoding.
FORMAT_VERSION = 2
_FORMAT = b"lightning_freeze.feature_cache.v%d" % FORMAT_VERSION


def sample_keys(tensors: Sequence[torch.Tensor], context: bytes = b"") -> list[bytes]:
    """One 16-byte key per sample (row along dim 0) of ``tensors``.

    The key is XXH3-128 over the format version, ``context`` and, for every tensor, its dtype,
    its per-sample shape and the raw bytes of row ``i`` (bits, not values: ``-0.0`` and ``0.0``
    differ). Large batches are hashed on several threads (XXH3 releases the GIL), with the same keys.
    Tensors on an accelerator are copied to the host first: key them where they are born (see
    ``FeatureCache``), not on the device.

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
    batch = tensors[0].shape[0]
    if any(t.shape[0] != batch for t in tensors):
        raise ValueError(f"Tensors with different batch sizes: {[t.shape[0] for t in tensors]}.")
    prefix = xxhash.xxh3_128(_FORMAT)
    prefix.update(len(context).to_bytes(8, "little"))
    prefix.update(context)
    views = []
    for t in tensors:
        meta = f"{t.dtype}|{tuple(t.shape[1:])}".encode()
        prefix.update(len(meta).to_bytes(8, "little") + meta)
        raw = raw_bytes(t)
        views.append((raw, len(raw) // batch if batch else 0))

    def key(i: int) -> bytes:
        h = prefix.copy()
        for raw, row in views:
            h.update(raw[i * row : (i + 1) * row])
        return h.digest()

    workers = min(torch.get_num_threads(), batch)
    if workers > 1 and sum(len(raw) for raw, _ in views) >= _PARALLEL_HASH_BYTES:
        # XXH3 releases the GIL on large buffers: hash the samples on torch's intra-op threads
        return list(_hash_pool(workers).map(key, range(batch)))
    return [key(i) for i in range(batch)]


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


if __name__ == "__main__":  # python -m lightning_freeze.core.cache_keys
    result = key_throughput()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"sample_keys {result['sample_keys_gb_s']:.2f} GB/s, tensor.clone() {result['clone_gb_s']:.2f} GB/s "
        f"({result['bytes'] / 1e6:.1f} MB batch, {int(result['threads'])} threads, "
        f"load average {load[0]:.2f})"
    )
