"""Fingerprints are exact (bit level) and device independent; diffs name what changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_freeze.core import diff_fingerprints, fingerprint, tensor_fingerprint


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
