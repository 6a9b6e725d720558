"""FeatureCache under real 2-process CPU DDP (gloo), shuffled sampler, shared disk store.

The fits run in the suite's one DDP launch (``ddp_runs``: tests/scripts/feature_cache_ddp.py's
``cached`` and ``plain`` in ``feature_cache/``, ``skip`` with a store of its own in ``feature_cache_skip/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.ddp import load_ranks


@pytest.fixture(scope="module")
def cached_run(ddp_runs: Path) -> tuple[Path, list[dict[str, Any]]]:
    out = ddp_runs / "feature_cache"
    return out, load_ranks(out / "cached")


@pytest.mark.distributed
def test_ddp_disk_cache_hits_every_sample_after_the_first_epoch_and_matches_uncached(
    cached_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    tmp_path, cached = cached_run
    plain = load_ranks(tmp_path / "plain")
    for rank in cached:
        epochs = rank["epochs"].tolist()
        assert epochs[0] == [0, 32]  # each rank computes its half of the 64 samples
        assert epochs[1:] == [[32, 0]] * 3  # then hits everything, also the other rank's samples
    assert len(list((tmp_path / "cache").rglob("*.feat"))) == 64 + 32  # train + validation samples
    sd0, sd1 = cached[0]["state_dict"], cached[1]["state_dict"]
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if "running" not in k and "num_batches" not in k)
    for key, value in plain[0]["state_dict"].items():
        if key.startswith("backbone."):
            assert torch.equal(sd0[key], value), key
        else:  # shuffled: served features may come from another batch composition (last bits)
            torch.testing.assert_close(sd0[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
def test_ddp_skip_pipeline_skips_on_every_rank_and_ends_bitwise_as_the_cached_run(
    ddp_runs: Path, cached_run: tuple[Path, list[dict[str, Any]]]
) -> None:
    skipped = load_ranks(ddp_runs / "feature_cache_skip" / "skip")
    for rank, cached in zip(skipped, cached_run[1], strict=True):
        assert rank["skipped_epochs"] == 2  # epoch 0 computes, epoch 1 verifies, epochs 2-3 skip
        assert rank["epochs"].tolist() == [[0, 32], [32, 0], [32, 0], [32, 0]]
        for key, value in cached["state_dict"].items():
            assert torch.equal(rank["state_dict"][key], value), key
