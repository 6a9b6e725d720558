"""FreezeBackbone under real 2-process CPU DDP (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _ddp import run_ddp_script

SCRIPT = Path(__file__).parent / "scripts" / "freeze_ddp.py"


@pytest.mark.distributed
def test_ddp_frozen_tensors_identical_on_both_ranks_and_to_the_start(tmp_path) -> None:
    ranks = run_ddp_script(SCRIPT, tmp_path, out=tmp_path)
    start = torch.load(tmp_path / "start.pt", weights_only=True)
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
