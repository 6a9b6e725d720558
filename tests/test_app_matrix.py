"""Every experiment preset with every data and model preset: stage 1, 2 and 3 run in a chain, in-process.

``experiment=stage1 data=image_folder`` used to crash (the experiment set ``data.half``, which only the
digits take): an experiment's data-specific settings now live in ``conf/experiment_data``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _app_stage1 import compose_app, options
from PIL import Image

import lightning_freeze.train as app

#: one epoch of one batch: the whole chain of a pair in seconds, with a checkpoint for the next stage
ONE_BATCH = [
    "quiet=true",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "logger=none",
]
#: what each data preset needs to run here (a tiny image folder, no worker processes)
DATA_ARGS = {
    "digits": [],
    "image_folder": ["branch=folder", "data.num_workers=0", "data.image_size=8", "data.batch_size=4"],
}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageFolder tree: 2 classes of 6 RGB images, 8x8 pixels."""
    root = tmp_path_factory.mktemp("matrix_images")
    generator = torch.Generator().manual_seed(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir()
        for i in range(6):
            pixels = torch.randint(0, 256, (8, 8, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_every_data_and_model_preset_is_in_the_matrix() -> None:
    assert set(options("data")) == set(DATA_ARGS)
    assert options("experiment") == ["stage1", "stage2", "stage3"]


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("data", options("data"))
def test_every_experiment_runs_with_every_data_and_model_preset(
    data: str, model: str, image_root: Path, tmp_path: Path
) -> None:
    base = [f"data={data}", f"model={model}", *DATA_ARGS[data], *ONE_BATCH]
    if data == "image_folder":
        base.append(f"data.root={image_root}")
    init_from: Path | None = None
    branches: list[str] = []
    for experiment in options("experiment"):
        run_dir = tmp_path / experiment
        overrides = [f"experiment={experiment}", *base]
        if init_from is not None:
            overrides.append(f"init_from={init_from}")
        if data == "image_folder" and experiment != "stage1":
            # the folder has one labelling: every later stage adds a branch of its own name
            overrides.append(f"branch.name=folder_{experiment}")
        cfg = compose_app(overrides, run_dir)
        if data == "digits":  # the experiment's data half reaches the data module that takes it
            assert cfg.data.half == ("A" if experiment == "stage1" else "B")
        else:
            assert "half" not in cfg.data
        summary = app.train(cfg)
        branches.append(cfg.branch.name)
        assert [row["name"] for row in summary.branches] == branches
        if init_from is not None:
            # everything but the new branch stayed bitwise the same (checked here, not by the report)
            before = torch.load(init_from, map_location="cpu", weights_only=False)["state_dict"]
            after = torch.load(summary.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
            assert all(torch.equal(before[k], after[k]) for k in before)
            assert summary.frozen_changed == 0
        init_from = Path(summary.checkpoint)
        assert init_from == run_dir / "checkpoints" / "last.ckpt" and init_from.is_file()
