"""FreezeBackbone in a real Trainer.fit: bitwise frozen, verified, resumable, clear errors."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from helpers.freeze import TinyNet, changed_keys, loaders, snapshot, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from packaging.version import Version
from torch import nn

from lightning_freeze import FreezeBackbone, FrozenStateError
from lightning_freeze.core import FrozenBatchNorm, ModuleSelectionError

BACKBONE_TENSORS = 14  # 2 convs (weight, bias) + 2 BatchNorms (5 tensors each)


def _fit(model: L.LightningModule, tmp_path, callbacks: list, **kwargs) -> L.Trainer:
    train, val = loaders()
    t = trainer(tmp_path, callbacks=callbacks, **kwargs)
    t.fit(model, train, val)
    return t


@pytest.mark.parametrize("norm", ["eval", "frozen"])
def test_backbone_bitwise_frozen_after_three_epochs_with_validation(tmp_path, norm: str) -> None:
    model = TinyNet()
    before = snapshot(model)
    callback = FreezeBackbone("backbone", norm=norm)
    seen: list[type] = []
    probe = L.pytorch.callbacks.LambdaCallback(
        on_train_epoch_end=lambda trainer, module: seen.append(type(module.backbone[1]))
    )
    _fit(model, tmp_path, [callback, probe])
    changed = changed_keys(before, model)
    assert not [k for k in changed if k.startswith("backbone.")]
    # every trainable tensor moved, and the head's BatchNorm1d of the same width still tracks stats
    assert sorted(changed) == sorted(k for k in before if k.startswith("head."))
    assert "head.1.running_mean" in changed and "head.1.num_batches_tracked" in changed
    assert callback.last_check is not None
    assert callback.last_check.summary() == f"checked {BACKBONE_TENSORS} frozen tensors: 0 changed"
    assert model.losses[-1] < model.losses[0]
    expected = FrozenBatchNorm if norm == "frozen" else nn.BatchNorm2d
    assert seen == [expected] * 3
    assert type(model.backbone[1]) is nn.BatchNorm2d  # given back as found after the fit


def test_control_requires_grad_false_alone_lets_running_stats_move(tmp_path) -> None:
    model = TinyNet(train_at_epoch_start=True)
    model.backbone.requires_grad_(False)
    model.backbone.eval()  # even eval() is undone by the user's .train() in on_train_epoch_start
    before = snapshot(model, "backbone.")
    _fit(model, tmp_path, [])
    assert sorted(changed_keys(before, model)) == sorted(
        f"backbone.{i}.{b}" for i in (1, 5) for b in ("running_mean", "running_var", "num_batches_tracked")
    )


@pytest.mark.parametrize(
    "user_code",
    [{"train_at_epoch_start": True}, {"train_in_step": True}],
    ids=["epoch_start", "training_step"],
)
def test_user_train_calls_cannot_unfreeze(tmp_path, user_code: dict) -> None:
    model = TinyNet(**user_code)
    before = snapshot(model, "backbone.")
    callback = FreezeBackbone()
    _fit(model, tmp_path, [callback])
    assert changed_keys(before, model) == []
    assert callback.last_check.summary() == f"checked {BACKBONE_TENSORS} frozen tensors: 0 changed"


def test_lightning_module_unfreeze_cannot_move_frozen_norm(tmp_path) -> None:
    class Unfreezing(TinyNet):
        def on_train_epoch_start(self) -> None:
            self.unfreeze()  # LightningModule.unfreeze(): requires_grad=True everywhere and .train()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.head.parameters(), lr=self.lr)

    model = Unfreezing()
    before = snapshot(model, "backbone.1.")
    _fit(model, tmp_path, [FreezeBackbone("backbone.1", norm="frozen")])
    assert changed_keys(before, model) == []


def test_layers_replaced_after_setup_are_pinned(tmp_path) -> None:
    class Replacing(TinyNet):
        def on_train_epoch_start(self) -> None:
            # what a SyncBatchNorm conversion does: a new module object, in train mode, same tensors
            if self.current_epoch == 1:
                old = self.backbone[1]
                new = nn.BatchNorm2d(old.num_features)
                new.weight, new.bias = old.weight, old.bias
                new.running_mean, new.running_var = old.running_mean, old.running_var
                new.num_batches_tracked = old.num_batches_tracked
                self.backbone[1] = new.train()

    model = Replacing(train_in_step=True)
    before = snapshot(model, "backbone.")
    _fit(model, tmp_path, [FreezeBackbone()])
    assert changed_keys(before, model) == []


def test_verify_raise_names_the_changed_tensor_and_the_cause(tmp_path) -> None:
    class Tampering(TinyNet):
        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                with torch.no_grad():
                    self.backbone[5].running_var.add_(1.0)
            return super().training_step(batch, batch_idx)

    with pytest.raises(FrozenStateError) as err:
        _fit(Tampering(), tmp_path, [FreezeBackbone()])
    assert err.value.changed == ["backbone.5.running_var"]
    assert "backbone.5.running_var: a buffer of a norm layer (BatchNorm2d) that ran in train mode" in str(
        err.value
    )
    assert f"checked {BACKBONE_TENSORS} frozen tensors: 1 changed" in str(err.value)


def test_verify_warn_and_off(tmp_path) -> None:
    class Tampering(TinyNet):
        def on_train_epoch_end(self) -> None:
            with torch.no_grad():
                self.backbone[0].weight[0, 0, 0, 0] += 1.0

    with pytest.warns(UserWarning, match=r"backbone\.0\.weight: changed by code outside FreezeBackbone"):
        _fit(Tampering(), tmp_path, [FreezeBackbone(verify="warn")], max_epochs=1)
    callback = FreezeBackbone(verify="off")
    _fit(Tampering(), tmp_path, [callback], max_epochs=1)
    assert callback.last_check is None


def test_norm_train_lets_stats_move_and_does_not_verify_them(tmp_path) -> None:
    model = TinyNet(train_at_epoch_start=True)
    before = snapshot(model, "backbone.")
    callback = FreezeBackbone(norm="train")
    _fit(model, tmp_path, [callback])
    # exactly the running statistics moved (an empty list must fail: it would mean norm="train" did nothing)
    assert sorted(changed_keys(before, model)) == sorted(
        f"backbone.{i}.{b}" for i in (1, 5) for b in ("running_mean", "running_var", "num_batches_tracked")
    )
    assert callback.last_check.summary() == "checked 8 frozen tensors: 0 changed"


def test_bf16_mixed_and_gradient_accumulation_keep_the_guarantee(tmp_path) -> None:
    model = TinyNet(train_in_step=True)
    before = snapshot(model, "backbone.")
    callback = FreezeBackbone()
    _fit(model, tmp_path, [callback], precision="bf16-mixed", accumulate_grad_batches=2, max_epochs=2)
    assert changed_keys(before, model) == []
    assert callback.last_check.summary() == f"checked {BACKBONE_TENSORS} frozen tensors: 0 changed"


def test_unfreeze_at_epoch_adds_a_param_group_at_scaled_lr(tmp_path) -> None:
    model = TinyNet(lr=0.05)
    before = snapshot(model, "backbone.")
    callback = FreezeBackbone(unfreeze_at_epoch=1, unfreeze_lr_scale=0.1)
    t = _fit(model, tmp_path, [callback], max_epochs=2)
    groups = t.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(0.005)
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert "backbone.0.weight" in changed_keys(before, model)  # trained after unfreezing
    assert callback.last_check.summary() == "checked 0 frozen tensors: 0 changed"


def test_resume_keeps_unfrozen_state_and_fingerprints(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = TinyNet()
    _fit(
        model, tmp_path, [FreezeBackbone(unfreeze_at_epoch=1), ckpt], max_epochs=2, enable_checkpointing=True
    )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("FreezeBackbone"))
    assert state["unfrozen"] is True and state["unfreeze_at_epoch"] == 1

    # resuming re-applies the schedule before the optimizer state loads (BaseFinetuning re-freezes)
    resumed = TinyNet()
    t = trainer(tmp_path, callbacks=[FreezeBackbone(unfreeze_at_epoch=1)], max_epochs=3)
    train, val = loaders()
    t.fit(resumed, train, val, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert len(t.optimizers[0].param_groups) == 2
    assert all(p.requires_grad for p in resumed.backbone.parameters())


def test_resume_verifies_against_the_original_fingerprints(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = TinyNet()
    first = FreezeBackbone()
    _fit(model, tmp_path, [first, ckpt], max_epochs=1, enable_checkpointing=True)
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    saved["state_dict"]["backbone.1.running_mean"] += 1.0  # a checkpoint edited between the runs
    torch.save(saved, path)
    t = trainer(tmp_path, callbacks=[FreezeBackbone()], max_epochs=2)
    train, val = loaders()
    with pytest.raises(FrozenStateError, match=r"backbone\.1\.running_mean"):
        t.fit(TinyNet(), train, val, ckpt_path=path)


def test_optimizer_holding_frozen_params_warns(tmp_path) -> None:
    class Careless(TinyNet):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    with pytest.warns(
        UserWarning, match=r"the optimizer holds 8 frozen parameter\(s\) \(backbone\.0\.weight"
    ):
        _fit(Careless(), tmp_path, [FreezeBackbone()], max_epochs=1)


@pytest.mark.skipif(
    Version(L.__version__) < Version("2.5.5"),
    reason=f"lightning {L.__version__} has no eval-mode notice at fit start (2.5.5 added it)",
)
def test_eval_mode_notice_is_silenced_only_for_pinned_layers(tmp_path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(TinyNet(), tmp_path, [FreezeBackbone()], max_epochs=1)
    assert not [w for w in caught if "in eval mode at the start of training" in str(w.message)]

    model = TinyNet()
    model.head[1].eval()  # a layer the user put in eval mode: Lightning's warning must still show
    with pytest.warns(UserWarning, match=r"Found \d+ module\(s\) in eval mode"):  # count: core.freeze
        _fit(model, tmp_path, [FreezeBackbone()], max_epochs=1)


def test_bad_input_errors_name_the_value_and_the_choices(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"Invalid norm='off'; valid choices: 'eval', 'frozen', 'train'\."):
        FreezeBackbone(norm="off")
    with pytest.raises(ValueError, match=r"Invalid verify='yes'; valid choices: 'raise', 'warn', 'off'\."):
        FreezeBackbone(verify="yes")
    with pytest.raises(ValueError, match=r"Invalid unfreeze_at_epoch=-1; valid choices: None \(never\)"):
        FreezeBackbone(unfreeze_at_epoch=-1)
    with pytest.raises(
        ValueError, match=r"Invalid unfreeze_lr_scale=0; valid choices: a finite number > 0\."
    ):
        FreezeBackbone(unfreeze_lr_scale=0)
    with pytest.raises(ValueError, match=r"Invalid modules=\[\]; valid choices: a dotted submodule name"):
        FreezeBackbone(modules=[])
    with pytest.raises(
        ModuleSelectionError, match=r"TinyNet has no submodule 'bakcbone'; closest valid names: 'backbone'"
    ):
        _fit(TinyNet(), tmp_path, [FreezeBackbone("bakcbone")], max_epochs=1)
    with pytest.raises(ModuleSelectionError, match=r"Pattern 'backbone\.9\*' matches no submodule"):
        _fit(TinyNet(), tmp_path, [FreezeBackbone("backbone.9*")], max_epochs=1)
    with pytest.raises(
        ValueError, match=r"Nothing left to train: FreezeBackbone\(modules=\['backbone', 'head'\]\)"
    ):
        _fit(TinyNet(), tmp_path, [FreezeBackbone(["backbone", "head"])], max_epochs=1)


def test_unfreeze_schedule_is_refused_under_sharded_strategies_with_what_to_do_instead(tmp_path) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    callback = FreezeBackbone(unfreeze_at_epoch=2)
    for strategy in (FSDPStrategy(), ModelParallelStrategy()):
        with pytest.raises(
            ValueError,
            match=rf"cannot unfreeze under {type(strategy).__name__}: a sharded or engine-managed strategy "
            r"builds its parameter groups .*Supported: single device and DDPStrategy",
        ):
            callback.setup(SimpleNamespace(strategy=strategy), TinyNet(), "fit")  # type: ignore[arg-type]
    # DDP is accepted (tests/test_freeze_backbone_ddp.py trains through the unfreeze)
    t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, default_root_dir=tmp_path)
    callback.setup(t, TinyNet(), "fit")
    assert callback.frozen is not None and callback.frozen.names == ["backbone"]


def test_inactive_branches_of_a_multi_branch_module_are_frozen(tmp_path) -> None:
    class TwoHeads(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.branches = nn.ModuleDict({"a": nn.Linear(8, 3), "b": nn.Linear(8, 3)})
            self.active_branch = "b"
            self.head = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.branches[self.active_branch](self.backbone(x))

    model = TwoHeads()
    before = snapshot(model)
    callback = FreezeBackbone()
    _fit(model, tmp_path, [callback], max_epochs=1)
    assert sorted(changed_keys(before, model)) == ["branches.b.bias", "branches.b.weight"]
    assert callback.frozen.names == ["backbone", "branches.a"]
    assert callback.last_check.summary() == f"checked {BACKBONE_TENSORS + 2} frozen tensors: 0 changed"
