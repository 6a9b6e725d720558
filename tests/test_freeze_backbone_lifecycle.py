"""FreezeBackbone's lifecycle: it acts for one fit and gives the model back exactly as it found it."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from helpers.freeze import TinyNet, changed_keys, loaders, make_data, snapshot, trainer
from helpers.multibranch import loader as branch_loader
from helpers.multibranch import make_module
from lightning.pytorch.callbacks import LambdaCallback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_freeze import FreezeBackbone, FrozenStateError


def _fit(model: L.LightningModule, tmp_path, callbacks: list, **kwargs) -> L.Trainer:
    train, val = loaders()
    t = trainer(tmp_path, callbacks=callbacks, **kwargs)
    t.fit(model, train, val)
    return t


def _hooked_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]


@pytest.mark.parametrize("norm", ["eval", "frozen"])
def test_after_fit_the_model_is_given_back_as_found(tmp_path, norm: str) -> None:
    model = TinyNet()
    model.head[1].eval()  # a flag the user chose: it must survive the fit too
    before = snapshot(model, "backbone.")
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    _fit(model, tmp_path, [FreezeBackbone(norm=norm)], max_epochs=1)
    assert _hooked_modules(model) == []
    assert type(model.backbone[1]) is nn.BatchNorm2d and type(model.backbone[5]) is nn.BatchNorm2d
    assert changed_keys(before, model) == []  # frozen norms converted back bitwise
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: m.training for n, m in model.named_modules()} == modes


@pytest.mark.parametrize("norm", ["eval", "frozen"])
def test_a_second_fit_without_freeze_backbone_trains_the_backbone(tmp_path, norm: str) -> None:
    model = TinyNet()
    _fit(model, tmp_path, [FreezeBackbone(norm=norm)], max_epochs=1)
    before = snapshot(model, "backbone.")
    dropout_training: list[bool] = []
    model.backbone[3].register_forward_hook(lambda m, args, out: dropout_training.append(m.training))
    _fit(model, tmp_path, [], max_epochs=1)
    changed = changed_keys(before, model)
    assert "backbone.0.weight" in changed and "backbone.4.weight" in changed  # trained
    assert "backbone.1.running_mean" in changed and "backbone.5.running_var" in changed  # stats update
    assert True in dropout_training  # dropout active in the training steps


@pytest.mark.parametrize("norm", ["eval", "frozen"])
def test_after_fit_the_model_scripts(tmp_path, norm: str) -> None:
    model = TinyNet()
    _fit(model, tmp_path, [FreezeBackbone(norm=norm)], max_epochs=1)
    scripted = torch.jit.script(model.eval())
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(scripted(x), model(x))


def test_after_a_failed_fit_the_model_is_given_back_too(tmp_path) -> None:
    class Tampering(TinyNet):
        def on_train_epoch_end(self) -> None:
            with torch.no_grad():
                self.backbone[0].bias += 1.0

    model = Tampering()
    with pytest.raises(FrozenStateError, match=r"backbone\.0\.bias"):
        _fit(model, tmp_path, [FreezeBackbone()], max_epochs=1)
    assert _hooked_modules(model) == []
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_unfreeze_at_epoch_lets_the_unfrozen_batchnorm_train(tmp_path) -> None:
    seen: dict[int, dict[str, torch.Tensor]] = {}
    record = LambdaCallback(
        on_train_epoch_end=lambda t, m: seen.setdefault(t.current_epoch, snapshot(m, "backbone."))
    )
    _fit(TinyNet(), tmp_path, [FreezeBackbone(unfreeze_at_epoch=1), record], max_epochs=2)
    moved = [k for k, v in seen[0].items() if not torch.equal(v, seen[1][k])]
    assert "backbone.1.running_mean" in moved and "backbone.5.running_var" in moved
    assert "backbone.0.weight" in moved


def test_switch_branch_then_second_fit_trains_the_new_active_branch(tmp_path) -> None:
    model = make_module(["a", "b"], active="a")
    first = FreezeBackbone()
    trainer(tmp_path, callbacks=[first], max_epochs=1).fit(model, branch_loader("a"))
    model.switch_branch("b")
    before = snapshot(model)
    second = FreezeBackbone()
    trainer(tmp_path, callbacks=[second], max_epochs=1).fit(model, branch_loader("b"))
    changed = changed_keys(before, model)
    assert changed and all(k.startswith("branches.b.") for k in changed)
    assert "branches.b.0.weight" in changed and "branches.b.1.running_mean" in changed
    assert second.frozen.names == ["backbone", "branches.a"]
    assert second.last_check.summary().endswith(": 0 changed")


def test_the_global_warning_filters_are_never_touched(tmp_path) -> None:
    outside = list(warnings.filters)
    during: list[list] = []
    spy = LambdaCallback(on_train_epoch_start=lambda t, m: during.append(list(warnings.filters)))
    _fit(TinyNet(), tmp_path, [FreezeBackbone(), spy], max_epochs=1)
    assert during == [outside] and warnings.filters == outside

    class Tampering(TinyNet):
        def on_train_epoch_end(self) -> None:
            with torch.no_grad():
                self.backbone[0].bias += 1.0

    with pytest.raises(FrozenStateError):
        _fit(Tampering(), tmp_path, [FreezeBackbone()], max_epochs=1)
    assert warnings.filters == outside


def test_pinned_layers_run_in_eval_although_the_eval_mode_notice_is_not_shown(tmp_path) -> None:
    modes: list[bool] = []
    model = TinyNet(train_in_step=True)
    for layer in (model.backbone[1], model.backbone[3], model.backbone[5]):
        layer.register_forward_hook(lambda m, args, out: modes.append(m.training))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(tmp_path, callbacks=[FreezeBackbone()], max_epochs=1)
        t.fit(model, loaders()[0])
    assert not [w for w in caught if "in eval mode at the start of training" in str(w.message)]
    assert modes and not any(modes)


def test_resume_at_the_last_batch_before_the_unfreeze_epoch_unfreezes_there(tmp_path) -> None:
    class Seeded(TinyNet):
        def on_train_batch_start(self, batch, batch_idx: int) -> None:
            if batch_idx == 0:  # on_train_epoch_start is skipped on resume; this hook is not
                torch.manual_seed(100 + self.current_epoch)  # dropout draws the same in both runs

    def data() -> DataLoader:
        return DataLoader(make_data(64, 0), batch_size=16, shuffle=False)  # 4 batches per epoch

    kwargs = dict(max_epochs=2, limit_val_batches=0)
    straight = Seeded()
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    trainer(tmp_path, callbacks=[FreezeBackbone(unfreeze_at_epoch=1)], **kwargs).fit(straight, data())

    interrupted = Seeded()
    interrupted.load_state_dict(init)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer(
        tmp_path,
        callbacks=[FreezeBackbone(unfreeze_at_epoch=1), ckpt],
        enable_checkpointing=True,
        **{**kwargs, "max_epochs": 1},
    ).fit(interrupted, data())
    at_checkpoint = snapshot(interrupted, "backbone.")

    resumed = Seeded()
    t = trainer(tmp_path, callbacks=[FreezeBackbone(unfreeze_at_epoch=1)], **kwargs)
    t.fit(resumed, data(), ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    assert len(t.optimizers[0].param_groups) == 2
    assert "backbone.0.weight" in changed_keys(at_checkpoint, resumed)  # trained in epoch 1
    expected = straight.state_dict()
    assert [k for k, v in resumed.state_dict().items() if not torch.equal(v, expected[k])] == []


@pytest.mark.parametrize("scale", [math.inf, math.nan, -math.inf])
def test_non_finite_unfreeze_lr_scale_is_refused(scale: float) -> None:
    with pytest.raises(
        ValueError, match=r"Invalid unfreeze_lr_scale=.*; valid choices: a finite number > 0\."
    ):
        FreezeBackbone(unfreeze_lr_scale=scale)


def test_lightning_ema_weight_averaging_is_named_at_fit_start(tmp_path) -> None:
    EMAWeightAveraging = getattr(L.pytorch.callbacks, "EMAWeightAveraging", None)
    if EMAWeightAveraging is None:
        pytest.skip(f"lightning {L.__version__} has no EMAWeightAveraging (newer releases do)")
    with pytest.warns(
        UserWarning,
        match=r"FreezeBackbone: EMAWeightAveraging averages every parameter, frozen ones included, and "
        r"copies its average into the model at train end: .* it will overwrite frozen weights .* Use "
        r"lightning_freeze\.FrozenSafeEMA instead",
    ):
        _fit(TinyNet(), tmp_path, [FreezeBackbone(verify="warn"), EMAWeightAveraging()], max_epochs=1)


def test_nothing_left_to_train_names_what_was_frozen_before(tmp_path) -> None:
    from lightning_freeze.core import freeze

    model = make_module(["a", "b"], active="b")
    freeze(model, "branches.b")  # e.g. left over from user code
    with pytest.raises(
        ValueError,
        match=r"froze backbone, branches\.a, and MultiBranchModule has no other trainable parameter\. "
        r"Already frozen before FreezeBackbone \(requires_grad=False\): branches\.b\.0, branches\.b\.1",
    ):
        trainer(tmp_path, callbacks=[FreezeBackbone()], max_epochs=1).fit(model, branch_loader("b"))
