"""The private torch names that lightning_freeze._compat wraps for cache-core still behave as relied on."""

from __future__ import annotations

import torch

from lightning_freeze._compat import tensor_version


def test_tensor_version_counts_in_place_writes_but_not_data_writes() -> None:
    t = torch.zeros(3)
    try:
        before = tensor_version(t)
    except AttributeError as err:  # pragma: no cover - only on a torch that removed it
        raise AssertionError(f"torch {torch.__version__}: Tensor._version is gone ({err})") from None
    t.add_(1)
    assert tensor_version(t) > before, f"torch {torch.__version__}: in-place add_ no longer bumps _version"
    after = tensor_version(t)
    t.data.mul_(2)
    assert tensor_version(t) == after, (
        f"torch {torch.__version__}: writes through .data now bump _version (update the docs of "
        "lightning_freeze.core.feature_cache)"
    )
