"""freeze() on real model-zoo layers: timm BatchNormAct2d, DropPath, EvoNorm; torchvision StochasticDepth;
attention dropout in nn.TransformerEncoder. Frozen means the eval-mode function, bitwise."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_freeze.core import freeze, unfreeze
from lightning_freeze.core.freeze import likely_cause
from lightning_freeze.core.norm import find_running_stat_norms, is_running_stat_norm

timm = pytest.importorskip("timm")


def _eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        return reference(x)


def _train_mode_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()  # what every training loop does; LightningModule.unfreeze() too
    with torch.no_grad():
        return model(x), model(x)


@pytest.fixture(scope="module")
def efficientnet() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, drop_path_rate=0.5)
    # non-trivial statistics, so a lost activation or a wrong statistic shows in the output
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32) * 2 + 1)
    return model.eval()


def test_norm_frozen_keeps_batchnormact_layers_and_the_eval_function(efficientnet: nn.Module) -> None:
    model = copy.deepcopy(efficientnet)
    acts_before = {n: (type(m), type(getattr(m, "act", None))) for n, m in model.named_modules()}
    x = torch.randn(2, 3, 32, 32)
    expected = _eval_output(model, x)
    wrapper = nn.ModuleDict({"backbone": model})
    frozen = freeze(wrapper, "backbone", norm="frozen")
    # BatchNormAct2d overrides forward (normalization + activation + drop): not reproducible by a
    # plain frozen BatchNorm, so it is kept and pinned to eval instead of converted
    bn_act = [n for n, m in model.named_modules() if type(m).__name__ == "BatchNormAct2d"]
    assert bn_act and frozen.kept_pinned == [f"backbone.{n}" for n in bn_act]
    assert "overrides forward" in frozen.kept_pinned_reasons[f"backbone.{bn_act[0]}"]
    first, second = _train_mode_outputs(model, x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    unfreeze(wrapper, frozen, mode=None)
    assert {n: (type(m), type(getattr(m, "act", None))) for n, m in model.named_modules()} == acts_before


def test_timm_drop_path_is_off_in_a_frozen_module() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_convnext", pretrained=False, drop_path_rate=0.5, drop_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    expected = _eval_output(model, x)
    first, second = _train_mode_outputs(copy.deepcopy(model), x)
    assert not torch.equal(first, second)  # control: DropPath is random in train mode
    wrapper = nn.ModuleDict({"backbone": model})
    freeze(wrapper, "backbone")
    first, second = _train_mode_outputs(model, x)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_timm_vit_attention_and_path_dropout_are_off_in_a_frozen_module() -> None:
    torch.manual_seed(0)
    model = timm.create_model(
        "test_vit", pretrained=False, img_size=32, drop_path_rate=0.3, attn_drop_rate=0.3, proj_drop_rate=0.3
    )
    x = torch.randn(2, 3, 32, 32)
    expected = _eval_output(model, x)
    wrapper = nn.ModuleDict({"backbone": model})
    freeze(wrapper, "backbone")
    first, second = _train_mode_outputs(model, x)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_torchvision_stochastic_depth_is_off_in_a_frozen_module() -> None:
    ops = pytest.importorskip("torchvision.ops")

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.drop = ops.StochasticDepth(0.5, "row")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.drop(self.conv(x))

    torch.manual_seed(0)
    model = nn.Sequential(*(Residual() for _ in range(4)))
    x = torch.randn(8, 4, 5, 5)
    expected = _eval_output(model, x)
    first, second = _train_mode_outputs(copy.deepcopy(model), x)
    assert not torch.equal(first, second)  # control: StochasticDepth is random in train mode
    wrapper = nn.ModuleDict({"backbone": model})
    freeze(wrapper, "backbone")
    first, second = _train_mode_outputs(model, x)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_transformer_encoder_attention_dropout_is_off_in_a_frozen_module() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.5, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    x = torch.randn(3, 5, 16)
    expected = _eval_output(model, x)
    wrapper = nn.ModuleDict({"backbone": model})
    freeze(wrapper, "backbone")
    first, second = _train_mode_outputs(model, x)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_dropout_train_opts_every_non_norm_layer_out(efficientnet: nn.Module) -> None:
    model = copy.deepcopy(efficientnet)
    model.classifier = nn.Sequential(nn.Dropout(0.5), model.classifier)
    wrapper = nn.ModuleDict({"backbone": model})
    frozen = freeze(wrapper, "backbone", dropout="train")
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = _train_mode_outputs(model, torch.randn(2, 3, 32, 32))
    assert not torch.equal(first, second)  # DropPath active, as asked
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())  # norms still pinned
    assert frozen.tensor_keys == [f"backbone.{k}" for k in stats]


def _evonorm_net() -> nn.Module:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3), timm.layers.EvoNorm2dB0(8), nn.Flatten())
    return nn.ModuleDict({"backbone": body, "head": nn.Linear(8 * 4 * 4, 2)})


def test_evonorm_running_var_is_a_running_statistic() -> None:
    net = _evonorm_net()
    evo = net["backbone"][1]
    assert is_running_stat_norm(evo) and list(find_running_stat_norms(net)) == ["backbone.1"]
    x = torch.randn(4, 3, 6, 6)

    control = _evonorm_net()
    control["backbone"].requires_grad_(False)
    control.train()
    control["backbone"](x)
    assert not torch.equal(control["backbone"][1].running_var, evo.running_var)  # the trap is real

    frozen = freeze(net, "backbone")
    before = evo.running_var.clone()
    net.train()
    net["backbone"](x)
    evo(net["backbone"][0](x))  # called directly, bypassing the module guard: its own pin holds
    assert torch.equal(evo.running_var, before)
    assert "backbone.1.running_var" in frozen.tensor_keys
    assert likely_cause(net, "backbone.1.running_var").startswith(
        "a buffer of a norm layer (EvoNorm2dB0) that ran in train mode"
    )


def test_evonorm_with_norm_train_and_norm_frozen() -> None:
    net = _evonorm_net()
    frozen = freeze(net, "backbone", norm="train")
    assert "backbone.1.running_var" not in frozen.tensor_keys
    before = net["backbone"][1].running_var.clone()
    net.train()
    net["backbone"](torch.randn(4, 3, 6, 6))
    assert not torch.equal(net["backbone"][1].running_var, before)  # it trains, as asked

    net = _evonorm_net()
    frozen = freeze(net, "backbone", norm="frozen")
    assert frozen.converted == 0 and frozen.kept_pinned == ["backbone.1"]
    assert "not a torch BatchNorm/InstanceNorm" in frozen.kept_pinned_reasons["backbone.1"]
    before = net["backbone"][1].running_var.clone()
    net.train()
    net["backbone"](torch.randn(4, 3, 6, 6))
    assert torch.equal(net["backbone"][1].running_var, before)
