"""The app preset `callbacks=[default,freeze_backbone,feature_cache]`: composes, and a stage-2 run
with it ends where the uncached run ends; a later run (or a parallel job) hits from its first epoch."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers.app import run_app_ok
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import lightning_freeze.train as app
from lightning_freeze import FeatureCache

CONF = Path(app.__file__).parent / "conf"
PRESET = "callbacks=[default,freeze_backbone,feature_cache]"
ARGS = ["trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2"]


def test_preset_composes_to_a_disk_cache_of_the_backbone(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=stage2", "init_from=prev.ckpt", PRESET])
    node = cfg.callbacks.feature_cache
    assert (node.modules, node.store, node.directory) == ("backbone", "disk", "outputs/feature_cache")
    cache = instantiate(node, directory=str(tmp_path))
    assert isinstance(cache, FeatureCache) and cache.store_kind == "disk"


def _app(args: list[str], cwd: Path) -> str:
    result = run_app_ok(args, cwd)
    return result.stdout + result.stderr


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_stage2_with_the_preset_matches_the_uncached_stage_and_is_reused(tmp_path: Path) -> None:
    _app(["experiment=stage1", f"hydra.run.dir={tmp_path / 's1'}", *ARGS], tmp_path)
    s1 = tmp_path / "s1" / "checkpoints" / "last.ckpt"
    stage2 = ["experiment=stage2", f"init_from={s1}", *ARGS]
    _app([*stage2, f"hydra.run.dir={tmp_path / 'plain'}"], tmp_path)
    out = _app([*stage2, PRESET, f"hydra.run.dir={tmp_path / 'cached'}"], tmp_path)
    assert "FeatureCache: backbone: " in out and "in the disk store" in out
    assert (tmp_path / "outputs" / "feature_cache").is_dir()  # ${paths.log_dir}/feature_cache
    plain = _state(tmp_path / "plain" / "checkpoints" / "last.ckpt")
    cached = _state(tmp_path / "cached" / "checkpoints" / "last.ckpt")
    assert list(plain) == list(cached)
    for key, value in plain.items():
        if key.startswith(("backbone.", "branches.digit.")):
            assert torch.equal(cached[key], value), key
        else:  # the digits loader shuffles: epoch 2 may serve features from other batch compositions
            torch.testing.assert_close(cached[key], value, rtol=1e-4, atol=1e-5)
    # a later run (or a parallel job of a multirun) finds every sample of its first epoch cached
    again = _app([*stage2, PRESET, f"hydra.run.dir={tmp_path / 'again'}"], tmp_path)
    assert "FeatureCache: backbone: 100.0% hits" in again
