"""FrozenSafeEMA under real 2-process CPU DDP (gloo): identical shadows without communication."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.ddp import run_ddp_script

SCRIPT = Path(__file__).parent / "scripts" / "ema_ddp.py"


@pytest.mark.distributed
def test_ddp_ranks_keep_identical_shadows_and_frozen_tensors(tmp_path: Path) -> None:
    ranks = run_ddp_script(SCRIPT, tmp_path, out=tmp_path)
    start = torch.load(tmp_path / "start.pt", weights_only=True)
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
