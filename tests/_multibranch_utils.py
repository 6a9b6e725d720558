"""Kept for the files that still import it (tests, tests/scripts): the helpers live in helpers.multibranch."""

from helpers.multibranch import (
    CLASSES,
    IN_FEATURES,
    WIDTH,
    Stage,
    fixed_batch,
    loader,
    make_backbone,
    make_branch,
    make_data,
    make_module,
    outputs,
    run_stage1,
    run_stage2,
    trainer,
    val_loss,
)

__all__ = [
    "CLASSES",
    "IN_FEATURES",
    "WIDTH",
    "Stage",
    "fixed_batch",
    "loader",
    "make_backbone",
    "make_branch",
    "make_data",
    "make_module",
    "outputs",
    "run_stage1",
    "run_stage2",
    "trainer",
    "val_loss",
]
