"""MultiBranchModule on its own: branches, forward, losses/metrics, optimizers, hparams, checkpoints."""

from __future__ import annotations

import functools

import hydra.utils
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers.multibranch import (
    CLASSES,
    WIDTH,
    fixed_batch,
    loader,
    make_backbone,
    make_branch,
    make_data,
    make_module,
    trainer,
    val_loss,
)
from omegaconf import OmegaConf
from torch import nn
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_freeze import FreezeBackbone, MultiBranchModule
from lightning_freeze.module import UnknownBranchError


# ------------------------------------------------------------------------------------------------
# branches and forward
# ------------------------------------------------------------------------------------------------
def test_forward_all_runs_the_backbone_once_and_matches_forward() -> None:
    model = make_module(["a", "b", "c"]).eval()
    calls = []
    model.backbone.register_forward_hook(lambda *args: calls.append(1))
    x = fixed_batch()
    with torch.no_grad():
        outs = model.forward_all(x)
        assert len(calls) == 1
        assert list(outs) == ["a", "b", "c"]
        for name, out in outs.items():
            assert out.shape == (len(x), CLASSES[name])
            assert torch.equal(out, model(x, branch=name))
        assert torch.equal(model(x), outs["a"])  # default: the active (first) branch
        assert list(model.forward_all(x, branches=["c"])) == ["c"]


def test_branch_names_active_branch_and_switch_branch() -> None:
    model = make_module(["a", "b"], active="b")
    assert model.branch_names == ["a", "b"]
    assert model.active_branch == "b"
    model.switch_branch("a")
    assert model.active_branch == "a"
    assert model.hparams["active_branch"] == "a"
    with pytest.raises(UnknownBranchError, match=r"Unknown branch 'z'; valid choices: 'a', 'b'\."):
        model.switch_branch("z")
    with pytest.raises(UnknownBranchError, match=r"Unknown branch 'q'; valid choices: 'a', 'b'\."):
        model(fixed_batch(), branch="q")
    assert model.active_branch == "a"


@pytest.mark.parametrize("name", ["training", "_modules", "_parameters"])
def test_branch_names_of_nn_module_instance_attributes_are_refused_with_the_rule(name: str) -> None:
    # instance attributes are not in dir(nn.ModuleDict): they used to pass the check and fail later
    message = (
        f"Invalid branch name {name!r} (it is an attribute of nn.Module/nn.ModuleDict); valid choices: "
        "a non-empty string without '.' or '/' that is not an attribute of nn.Module/nn.ModuleDict "
        "(such as 'training', 'forward', 'state_dict'), e.g. 'a' or 'cls_head'."
    )
    with pytest.raises(ValueError) as info:
        MultiBranchModule(make_backbone(), {name: make_branch("a")})
    assert str(info.value) == message


def test_to_torchscript_matches_forward_bitwise_for_every_branch() -> None:
    model = make_module(["a", "b"], active="b").eval()
    x = fixed_batch()
    scripted = model.to_torchscript()
    with torch.no_grad():
        assert torch.equal(scripted(x), model(x))  # default: the branch active when scripted
        for name in model.branch_names:
            assert torch.equal(scripted(x, name), model(x, branch=name))
    with pytest.raises(torch.jit.Error, match="Unknown branch q"):
        scripted(x, "q")


def test_constructor_errors_name_the_bad_value_and_the_choices() -> None:
    with pytest.raises(UnknownBranchError, match=r"Unknown active_branch 'x'; valid choices: 'a', 'b'\."):
        make_module(["a", "b"], active="x")
    with pytest.raises(ValueError, match=r"Invalid branch name 'a\.b' .*without '\.' or '/'"):
        MultiBranchModule(make_backbone(), {"a.b": make_branch("a")})
    with pytest.raises(ValueError, match=r"Invalid branch name 'keys' \(it is an attribute of nn\.Module"):
        MultiBranchModule(make_backbone(), {"keys": make_branch("a")})
    with pytest.raises(ValueError, match=r"Invalid branches=\{\}; valid choices: a non-empty mapping"):
        MultiBranchModule(make_backbone(), {})
    with pytest.raises(
        UnknownBranchError, match=r"losses names unknown branch\(es\) 'b'; valid choices: 'a'\."
    ):
        make_module(["a"], losses={"b": F.cross_entropy})
    with pytest.raises(UnknownBranchError, match=r"metrics names unknown branch\(es\) 'z'"):
        make_module(["a"], metrics={"z": None})
    with pytest.raises(
        ValueError, match=r"Cannot infer the class count of branch 'emb'.*no nn\.Linear.*num_classes="
    ):
        MultiBranchModule(make_backbone(), {"emb": nn.Identity()})
    with pytest.raises(ValueError, match=r"last nn\.Linear with out_features=1"):
        MultiBranchModule(make_backbone(), {"score": nn.Linear(WIDTH, 1)})
    with pytest.raises(TypeError, match=r"branches\['a'\] must be an nn\.Module or a Hydra config"):
        MultiBranchModule(make_backbone(), {"a": "linear"})
    with pytest.raises(
        TypeError, match=r"needs backbone and branches.*load_from_checkpoint\(path, backbone="
    ):
        MultiBranchModule()


def test_default_accuracy_class_count_inferred_or_given_and_custom_metrics() -> None:
    model = make_module(["a", "c"])
    assert model.val_metrics["a"]["acc"].num_classes == 3
    assert model.test_metrics["c"]["acc"].num_classes == 4
    model = make_module(["a", "c"], num_classes={"a": 7})
    assert model.val_metrics["a"]["acc"].num_classes == 7
    assert model.val_metrics["c"]["acc"].num_classes == 4
    # a regression branch: custom loss, custom metric; None switches a branch's metric off
    model = MultiBranchModule(
        make_backbone(),
        {"a": make_branch("a"), "r": nn.Linear(WIDTH, 1), "e": nn.Identity()},
        losses={"r": nn.MSELoss()},
        metrics={"r": {"mse": MeanSquaredError()}, "e": None},
    )
    assert list(model.val_metrics) == ["a", "r"]
    assert list(model.val_metrics["r"].keys(keep_base=False)) == ["r/val_mse"]
    # validation and test keep separate metric state
    assert model.val_metrics["a"]["acc"] is not model.test_metrics["a"]["acc"]


# ------------------------------------------------------------------------------------------------
# optimizers
# ------------------------------------------------------------------------------------------------
def test_configure_optimizers_passes_only_trainable_parameters() -> None:
    model = make_module(["a", "b"], active="b")
    for module in (model.backbone, model.branches["a"]):
        module.requires_grad_(False)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    passed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert passed == {id(p) for p in model.branches["b"].parameters()}

    model = make_module(
        ["a"],
        optimizer=functools.partial(torch.optim.SGD, lr=0.25, momentum=0.5),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3),
    )
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD)
    assert config["optimizer"].param_groups[0]["lr"] == 0.25
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)

    model = make_module(["a"], scheduler=functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau))
    assert model.configure_optimizers()["lr_scheduler"]["monitor"] == "a/val_loss"

    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"Nothing to optimize: .*active branch 'a'"):
        model.configure_optimizers()


# ------------------------------------------------------------------------------------------------
# training, logging, evaluation, prediction
# ------------------------------------------------------------------------------------------------
def test_fit_logs_per_branch_loss_and_accuracy_and_loss_goes_down(tmp_path) -> None:
    model = make_module(["a"], optimizer=functools.partial(torch.optim.AdamW, lr=0.02))
    before = val_loss(model, "a")
    fit = trainer(tmp_path, max_epochs=4)
    fit.fit(model, loader("a"), loader("a", n=32, seed=1, shuffle=False))
    metrics = fit.callback_metrics
    assert {"a/train_loss", "a/val_loss", "a/val_acc"} <= set(metrics)
    after = val_loss(model, "a")
    assert after < 0.8 * before
    # the logged validation loss is the mean cross-entropy over the validation set
    assert float(metrics["a/val_loss"]) == pytest.approx(after, abs=1e-5)
    tested = fit.test(model, loader("a", n=32, seed=1, shuffle=False), verbose=False)[0]
    assert tested["a/test_loss"] == pytest.approx(after, abs=1e-5)
    data = make_data("a", 32, 1)
    model.eval()
    with torch.no_grad():
        expected_acc = (model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean()
    assert tested["a/test_acc"] == pytest.approx(float(expected_acc))
    predicted = fit.predict(model, loader("a", n=32, seed=1, shuffle=False))
    assert torch.equal(torch.cat(predicted), model(data.tensors[0]))


def test_predict_all_and_validation_dataloaders_keyed_by_branch(tmp_path) -> None:
    model = make_module(["a", "b"], predict_all=True)
    fit = trainer(tmp_path)
    preds = fit.predict(model, loader("a", n=16, shuffle=False))[0]
    assert set(preds) == {"a", "b"}
    assert preds["b"].shape == (16, CLASSES["b"])

    val = {name: loader(name, n=32, seed=1, shuffle=False) for name in ("a", "b")}
    result = fit.validate(model, val, verbose=False)
    logged = {k: v for r in result for k, v in r.items()}
    assert {"a/val_loss", "a/val_acc", "b/val_loss", "b/val_acc"} <= set(logged)
    for name in ("a", "b"):  # each loader was evaluated with its own branch
        assert logged[f"{name}/val_loss"] == pytest.approx(val_loss(model, name), abs=1e-5)
    with pytest.raises(UnknownBranchError, match=r"unknown key\(s\) 'x'; valid choices: 'a', 'b'"):
        fit.validate(model, {"a": val["a"], "x": val["b"]}, verbose=False)


def test_inactive_trainable_branch_warns_and_switch_during_fit_is_refused(tmp_path) -> None:
    model = make_module(["a", "b"])
    with pytest.warns(
        UserWarning, match=r"inactive branch\(es\) 'b' have trainable parameters.*FreezeBackbone"
    ):
        trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(model, loader("a"))

    class SwitchMidFit(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            pl_module.switch_branch("b")

    with pytest.raises(RuntimeError, match=r"Cannot switch from branch 'a' to 'b' while Trainer.fit runs"):
        trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[SwitchMidFit()]).fit(
            model, loader("a")
        )


# ------------------------------------------------------------------------------------------------
# hyper-parameters and checkpoints
# ------------------------------------------------------------------------------------------------
def _hydra_config():
    linear = "torch.nn.Linear"
    return OmegaConf.create(
        {
            "_target_": "lightning_freeze.MultiBranchModule",
            "_recursive_": False,
            "backbone": {"_target_": linear, "in_features": 6, "out_features": WIDTH},
            "branches": {
                "a": {"_target_": linear, "in_features": WIDTH, "out_features": 3},
                "b": {"_target_": linear, "in_features": WIDTH, "out_features": 2},
            },
            "active_branch": "b",
            "losses": {"b": {"_target_": "torch.nn.CrossEntropyLoss", "label_smoothing": 0.1}},
            "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
            "scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 2},
        }
    )


def test_hydra_built_module_round_trips_through_load_from_checkpoint(tmp_path) -> None:
    model = hydra.utils.instantiate(_hydra_config())
    assert isinstance(model.backbone, nn.Linear) and model.active_branch == "b"
    assert isinstance(
        model.configure_optimizers()["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR
    )
    fit = trainer(tmp_path, max_epochs=1, callbacks=[FreezeBackbone()])
    fit.fit(model, loader("b"))
    path = tmp_path / "hydra.ckpt"
    fit.save_checkpoint(path)

    raw = torch.load(path, weights_only=True)  # hparams are plain containers: no pickled objects
    assert raw["hyper_parameters"]["optimizer"] == {
        "_target_": "torch.optim.SGD",
        "_partial_": True,
        "lr": 0.1,
    }
    restored = MultiBranchModule.load_from_checkpoint(path)  # nothing else needed
    assert restored.branch_names == ["a", "b"] and restored.active_branch == "b"
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    x = fixed_batch()
    model.eval()
    restored.eval()
    with torch.no_grad():
        assert all(torch.equal(model.forward_all(x)[n], restored.forward_all(x)[n]) for n in ("a", "b"))
    optimizer = restored.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.1
    assert isinstance(restored._losses["b"], nn.CrossEntropyLoss)


@pytest.mark.filterwarnings("ignore:MultiBranchModule. inactive branch")
def test_module_built_from_objects_reloads_with_them_and_restores_the_active_branch(tmp_path) -> None:
    model = make_module(["a", "b"])
    fit = trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    fit.fit(model, loader("a"))
    model.switch_branch("b")
    path = tmp_path / "objects.ckpt"
    fit.save_checkpoint(path)
    with pytest.raises(TypeError, match=r"needs backbone and branches.*pass them again"):
        MultiBranchModule.load_from_checkpoint(path)
    restored = MultiBranchModule.load_from_checkpoint(
        path, backbone=make_backbone(), branches={n: make_branch(n) for n in ("a", "b")}
    )
    assert restored.active_branch == "b"
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in model.state_dict().items())

    # resuming a fit with a module set to another branch would train the wrong branch: refused
    other = make_module(["a", "b"], active="a")
    resume = trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(
        ValueError, match=r"saved while training branch 'b', but the module is set to train 'a'"
    ):
        resume.fit(other, loader("a"), ckpt_path=path)


def test_metric_collection_given_per_branch_is_logged_with_its_names(tmp_path) -> None:
    collection = MetricCollection({"top1": MulticlassAccuracy(num_classes=3, average="micro")})
    model = make_module(["a"], metrics={"a": collection})
    result = trainer(tmp_path).validate(model, loader("a", n=32, shuffle=False), verbose=False)[0]
    assert set(result) == {"a/val_loss", "a/val_top1"}
