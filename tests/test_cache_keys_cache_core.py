"""Sample keys (XXH3-128, versioned): exact over bits, dtype and shape; old stores never misread."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from torch import nn

from lightning_freeze.core.cache_keys import key_throughput
from lightning_freeze.core.feature_cache import DiskStore, OutputCache, sample_keys


def test_equal_bits_give_equal_keys_and_one_flipped_bit_another() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5)
    same = sample_keys([x.clone()])
    assert sample_keys([x]) == same
    assert len(set(same)) == 8
    for dtype_bits, flat_index in ((torch.int32, 0), (torch.int32, 37), (torch.int32, 74)):
        flipped = x.clone()
        view = flipped.view(dtype_bits).reshape(-1)
        view[flat_index] ^= 1  # lowest mantissa bit of one element of sample 0
        keys = sample_keys([flipped])
        assert keys[0] != same[0]
        assert keys[1:] == same[1:]


def test_negative_zero_dtype_and_shape_give_other_keys() -> None:
    zeros = torch.zeros(2, 6)
    key = sample_keys([zeros])[0]
    assert sample_keys([-zeros])[0] != key
    assert torch.equal(zeros, -zeros)  # equal values, other bits
    assert sample_keys([zeros.to(torch.int32)])[0] != key  # same bytes, another dtype
    assert sample_keys([zeros.reshape(2, 2, 3)])[0] != key  # same bytes, another per-sample shape
    assert sample_keys([zeros], context=b"a")[0] != key
    # the context and the tensors cannot trade bytes
    assert sample_keys([zeros], context=b"ab") != sample_keys([zeros], context=b"a")


def test_permuted_rows_give_permuted_keys() -> None:
    torch.manual_seed(1)
    x = torch.randn(16, 7)
    perm = torch.randperm(16)
    keys = sample_keys([x])
    assert sample_keys([x[perm]]) == [keys[i] for i in perm.tolist()]


def test_threaded_keys_equal_single_threaded_keys() -> None:
    torch.manual_seed(2)
    x = torch.randn(64, 3, 64, 64)  # 3 MiB: hashed on threads when torch has more than one
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = sample_keys([x])
        torch.set_num_threads(4)
        assert sample_keys([x]) == single
    finally:
        torch.set_num_threads(threads)


def _v1_file(state: bytes, key: bytes, payload_tensor: torch.Tensor) -> bytes:
    """A file as the v1 (BLAKE2b) disk store wrote it, holding ``payload_tensor``."""
    magic = b"LFFCACHE1\n"
    preamble = struct.Struct(f"<{len(magic)}s16s16sIQ16s")
    header = json.dumps(
        {"structure": "T", "leaves": [[str(payload_tensor.dtype), list(payload_tensor.shape)]]},
        separators=(",", ":"),
    ).encode()
    payload = payload_tensor.contiguous().numpy().tobytes()
    checksum = hashlib.blake2b(header + payload, digest_size=16).digest()
    return preamble.pack(magic, state, key, len(header), len(payload), checksum) + header + payload


def test_an_old_format_file_at_the_same_path_is_never_served(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = nn.Linear(4, 3).eval().requires_grad_(False)
    x = torch.randn(2, 4)
    truth = net(x)
    cache = OutputCache(net, store="disk", directory=tmp_path)
    with cache:
        net(x)  # learn the paths
    state, keys, _ = cache.last_call
    files = sorted(tmp_path.rglob("*.feat"))
    assert len(files) == 2
    for file in files:  # replace each file by a valid v1 file with the same keys and wrong features
        key = next(k for k in keys if k.hex()[2:] in file.name)
        file.write_bytes(_v1_file(state, key, torch.full((3,), 7.0)))
    fresh = OutputCache(net, store=DiskStore(tmp_path))
    with fresh:
        served = net(x)
    assert torch.equal(served, truth)
    assert fresh.stats["hits"] == 0 and fresh.stats["corrupt"] == 2
    with fresh:  # rebuilt in the current format: now they hit
        assert torch.equal(net(x), truth)
    assert fresh.stats["hits"] == 2


def test_key_throughput_reports_both_rates() -> None:
    result = key_throughput(batch=4, sample_shape=(3, 8, 8), rounds=1)
    assert result["sample_keys_gb_s"] > 0 and result["clone_gb_s"] > 0
    assert result["bytes"] == 4 * 3 * 8 * 8 * 4
