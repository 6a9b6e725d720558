"""Three packed branches under real 2-process CPU DDP (gloo), no find_unused_parameters.

The fits (tests/scripts/packed_ddp.py) run in the suite's one DDP launch (``ddp_runs``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.ddp import load_ranks


@pytest.mark.distributed
def test_ddp_trains_three_packed_branches_each_as_if_alone(ddp_runs: Path) -> None:
    ranks = load_ranks(ddp_runs / "packed")
    for result in ranks:
        assert result["find_unused_parameters"] is False
        state, initial = result["state_dict"], result["initial"]
        for key, value in initial.items():
            trained = key.startswith(("branches.v0.", "branches.v1.", "branches.v2."))
            assert torch.equal(state[key], value) != trained, key  # backbone and branch "a" bitwise frozen
        # the packed variant v1 ends bitwise where v1 trained alone under DDP ends
        for key, value in result["solo_v1"].items():
            assert torch.equal(state[key], value), key
        assert {f"v{i}/val_acc" for i in range(3)} <= set(result["metrics"])
    # DDP kept every variant in sync across the two ranks
    assert all(
        torch.equal(ranks[0]["state_dict"][k], ranks[1]["state_dict"][k]) for k in ranks[0]["state_dict"]
    )
    assert not torch.equal(
        ranks[0]["state_dict"]["branches.v0.weight"], ranks[0]["state_dict"]["branches.v2.weight"]
    )
