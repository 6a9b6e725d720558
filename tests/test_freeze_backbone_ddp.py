"""FreezeBackbone under real 2-process CPU DDP (gloo), in the suite's one DDP launch (``ddp_runs``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.ddp import load_ranks


@pytest.mark.distributed
def test_ddp_unfreeze_at_epoch_keeps_ranks_identical_trains_the_backbone_and_resumes(ddp_runs: Path) -> None:
    rank0, rank1 = load_ranks(ddp_runs / "unfreeze")  # tests/scripts/unfreeze_ddp.py
    straight = rank0["straight"]
    start = straight["start"]
    backbone = [k for k in start if k.startswith("backbone.")]
    for name in ("straight", "resume_before", "resume_after"):
        for result in (rank0[name], rank1[name]):
            assert result["find_unused_parameters"] is False
            assert result["param_groups"] == 2  # the unfrozen backbone joined the optimizer on every rank
            assert result["summary"] == "checked 0 frozen tensors: 0 changed"
        epochs = rank0[name]["epochs"]
        assert sorted(epochs) == {"straight": [0, 1, 2], "resume_before": [1, 2], "resume_after": [2]}[name]
        for epoch, params in epochs.items():
            # every parameter identical on both ranks after every epoch
            other = rank1[name]["epochs"][epoch]
            assert [k for k in params if not torch.equal(params[k], other[k])] == [], (name, epoch)
            # a resumed run continues exactly where the straight one went (across the unfreeze)
            assert all(torch.equal(params[k], straight["epochs"][epoch][k]) for k in params), (name, epoch)
    epochs = straight["epochs"]
    assert all(torch.equal(epochs[0][k], start[k]) for k in backbone)  # frozen in epoch 0
    weights = [k for k in backbone if k.endswith("weight")]  # (a conv bias before BatchNorm gets no gradient)
    for epoch in (1, 2):  # and really trained once unfrozen
        assert [k for k in weights if torch.equal(epochs[epoch][k], epochs[epoch - 1][k])] == [], epoch


@pytest.mark.distributed
def test_ddp_a_rank_with_another_frozen_tensor_or_ema_shadow_is_named_on_every_rank(ddp_runs: Path) -> None:
    ranks = load_ranks(ddp_runs / "ranks")  # tests/scripts/ranks_ddp.py
    for result in ranks:  # both ranks raise the same error at the same point: no rank left waiting
        frozen = result["freeze"]
        assert frozen is not None and frozen["type"] == "FrozenStateError"
        assert frozen["epoch"] == 0  # at the first check
        assert "1 rank(s) differ" in frozen["message"]
        assert "rank 1 differs on 1 tensor(s): 'backbone.0.weight'" in frozen["message"]
        assert frozen["changed"] == ["backbone.0.weight"]
        assert frozen["causes"] == {"backbone.0.weight": "differs on rank 1 from the other ranks"}
        ema = result["ema"]
        assert ema is not None and ema["type"] == "FrozenStateError" and ema["epoch"] == 0
        assert ema["message"].startswith(
            "FrozenSafeEMA: the EMA shadows of the parameters differ across ranks"
        )
        assert ema["message"].endswith("rank 1 differs on 1 tensor(s): 'head.0.weight'")
        assert ema["changed"] == ["head.0.weight"]
        assert ema["causes"] == {"head.0.weight": "EMA shadow differs on rank 1 from the other ranks"}
