"""A fine-tuning schedule under real 2-process CPU DDP (gloo): DDP rebuilt per phase, ranks identical.

The fits (tests/scripts/unfreeze_schedule_ddp.py) run in the suite's one DDP launch (``ddp_runs``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.ddp import load_ranks


@pytest.mark.distributed
def test_ddp_rebuilds_per_phase_keeps_ranks_identical_and_resumes_bitwise(ddp_runs: Path) -> None:
    rank0, rank1 = load_ranks(ddp_runs / "unfreeze_schedule")
    straight = rank0["straight"]
    start = straight["start"]
    for name in ("straight", "resume_before", "resume_after"):
        for result in (rank0[name], rank1[name]):
            assert result["find_unused_parameters"] is False
            assert result["param_groups"] == 3  # one group per phase, on every rank
            assert [p for p in result["phases"] if p[0] > 0] == [(1, 1), (2, 2)]
        for epoch, params in rank0[name]["epochs"].items():
            other = rank1[name]["epochs"][epoch]
            assert [k for k in params if not torch.equal(params[k], other[k])] == [], (name, epoch)
            assert all(torch.equal(params[k], straight["epochs"][epoch][k]) for k in params), (name, epoch)
    epochs = straight["epochs"]
    early = [k for k in start if k.startswith(("backbone.0.", "backbone.1."))]
    late = [k for k in start if k.startswith(("backbone.4.weight", "backbone.5."))]
    assert all(torch.equal(epochs[0][k], start[k]) for k in early + late)  # phase 0: all frozen
    assert all(torch.equal(epochs[1][k], start[k]) for k in early)  # phase 1: still frozen
    assert [k for k in late if torch.equal(epochs[1][k], epochs[0][k])] == []  # phase 1 trains them
    assert [k for k in early if k.endswith("weight") and torch.equal(epochs[2][k], epochs[1][k])] == []
