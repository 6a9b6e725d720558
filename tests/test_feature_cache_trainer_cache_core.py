"""FeatureCache under the Trainer: every entry point sees every change, a failing store never changes a
result, and hits need no host copy of the batch (keys made on the host before the transfer)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers.freeze import TinyNet, make_data
from torch.utils.data import DataLoader

import lightning_freeze.core.bits as bits
import lightning_freeze.core.cache_keys as cache_keys
import lightning_freeze.core.cache_stores as cache_stores
import lightning_freeze.core.feature_cache as core_cache
import lightning_freeze.core.files as files
from lightning_freeze import FeatureCache, FreezeBackbone

N_TRAIN, N_VAL = 64, 32


class EvalNet(TinyNet):
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0])


def trainer(callbacks: list[Any], epochs: int = 3, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator=kwargs.pop("accelerator", "cpu"),
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def loader(n: int, seed: int) -> DataLoader:
    return DataLoader(make_data(n, seed), batch_size=16)


def fit(callbacks: list[Any], epochs: int = 3, **kwargs: Any) -> L.LightningModule:
    L.seed_everything(0, verbose=False)
    model = EvalNet()
    trainer(callbacks, epochs, **kwargs).fit(model, loader(N_TRAIN, 0), loader(N_VAL, 1))
    return model


@pytest.fixture(scope="module")
def uncached() -> dict[str, torch.Tensor]:
    return fit([FreezeBackbone("backbone")]).state_dict()


def same(state: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
    return list(state) == list(other) and all(torch.equal(state[k], other[k]) for k in state)


def run(entry: str, t: L.Trainer, model: L.LightningModule) -> Any:
    if entry == "predict":
        return torch.cat(t.predict(model, loader(N_VAL, 1)))
    if entry == "fit":
        t.fit_loop.max_epochs += 1
        t.fit(model, loader(N_TRAIN, 0), loader(N_VAL, 1))
        return {k: v.clone() for k, v in model.state_dict().items()}
    return getattr(t, entry)(model, loader(N_VAL, 1), verbose=False)[0]["val_loss"]


def write_data(model: L.LightningModule) -> None:
    model.backbone[0].weight.data.mul_(3)  # bypasses the version counter


def load_other(model: L.LightningModule) -> None:
    state = model.state_dict()
    state["backbone.0.weight"] = state["backbone.0.weight"] * 3
    model.load_state_dict(state)


def sequence(entry: str, change: Any, cached: bool) -> tuple[Any, FeatureCache | None]:
    """fit one epoch, run ``entry``, ``change`` the backbone, run ``entry`` again: its second result."""
    cache = FeatureCache("backbone") if cached else None
    L.seed_everything(0, verbose=False)
    model = EvalNet()
    t = trainer([FreezeBackbone("backbone", verify="off"), *([cache] if cache else [])], epochs=1)
    t.fit(model, loader(N_TRAIN, 0), loader(N_VAL, 1))
    run(entry, t, model)  # fills the cache for this entry point
    change(model)
    return run(entry, t, model), cache


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return same(a, b)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("change", [write_data, load_other], ids=["data_write", "load_state_dict"])
@pytest.mark.parametrize("entry", ["validate", "test", "predict", "fit"])
def test_every_trainer_call_sees_changes_made_before_it(entry: str, change: Any) -> None:
    served, cache = sequence(entry, change, cached=True)
    truth, _ = sequence(entry, change, cached=False)
    unchanged, _ = sequence(entry, lambda model: None, cached=False)
    assert equal(served, truth) and not equal(truth, unchanged)
    assert cache is not None
    if entry != "fit":  # the cache was in use (a fit's stats count that fit only: all misses here)
        assert cache.stats["hits"] > 0


def _fail(*args: Any, **kwargs: Any) -> Any:
    raise OSError(28, "No space left on device")


OPERATIONS = {
    "write": lambda mp: mp.setattr(cache_stores, "write_atomic", _fail),
    "fsync": lambda mp: mp.setattr(files.os, "fsync", _fail),
    "mkdir": lambda mp: mp.setattr(Path, "mkdir", _fail),
    "read": lambda mp: mp.setattr(cache_stores, "open", _fail, raising=False),
}


class FailAt(L.Callback):
    """Breaks one store operation from the start of epoch ``epoch`` on."""

    def __init__(self, operation: str, epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.operation, self.epoch, self.monkeypatch = operation, epoch, monkeypatch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            OPERATIONS[self.operation](self.monkeypatch)


@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_a_failing_disk_store_never_changes_the_fit(
    uncached: dict[str, torch.Tensor],
    operation: str,
    epoch: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = FeatureCache("backbone", store="disk", directory=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fit([FailAt(operation, epoch, monkeypatch), FreezeBackbone("backbone"), cache])
    assert same(model.state_dict(), uncached)
    ours = [w for w in caught if "disk store" in str(w.message)]
    # every epoch reads; epoch 0 writes every sample, later epochs write nothing (all hit)
    used = operation == "read" or epoch == 0
    assert len(ours) == (1 if used else 0), [str(w.message) for w in caught]


def test_hits_never_hash_in_the_forward(
    uncached: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keys come from the host batch filed at the transfer: the forward never hashes a moved row.

    The host rows are hashed (on the host) when the module is first called on the batch; hashing the
    moved tensor instead would be a device-to-host copy of the batch per call on an accelerator.
    """

    def forbidden(tensor: torch.Tensor) -> list[bytes]:
        raise AssertionError(f"a batch tensor {tuple(tensor.shape)} was hashed inside the forward")

    monkeypatch.setattr(core_cache, "row_digests", forbidden)
    cache = FeatureCache("backbone")
    model = fit([FreezeBackbone("backbone"), cache])
    assert same(model.state_dict(), uncached)
    assert cache.stats["hits"] == 2 * (N_TRAIN + N_VAL) and cache.stats["misses"] == N_TRAIN + N_VAL


def test_only_the_tensor_the_module_gets_is_hashed_once_per_batch(
    uncached: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host rows are hashed at the module's call: the targets never, each input batch once."""
    hashed: list[tuple[int, ...]] = []
    real = cache_keys.row_digests

    def counting(tensor: torch.Tensor) -> list[bytes]:
        hashed.append(tuple(tensor.shape))
        return real(tensor)

    monkeypatch.setattr(cache_keys, "row_digests", counting)
    cache = FeatureCache("backbone")
    model = fit([FreezeBackbone("backbone"), cache])
    assert same(model.state_dict(), uncached)
    batches = 3 * (N_TRAIN + N_VAL) // 16  # 3 epochs of training and validation batches of 16
    assert len(hashed) == batches and all(len(shape) > 1 for shape in hashed), hashed


def test_a_host_tensor_written_after_the_move_is_not_keyed_by_its_new_bits() -> None:
    memo = cache_keys.RowDigestMemo()
    host = torch.arange(12.0).reshape(4, 3)
    moved = host.clone()  # what a transfer to an accelerator gives: another tensor, the same values
    memo.remember(host, moved)
    expected = cache_keys.row_digests(host)
    host.add_(1)  # the host batch changes before the call: its rows no longer stand for `moved`
    assert memo.lookup(moved) is None  # the call hashes `moved` itself
    on_cpu = cache_keys.RowDigestMemo()
    on_cpu.remember(moved, moved)  # on the CPU the move gives the host tensor back
    assert on_cpu.lookup(moved) == expected == on_cpu.lookup(moved)
    moved.mul_(2)  # written in place after it was keyed: hashed again at the call, not served
    assert on_cpu.lookup(moved) is None


def test_a_batch_changed_in_place_before_the_call_is_hashed_again(uncached: dict[str, torch.Tensor]) -> None:
    class Normalises(EvalNet):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            if self.current_epoch == 1:
                x.mul_(-1)  # the batch tensor itself changes after its keys were made
            return torch.nn.functional.cross_entropy(self(x), y)

    def run_fit(callbacks: list[Any]) -> dict[str, torch.Tensor]:
        L.seed_everything(0, verbose=False)
        model = Normalises()
        trainer(callbacks).fit(model, loader(N_TRAIN, 0), loader(N_VAL, 1))
        return model.state_dict()

    truth = run_fit([FreezeBackbone("backbone")])
    cache = FeatureCache("backbone")
    assert same(run_fit([FreezeBackbone("backbone"), cache]), truth)
    assert not same(truth, uncached)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_device_to_host_copy_on_the_hit_path_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    copies: list[tuple[int, ...]] = []
    plain_dense_cpu = bits.dense_cpu

    def counting(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_cpu:
            copies.append(tuple(tensor.shape))
        return plain_dense_cpu(tensor)

    monkeypatch.setattr(bits, "dense_cpu", counting)
    cache = FeatureCache("backbone")
    L.seed_everything(0, verbose=False)
    model = EvalNet()
    trainer([FreezeBackbone("backbone"), cache], epochs=3, accelerator="gpu", devices=1).fit(
        model, loader(N_TRAIN, 0), loader(N_VAL, 1)
    )
    batch_copies = [shape for shape in copies if len(shape) == 4]  # (batch, 3, 6, 6) inputs
    assert cache.stats["hits"] >= 2 * N_TRAIN
    assert batch_copies == [], f"{len(batch_copies)} device-to-host copies of input batches"
