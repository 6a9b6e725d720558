"""MultiBranchModule(train_branches=[...]): packed branches on one backbone pass, each bitwise as if alone."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from helpers.multibranch import CLASSES, IN_FEATURES, WIDTH, loader, make_backbone, make_data, trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader

from lightning_freeze import FreezeBackbone, FrozenSafeEMA, MultiBranchModule
from lightning_freeze.module import UnknownBranchError

# three variants of one head (same task "a"), each with its own lr / weight decay
SETTINGS = {
    "v0": {"lr": 0.01, "weight_decay": 0.0},
    "v1": {"lr": 0.05, "weight_decay": 0.1},
    "v2": {"lr": 0.003, "weight_decay": 0.01},
}
# a clip value small enough to act at every step: a norm over all branches would couple them
CLIP = 0.05


def make_head(classes: int) -> nn.Sequential:
    """A head with BatchNorm (its own buffers) and no randomness of its own."""
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(), nn.Linear(WIDTH, classes))


def fit(model: MultiBranchModule, root, train_loader, val_loader, *callbacks, **kwargs):
    torch.manual_seed(1)  # the same shuffle order for every run
    fit_trainer = trainer(root, deterministic=True, callbacks=[FreezeBackbone(), *callbacks], **kwargs)
    fit_trainer.fit(model, train_loader, val_loader)
    return fit_trainer


@pytest.fixture(scope="module")
def initial() -> tuple[nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(0)
    backbone = make_backbone()
    heads = {name: make_head(CLASSES["a"]) for name in SETTINGS}
    return backbone, heads


@pytest.fixture(scope="module")
def packed_vs_solo(initial, tmp_path_factory):
    """One packed fit of v0, v1, v2 (with EMA and norm clipping) and three solo fits."""
    backbone, heads = initial
    root = tmp_path_factory.mktemp("packed")
    runs = {}
    packed = MultiBranchModule(
        copy.deepcopy(backbone),
        copy.deepcopy(heads),
        train_branches=list(SETTINGS),
        branch_optimizers=SETTINGS,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
    )
    ema = FrozenSafeEMA(decay=0.9)
    packed_trainer = fit(
        packed, root / "packed", loader("a"), loader("a", 32, 1, False), ema, gradient_clip_val=CLIP
    )
    runs["packed"] = (packed, ema, dict(packed_trainer.callback_metrics))
    runs["packed_optimizer"] = packed_trainer.optimizers[0]
    for name, settings in SETTINGS.items():
        solo = MultiBranchModule(
            copy.deepcopy(backbone),
            {name: copy.deepcopy(heads[name])},
            optimizer=functools.partial(torch.optim.AdamW, **settings),
        )
        solo_ema = FrozenSafeEMA(decay=0.9)
        solo_trainer = fit(
            solo, root / name, loader("a"), loader("a", 32, 1, False), solo_ema, gradient_clip_val=CLIP
        )
        runs[name] = (solo, solo_ema, dict(solo_trainer.callback_metrics))
    return runs


def test_each_packed_branch_ends_bitwise_where_training_it_alone_ends(initial, packed_vs_solo) -> None:
    _, heads = initial
    packed, packed_ema, packed_metrics = packed_vs_solo["packed"]
    packed_shadow = packed_ema.ema_state_dict()
    for name in SETTINGS:
        solo, solo_ema, solo_metrics = packed_vs_solo[name]
        prefix = f"branches.{name}."
        solo_state = solo.state_dict()
        keys = [k for k in solo_state if k.startswith(prefix)]
        assert len(keys) == 9  # two Linear (weight, bias), BatchNorm (weight, bias, 3 buffers)
        for key in keys:  # weights and the branch's own BatchNorm buffers
            assert torch.equal(packed.state_dict()[key], solo_state[key]), key
        # it trained (the lr differs per branch, so the branches differ from one another too)
        assert not torch.equal(packed.branches[name][0].weight, heads[name][0].weight)
        # one EMA shadow per variant, bitwise the solo run's
        solo_shadow = solo_ema.ema_state_dict()
        for key in keys:
            assert torch.equal(packed_shadow[key], solo_shadow[key]), key
        # the metrics each variant logs are the solo run's (validation on one backbone pass)
        for metric in ("val_loss", "val_acc", "train_loss_epoch"):
            assert float(packed_metrics[f"{name}/{metric}"]) == float(solo_metrics[f"{name}/{metric}"])
    assert not torch.equal(packed.branches["v0"][0].weight, packed.branches["v1"][0].weight)
    # the backbone stayed bitwise frozen, and is the solo runs' backbone
    for key, value in packed_vs_solo["v0"][0].backbone.state_dict().items():
        assert torch.equal(packed.backbone.state_dict()[key], value), key


def test_one_shadow_per_variant_and_nothing_frozen_is_shadowed(packed_vs_solo) -> None:
    model, ema, _ = packed_vs_solo["packed"]
    # what the optimizer trained (FreezeBackbone gives requires_grad back when the fit ends)
    held = {id(p) for group in packed_vs_solo["packed_optimizer"].param_groups for p in group["params"]}
    trainable = {k for k, p in model.named_parameters() if id(p) in held}
    assert trainable == {
        f"branches.{v}.{k}"
        for v in SETTINGS
        for k in ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")
    }
    buffers = {
        f"branches.{v}.1.{b}"
        for v in SETTINGS
        for b in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert set(ema.ema.shadow) == trainable | buffers


def test_per_branch_lr_and_weight_decay_are_param_groups(initial) -> None:
    backbone, heads = initial
    model = MultiBranchModule(
        copy.deepcopy(backbone),
        {"a": make_head(3), **copy.deepcopy(heads)},
        train_branches=["v0", "v1", "v2"],
        branch_optimizers={"v1": SETTINGS["v1"]},
        optimizer=functools.partial(torch.optim.AdamW, lr=0.02, weight_decay=0.5),
    )
    assert model.active_branch == "v0"
    assert model.trained_branches == ["v0", "v1", "v2"]
    FreezeBackbone().setup(trainer(None), model, "fit")  # freezes the backbone and branch "a"
    optimizer = model.configure_optimizers()
    groups = {g["branch"]: g for g in optimizer.param_groups}
    assert [(g["lr"], g["weight_decay"]) for g in groups.values()] == [(0.02, 0.5), (0.05, 0.1), (0.02, 0.5)]
    for name, group in groups.items():
        assert group["params"] == list(model.branches[name].parameters())
    assert model.hparams["train_branches"] == ["v0", "v1", "v2"]
    assert model.hparams["branch_optimizers"] == {"v1": SETTINGS["v1"]}


class _KeyedTargets(torch.utils.data.Dataset):
    """``(x, {"a": y_a, "b": y_b})``: two tasks labelled on the same samples."""

    def __init__(self, n: int, seed: int) -> None:
        self.x = make_data("a", n, seed).tensors[0]
        self.y = {name: make_data(name, n, seed).tensors[1] for name in ("a", "b")}

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {name: y[i] for name, y in self.y.items()}


def test_several_tasks_with_targets_keyed_by_branch_match_solo_runs(tmp_path) -> None:
    torch.manual_seed(0)
    backbone, heads = make_backbone(), {"a": make_head(3), "b": make_head(2)}
    packed = MultiBranchModule(copy.deepcopy(backbone), copy.deepcopy(heads), train_branches=["a", "b"])
    metrics = fit(
        packed,
        tmp_path / "p",
        DataLoader(_KeyedTargets(64, 0), 16, shuffle=True),
        DataLoader(_KeyedTargets(32, 1), 16),
    ).callback_metrics
    assert {"a/val_acc", "b/val_acc", "a/train_loss_epoch", "b/train_loss_epoch"} <= set(metrics)
    for name in ("a", "b"):
        solo = MultiBranchModule(copy.deepcopy(backbone), {name: copy.deepcopy(heads[name])})
        fit(solo, tmp_path / name, loader(name, 64, 0), loader(name, 32, 1, False))
        for key, value in solo.branches[name].state_dict().items():
            assert torch.equal(packed.branches[name].state_dict()[key], value), (name, key)


def test_freeze_backbone_freezes_every_branch_that_is_not_trained(tmp_path) -> None:
    torch.manual_seed(0)
    model = MultiBranchModule(
        make_backbone(), {n: make_head(3) for n in ("a", "b", "c")}, train_branches=["b", "c"]
    )
    before = copy.deepcopy(model.state_dict())
    fit(model, tmp_path, loader("a"), None, limit_val_batches=0)
    after = model.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == key.startswith(("branches.b.", "branches.c.")), key


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"train_branches": ["a", "z"]},
            UnknownBranchError,
            r"Unknown branch in train_branches 'z'; valid choices: 'a', 'b', 'c'\.",
        ),
        (
            {"train_branches": []},
            ValueError,
            r"Invalid train_branches=\[\]; valid choices: None .* 'a', 'b', 'c'\.",
        ),
        ({"train_branches": "a"}, ValueError, r"Invalid train_branches='a'"),
        ({"train_branches": ["a", "b", "a"]}, ValueError, r"names 'a' more than once"),
        (
            {"train_branches": ["a", "b"], "active_branch": "c"},
            ValueError,
            r"active_branch='c' is not in train_branches=\['a', 'b'\]; valid choices: one of 'a', 'b'",
        ),
        (
            {"train_branches": ["a", "b"], "branch_optimizers": {"c": {"lr": 0.1}}},
            ValueError,
            r"branch_optimizers names branch\(es\) 'c' that are not trained; valid choices: .*'a', 'b'\.",
        ),
        (
            {"train_branches": ["a"], "branch_optimizers": {"q": {"lr": 0.1}}},
            UnknownBranchError,
            r"branch_optimizers names unknown branch\(es\) 'q'; valid choices: 'a', 'b', 'c'\.",
        ),
        (
            {"train_branches": ["a"], "branch_optimizers": {"a": {"_target_": "torch.optim.SGD"}}},
            TypeError,
            r"branch_optimizers\['a'\] must be a mapping of param-group settings",
        ),
    ],
)
def test_bad_train_branches_give_one_clear_error(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        MultiBranchModule(make_backbone(), {n: make_head(3) for n in ("a", "b", "c")}, **kwargs)


def _packed(**kwargs) -> MultiBranchModule:
    torch.manual_seed(0)
    return MultiBranchModule(
        make_backbone(), {n: make_head(3) for n in ("a", "b")}, train_branches=["a", "b"], **kwargs
    )


def test_a_branch_both_frozen_and_trained_is_refused(tmp_path) -> None:
    model = _packed()
    with pytest.raises(
        ValueError, match=r"Branch\(es\) 'a' are in train_branches=\['a', 'b'\] but every parameter"
    ):
        trainer(tmp_path, callbacks=[FreezeBackbone(["backbone", "branches.a"])]).fit(model, loader("a"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"scheduler": functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau)},
            r"ReduceLROnPlateau cannot drive packed branches \['a', 'b'\]: it monitors one metric",
        ),
        (
            {"optimizer": functools.partial(torch.optim.LBFGS, lr=0.1)},
            r"optimizer .*LBFGS.* cannot train packed branches .*one optimizer param group per branch",
        ),
        (
            {"branch_optimizers": {"b": {"lrr": 0.1}}},
            r"branch_optimizers\['b'\] sets 'lrr', which AdamW does not take per param group; valid choices: "
            r".*'lr'.*'weight_decay'",
        ),
    ],
)
def test_settings_that_would_couple_packed_branches_are_refused(tmp_path, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, callbacks=[FreezeBackbone()], limit_train_batches=1).fit(
            _packed(**kwargs), loader("a")
        )


def test_norm_clipping_is_per_branch_and_a_global_clip_would_couple(tmp_path) -> None:
    """Control: clipping by the norm over all packed branches changes each branch's result."""

    class GlobalClip(MultiBranchModule):
        def configure_gradient_clipping(
            self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
        ):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    results = []
    for cls in (MultiBranchModule, GlobalClip):
        torch.manual_seed(0)
        model = cls(make_backbone(), {n: make_head(3) for n in ("a", "b")}, train_branches=["a", "b"])
        fit(model, tmp_path, loader("a"), None, limit_val_batches=0, gradient_clip_val=CLIP)
        results.append(model.branches["a"][0].weight.detach().clone())
    assert not torch.equal(results[0], results[1])


def test_input_features_and_ddp_contract_one_backbone_pass_per_batch(tmp_path) -> None:
    model = _packed()
    calls = []
    model.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    fit(model, tmp_path, loader("a", n=32), loader("a", 16, 1, False), max_epochs=1, num_sanity_val_steps=0)
    # two training batches, one validation batch (16 samples each): one backbone pass each; the other
    # passes are FreezeBackbone's probe of the frozen backbone (its first two samples)
    assert sorted(calls) == [2] * (len(calls) - 3) + [16] * 3
    x = torch.zeros(2, IN_FEATURES)
    assert model(x).shape == (2, 3)


def test_a_gradient_scaler_is_refused_because_one_overflow_would_skip_every_branch(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"cannot train with a gradient scaler \(precision='16-mixed'\)"):
        # (on CPU, Trainer(precision="16-mixed") falls back to bf16: give the fp16 plugin explicitly)
        plugin = MixedPrecision("16-mixed", "cpu")
        trainer(tmp_path, callbacks=[FreezeBackbone()], plugins=[plugin], limit_train_batches=1).fit(
            _packed(), loader("a")
        )


def test_a_packed_fit_of_one_branch_is_the_single_branch_fit(tmp_path) -> None:
    """One training path: ``train_branches=["a"]`` trains exactly as ``active_branch="a"`` does.

    The backbone trains too (stage 1: dropout and BatchNorm in it, no FreezeBackbone), so the single
    branch's stream, the backbone's draws and the optimizer's shared group are all exercised. (Not
    with ``gradient_clip_val``: the packed fit's groups list the branch before the backbone, so the
    global norm sums in another order; with a frozen backbone, the packed use, the order is the same.)
    """
    torch.manual_seed(0)
    backbone, head = make_backbone(), make_head(CLASSES["a"])
    runs = {}
    for label, kwargs in (("solo", {}), ("packed", {"train_branches": ["a"]})):
        model = MultiBranchModule(copy.deepcopy(backbone), {"a": copy.deepcopy(head)}, **kwargs)
        torch.manual_seed(1)
        fit_trainer = trainer(tmp_path / label, deterministic=True)
        fit_trainer.fit(model, loader("a"), loader("a", 32, 1, False))
        runs[label] = (model.state_dict(), dict(fit_trainer.callback_metrics))
    (solo_state, solo_metrics), (packed_state, packed_metrics) = runs["solo"], runs["packed"]
    assert solo_state.keys() == packed_state.keys()
    for key, value in solo_state.items():
        assert torch.equal(packed_state[key], value), key
    assert not torch.equal(solo_state["backbone.0.weight"], backbone[0].weight)  # the backbone trained
    assert solo_metrics.keys() == packed_metrics.keys()
    assert {"a/train_loss_epoch", "a/val_loss", "a/val_acc"} <= solo_metrics.keys()
    for key, value in solo_metrics.items():
        assert torch.equal(packed_metrics[key], value), key
