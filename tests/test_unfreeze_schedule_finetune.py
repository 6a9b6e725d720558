"""Fine-tuning schedules (FreezeBackbone(schedule=UnfreezeSchedule(...))): exact at every phase."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.freeze import TinyNet, loaders, make_data, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.optim import lr_scheduler as S
from torch.utils.data import DataLoader, TensorDataset

from lightning_freeze import FeatureCache, FreezeBackbone, FrozenSafeEMA, UnfreezePhase, UnfreezeSchedule
from lightning_freeze.core.unfreeze_schedule import split_frozen_names, top_level_blocks

# TinyNet's backbone: 0 conv, 1 bn, 2 relu, 3 dropout, 4 conv, 5 bn, 6 relu, 7 pool, 8 flatten
BLOCKS = [
    ["backbone.0", "backbone.1", "backbone.2", "backbone.3"],
    ["backbone.4", "backbone.5", "backbone.6", "backbone.7", "backbone.8"],
]
EPOCHS = 3  # gradual(every_n_epochs=1): phases begin at epochs 1, 2


class Recorder(Callback):
    """After FreezeBackbone's hooks: per epoch, the state at its start and the modes in training."""

    def __init__(self) -> None:
        self.at_start: dict[int, dict[str, torch.Tensor]] = {}
        self.training: dict[int, dict[str, bool]] = {}
        self.groups: dict[int, list[float]] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at_start[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.groups[trainer.current_epoch] = [g["lr"] for g in trainer.optimizers[0].param_groups]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            hook = pl_module.backbone.register_forward_pre_hook(self._modes)
            self._handle, self._epoch = hook, trainer.current_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self._handle.remove()

    def _modes(self, module: torch.nn.Module, args: object) -> None:
        # after FreezeBackbone's guards (registered first): the modes the layers compute in
        self.training[self._epoch] = {name: m.training for name, m in module.named_children()}


class Seeder(Callback):
    """Seeds the global RNG (dropout) from the step: Lightning does not restore it on resume."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(1000 + trainer.global_step)


def fixed_loaders(same_batches: bool = False) -> tuple[DataLoader, DataLoader]:
    """Unshuffled loaders. ``same_batches``: the 4 training batches are equal, because Lightning resumes
    a plain DataLoader mid-epoch from its first batch (only the batch counter is restored)."""
    train = make_data(64, 0)
    if same_batches:
        train = TensorDataset(*(t[:16].repeat(4, *[1] * (t.dim() - 1)) for t in train.tensors))
    return DataLoader(train, batch_size=16), DataLoader(make_data(32, 1), batch_size=16)


def _fit(
    root: Path,
    schedule: UnfreezeSchedule,
    epochs: int = EPOCHS,
    extra: list | None = None,
    same_batches: bool = False,
    **kw,
):
    torch.manual_seed(0)
    model = TinyNet()
    callback = FreezeBackbone("backbone", schedule=schedule)
    train, val = fixed_loaders(same_batches)
    t = trainer(root, max_epochs=epochs, callbacks=[Seeder(), callback, *(extra or [])], **kw)
    t.fit(model, train, val)
    return model, callback, t


def test_blocks_and_split() -> None:
    model = TinyNet()
    assert top_level_blocks(model, "backbone") == BLOCKS
    names = split_frozen_names(model, ["backbone"], ["backbone.4", "backbone.5"])
    assert names == [f"backbone.{i}" for i in range(9)]
    assert split_frozen_names(model, ["backbone", "head"], ["backbone"]) == ["backbone", "head"]
    with pytest.raises(
        ValueError, match=r"'head.0', which FreezeBackbone does not freeze; frozen modules: backbone"
    ):
        split_frozen_names(model, ["backbone"], ["head.0"])


def test_gradual_unfreezes_one_block_per_epoch_and_the_rest_stays_bitwise_frozen_in_eval(tmp_path) -> None:
    recorder = Recorder()
    schedule = UnfreezeSchedule.gradual("backbone", every_n_epochs=1, lr_scale=0.5, layer_decay=0.5)
    model, callback, _ = _fit(tmp_path, schedule, extra=[recorder])
    start = recorder.at_start[0]
    final = model.state_dict()
    # block b (0 = input side) begins at epoch 4 - b: before that every tensor of it is as at fit start
    for b, block in enumerate(BLOCKS):
        begins = len(BLOCKS) - b
        keys = [k for k in start if k.startswith(tuple(f"{m}." for m in block))]
        assert keys
        for epoch in range(1, EPOCHS):
            if epoch <= begins:  # unchanged up to the start of the epoch it begins in
                assert all(torch.equal(recorder.at_start[epoch][k], start[k]) for k in keys), (block, epoch)
            children = [m.split(".")[1] for m in block]
            modes = [recorder.training[epoch][c] for c in children]
            # frozen: eval; begun: train mode
            assert modes == [epoch >= begins] * len(children), (block, epoch, modes)
        assert any(not torch.equal(final[k], start[k]) for k in keys), block  # and it trained after
    # one param group per phase, layer-wise decayed: head 0.05, then 0.025, 0.0125
    assert recorder.groups[2] == [0.05, 0.025, 0.0125]
    assert [e["epoch"] for e in callback.phases.timeline] == [1, 2]
    assert callback.last_check is not None and callback.last_check.changed == []


def test_explicit_phases_absolute_lr_and_pinned_norm_statistics(tmp_path) -> None:
    schedule = UnfreezeSchedule(
        [
            UnfreezePhase(["backbone.4", "backbone.5"], epoch=1, lr=0.01, norm="eval"),
            {"modules": "backbone.[0-3]", "epoch": 2, "lr_scale": 0.2},
        ]
    )
    recorder = Recorder()
    model, callback, _ = _fit(tmp_path, schedule, epochs=3, extra=[recorder])
    start, final = recorder.at_start[0], model.state_dict()
    assert recorder.groups[2] == [0.05, 0.01, 0.05 * 0.2]
    # backbone.5 trains its affine weights but its running statistics stay pinned, bitwise
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(final[f"backbone.5.{key}"], start[f"backbone.5.{key}"]), key
    assert not torch.equal(final["backbone.5.weight"], start["backbone.5.weight"])
    assert recorder.training[2]["5"] is False and recorder.training[2]["4"] is True
    # backbone.1 (norm="train" by default): its statistics update once its phase began
    assert not torch.equal(final["backbone.1.running_mean"], start["backbone.1.running_mean"])
    assert "backbone.5.running_mean" in callback.frozen.tensor_keys  # still verified


def _resume_case(tmp_path: Path, schedule_factory, epochs: int, resume_from: str, every_n_train_steps=None):
    """Straight run with checkpoints, then a fresh run resumed from one of them: both end bitwise equal."""
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        save_top_k=-1,
        every_n_epochs=None if every_n_train_steps else 1,
        every_n_train_steps=every_n_train_steps,
        filename="{epoch}-{step}",
    )
    same = every_n_train_steps is not None
    straight, _, _ = _fit(
        tmp_path / "a", schedule_factory(), epochs, extra=[ckpt], same_batches=same, enable_checkpointing=True
    )
    path = tmp_path / "ckpt" / resume_from
    assert path.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    torch.manual_seed(123)  # the resumed run must not depend on the global RNG at start
    model = TinyNet()
    callback = FreezeBackbone("backbone", schedule=schedule_factory())
    train, val = fixed_loaders(same)
    t = trainer(tmp_path / "b", max_epochs=epochs, callbacks=[Seeder(), callback])
    torch.manual_seed(0)
    t.fit(model, train, val, ckpt_path=path)
    a, b = straight.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    return callback


def _gradual_with_warmup():
    return UnfreezeSchedule.gradual("backbone", every_n_epochs=1, layer_decay=0.5, warmup_steps=3)


@pytest.mark.parametrize(
    "resume_from",
    [
        "epoch=1-step=8.ckpt",  # written at the end of epoch 1, right before phase 2 begins
        "epoch=0-step=4.ckpt",  # the end of phase 0, right before phase 1
    ],
)
def test_resume_right_before_a_boundary_is_bitwise_the_straight_run(tmp_path, resume_from) -> None:
    callback = _resume_case(tmp_path, _gradual_with_warmup, 4, resume_from)
    assert [e["epoch"] for e in callback.phases.timeline] == [1, 2]


def test_resume_mid_phase_and_on_a_boundary_is_bitwise_the_straight_run(tmp_path) -> None:
    # every 2 steps (4 per epoch): step 6 is mid-epoch 1 (mid-phase, inside a warm-up), step 8 ends it
    _resume_case(tmp_path, _gradual_with_warmup, 3, "epoch=1-step=6.ckpt", every_n_train_steps=2)


class Losses(TinyNet):
    """val_loss that follows a script, so the plateau rule's decisions are known in advance."""

    def __init__(self, script: list[float]) -> None:
        super().__init__()
        self.script = script

    def on_validation_epoch_end(self) -> None:
        self.log("val_loss", self.script[min(self.current_epoch, len(self.script) - 1)])

    def validation_step(self, batch, batch_idx) -> None:
        return None


def test_plateau_transitions_with_patience_min_delta_and_max_epochs(tmp_path) -> None:
    # epochs: 0:1.0 1:0.5 2:0.499 (not better by min_delta) 3:0.6 -> phase 1 begins at epoch 4;
    # phase 2 (max_epochs_per_phase=2) begins at epoch 6 whatever the metric
    script = [1.0, 0.5, 0.499, 0.6, 0.1, 0.05, 0.01, 0.005]
    schedule = UnfreezeSchedule(
        [UnfreezePhase("backbone.4"), UnfreezePhase("backbone.5")],
        monitor="val_loss",
        patience=2,
        min_delta=0.01,
        max_epochs_per_phase=2,
    )
    callback = FreezeBackbone("backbone", schedule=schedule)
    train, val = loaders()
    t = trainer(tmp_path, max_epochs=7, callbacks=[callback], num_sanity_val_steps=0)
    t.fit(Losses(script), train, val)
    # phase 1 also had a max of 2 epochs after phase 0's start: it begins at epoch 2 by that rule
    assert [e["epoch"] for e in callback.phases.timeline[1:]] == [2, 4]
    assert "phase 1 from epoch 2: backbone.4" in callback.phases.summary()


def test_plateau_alone_and_restore_best_puts_the_phase_best_weights_back(tmp_path) -> None:
    script = [1.0, 0.5, 0.9, 0.8, 0.7]  # best at epoch 1, no improvement at 2 and 3: phase 1 at epoch 4
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Keep(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            snapshots[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            snapshots[-trainer.current_epoch - 1] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    schedule = UnfreezeSchedule(
        [UnfreezePhase("backbone.4")], monitor="val_loss", patience=2, restore_best=True
    )
    callback = FreezeBackbone("backbone", schedule=schedule)
    train, val = loaders()
    t = trainer(tmp_path, max_epochs=5, callbacks=[callback, Keep()], num_sanity_val_steps=0)
    t.fit(Losses(script), train, val)
    assert [e["epoch"] for e in callback.phases.timeline] == [0, 4]
    best, at_phase = snapshots[1], snapshots[-5]  # end of epoch 1; start of epoch 4, after the restore
    assert [k for k in best if not torch.equal(best[k], at_phase[k])] == []
    assert any(not torch.equal(snapshots[2][k], best[k]) for k in best)  # epoch 2 had moved on


def test_restore_best_resume_before_the_boundary_is_bitwise(tmp_path) -> None:
    script = [1.0, 0.5, 0.9, 0.8, 0.7]

    def schedule():
        return UnfreezeSchedule(
            [UnfreezePhase("backbone.4")], monitor="val_loss", patience=2, restore_best=True
        )

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    train, val = fixed_loaders()
    torch.manual_seed(0)
    straight = Losses(script)
    t = trainer(tmp_path / "a", max_epochs=5, callbacks=[Seeder(), FreezeBackbone(schedule=schedule()), ckpt],
                enable_checkpointing=True, num_sanity_val_steps=0)  # fmt: skip
    t.fit(straight, train, val)
    torch.manual_seed(5)
    resumed = Losses(script)
    callbacks = [Seeder(), FreezeBackbone(schedule=schedule())]
    t = trainer(tmp_path / "b", max_epochs=5, callbacks=callbacks, num_sanity_val_steps=0)
    torch.manual_seed(0)
    t.fit(resumed, train, val, ckpt_path=tmp_path / "ckpt" / "epoch=3.ckpt")  # right before the boundary
    a, b = straight.state_dict(), resumed.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_warmup_ramps_the_new_group_lr_around_each_step(tmp_path) -> None:
    seen: list[list[float]] = []

    class Watch(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            trainer.optimizers[0].register_step_pre_hook(
                lambda opt, a, k: seen.append([g["lr"] for g in opt.param_groups])
            )

    schedule = UnfreezeSchedule([UnfreezePhase("backbone.4", epoch=1, lr_scale=0.5, warmup_steps=4)])
    _, _, t = _fit(tmp_path, schedule, epochs=3, extra=[Watch()])
    assert [s[1] for s in seen[4:12]] == [0.025 * 1 / 4, 0.025 * 2 / 4, 0.025 * 3 / 4] + [0.025] * 5
    assert all(g["lr"] == 0.025 for g in t.optimizers[0].param_groups[1:])  # restored after each step


def test_every_scheduler_extends_to_each_phase_group(tmp_path) -> None:
    class Cosine(TinyNet):
        def configure_optimizers(self):
            opt = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)
            return {"optimizer": opt, "lr_scheduler": S.CosineAnnealingLR(opt, T_max=4)}

    callback = FreezeBackbone(
        schedule=UnfreezeSchedule.gradual(every_n_epochs=1, lr_scale=0.5, layer_decay=0.5)
    )
    train, val = loaders()
    t = trainer(tmp_path, max_epochs=4, callbacks=[callback])
    t.fit(Cosine(), train, val)
    groups = t.optimizers[0].param_groups
    first = groups[0]["lr"]
    for i, group in enumerate(groups[1:]):
        assert group["lr"] == pytest.approx(first * 0.5 * 0.5**i, rel=1e-12)


def test_frozen_safe_ema_tracks_new_tensors_from_their_value_at_the_transition(tmp_path) -> None:
    joined: dict[str, bool] = {}
    ema = FrozenSafeEMA(decay=0.9)

    class Look(Callback):  # after FrozenSafeEMA: its shadow at the first batch of epoch 1 (phase 1)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.current_epoch == 1 and batch_idx == 0:
                shadow, state = ema.ema.shadow, pl_module.state_dict()
                for key in ("backbone.4.weight", "backbone.4.bias"):
                    joined[key] = key in shadow and torch.equal(shadow[key], state[key].float())

    schedule = UnfreezeSchedule([UnfreezePhase("backbone.4", epoch=1)])
    _fit(tmp_path, schedule, epochs=2, extra=[ema, Look()])
    assert joined == {"backbone.4.weight": True, "backbone.4.bias": True}


def test_feature_cache_turns_off_when_the_backbone_starts_training_bitwise_as_uncached(tmp_path) -> None:
    def schedule():
        return UnfreezeSchedule([UnfreezePhase("backbone.4", epoch=2)])

    plain, _, _ = _fit(tmp_path / "a", schedule(), epochs=3)
    cache = FeatureCache("backbone")
    cached, _, _ = _fit(tmp_path / "b", schedule(), epochs=3, extra=[cache])
    a, b = plain.state_dict(), cached.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert cache.stats["hits"] > 0  # it served the epochs before the phase


def test_bad_schedules_name_the_bad_value_and_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"phase 1 \(\['backbone.4'\]\) has epoch=None and the schedule has no"
    ):
        UnfreezeSchedule([UnfreezePhase("backbone.4")])
    with pytest.raises(
        ValueError, match=r"phase 1 has unknown key\(s\) \['epochs'\]; valid keys: modules, epoch"
    ):
        UnfreezeSchedule([{"modules": "backbone.4", "epochs": 2}])
    with pytest.raises(ValueError, match=r"UnfreezePhase.norm=.*'frozen'.*train.*eval"):
        UnfreezePhase("backbone.4", epoch=1, norm="frozen")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"give lr=0.1 or lr_scale=0.5, not both"):
        UnfreezePhase("backbone.4", epoch=1, lr=0.1, lr_scale=0.5)
    with pytest.raises(ValueError, match=r"restore_best=True\) needs monitor="):
        UnfreezeSchedule([UnfreezePhase("backbone.4", epoch=1)], restore_best=True)
    with pytest.raises(ValueError, match=r"give one of them"):
        FreezeBackbone(unfreeze_at_epoch=1, schedule=UnfreezeSchedule.gradual())


def test_a_phase_inside_another_phase_is_refused_at_setup(tmp_path) -> None:
    phases = [UnfreezePhase("backbone.4", epoch=1), UnfreezePhase("backbone", epoch=2)]
    callback = FreezeBackbone("backbone", schedule=UnfreezeSchedule(phases))
    train, val = loaders()
    with pytest.raises(ValueError, match=r"phase 1 unfreezes 'backbone.4', inside 'backbone' that phase 2"):
        trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(TinyNet(), train, val)


def test_a_phase_outside_the_frozen_modules_is_refused_at_setup(tmp_path) -> None:
    callback = FreezeBackbone("backbone", schedule=UnfreezeSchedule([UnfreezePhase("head.0", epoch=1)]))
    train, val = loaders()
    with pytest.raises(ValueError, match=r"unfreezes 'head.0', which FreezeBackbone does not freeze"):
        trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(TinyNet(), train, val)
