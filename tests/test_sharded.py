"""Sharded (FSDP2 ``fully_shard``) core pieces on CPU with 2 gloo processes: EMA, checkpoints, fingerprints.

Lightning's FSDPStrategy refuses CPU; PyTorch's FSDP2 runs on CPU with gloo, so the pieces this
package adds are tested here. The Lightning strategies themselves run in scripts/gpu_check.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.ddp import load_ranks
from packaging.version import Version


@pytest.mark.distributed
@pytest.mark.skipif(
    Version(torch.__version__).release < (2, 7),
    reason=f"torch {torch.__version__}'s FSDP2 does not run on CPU (no Stream.record_event)",
)
def test_fsdp2_ema_is_shard_local_exact_resumable_and_the_frozen_check_works_per_shard(
    ddp_runs: Path,
) -> None:
    # tests/scripts/fsdp2_core.py's checks, run on both ranks of the suite's one DDP launch (ddp_runs)
    ranks = load_ranks(ddp_runs / "fsdp2")
    for rank, got in enumerate(ranks):
        assert got["param_types"] == ["DTensor"]
        assert got["requires_grad"] == {
            "0.0.weight": False, "0.0.bias": False, "0.2.weight": False, "0.2.bias": False,
            "1.weight": True, "1.bias": True,
        }  # fmt: skip
        # the shadow: the head only, sharded like it (this rank's rows), no communication per update
        assert got["sharded"] is True
        assert got["shadow_local_numel"] == got["head_local_numel"] < 3 * 16 + 3
        assert got["comm_per_update"] == [0, 0, 0, 0]
        # full tensors on request, bitwise equal to an unsharded EMA of the same training
        assert got["full_types"] == ["Tensor"]
        assert got["full_equal"] == dict.fromkeys(got["full_equal"], True) and len(got["full_equal"]) == 6
        assert got["ema_moved"] is True
        assert got["dcp_resumed_equal"] is True and got["full_resumed_equal"] is True
        # load_ema_weights of a consolidated checkpoint into a sharded model: the same full EMA weights
        assert got["load_ema_weights_equal"] == dict.fromkeys(got["full_equal"], True)
        # fingerprints of this rank's shards: clean, then rank 1's shard changed, named on both ranks
        assert got["reference_keys"] == ["0.0.bias", "0.0.weight", "0.2.bias", "0.2.weight"]
        assert got["clean_check"] == "checked 4 frozen tensors: 0 changed"
        corrupt = got["corrupt_check"]
        assert corrupt is not None, rank
        assert corrupt["changed"] == ["0.2.weight"]
        assert "0.2.weight" in corrupt["message"]
        assert "sharded tensors changed on rank(s) 1" in corrupt["message"]
        cause = corrupt["causes"]["0.2.weight"]
        assert (
            cause == "its shard on rank 1 changed"
            if rank == 0
            else cause.startswith("changed by code outside")
        )
    assert ranks[0]["shadow_local_numel"] + ranks[1]["shadow_local_numel"] == 3 * 16 + 3
