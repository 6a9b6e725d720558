"""The app preset `callbacks=[default,unfreeze_gradual]`: gradual unfreezing of the backbone, in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _app_stage1 import compose_app, shared_stage1

import lightning_freeze.train as app

GRADUAL = "callbacks=[default,unfreeze_gradual]"
RUN = ["quiet=true", "trainer.max_epochs=3", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_stage1(tmp_path_factory)


def test_preset_composes_to_freeze_backbone_with_a_gradual_schedule(tmp_path: Path) -> None:
    cfg = compose_app(["experiment=stage2", "init_from=prev.ckpt", GRADUAL])
    node = cfg.callbacks.freeze_backbone
    assert node._target_ == "lightning_freeze.FreezeBackbone" and node.modules == "backbone"
    assert node.schedule._target_ == "lightning_freeze.UnfreezeSchedule.gradual"
    assert node.schedule.monitor == "parity/val_loss" and node.schedule.layer_decay == 0.5


def test_stage2_unfreezes_block_by_block_and_the_summary_shows_the_phases(
    stage1: Path, tmp_path: Path
) -> None:
    before = torch.load(stage1, weights_only=True)["state_dict"]
    cfg = compose_app(["experiment=stage2", f"init_from={stage1}", GRADUAL, *RUN], tmp_path)
    summary = app.train(cfg)
    # the TinyCNN's last conv+bn+relu+pool block at epoch 1, the one before it at epoch 2
    assert [(p["phase"], p["epoch"]) for p in summary.phases] == [(0, 0), (1, 1), (2, 2)]
    first, second = summary.phases[1]["modules"], summary.phases[2]["modules"]
    assert first[0] == "backbone.6" and second[0] == "backbone.3"
    assert summary.phases[2]["lr"] == pytest.approx(summary.phases[1]["lr"] * 0.5, rel=1e-12)
    assert all(len(p["val"]) == 1 for p in summary.phases)  # the validation loss of each epoch
    after = torch.load(summary.checkpoint, weights_only=True)["state_dict"]
    # still frozen at the end: blocks 0-2 of the backbone and the stage-1 branch, bitwise
    still = [k for k in before if k.startswith(("backbone.0.", "backbone.1.", "branches.digit."))]
    assert still and [k for k in still if not torch.equal(before[k], after[k])] == []
    assert not torch.equal(before["backbone.6.weight"], after["backbone.6.weight"])
    text = summary.format()
    assert "fine-tuning phases:" in text and "phase 2 from epoch 2: backbone.3" in text
    assert summary.frozen_changed is not None
