"""FeatureCache(skip_pipeline=True): later epochs iterate the cached features, no sample is loaded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers.freeze import TinyNet, make_data
from torch.utils.data import DataLoader, Dataset

from lightning_freeze import FeatureCache, FreezeBackbone
from lightning_freeze.callbacks import skip_pipeline
from lightning_freeze.callbacks.skip_pipeline import CHECK_SAMPLES
from lightning_freeze.core.cache_stores import MemoryStore

N_TRAIN, N_VAL, EPOCHS = 64, 32, 4
CHECKED = {2: CHECK_SAMPLES, 3: CHECK_SAMPLES}  # loads of the random check of the skipped epochs 2 and 3


class Counted(Dataset):
    """``make_data`` that counts its ``__getitem__`` calls per epoch (set by :class:`EpochOf`)."""

    def __init__(self, noise: bool = False) -> None:
        self.data = make_data(N_TRAIN, 0)
        self.noise = noise
        self.epoch = 0
        self.loads: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.loads[self.epoch] = self.loads.get(self.epoch, 0) + 1
        x, y = self.data[i]
        return (x + 0.01 * torch.randn_like(x) if self.noise else x), y


class EpochOf(L.Callback):
    def __init__(self, data: Counted) -> None:
        self.data = data

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.data.epoch = trainer.current_epoch


class ChangeBuffer(L.Callback):
    """Changes a running mean of the frozen backbone at the start of epoch 3.

    In place (the version counter moves), or through ``tensor.data`` (it does not: only a hash sees it).
    """

    def __init__(self, through_data: bool = False) -> None:
        self.through_data = through_data

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 3:
            mean = pl_module.backbone[1].running_mean
            (mean.data if self.through_data else mean).add_(0.5)


class ClearAt(L.Callback):
    """``FeatureCache.clear()`` before the second batch of epoch 3 (a skipped epoch)."""

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int
    ) -> None:
        if trainer.current_epoch == 3 and i == 1:
            self.cache.clear()


class TwoCalls(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x) + self.backbone(x))


def fit(
    callbacks: list[Any],
    shuffle: bool = False,
    noise: bool = False,
    model_class: type[TinyNet] = TinyNet,
    data_class: type[Counted] = Counted,
) -> tuple[L.LightningModule, Counted]:
    L.seed_everything(0, verbose=False)
    model = model_class()
    data = data_class(noise)
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        callbacks=[EpochOf(data), *callbacks],
        accelerator="cpu",
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        model,
        DataLoader(data, batch_size=16, shuffle=shuffle),
        DataLoader(make_data(N_VAL, 1), batch_size=16),
    )
    return model, data


def same(a: L.LightningModule, b: L.LightningModule) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def info(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.fixture(scope="module")
def uncached() -> L.LightningModule:
    return fit([FreezeBackbone("backbone")])[0]


def test_later_epochs_load_no_sample_and_end_bitwise_as_the_uncached_run(
    uncached: L.LightningModule, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyed: list[int] = []
    real_key = skip_pipeline.module_state_key
    monkeypatch.setattr(
        skip_pipeline, "module_state_key", lambda *a, **k: keyed.append(1) or real_key(*a, **k)
    )
    cache = FeatureCache("backbone", skip_pipeline=True)
    with caplog.at_level(logging.INFO):
        model, data = fit([cache, FreezeBackbone("backbone")])
    # epoch 0 computes, epoch 1 hits every sample with the same input and target: verified; then
    # each epoch loads only its random check samples
    assert data.loads == {0: N_TRAIN, 1: N_TRAIN, **CHECKED}
    assert len(keyed) == EPOCHS - 2  # the module key is derived once per skipped epoch, not per batch
    assert same(model, uncached)
    assert cache.stats["misses"] == N_TRAIN + N_VAL
    assert cache.stats["hits"] == (EPOCHS - 1) * (N_TRAIN + N_VAL)
    assert len(info(caplog, "skip_pipeline: from epoch 2 on")) == 1
    assert cache.stats["skipped_epochs"] == EPOCHS - 2
    assert "2 training epoch(s) ran on the cached features" in cache.report()
    assert "forward" not in model.backbone.__dict__


def test_a_disk_store_filled_by_an_earlier_run_skips_from_the_third_epoch(
    uncached: L.LightningModule, tmp_path: Path
) -> None:
    fit([FeatureCache("backbone", store="disk", directory=tmp_path), FreezeBackbone("backbone")])
    cache = FeatureCache("backbone", store="disk", directory=tmp_path, skip_pipeline=True)
    model, data = fit([cache, FreezeBackbone("backbone")])
    # every sample hits from epoch 0 on, but the targets are verified only by a second epoch
    assert data.loads == {0: N_TRAIN, 1: N_TRAIN, **CHECKED}
    assert same(model, uncached)
    assert cache.stats["misses"] == 0 and cache.stats["skipped_epochs"] == EPOCHS - 2


def test_shuffled_run_keeps_the_sampler_order() -> None:
    plain, _ = fit([FreezeBackbone("backbone")], shuffle=True)
    model, data = fit(
        [FeatureCache("backbone", skip_pipeline=True), FreezeBackbone("backbone")], shuffle=True
    )
    assert data.loads == {0: N_TRAIN, 1: N_TRAIN, **CHECKED}
    # features of a sample may come from another batch composition: close, not necessarily bitwise
    sp, sm = plain.state_dict(), model.state_dict()
    assert all(torch.allclose(sp[k].float(), sm[k].float(), atol=1e-5) for k in sp)


def test_shuffled_skip_run_ends_bitwise_as_the_cached_run() -> None:
    # both serve the same stored features; equal weights need the same sampler orders, i.e. the same
    # global random stream (the skipped epochs draw the DataLoader's base seed, the check draws none)
    cached, _ = fit([FeatureCache("backbone"), FreezeBackbone("backbone")], shuffle=True)
    skipped, data = fit(
        [FeatureCache("backbone", skip_pipeline=True), FreezeBackbone("backbone")], shuffle=True
    )
    assert data.loads == {0: N_TRAIN, 1: N_TRAIN, **CHECKED}
    assert same(skipped, cached)


@pytest.mark.parametrize("through_data", [False, True])
@pytest.mark.parametrize("change_first", [True, False])
def test_a_changed_buffer_falls_back_to_loading(
    uncached: L.LightningModule, caplog: pytest.LogCaptureFixture, change_first: bool, through_data: bool
) -> None:
    plain, _ = fit([FreezeBackbone("backbone", verify="off"), ChangeBuffer(through_data)])
    callbacks = [FeatureCache("backbone", skip_pipeline=True), FreezeBackbone("backbone", verify="off")]
    # before the cache's epoch start hook: seen there; after it: seen by the module call (the features
    # gathered for the skipped epoch 2 are not served under the new key)
    change = ChangeBuffer(through_data)
    callbacks = [change, *callbacks] if change_first else [*callbacks, change]
    with caplog.at_level(logging.INFO):
        model, data = fit(callbacks)
    # epoch 2 skipped, epoch 3 loads (after its random check)
    assert data.loads == {0: N_TRAIN, 1: N_TRAIN, 2: CHECK_SAMPLES, 3: CHECK_SAMPLES + N_TRAIN}
    assert same(model, plain) and not same(model, uncached)
    assert len(info(caplog, "falls back") + info(caplog, "loads the samples again")) == 1


def test_entries_cleared_during_a_skipped_epoch_are_not_served(
    uncached: L.LightningModule, caplog: pytest.LogCaptureFixture
) -> None:
    cache = FeatureCache("backbone", skip_pipeline=True)
    with caplog.at_level(logging.INFO):
        model, data = fit([cache, FreezeBackbone("backbone"), ClearAt(cache)])
    # epoch 3 serves its first batch, then loads the 3 others and computes them again
    assert data.loads == {0: N_TRAIN, 1: N_TRAIN, 2: CHECK_SAMPLES, 3: CHECK_SAMPLES + N_TRAIN - 16}
    assert same(model, uncached)
    assert len(info(caplog, "an entry is gone")) == 1


def test_entries_that_cannot_be_gathered_are_served_one_by_one_and_gathered_once(
    uncached: L.LightningModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    tries: list[int] = []

    def cannot(self: MemoryStore, state: bytes, keys: list[bytes]) -> None:
        tries.append(len(keys))  # e.g. a per-rank store under DDP holds only its rank's samples

    monkeypatch.setattr(MemoryStore, "gather", cannot)
    cache = FeatureCache("backbone", skip_pipeline=True)
    model, data = fit([cache, FreezeBackbone("backbone")])
    assert data.loads == {0: N_TRAIN, 1: N_TRAIN, **CHECKED}  # epochs 2 and 3 still skip
    assert same(model, uncached)
    assert tries == [N_TRAIN]  # tried once for the verified state, not once per batch


@pytest.mark.parametrize("cache_first", [True, False])
def test_an_unfreeze_falls_back_to_loading(caplog: pytest.LogCaptureFixture, cache_first: bool) -> None:
    plain, _ = fit([FreezeBackbone("backbone", unfreeze_at_epoch=3)])
    callbacks = [
        FeatureCache("backbone", skip_pipeline=True),
        FreezeBackbone("backbone", unfreeze_at_epoch=3),
    ]
    with caplog.at_level(logging.INFO):
        model, data = fit(callbacks if cache_first else callbacks[::-1])
    assert data.loads == {0: N_TRAIN, 1: N_TRAIN, 2: CHECK_SAMPLES, 3: CHECK_SAMPLES + N_TRAIN}
    assert same(model, plain)
    assert len(info(caplog, "FeatureCache: backbone is no longer cacheable")) == 1


def test_random_inputs_never_skip(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        _, data = fit([FeatureCache("backbone", skip_pipeline=True), FreezeBackbone("backbone")], noise=True)
    assert data.loads == dict.fromkeys(range(EPOCHS), N_TRAIN)
    assert not info(caplog, "skip_pipeline: from epoch")


def test_a_module_called_twice_per_batch_is_not_skipped(caplog: pytest.LogCaptureFixture) -> None:
    plain, _ = fit([FreezeBackbone("backbone")], model_class=TwoCalls)
    with caplog.at_level(logging.INFO):
        model, data = fit(
            [FeatureCache("backbone", skip_pipeline=True), FreezeBackbone("backbone")], model_class=TwoCalls
        )
    assert data.loads == dict.fromkeys(range(EPOCHS), N_TRAIN)
    assert same(model, plain)
    lines = info(caplog, "skip_pipeline does not apply")
    assert lines == [
        "FeatureCache: skip_pipeline does not apply (backbone is not called exactly once per training "
        "batch); every epoch loads its samples."
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"skip_pipeline": "yes"}, r"Invalid skip_pipeline='yes'; valid choices: True, False\."),
        ({"modules": ["a", "b"], "skip_pipeline": True}, r"exactly one module .* modules=\['a', 'b'\]"),
        ({"modules": "layer*", "skip_pipeline": True}, r"exactly one module .* modules='layer\*'"),
    ],
)
def test_bad_input(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FeatureCache(**kwargs)


# --- issue 17 item 6: skip_pipeline serves only what it verified -----------------------------------


class DrawnTargets(Counted):
    """Targets drawn from the global RNG at every access (e.g. random label noise)."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = super().__getitem__(i)
        return x, torch.randint(0, 3, ())


class ChangeData(L.Callback):
    """Changes every training input at the start of epoch 3 (after FeatureCache's epoch-start hook)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 3:
            trainer.train_dataloader.dataset.data.tensors[0].mul_(-1)


class FloatCall(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x.float()))


class ChannelsLast(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x.to(memory_format=torch.channels_last)))


class DictData(Counted):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        x, y = super().__getitem__(i)
        return {"pixel_values": x, "labels": y}


class DictNet(TinyNet):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:  # type: ignore[override]
        return super().training_step((batch["pixel_values"], batch["labels"]), batch_idx)


def test_targets_drawn_per_access_are_never_frozen(caplog: pytest.LogCaptureFixture) -> None:
    plain, _ = fit([FreezeBackbone("backbone")], data_class=DrawnTargets)
    with caplog.at_level(logging.INFO):
        model, data = fit(
            [FeatureCache("backbone", skip_pipeline=True), FreezeBackbone("backbone")],
            data_class=DrawnTargets,
        )
    assert data.loads == dict.fromkeys(range(EPOCHS), N_TRAIN)
    assert same(model, plain)
    lines = info(caplog, "skip_pipeline does not apply")
    assert len(lines) == 1 and "gave another target than in an earlier epoch" in lines[0]


def test_data_changed_after_the_check_epoch_is_loaded_not_served(caplog: pytest.LogCaptureFixture) -> None:
    plain, _ = fit([FreezeBackbone("backbone"), ChangeData()])
    with caplog.at_level(logging.INFO):
        model, data = fit(
            [FeatureCache("backbone", skip_pipeline=True), FreezeBackbone("backbone"), ChangeData()]
        )
    # epoch 2 skipped; epoch 3's random check sees the change: the whole epoch loads
    assert data.loads == {0: N_TRAIN, 1: N_TRAIN, 2: CHECK_SAMPLES, 3: CHECK_SAMPLES + N_TRAIN}
    assert same(model, plain)
    assert len(info(caplog, "skip_pipeline: the data changed since its features were verified")) == 1


def test_a_call_on_x_float_is_served(uncached: L.LightningModule) -> None:
    model, data = fit(
        [FeatureCache("backbone", skip_pipeline=True), FreezeBackbone("backbone")], model_class=FloatCall
    )
    assert data.loads == {0: N_TRAIN, 1: N_TRAIN, **CHECKED}
    assert same(model, uncached)  # x is float32 already: x.float() is x


def test_a_call_on_a_channels_last_copy_falls_back_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    plain, _ = fit([FreezeBackbone("backbone")], model_class=ChannelsLast)
    with caplog.at_level(logging.INFO):
        model, data = fit(
            [FeatureCache("backbone", skip_pipeline=True), FreezeBackbone("backbone")],
            model_class=ChannelsLast,
        )
    assert data.loads == dict.fromkeys(range(EPOCHS), N_TRAIN)
    assert same(model, plain)
    assert info(caplog, "skip_pipeline does not apply") == [
        "FeatureCache: skip_pipeline does not apply (backbone is not called on the batch input x itself (a "
        "dtype conversion, copy or memory-format change of x, or another tensor)); every epoch loads its "
        "samples."
    ]


def test_dict_batches_skip_with_named_input_and_target(uncached: L.LightningModule) -> None:
    cache = FeatureCache("backbone", skip_pipeline=True, input_key="pixel_values", target_key="labels")
    model, data = fit([cache, FreezeBackbone("backbone")], model_class=DictNet, data_class=DictData)
    assert data.loads == {0: N_TRAIN, 1: N_TRAIN, **CHECKED}
    assert cache.stats["skipped_epochs"] == EPOCHS - 2
    assert same(model, uncached)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"input_key": "pixels", "target_key": "labels"},
            r"input_key='pixels' is not an entry of the training batch \(dict\); valid choices: "
            r"'pixel_values', 'labels'\.",
        ),
        ({}, r"training batches are dicts with keys \['pixel_values', 'labels'\]; name the input"),
    ],
)
def test_dict_batch_with_a_bad_or_missing_name(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit(
            [FeatureCache("backbone", skip_pipeline=True, **kwargs), FreezeBackbone("backbone")],
            model_class=DictNet,
            data_class=DictData,
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_key": 1.5, "skip_pipeline": True}, r"Invalid input_key=1\.5; valid choices: None"),
        ({"input_key": "x", "target_key": "x", "skip_pipeline": True}, r"both 'x'; valid choices: two"),
        ({"input_key": "x"}, r"input_key='x'/target_key=None name the batch entries of skip_pipeline=True"),
    ],
)
def test_bad_batch_keys(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FeatureCache(**kwargs)


def test_the_random_check_leaves_the_global_random_streams_as_they_were() -> None:
    import random

    import numpy as np

    def draws() -> tuple[float, float, float]:
        return torch.rand(()).item(), random.random(), float(np.random.rand())

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = draws()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with skip_pipeline._global_rng_kept():
        draws()  # what a dataset's __getitem__ may draw while the check loads its samples
    assert draws() == expected


class CopyWhenZero(TinyNet):
    """Calls the backbone on x itself for real data, on a copy of x for an all-zero input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x if bool(x.abs().sum() > 0) else x.clone()))


def test_a_skipped_batch_called_on_a_copy_is_loaded_and_computed(
    uncached: L.LightningModule, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        model, data = fit(
            [FeatureCache("backbone", skip_pipeline=True), FreezeBackbone("backbone")],
            model_class=CopyWhenZero,
        )
    # epoch 2: the check, then its first batch is loaded for the real input and so are the others
    assert data.loads == {0: N_TRAIN, 1: N_TRAIN, 2: CHECK_SAMPLES + N_TRAIN, 3: N_TRAIN}
    assert same(model, uncached)
    lines = info(caplog, "skip_pipeline does not apply")
    assert len(lines) == 1 and "called on something else than the batch input" in lines[0]
