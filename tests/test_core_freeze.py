"""freeze/unfreeze in a plain PyTorch loop; the trap is real; core/ never imports Lightning."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_freeze.core import FrozenBatchNorm, diff_fingerprints, fingerprint, freeze, unfreeze
from lightning_freeze.core.freeze import likely_cause


def _model() -> nn.Module:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Flatten())
    return nn.ModuleDict({"backbone": backbone, "head": nn.Sequential(nn.Linear(8 * 4 * 4, 2))})


def _plain_loop(model: nn.Module, steps: int = 5) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        model.train()  # what every plain loop does at the top of each epoch
        x = torch.randn(16, 3, 6, 6)
        y = torch.randint(0, 2, (16,))
        loss = F.cross_entropy(model["head"](model["backbone"](x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_control_requires_grad_false_lets_running_stats_move() -> None:
    model = _model()
    model["backbone"].requires_grad_(False)  # the usual "freeze"
    before = fingerprint(model["backbone"])
    _plain_loop(model)
    changed = diff_fingerprints(before, fingerprint(model["backbone"])).changed
    assert changed == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]


@pytest.mark.parametrize("norm", ["eval", "frozen"])
def test_freeze_keeps_backbone_bitwise_in_a_plain_loop(norm: str) -> None:
    model = _model()
    head_before = fingerprint(model["head"])
    frozen = freeze(model, "backbone", norm=norm)
    reference = frozen.fingerprint(model)
    assert len(reference) == 7  # conv weight/bias + 5 BatchNorm tensors
    _plain_loop(model)
    assert (
        diff_fingerprints(reference, frozen.fingerprint(model)).summary()
        == "checked 7 frozen tensors: 0 changed"
    )
    assert diff_fingerprints(head_before, fingerprint(model["head"])).changed == ["0.weight", "0.bias"]
    if norm == "frozen":
        assert isinstance(model["backbone"][1], FrozenBatchNorm)


def test_dropout_in_frozen_modules_is_eval_by_default_and_optional() -> None:
    model = _model()
    freeze(model, "backbone")
    model.train()
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(model["backbone"](x), model["backbone"](x))  # deterministic: dropout pinned
    other = _model()
    freeze(other, "backbone", dropout="train")
    other.train()
    assert not torch.equal(other["backbone"](x), other["backbone"](x))


def test_norm_train_is_an_explicit_opt_in_and_its_stats_are_not_verified() -> None:
    model = _model()
    frozen = freeze(model, "backbone", norm="train")
    assert frozen.tensor_keys == [
        "backbone.0.weight",
        "backbone.0.bias",
        "backbone.1.weight",
        "backbone.1.bias",
    ]
    _plain_loop(model)
    assert not diff_fingerprints(frozen.fingerprint(model), frozen.fingerprint(model))


def test_unfreeze_returns_params_for_the_optimizer() -> None:
    model = _model()
    freeze(model, "backbone", norm="frozen")
    params = unfreeze(model, "backbone")
    assert len(params) == 4 and all(p.requires_grad for p in params)
    assert type(model["backbone"][1]) is nn.BatchNorm2d
    model.train()
    model["backbone"](torch.randn(4, 3, 6, 6))
    assert int(model["backbone"][1].num_batches_tracked) == 1


def test_invalid_choices_name_the_value_and_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"Invalid norm='freeze'; valid choices: 'eval', 'frozen', 'train'\."
    ):
        freeze(_model(), "backbone", norm="freeze")
    with pytest.raises(ValueError, match=r"Invalid dropout='off'; valid choices: 'eval', 'train'\."):
        freeze(_model(), "backbone", dropout="off")


def test_likely_cause_names_norm_buffers() -> None:
    model = _model()
    freeze(model, "backbone")
    assert "norm layer (BatchNorm2d) that ran in train mode" in likely_cause(model, "backbone.1.running_var")
    assert "outside FreezeBackbone" in likely_cause(model, "backbone.0.weight")
    weight = model["backbone"][0].weight
    assert "the optimizer held" in likely_cause(model, "backbone.0.weight", optimizer_params=[weight])
    weight.requires_grad_(True)
    assert "requires_grad was re-enabled" in likely_cause(model, "backbone.0.weight")


def test_core_does_not_import_lightning() -> None:
    code = (
        "import sys, lightning_freeze.core\n"
        "assert not [m for m in sys.modules if m == 'lightning' or m.startswith('lightning.')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class ScriptableNet(nn.Module):
    """A model users script/export after training; one conv bias was frozen by the user beforehand."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Flatten()
        )
        self.head = nn.Linear(8 * 4 * 4, 2)
        self.backbone[0].bias.requires_grad_(False)
        self.backbone[3].eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _hooks(model: nn.Module) -> dict[str, list[object]]:
    return {name: list(m._forward_pre_hooks.values()) for name, m in model.named_modules()}


def _user_hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    return None


@pytest.mark.parametrize("norm", ["eval", "frozen", "train"])
def test_unfreeze_with_the_record_is_the_exact_inverse_of_freeze(norm: str) -> None:
    model = ScriptableNet()
    user_hook = model.backbone[2].register_forward_pre_hook(_user_hook)  # the user's own hooks stay
    hooks = _hooks(model)
    requires_grad = {k: p.requires_grad for k, p in model.named_parameters()}
    training = {k: m.training for k, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    frozen = freeze(model, "backbone", norm=norm)
    assert frozen.requires_grad_before == {
        "backbone.0.weight": True,
        "backbone.0.bias": False,
        "backbone.1.weight": True,
        "backbone.1.bias": True,
    }
    assert frozen.training_before["backbone.3"] is False and frozen.training_before["backbone"] is True
    model.train()
    model(torch.randn(4, 3, 6, 6))  # the guard puts the frozen module in eval mode
    if norm == "train":  # the statistics trained, as asked: what unfreeze keeps is what is there now
        state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()

    assert unfreeze(model, frozen, mode=None) == [
        p
        for k, p in model.named_parameters()
        if k in ("backbone.0.weight", "backbone.1.weight", "backbone.1.bias")
    ]
    assert _hooks(model) == hooks
    assert {k: p.requires_grad for k, p in model.named_parameters()} == requires_grad
    assert {k: m.training for k, m in model.named_modules()} == training
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert type(model.backbone[1]) is nn.BatchNorm2d
    user_hook.remove()  # (TorchScript cannot compile that untyped hook; ours are all gone)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(scripted.eval()(x), model.eval()(x))


def test_unfrozen_norm_layers_train_again() -> None:
    model = _model()
    hooks = _hooks(model)
    freeze(model, "backbone")
    unfreeze(model, "backbone")
    assert _hooks(model) == hooks  # the module guard is gone too, not only the per-layer pins
    model.train()
    model["backbone"](torch.randn(4, 3, 6, 6))  # no leftover guard re-pins the BatchNorm
    assert int(model["backbone"][1].num_batches_tracked) == 1
    assert model["backbone"][1].training and model["backbone"].training


def test_unfreeze_by_name_with_mode_none_leaves_modes() -> None:
    model = _model()
    freeze(model, "backbone", norm="frozen")
    model["backbone"].eval()
    unfreeze(model, "backbone", mode=None)
    assert not any(m.training for m in model["backbone"].modules())


def test_a_weight_tied_to_a_trainable_module_is_named_when_frozen() -> None:
    model = _model()
    extra = nn.Conv2d(3, 8, 3)
    extra.weight = model["backbone"][0].weight  # tied: the same tensor object
    model["extra"] = extra
    with pytest.warns(
        UserWarning, match=r"'extra\.weight' is the same tensor as the frozen 'backbone\.0\.weight'"
    ):
        freeze(model, "backbone")
    assert not extra.weight.requires_grad  # what the warning is about


def test_freezing_both_ends_of_a_tie_does_not_warn() -> None:
    model = _model()
    model["extra"] = nn.Conv2d(3, 8, 3)
    model["extra"].weight = model["backbone"][0].weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        freeze(model, ["backbone", "extra"])


def test_unfreeze_a_subset_of_the_record() -> None:
    model = _model()
    model["head"][0].weight.requires_grad_(False)
    frozen = freeze(model, ["backbone", "head"])
    with pytest.raises(
        KeyError, match=r"Not frozen here: \['neck'\]; frozen modules: \['backbone', 'head'\]"
    ):
        frozen.subset(["neck"])
    params = unfreeze(model, frozen.subset(["head"]), mode=None)
    assert params == [model["head"][0].bias]  # the weight was not trainable before freezing
    assert not any(p.requires_grad for p in model["backbone"].parameters())


def test_unfreezing_part_of_a_frozen_module_says_it_stays_in_eval_mode() -> None:
    model = _model()
    freeze(model, "backbone")
    message = r"'backbone\.1' lies inside the frozen module 'backbone', whose guard keeps every layer"
    with pytest.warns(UserWarning, match=message):
        params = unfreeze(model, "backbone.1")
    assert params == list(model["backbone"][1].parameters())
