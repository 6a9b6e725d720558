"""Stage 2 of a MultiBranchModule under real 2-process CPU DDP (gloo), no find_unused_parameters.

The fit (tests/scripts/module_ddp_stage2.py) runs in the suite's one DDP launch (``ddp_runs``), from
the session's ``multibranch_stage1`` checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.ddp import load_ranks

from lightning_freeze.cli.checkpoint_tools import main as cli


@pytest.mark.distributed
def test_ddp_stage2_trains_the_new_branch_and_leaves_the_rest_bitwise_identical(
    ddp_runs: Path, multibranch_stage1: Path
) -> None:
    stage1 = multibranch_stage1
    out = ddp_runs / "module_stage2"
    ranks = load_ranks(out)
    reference = torch.load(stage1, weights_only=True)["state_dict"]
    for result in ranks:
        assert result["fresh"] == ["b"]
        assert result["find_unused_parameters"] is False
        assert result["summary"] == "checked 18 frozen tensors: 0 changed"
        state = result["state_dict"]
        for key, value in reference.items():  # backbone and branch a, buffers included
            assert torch.equal(state[key], value), key
        assert not torch.equal(state["branches.b.0.weight"], result["initial"]["branches.b.0.weight"])
    # DDP kept the trained branch in sync (BatchNorm statistics are per rank without SyncBatchNorm)
    sd0, sd1 = ranks[0]["state_dict"], ranks[1]["state_dict"]
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if "running" not in k and "num_batches" not in k)
    # and the checkpoint it wrote proves it with the CLI
    assert (
        cli(["diff", str(stage1), str(out / "stage2.ckpt"), "--only", "backbone", "--only", "branches.a"])
        == 0
    )
