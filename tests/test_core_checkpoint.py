"""core.checkpoint.ema_state_dict: tied weights get their average under every key."""

from __future__ import annotations

import io

import torch
from torch import nn

from lightning_freeze.core.checkpoint import ema_state_dict


def test_tied_weight_gets_the_average_under_both_keys() -> None:
    model = nn.ModuleDict({"enc": nn.Linear(2, 2, bias=False), "dec": nn.Linear(2, 2, bias=False)})
    model["dec"].weight = model["enc"].weight  # tied: two state_dict keys, one shadow key
    model.add_module("frozen", nn.Linear(2, 2, bias=False))
    averaged = torch.full((2, 2), 0.25)
    buffer = io.BytesIO()
    torch.save(
        {
            "state_dict": model.state_dict(),
            "callbacks": {"FrozenSafeEMA{}": {"ema": {"shadow": {"enc.weight": averaged}}}},
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    out = ema_state_dict(checkpoint)
    assert torch.equal(out["enc.weight"], averaged)
    assert torch.equal(out["dec.weight"], averaged)
    assert torch.equal(out["frozen.weight"], model["frozen"].weight.detach())
