"""FeatureCache callback: exact (bitwise) training, refusals, auto-off, stores, resume, eval stages."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers.freeze import TinyNet, make_data
from torch.utils.data import DataLoader, Dataset

from lightning_freeze import FeatureCache, FreezeBackbone, FrozenSafeEMA, FrozenStateError, MultiBranchModule
from lightning_freeze.core import ModuleSelectionError
from lightning_freeze.core.feature_cache import UncacheableModuleError

N_TRAIN, N_VAL = 64, 32


def fit(
    callbacks: list[Any],
    epochs: int = 3,
    shuffle: bool = False,
    model: L.LightningModule | None = None,
    train: Dataset | None = None,
    ckpt_path: Path | None = None,
    **trainer_kwargs: Any,
) -> tuple[L.LightningModule, L.Trainer]:
    L.seed_everything(0, verbose=False)
    model = model or TinyNet()
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "deterministic": True,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, **{**settings, **trainer_kwargs})
    trainer.fit(
        model,
        DataLoader(train or make_data(N_TRAIN, 0), batch_size=16, shuffle=shuffle),
        DataLoader(make_data(N_VAL, 1), batch_size=16),
        ckpt_path=ckpt_path,
    )
    return model, trainer


@pytest.fixture(scope="module")
def uncached() -> dict[str, torch.Tensor]:
    model, _ = fit([FreezeBackbone("backbone")])
    return model.state_dict()


@pytest.mark.parametrize("order", ["cache_first", "freeze_first"])
def test_fixed_order_run_is_bitwise_the_uncached_run(uncached: dict[str, torch.Tensor], order: str) -> None:
    cache = FeatureCache("backbone")
    callbacks = [cache, FreezeBackbone("backbone")]
    model, _ = fit(callbacks if order == "cache_first" else callbacks[::-1])
    state = model.state_dict()
    assert list(state) == list(uncached)  # no cache keys in the model
    assert all(torch.equal(state[k], uncached[k]) for k in uncached)
    # 3 epochs of 64 training samples and 3 validations of 32: computed once each (train and eval mode)
    assert cache.stats["misses"] == N_TRAIN + N_VAL
    assert cache.stats["hits"] == 2 * N_TRAIN + 2 * N_VAL
    assert cache.stats["bytes"] == (N_TRAIN + N_VAL) * 8 * 4  # 8 float32 features per sample
    assert "forward" not in model.backbone.__dict__  # detached at teardown


def test_frozen_norm_conversion_after_the_cache_is_set_up() -> None:
    class NormBackbone(TinyNet):  # the cached module is itself a BatchNorm: norm="frozen" replaces it
        def __init__(self) -> None:
            super().__init__()
            self.stem = self.backbone
            self.backbone = torch.nn.BatchNorm1d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(self.stem(x)))

    seen: list[bool] = []

    class CachedModuleIsTheConverted(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            converted = type(pl_module.backbone).__name__ == "FrozenBatchNorm"
            seen.append(converted and cache.caches["backbone"].module is pl_module.backbone)

    cache = FeatureCache("backbone")
    callbacks = [cache, FreezeBackbone(["stem", "backbone"], norm="frozen"), CachedModuleIsTheConverted()]
    model, _ = fit(callbacks, model=NormBackbone())
    assert seen == [True, True, True]
    assert type(model.backbone) is torch.nn.BatchNorm1d  # given back after the fit
    assert cache.stats["hits"] == 2 * N_TRAIN + 2 * N_VAL


class WriteThroughData(L.Callback):
    """Changes a frozen weight through ``.data`` (no version-counter bump) at the start of epoch 1."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            pl_module.backbone[0].weight.data.mul_(2)


def test_writes_through_data_never_serve_stale_features() -> None:
    cache = FeatureCache("backbone")  # FreezeBackbone does not verify: the cache re-hashes each epoch
    fit([cache, FreezeBackbone("backbone", verify="off"), WriteThroughData()], epochs=2)
    assert cache.stats["hits"] == 0 and cache.stats["misses"] == 2 * (N_TRAIN + N_VAL)
    # with verify="raise", FreezeBackbone fails the run at the end of that epoch instead
    with pytest.raises(FrozenStateError, match=r"backbone\.0\.weight"):
        fit([FeatureCache("backbone"), FreezeBackbone("backbone"), WriteThroughData()], epochs=2)


def test_multibranch_with_ema_is_bitwise_the_uncached_run(tmp_path: Path) -> None:
    def build() -> MultiBranchModule:
        torch.manual_seed(0)
        backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(108, 16), torch.nn.BatchNorm1d(16))
        return MultiBranchModule(backbone, {"a": torch.nn.Linear(16, 3), "b": torch.nn.Linear(16, 3)}, "b")

    def callbacks(cached: bool) -> list[Any]:
        cbs: list[Any] = [FrozenSafeEMA(decay=0.9), FreezeBackbone()]
        return [FeatureCache(), *cbs] if cached else cbs

    def ema_of(trainer: L.Trainer) -> dict[str, torch.Tensor]:
        return next(cb for cb in trainer.callbacks if isinstance(cb, FrozenSafeEMA)).ema_state_dict()

    plain, plain_trainer = fit(callbacks(False), model=build())
    cached, trainer = fit(callbacks(True), model=build())
    cache = trainer.callbacks[0]
    assert cache.stats["hits"] == 2 * N_TRAIN + 2 * N_VAL  # validation on EMA weights hits too
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in cached.state_dict().items())
    plain_ema = ema_of(plain_trainer)
    assert all(torch.equal(v, plain_ema[k]) for k, v in ema_of(trainer).items())


def test_shuffled_run_matches_the_uncached_run_closely() -> None:
    plain, _ = fit([FreezeBackbone("backbone")], shuffle=True)
    cache = FeatureCache("backbone")
    cached, _ = fit([FreezeBackbone("backbone"), cache], shuffle=True)
    assert cache.stats["hits"] == 2 * N_TRAIN + 2 * N_VAL
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_refuses_a_trainable_or_train_mode_module_at_fit_start() -> None:
    model = TinyNet()
    with pytest.raises(
        UncacheableModuleError, match=r"cannot cache backbone: backbone is trainable \(8 param"
    ):
        fit([FeatureCache("backbone")], epochs=1, model=model)
    assert "forward" not in model.backbone.__dict__  # the model is left as it was
    with pytest.raises(
        UncacheableModuleError,
        match=r"backbone has 2 norm/dropout layer\(s\) in train mode \(backbone.1, backbone.5\)",
    ):
        fit([FeatureCache("backbone"), FreezeBackbone("backbone", norm="train")], epochs=1)


def test_unfreeze_switches_the_cache_off_with_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plain, _ = fit([FreezeBackbone("backbone", unfreeze_at_epoch=1)])
    cache = FeatureCache("backbone")
    with caplog.at_level(logging.INFO):
        cached, _ = fit([cache, FreezeBackbone("backbone", unfreeze_at_epoch=1)])
    lines = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("FeatureCache: backbone is no")
    ]
    assert len(lines) == 1 and "backbone is trainable" in lines[0]
    assert not cache.caches["backbone"].enabled
    assert cache.stats["misses"] == N_TRAIN + N_VAL and cache.stats["hits"] == 0
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in cached.state_dict().items())


class Augmented(Dataset):
    """Random noise added at every __getitem__: inputs never repeat."""

    def __init__(self) -> None:
        self.data = make_data(N_TRAIN * 2, 0)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data[i]
        return x + 0.01 * torch.randn_like(x), y


def test_random_augmentation_is_detected_once_and_training_stops_caching(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = FeatureCache("backbone")
    with caplog.at_level(logging.INFO):
        fit([FreezeBackbone("backbone"), cache], train=Augmented())
    lines = [r.getMessage() for r in caplog.records if "none had been seen before" in r.getMessage()]
    assert len(lines) == 1 and "got 64 training samples in epoch 1" in lines[0]
    assert cache.stats["random_inputs"]
    # epoch 0 and the first 64 samples of epoch 1 were looked up; then training bypassed the cache;
    # validation kept hitting
    assert cache.stats["misses"] == 2 * N_TRAIN + 64 + N_VAL
    assert cache.stats["hits"] == 2 * N_VAL


def test_disk_store_is_reused_by_a_later_run_and_a_resumed_run(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    first = FeatureCache("backbone", store="disk", directory=directory)
    fit([FreezeBackbone("backbone"), first], epochs=1, enable_checkpointing=True, default_root_dir=tmp_path)
    later = FeatureCache("backbone", store="disk", directory=directory)
    fit([FreezeBackbone("backbone"), later], epochs=2)
    assert later.stats["misses"] == 0 and later.stats["hits"] == 2 * (N_TRAIN + N_VAL)
    assert later.stats["bytes"] == first.stats["bytes"] > (N_TRAIN + N_VAL) * 8 * 4

    ckpt = next(tmp_path.rglob("*.ckpt"))
    assert not any("cache" in k for k in torch.load(ckpt, weights_only=True)["state_dict"])
    resumed = FeatureCache("backbone", store="disk", directory=directory)
    fit([FreezeBackbone("backbone"), resumed], epochs=2, ckpt_path=ckpt)
    assert resumed.stats["misses"] == 0 and resumed.stats["hits"] == N_TRAIN + N_VAL  # epoch 1 only


class EvalNet(TinyNet):
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0])


def test_validate_test_predict_use_the_cache_and_plain_inference_is_unaffected() -> None:
    cache = FeatureCache("backbone")
    model, trainer = fit([FreezeBackbone("backbone"), cache], epochs=1, model=EvalNet())
    val = DataLoader(make_data(N_VAL, 1), batch_size=16)
    assert (cache.stats["hits"], cache.stats["misses"]) == (0, N_TRAIN + N_VAL)
    trainer.test(model, val, verbose=False)  # computed during fit's validation: every sample hits
    assert (cache.stats["hits"], cache.stats["misses"]) == (N_VAL, N_TRAIN + N_VAL)
    trainer.validate(model, val, verbose=False)
    predictions = torch.cat(trainer.predict(model, val))
    assert (cache.stats["hits"], cache.stats["misses"]) == (3 * N_VAL, N_TRAIN + N_VAL)
    assert "forward" not in model.backbone.__dict__
    model.eval()
    with torch.no_grad():
        assert torch.equal(predictions, model(make_data(N_VAL, 1).tensors[0]))


def test_budget_full_is_reported_and_stored_samples_keep_hitting(caplog: pytest.LogCaptureFixture) -> None:
    cache = FeatureCache("backbone", max_bytes=40 * 8 * 4)  # room for 40 of the 96 samples
    with caplog.at_level(logging.INFO):
        fit([FreezeBackbone("backbone"), cache], epochs=2)
    assert cache.stats["bytes"] == 40 * 8 * 4 and cache.stats["stored"] == 40
    assert cache.stats["hits"] == 40 and cache.stats["misses"] == 2 * (N_TRAIN + N_VAL) - 40
    report = next(r.getMessage() for r in caplog.records if "hits (" in r.getMessage())
    assert f"max_bytes={40 * 8 * 4} reached" in report


def test_bad_arguments_fail_with_the_value_and_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Invalid store='ssd'; valid choices: 'memory', 'disk'"):
        FeatureCache(store="ssd")
    with pytest.raises(
        ValueError, match=r"Invalid max_bytes=-1; valid choices: None \(no limit\) or an integer > 0"
    ):
        FeatureCache(max_bytes=-1)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"Invalid directory=.*f/c' for store='disk': cannot write there"):
        FeatureCache(store="disk", directory=tmp_path / "f" / "c")
    with pytest.raises(ValueError, match=r"Invalid modules=\[\]; valid choices: a dotted submodule name"):
        FeatureCache(modules=[])
    with pytest.raises(
        ModuleSelectionError, match=r"TinyNet has no submodule 'backbon'; closest valid names: 'backbone'"
    ):
        fit([FreezeBackbone("backbone"), FeatureCache("backbon")], epochs=1)


class ReplaceInnerForward(L.Callback):
    """Mid-fit, a layer inside the cached frozen module computes something else (no tensor changes)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            layer = pl_module.backbone[0]
            layer.forward = lambda x: type(layer).forward(layer, x) * 2  # type: ignore[method-assign]


def test_the_function_proof_is_never_served_from_the_cache() -> None:
    # the cache key covers tensors, modes and types, not a patched forward inside the module; the
    # probe must still see the change (a probe served from the cache would prove nothing)
    with pytest.raises(FrozenStateError, match="backbone: output on the probe input changed"):
        fit([FeatureCache("backbone"), FreezeBackbone("backbone"), ReplaceInnerForward()])
