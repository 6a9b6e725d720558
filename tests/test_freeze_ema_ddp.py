"""FreezeBackbone and FrozenSafeEMA under one real 2-process CPU DDP fit (gloo).

The fit (tests/scripts/freeze_ema_ddp.py) runs in the suite's one DDP launch (``ddp_runs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.ddp import load_ranks


@pytest.fixture(scope="module")
def ddp_run(ddp_runs: Path) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    out = ddp_runs / "freeze_ema"
    return load_ranks(out), torch.load(out / "start.pt", weights_only=True)


@pytest.mark.distributed
def test_ddp_frozen_tensors_identical_on_both_ranks_and_to_the_start(ddp_run) -> None:
    ranks, start = ddp_run
    for result in ranks:
        assert result["find_unused_parameters"] is False
        assert result["summary"] == "checked 14 frozen tensors: 0 changed"
        for key, value in start.items():
            if key.startswith("backbone."):
                assert torch.equal(result["state_dict"][key], value), key
    # the head trained (its BatchNorm statistics are per rank, as DDP without SyncBatchNorm does)
    sd0, sd1 = ranks[0]["state_dict"], ranks[1]["state_dict"]
    assert not torch.equal(sd0["head.0.weight"], start["head.0.weight"])
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if "running" not in k and "num_batches" not in k)


@pytest.mark.distributed
def test_ddp_ranks_keep_identical_shadows_and_frozen_tensors(ddp_run) -> None:
    ranks, start = ddp_run
    trainable = {k for k in start if k.startswith("head.") and "running" not in k and "num_batches" not in k}
    for result in ranks:
        assert (
            result["world_size"] == 2 and result["num_updates"] == 4
        )  # 64 samples / 2 ranks / 16 x 2 epochs
        sd, shadow = result["state_dict"], result["shadow"]
        assert [k for k in start if k.startswith("backbone.") and not torch.equal(sd[k], start[k])] == []
        assert set(shadow) == {k for k in start if k.startswith("head.")}  # never a frozen tensor
        # buffers="copy": each rank's copy of its own BatchNorm statistics (per rank without SyncBatchNorm)
        assert all(torch.equal(shadow[k], sd[k]) for k in set(shadow) - trainable)
    s0, s1 = ranks[0]["shadow"], ranks[1]["shadow"]
    assert all(torch.equal(s0[k], s1[k]) for k in trainable)
    assert not torch.equal(s0["head.0.weight"], ranks[0]["state_dict"]["head.0.weight"])  # really averaged
