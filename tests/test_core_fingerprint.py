"""Fingerprints are exact (bit level) and device independent; diffs name what changed."""

from __future__ import annotations

import hashlib
import importlib

import pytest
import torch
import xxhash
from torch import nn

from lightning_freeze.core.fingerprint import (
    TensorFingerprint,
    diff_fingerprints,
    fingerprint,
    tensor_bytes,
    tensor_fingerprint,
    verify_fingerprints,
)


def test_equal_bits_equal_fingerprints_any_layout() -> None:
    x = torch.randn(5, 7)
    assert tensor_fingerprint(x) == tensor_fingerprint(x.clone())
    assert tensor_fingerprint(x.t().contiguous().t()) == tensor_fingerprint(x)  # non-contiguous view


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_one_ulp_is_detected(dtype: torch.dtype) -> None:
    x = torch.randn(1000).to(dtype)
    y = x.clone()
    y[123] = torch.nextafter(y[123].float(), torch.tensor(float("inf"))).to(dtype)
    if torch.equal(y, x):  # rounding back to a short dtype: step the raw bits instead
        y.view(torch.int16)[123] += 1
    assert not torch.equal(x, y)
    assert tensor_fingerprint(x) != tensor_fingerprint(y)


def test_bits_not_values() -> None:
    assert tensor_fingerprint(torch.tensor([0.0])) != tensor_fingerprint(torch.tensor([-0.0]))
    assert tensor_fingerprint(torch.zeros(3)) != tensor_fingerprint(torch.zeros(3, dtype=torch.float64))
    assert tensor_fingerprint(torch.zeros(6)) != tensor_fingerprint(torch.zeros(2, 3))


def test_module_fingerprint_and_diff() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    before = fingerprint(net)
    assert set(before) == set(net.state_dict())
    net.train()
    net(torch.randn(4, 3))  # moves the running stats only
    diff = diff_fingerprints(before, fingerprint(net))
    assert diff.changed == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert diff.summary() == "checked 7 frozen tensors: 3 changed"
    assert diff
    assert not diff_fingerprints(before, before)


def test_missing_and_added_keys() -> None:
    a = fingerprint({"x": torch.zeros(1), "y": torch.ones(1)})
    b = fingerprint({"y": torch.ones(1), "z": torch.ones(1)})
    diff = diff_fingerprints(a, b)
    assert (diff.changed, diff.missing, diff.added, diff.checked) == ([], ["x"], ["z"], 1)


def test_unknown_key_is_named() -> None:
    with pytest.raises(KeyError, match="No tensor named 'nope'"):
        fingerprint(nn.Linear(2, 2), ["weight", "nope"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_independent() -> None:
    x = torch.randn(64, 64)
    assert tensor_fingerprint(x) == tensor_fingerprint(x.cuda())
    assert tensor_fingerprint(x.bfloat16()) == tensor_fingerprint(x.bfloat16().cuda())


# ------------------------------------------------------------------------------------------------
# algorithms, bit sensitivity, layouts, old-format references
# ------------------------------------------------------------------------------------------------
ALGOS = ["xxh3-128", "blake2b-128"]


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int8, torch.bool, torch.complex64]
)
def test_every_single_bit_flip_is_detected(algorithm: str, dtype: torch.dtype) -> None:
    x = (torch.randn(3, 5, dtype=torch.complex64 if dtype.is_complex else torch.float32) * 4).to(dtype)
    before = tensor_fingerprint(x, algorithm)
    raw = tensor_bytes(x)  # a view of x's bytes: flipping them flips x
    seen = {before.digest}
    for byte in range(raw.numel()):
        for bit in range(8):
            raw[byte] ^= 1 << bit
            flipped = tensor_fingerprint(x, algorithm)
            raw[byte] ^= 1 << bit
            assert flipped != before, (byte, bit)
            seen.add(flipped.digest)
    assert len(seen) == 1 + 8 * raw.numel()  # every flip gives its own digest
    assert tensor_fingerprint(x, algorithm) == before


@pytest.mark.parametrize("algorithm", ALGOS)
def test_signed_zero_and_nan_payloads_differ(algorithm: str) -> None:
    assert tensor_fingerprint(torch.tensor(0.0), algorithm) != tensor_fingerprint(
        torch.tensor(-0.0), algorithm
    )
    nan = torch.tensor([float("nan")])
    other_nan = nan.clone()
    other_nan.view(torch.int32)[0] += 1  # another quiet NaN payload
    assert torch.isnan(other_nan).all() and not torch.equal(
        nan.view(torch.int32), other_nan.view(torch.int32)
    )
    assert tensor_fingerprint(nan, algorithm) != tensor_fingerprint(other_nan, algorithm)
    assert tensor_fingerprint(nan, algorithm) == tensor_fingerprint(nan.clone(), algorithm)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_layout_does_not_matter(algorithm: str) -> None:
    base = torch.randn(6, 8, dtype=torch.float64)
    views = {
        "transposed": base.t(),
        "strided slice": base[::2, 1::3],
        "expanded": base[:1].expand(4, 8),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "complex slice": torch.randn(4, 4, dtype=torch.complex128)[:, ::2],
        "conjugate view": torch.randn(5, dtype=torch.complex64).conj(),
        "negative view": torch.randn(5, dtype=torch.complex64).conj().imag,
    }
    for name, view in views.items():
        copy = view.clone(memory_format=torch.contiguous_format).resolve_conj().resolve_neg()
        assert copy.is_contiguous() and not copy.is_conj()
        assert tensor_fingerprint(view, algorithm) == tensor_fingerprint(copy, algorithm), name
    plain = torch.randn(5, dtype=torch.complex64)
    assert tensor_fingerprint(plain.conj(), algorithm) != tensor_fingerprint(plain, algorithm)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_zero_dim_and_empty_tensors(algorithm: str) -> None:
    scalar = torch.tensor(3.5)
    assert tensor_fingerprint(scalar, algorithm) == tensor_fingerprint(scalar.clone(), algorithm)
    assert tensor_fingerprint(scalar, algorithm).shape == ()
    assert tensor_fingerprint(scalar, algorithm) != tensor_fingerprint(torch.tensor([3.5]), algorithm)
    assert tensor_fingerprint(scalar, algorithm) != tensor_fingerprint(torch.tensor(3.25), algorithm)
    empties = [torch.empty(0), torch.empty(0, 3), torch.empty(0, dtype=torch.int64), torch.empty(2, 0)[:, :0]]
    fps = [tensor_fingerprint(e, algorithm) for e in empties]
    assert len(set(fps)) == len(fps)  # same (empty) bytes, told apart by shape and dtype
    assert tensor_fingerprint(torch.empty(0, 3), algorithm) == tensor_fingerprint(
        torch.zeros(0, 3), algorithm
    )


def test_digest_format_is_the_plain_algorithm_on_the_raw_bytes() -> None:
    x = torch.randn(4, 3).bfloat16()
    raw = x.view(torch.int16).numpy().tobytes()
    assert tensor_fingerprint(x).digest == "xxh3-128:" + xxhash.xxh3_128_hexdigest(raw)
    assert tensor_fingerprint(x).algorithm == "xxh3-128"
    assert tensor_fingerprint(x, "blake2b-128").digest == hashlib.blake2b(raw, digest_size=16).hexdigest()
    assert tensor_fingerprint(x, "blake2b-128").algorithm == "blake2b-128"


def _old_checkpoint_fingerprints(module: nn.Module) -> dict[str, TensorFingerprint]:
    """What version 0.1 stored: bare BLAKE2b-128 hex of the raw bytes, dtype name and shape."""
    return {
        key: TensorFingerprint(
            hashlib.blake2b(t.detach().contiguous().numpy().tobytes(), digest_size=16).hexdigest(),
            str(t.dtype).removeprefix("torch."),
            tuple(t.shape),
        )
        for key, t in module.state_dict().items()
    }


def test_old_format_reference_still_verifies() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    old = _old_checkpoint_fingerprints(net)
    assert all(fp.algorithm == "blake2b-128" for fp in old.values())
    assert fingerprint(net, like=old) == old  # recomputed with the reference's algorithm
    assert not verify_fingerprints(old, net)
    # an old reference is still sensitive to change
    with torch.no_grad():
        net[1].running_var[2] = torch.nextafter(net[1].running_var[2], torch.tensor(2.0))
    diff = verify_fingerprints(old, net)
    assert diff.changed == ["1.running_var"] and diff.checked == 7
    # mixing algorithms by mistake is an error, never a false alarm or a false pass
    with pytest.raises(
        ValueError, match=r"'0.weight': the reference was made with 'blake2b-128', the current"
    ):
        diff_fingerprints(old, fingerprint(net))


def test_prefixed_and_bare_blake2b_digests_are_the_same() -> None:
    hexdigest = "0" * 32
    assert TensorFingerprint("blake2b-128:" + hexdigest, "float32", (1,)) == TensorFingerprint(
        hexdigest, "float32", (1,)
    )


def test_mixed_references_and_missing_keys() -> None:
    tensors = {"a": torch.randn(3), "b": torch.randn(3), "c": torch.randn(3)}
    reference = {**fingerprint(tensors, ["a"], algorithm="blake2b-128"), **fingerprint(tensors, ["b", "c"])}
    del tensors["c"]
    diff = verify_fingerprints(reference, tensors)
    assert (diff.changed, diff.missing, diff.checked) == ([], ["c"], 2)


def test_parallel_threads_give_the_same_digests_in_key_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # (the attribute lightning_freeze.core.fingerprint is the function: fetch the module by name)
    fingerprint_module = importlib.import_module("lightning_freeze.core.fingerprint")
    pools = []

    class RecordingPool(fingerprint_module.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(fingerprint_module, "ThreadPoolExecutor", RecordingPool)
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(1000 * (i % 7) + 1) for i in range(60)}
    tensors["big1"] = torch.randn(256, 1024)  # >= 256 KiB: hashed in the pool
    tensors["t3b"] = torch.randn(5)
    tensors["big2"] = torch.randn(1024, 300).t()  # non-contiguous, copied in a pool thread
    serial = fingerprint(tensors, threads=1)
    assert pools == []
    parallel = fingerprint(tensors, threads=4)
    assert len(pools) == 1
    assert serial == parallel
    assert list(parallel) == list(tensors)


def test_bad_algorithm_and_threads_are_named() -> None:
    with pytest.raises(ValueError, match=r"algorithm 'md5'; valid choices: xxh3-128, blake2b-128"):
        fingerprint(nn.Linear(2, 2), algorithm="md5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"algorithm 'md5'; valid choices"):
        tensor_fingerprint(torch.zeros(1), "md5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Invalid threads=0; valid choices: None or an integer >= 1\."):
        fingerprint(nn.Linear(2, 2), threads=0)
    future = {"weight": TensorFingerprint("sha3-256:00", "float32", (2, 2))}
    with pytest.raises(ValueError, match=r"reference digest for 'weight': 'sha3-256'; valid choices"):
        verify_fingerprints(future, nn.Linear(2, 2))


class _ShardedStandIn(torch.Tensor):
    """Duck-types a DTensor (a tensor subclass with ``to_local``), without importing
    torch.distributed.tensor (seconds); the refusal of a real DTensor was checked by hand."""

    def to_local(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)


def test_sharded_tensor_is_refused_with_a_hint() -> None:
    sharded = torch.randn(4, 3).as_subclass(_ShardedStandIn)
    with pytest.raises(TypeError, match=r"sharded _ShardedStandIn of global shape \(4, 3\): pass its local"):
        fingerprint({"w": sharded})
    assert tensor_fingerprint(sharded.to_local()) == tensor_fingerprint(sharded.to_local().clone())
    # a plain tensor subclass without to_local (e.g. nn.Parameter) is hashed as usual
    parameter = nn.Parameter(torch.randn(3))
    assert tensor_fingerprint(parameter) == tensor_fingerprint(parameter.detach().clone())


def test_stored_digests_never_change() -> None:
    # Known answers: fingerprints are stored in checkpoints, so the digest of a given tensor must
    # stay the same across versions of this package, of torch and of xxhash (XXH3's output is
    # frozen since xxHash 0.8.0). The empty-input value is XXH3-128's published test vector.
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert tensor_fingerprint(x).digest == "xxh3-128:2d0408b485dd77b108c27fcd95d1fea5"
    assert tensor_fingerprint(x, "blake2b-128").digest == "4edaf0fe20d221bc27cb2558c661fea0"
    assert tensor_fingerprint(torch.empty(0)).digest == "xxh3-128:99aa06d3014798d86001c324468d497f"
