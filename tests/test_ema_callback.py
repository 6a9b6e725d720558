"""FrozenSafeEMA with a Trainer: FreezeBackbone in any order, EMA validation, schedule, resume, loading."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.freeze import TinyNet, loaders, make_data, snapshot, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import Precision
from torch.utils.data import DataLoader

from lightning_freeze import FreezeBackbone, FrozenSafeEMA, load_ema_weights
from lightning_freeze.core import TrainableEMA, effective_decay


class Net(TinyNet):
    """TinyNet that records the weights its validation/test steps ran with, and reseeds per epoch."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: dict[str, list[torch.Tensor]] = {"val": [], "test": []}

    def on_train_epoch_start(self) -> None:
        torch.manual_seed(1000 + self.current_epoch)  # dropout after unfreezing: same bits after a resume
        super().on_train_epoch_start()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen["val"].append(self.head[0].weight.detach().clone())
        super().validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen["test"].append(self.head[0].weight.detach().clone())
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))


def head_keys(model: torch.nn.Module) -> set[str]:
    return {k for k in model.state_dict() if k.startswith("head.")}


class SeedEachEpoch(Callback):
    """Lightning does not restore the global RNG on resume: seed each epoch so dropout draws alike."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            torch.manual_seed(trainer.current_epoch)


def fit(tmp_path: Path, callbacks: list[Callback], model: Net | None = None, **kwargs: Any) -> Net:
    torch.manual_seed(0)
    callbacks = [*callbacks, SeedEachEpoch()]
    model = model or Net()
    _, val = loaders()
    train = DataLoader(make_data(64, 0), batch_size=16)  # no shuffling: a resumed run sees the same batches
    kwargs.setdefault("max_epochs", 2)
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer(tmp_path, callbacks=callbacks, **kwargs).fit(model, train, val, ckpt_path=ckpt_path)
    return model


# ----------------------------------------------------------------------------------------------
# with FreezeBackbone
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ema_first", [True, False], ids=["ema-first", "freeze-first"])
def test_fit_with_freeze_backbone_in_either_order(tmp_path: Path, ema_first: bool) -> None:
    torch.manual_seed(0)
    model = Net()
    backbone_before = snapshot(model, "backbone.")
    ema = FrozenSafeEMA(decay=0.9)
    freezer = FreezeBackbone("backbone")
    fit(tmp_path, [ema, freezer] if ema_first else [freezer, ema], model=model)
    assert [k for k, v in backbone_before.items() if not torch.equal(model.state_dict()[k], v)] == []
    assert set(ema.ema.shadow) == head_keys(model)  # head params + head BatchNorm buffers, no backbone
    assert ema.num_updates == 8  # 4 batches x 2 epochs
    averaged = ema.ema_state_dict()
    assert set(averaged) == set(model.state_dict())
    assert all(torch.equal(averaged[k], v) for k, v in backbone_before.items())
    assert not torch.equal(averaged["head.0.weight"], model.head[0].weight)
    assert float(model.trainer.callback_metrics["ema/decay"]) == pytest.approx(effective_decay(0.9, 7))


def test_validation_and_test_run_on_ema_and_raw_weights_are_restored_bitwise(tmp_path: Path) -> None:
    runs = {}
    for with_ema in (True, False):
        ema = FrozenSafeEMA(decay=0.9, validate_with_ema=with_ema)
        model = fit(tmp_path / str(with_ema), [FreezeBackbone("backbone"), ema])
        model.trainer.test(model, loaders()[1], verbose=False)
        runs[with_ema] = (model, ema)
    (model, ema), (plain, _) = runs[True], runs[False]
    # swapping EMA weights in and out for validation leaves training bit-for-bit unchanged
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())
    # the last validation and the test ran on the EMA weights; the plain run on the raw ones
    assert torch.equal(model.seen["val"][-1], ema.ema.shadow["head.0.weight"])
    assert torch.equal(model.seen["test"][-1], ema.ema.shadow["head.0.weight"])
    assert not torch.equal(model.seen["val"][-1], model.head[0].weight)
    assert torch.equal(plain.seen["val"][-1], plain.head[0].weight)
    # sanity check + 2 epochs; the sanity check ran before any update (EMA == raw weights then)
    assert len(model.seen["val"]) == 3


# ----------------------------------------------------------------------------------------------
# update schedule
# ----------------------------------------------------------------------------------------------
class RecordOptimizerSteps(Callback):
    """Records head.0.weight after every optimizer step (keyed by trainer.global_step)."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self.weights.setdefault(trainer.global_step, pl_module.head[0].weight.detach().clone())


def test_schedule_counts_optimizer_steps_with_gradient_accumulation(tmp_path: Path) -> None:
    ema = FrozenSafeEMA(decay=0.9, update_every_n_steps=3, start_step=2)
    recorder = RecordOptimizerSteps()
    train, val = loaders(batch_size=8)  # 8 batches per epoch, 2 per optimizer step: 4 steps per epoch
    torch.manual_seed(0)
    model = Net()
    trainer(
        tmp_path,
        callbacks=[ema, FreezeBackbone("backbone"), recorder],
        accumulate_grad_batches=2,
        max_epochs=2,
    ).fit(model, train, val)
    assert model.trainer.global_step == 8 and ema.step_count == 8
    assert ema.num_updates == 2  # after optimizer steps 5 and 8
    w = recorder.weights
    expected = torch.lerp(w[5], w[8], 1 - effective_decay(0.9, 1))  # the first update copies step 5
    assert torch.equal(ema.ema.shadow["head.0.weight"], expected)


class SkipEveryThirdStep(Precision):
    """Skips every third optimizer step after computing the gradients, as a gradient scaler does on inf."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.skipped = 0

    def optimizer_step(self, optimizer, model, closure, **kwargs):  # type: ignore[override]
        self.calls += 1
        if self.calls % 3 == 0:
            self.skipped += 1
            return closure()
        return super().optimizer_step(optimizer, model, closure, **kwargs)


def test_skipped_optimizer_steps_do_not_count(tmp_path: Path) -> None:
    ema = FrozenSafeEMA(decay=0.9)
    precision = SkipEveryThirdStep()
    model = fit(tmp_path, [FreezeBackbone("backbone"), ema], plugins=[precision])
    assert precision.skipped == 2 and model.trainer.global_step == 8
    assert ema.step_count == ema.num_updates == 6


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
class CrashAt(Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[override]
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("simulated crash")


def staged_callbacks(ema_first: bool) -> tuple[FrozenSafeEMA, list[Callback]]:
    ema = FrozenSafeEMA(decay=0.9, update_every_n_steps=2, start_step=1)
    freezer = FreezeBackbone("backbone", unfreeze_at_epoch=1)  # the trainable set changes mid-fit
    return ema, [ema, freezer] if ema_first else [freezer, ema]


@pytest.mark.parametrize("ema_first", [True, False], ids=["ema-first", "freeze-first"])
def test_resume_after_crash_reproduces_uninterrupted_run_exactly(tmp_path: Path, ema_first: bool) -> None:
    ema, callbacks = staged_callbacks(ema_first)
    uninterrupted = fit(tmp_path / "a", callbacks, max_epochs=3)
    backbone_keys = {k for k in uninterrupted.state_dict() if k.startswith("backbone.")}
    assert backbone_keys <= set(ema.ema.shadow)  # joined at the unfreeze

    ckpt_dir = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    _, callbacks = staged_callbacks(ema_first)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(
            tmp_path / "b",
            [*callbacks, saver, CrashAt(epoch=2, batch=2)],
            max_epochs=3,
            enable_checkpointing=True,
        )
    first, second = sorted(ckpt_dir.glob("epoch=*.ckpt"))
    state = next(
        v for k, v in torch.load(first, weights_only=False)["callbacks"].items() if "FrozenSafeEMA" in k
    )
    assert not backbone_keys & set(state["ema"]["shadow"])  # epoch 0: backbone frozen, never copied

    resumed_ema, callbacks = staged_callbacks(ema_first)
    resumed = fit(tmp_path / "c", callbacks, max_epochs=3, ckpt_path=second)
    raw = uninterrupted.state_dict()
    assert [k for k, v in resumed.state_dict().items() if not torch.equal(v, raw[k])] == []
    assert resumed_ema.ema.shadow.keys() == ema.ema.shadow.keys()
    assert [k for k, v in resumed_ema.ema.shadow.items() if not torch.equal(v, ema.ema.shadow[k])] == []
    assert resumed_ema.num_updates == ema.num_updates and resumed_ema.step_count == ema.step_count


class SaveDuringValidation(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("saver_first", [True, False])
def test_checkpoint_written_during_ema_validation_holds_raw_weights(
    tmp_path: Path, saver_first: bool
) -> None:
    path = tmp_path / "during_val.ckpt"
    ema = FrozenSafeEMA(decay=0.9)
    callbacks: list[Callback] = [FreezeBackbone("backbone"), ema]
    callbacks.insert(0 if saver_first else 2, SaveDuringValidation(path))
    model = fit(tmp_path, callbacks, max_epochs=1)
    ckpt = torch.load(path, weights_only=False)
    raw = model.state_dict()
    assert [k for k, v in ckpt["state_dict"].items() if not torch.equal(v, raw[k])] == []
    assert not torch.equal(ckpt["state_dict"]["head.0.weight"], ema.ema.shadow["head.0.weight"])
    shadow = ckpt["callbacks"][ema.state_key]["ema"]["shadow"]
    assert set(shadow) == head_keys(model)
    assert torch.equal(shadow["head.0.weight"], ema.ema.shadow["head.0.weight"])


def test_load_ema_weights_one_call_for_inference(tmp_path: Path) -> None:
    ema = FrozenSafeEMA(decay=0.9)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(tmp_path, [FreezeBackbone("backbone"), ema, saver], enable_checkpointing=True)
    fresh = load_ema_weights(Net(), tmp_path / "last.ckpt")
    expected = ema.ema_state_dict()
    assert [k for k, v in fresh.state_dict().items() if not torch.equal(v, expected[k])] == []

    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": fresh.state_dict(), "callbacks": {"EarlyStopping{}": {}}}, bare)
    with pytest.raises(
        ValueError, match=r"holds 0 FrozenSafeEMA states \[\]; was it trained with a FrozenSafeEMA"
    ):
        load_ema_weights(Net(), bare)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decay": 1.0}, r"Invalid decay=1.0; valid choices: a number strictly between 0 and 1"),
        ({"decay": 0}, r"Invalid decay=0; valid choices"),
        ({"update_every_n_steps": 0}, r"Invalid update_every_n_steps=0; valid choices: an integer >= 1"),
        ({"update_every_n_steps": 1.5}, r"Invalid update_every_n_steps=1.5; valid choices: an integer >= 1"),
        ({"start_step": -1}, r"Invalid start_step=-1; valid choices: an integer >= 0"),
        ({"buffers": "mean"}, r"Invalid buffers='mean'; valid choices: 'copy', 'average', 'ignore'"),
    ],
)
def test_bad_arguments_name_the_value_and_the_choices(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FrozenSafeEMA(**kwargs)


def test_nothing_trainable_is_a_value_error_at_fit_start(tmp_path: Path) -> None:
    class AllFrozen(Net):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            self.requires_grad_(False)  # e.g. a wrong freeze in user code
            return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    with pytest.raises(ValueError, match=r"Nothing to average: AllFrozen has 0 trainable of 14 parameters"):
        fit(tmp_path, [FrozenSafeEMA()], model=AllFrozen())


def test_two_emas_may_not_both_swap_into_the_model(tmp_path: Path) -> None:
    both = [FrozenSafeEMA(decay=0.9), FrozenSafeEMA(decay=0.99)]
    with pytest.raises(ValueError, match=r"2 FrozenSafeEMA callbacks have validate_with_ema=True"):
        fit(tmp_path, both)
    slow = FrozenSafeEMA(decay=0.99, validate_with_ema=False)
    fast = FrozenSafeEMA(decay=0.5)  # warm-up is capped at 0.5 from the 2nd update on
    fit(tmp_path, [fast, slow], max_epochs=1)
    assert fast.state_key != slow.state_key and fast.num_updates == slow.num_updates == 4
    assert not torch.equal(fast.ema.shadow["head.0.weight"], slow.ema.shadow["head.0.weight"])


def test_load_ema_weights_gives_a_tensor_shared_under_two_names_its_average() -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Linear(4, 4)
            self.decoder = self.encoder  # one parameter, two state_dict keys

    model = Tied()
    ema = TrainableEMA(model, decay=0.5)
    for _ in range(2):
        with torch.no_grad():
            model.encoder.weight.add_(1.0)
        ema.update(model)
    ckpt = {
        "state_dict": model.state_dict(),
        "callbacks": {"FrozenSafeEMA{'decay': 0.5}": {"ema": ema.state_dict()}},
    }
    fresh = load_ema_weights(Tied(), ckpt)
    assert torch.equal(fresh.decoder.weight, ema.shadow["encoder.weight"])
    assert not torch.equal(fresh.decoder.weight, model.encoder.weight)


# ----------------------------------------------------------------------------------------------
# trainer.validate(ckpt_path=...) after a fit; state keys
# ----------------------------------------------------------------------------------------------
def _fit_and_save(root: Path, callbacks: list[Callback], seed: int) -> tuple[Net, Any, Path]:
    torch.manual_seed(seed)
    model = Net()
    run = trainer(root, callbacks=callbacks, max_epochs=1, num_sanity_val_steps=0)
    run.fit(model, DataLoader(make_data(64, seed), batch_size=16), loaders()[1])
    path = root / "last.ckpt"
    run.save_checkpoint(path)
    return model, run, path


def _validate_info(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("FrozenSafeEMA: ")]


def test_validate_with_a_checkpoint_evaluates_its_weights_not_the_stale_ema_of_the_last_fit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lightning.pytorch")  # whatever an earlier test set
    ema = FrozenSafeEMA(decay=0.5)
    model, run, with_ema = _fit_and_save(tmp_path / "ema", [ema], seed=0)
    _, _, without_ema = _fit_and_save(tmp_path / "plain", [], seed=1)  # other weights, no EMA state
    raw = torch.load(without_ema, weights_only=True)["state_dict"]["head.0.weight"]
    assert not torch.equal(raw, ema.ema.shadow["head.0.weight"])

    caplog.set_level("INFO")
    caplog.clear()
    run.validate(model, loaders()[1], ckpt_path=without_ema, verbose=False)
    assert torch.equal(model.seen["val"][-1], raw)  # X's own weights, not the previous fit's EMA
    assert _validate_info(caplog) == [
        f"FrozenSafeEMA: checkpoint {str(without_ema)!r} holds no EMA state under {ema.state_key!r}: "
        "evaluating its raw weights (the EMA of an earlier fit averaged other weights: dropped)."
    ]

    caplog.clear()
    shadow = torch.load(with_ema, weights_only=True)["callbacks"][ema.state_key]["ema"]["shadow"]
    run.validate(model, loaders()[1], ckpt_path=with_ema, verbose=False)
    assert torch.equal(model.seen["val"][-1], shadow["head.0.weight"])  # X's EMA when X has one
    assert _validate_info(caplog) == [
        f"FrozenSafeEMA: evaluating checkpoint {str(with_ema)!r} on its EMA weights."
    ]


def test_checkpoints_with_the_old_state_key_still_load(tmp_path: Path) -> None:
    ema = FrozenSafeEMA(decay=0.5)
    _, _, path = _fit_and_save(tmp_path, [ema], seed=0)
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["callbacks"].pop(ema.state_key)
    ckpt["callbacks"]["FrozenSafeEMA{'decay': 0.5}"] = state  # the key before it held every setting
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    fresh = FrozenSafeEMA(decay=0.5)
    torch.manual_seed(3)
    other = Net()
    trainer(tmp_path, callbacks=[fresh]).validate(other, loaders()[1], ckpt_path=old, verbose=False)
    assert torch.equal(other.seen["val"][-1], state["ema"]["shadow"]["head.0.weight"])


def test_emas_with_the_same_decay_keep_separate_checkpoint_states(tmp_path: Path) -> None:
    plain = FrozenSafeEMA(decay=0.5, validate_with_ema=False)
    delayed = FrozenSafeEMA(decay=0.5, start_step=2)  # same decay: the key used to collide
    _, _, path = _fit_and_save(tmp_path, [plain, delayed], seed=0)
    assert plain.state_key != delayed.state_key
    saved = torch.load(path, weights_only=True)["callbacks"]
    for ema in (plain, delayed):
        shadow = saved[ema.state_key]["ema"]["shadow"]
        assert all(torch.equal(shadow[k], v) for k, v in ema.ema.shadow.items())
    assert not torch.equal(
        saved[plain.state_key]["ema"]["shadow"]["head.0.weight"],
        saved[delayed.state_key]["ema"]["shadow"]["head.0.weight"],
    )


def test_two_emas_with_identical_settings_are_refused(tmp_path: Path) -> None:
    twins = [FrozenSafeEMA(decay=0.5), FrozenSafeEMA(decay=0.5, validate_with_ema=False)]
    with pytest.raises(RuntimeError, match=r"`callback.state_key` must be unique"):
        fit(tmp_path, twins)


def test_fsdp1_strategy_is_refused_with_the_valid_choices() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[])
    with pytest.raises(
        ValueError, match=r"does not support FSDPStrategy \(FSDP1\).*Valid: ModelParallelStrategy"
    ):
        FrozenSafeEMA().setup(trainer, None, "fit")  # type: ignore[arg-type]
