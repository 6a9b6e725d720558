"""FeatureCache under real 2-process CPU DDP (gloo), shuffled sampler, shared disk store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.ddp import run_ddp_script

SCRIPT = Path(__file__).parent / "scripts" / "feature_cache_ddp.py"


@pytest.mark.distributed
def test_ddp_disk_cache_hits_every_sample_after_the_first_epoch_and_matches_uncached(tmp_path: Path) -> None:
    cached = run_ddp_script(SCRIPT, tmp_path, "cached", out=tmp_path / "cached")
    plain = run_ddp_script(SCRIPT, tmp_path, "plain", out=tmp_path / "plain")
    for rank in cached:
        epochs = rank["epochs"].tolist()
        assert epochs[0] == [0, 32]  # each rank computes its half of the 64 samples
        assert epochs[1:] == [[32, 0], [32, 0]]  # then hits everything, also the other rank's samples
    assert len(list((tmp_path / "cache").rglob("*.feat"))) == 64 + 32  # train + validation samples
    sd0, sd1 = cached[0]["state_dict"], cached[1]["state_dict"]
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if "running" not in k and "num_batches" not in k)
    for key, value in plain[0]["state_dict"].items():
        if key.startswith("backbone."):
            assert torch.equal(sd0[key], value), key
        else:  # shuffled: served features may come from another batch composition (last bits)
            torch.testing.assert_close(sd0[key], value, rtol=1e-4, atol=1e-5)
