"""One rule for "runs as a pure function during training": freeze, pins and cacheability agree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_freeze.core import freeze, unfreeze
from lightning_freeze.core.feature_cache import OutputCache, UncacheableModuleError, uncacheable_reasons
from lightning_freeze.core.norm import is_pinned
from lightning_freeze.core.purity import impure_layers, inherited_guard_rule, train_behaviour

timm = pytest.importorskip("timm")
ops = pytest.importorskip("torchvision.ops")


class Block(nn.Module):
    """Every kind of layer that behaves differently in train mode, in one residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)
        self.drop_path = timm.layers.DropPath(0.3)
        self.drop_block = timm.layers.DropBlock2d(0.3, block_size=3)
        self.depth = ops.StochasticDepth(0.3, "row")
        self.attn = nn.MultiheadAttention(4, 2, dropout=0.3, batch_first=True)
        self.rrelu = nn.RReLU()
        self.plain = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop_block(self.rrelu(self.bn(self.conv(x))))
        seq = h.flatten(2).transpose(1, 2)
        seq = seq + self.attn(seq, seq, seq, need_weights=False)[0]
        h = seq.transpose(1, 2).reshape_as(h)
        return x + self.depth(self.drop_path(self.drop(h)))


RANDOM_OR_STATEFUL = ["bn", "drop", "drop_path", "drop_block", "depth", "attn", "rrelu"]


def _net() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({"backbone": nn.Sequential(Block(), Block()), "head": nn.Linear(4, 2)})


def _expected_layers(prefix: str = "backbone") -> list[str]:
    return [f"{prefix}.{i}.{n}" for i in range(2) for n in RANDOM_OR_STATEFUL]


def test_train_behaviour_names_each_kind_and_nothing_else() -> None:
    block = Block()
    named = {n for n, m in block.named_modules() if train_behaviour(m) is not None}
    assert named == set(RANDOM_OR_STATEFUL)
    assert train_behaviour(nn.Dropout(0.0)) is None and train_behaviour(timm.layers.DropPath(0.0)) is None
    assert train_behaviour(nn.BatchNorm2d(3, track_running_stats=False)) is None


def test_an_unfrozen_module_in_train_mode_is_impure_layer_by_layer() -> None:
    net = _net().train()
    assert list(impure_layers(net["backbone"], "backbone")) == _expected_layers()
    # the control: the train-mode module really is random from call to call
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert not torch.equal(net["backbone"](x), net["backbone"](x))


@pytest.mark.parametrize("in_train_mode", [True, False], ids=["frozen_in_train_mode", "frozen_in_eval_mode"])
def test_pinned_counts_every_layer_it_pinned(in_train_mode: bool) -> None:
    net = _net().train(in_train_mode)
    frozen = freeze(net, "backbone")
    layers = [net.get_submodule(n) for n in _expected_layers()]
    assert all(is_pinned(m) for m in layers)
    assert frozen.pinned == len(layers) == 14
    unfreeze(net, frozen, mode=None)
    assert not any(is_pinned(m) for m in layers)


def test_a_frozen_module_is_pure_and_cacheable_whatever_calls_train() -> None:
    net = _net()
    freeze(net, "backbone")
    net.train()  # what the Trainer does at every epoch start: every flag reads True again
    assert net["backbone"][0].drop_path.training
    assert impure_layers(net["backbone"], "backbone") == {}
    assert uncacheable_reasons(net["backbone"], "backbone") == []
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = net["backbone"](x)
    net.train()
    with OutputCache(net["backbone"]), torch.no_grad():
        first, second = net["backbone"](x), net["backbone"](x)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_a_submodule_of_a_frozen_module_inherits_the_guard() -> None:
    net = _net()
    freeze(net, "backbone")
    net.train()
    guards = inherited_guard_rule(net, "backbone.1")
    assert guards == [("eval", "eval")]
    assert impure_layers(net["backbone"][1], "backbone.1", during_training=True, guards=guards) == {}
    # pins of the inner layers removed: the outer guard still forces them, seen only with its rule
    for layer in net["backbone"][1].modules():
        layer._forward_pre_hooks.clear()
    assert list(impure_layers(net["backbone"][1], "backbone.1", guards=guards)) == []
    assert list(impure_layers(net["backbone"][1], "backbone.1")) == _expected_layers()[7:]


def test_opt_outs_are_impure_as_asked() -> None:
    net = _net()
    freeze(net, "backbone", dropout="train")
    net.train()
    assert list(impure_layers(net["backbone"], "backbone")) == [
        n for n in _expected_layers() if not n.endswith(".bn")
    ]
    with pytest.raises(UncacheableModuleError, match=r"12 norm/dropout layer\(s\) in train mode"):
        OutputCache(net["backbone"]).attach()

    net = _net()
    freeze(net, "backbone", norm="train")
    assert list(impure_layers(net["backbone"], "backbone", during_training=True)) == [
        "backbone.0.bn",
        "backbone.1.bn",
    ]


TIMM_ZOO = [
    "test_efficientnet",  # BatchNormAct2d (norm + activation + drop), DropPath
    "test_efficientnet_evos",  # EvoNorm2dS0
    "test_efficientnet_gn",  # GroupNorm: no running statistics
    "test_nfnet",  # scaled weight standardisation, DropPath
    "test_maxvit",  # attention, BatchNorm, DropPath
    "test_vit_relpos",  # relative-position attention, non-persistent buffers
]


@pytest.mark.parametrize("name", TIMM_ZOO)
def test_timm_test_models_frozen_with_the_defaults_are_cacheable(name: str) -> None:
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if "vit" in name or "maxvit" in name else {}
    model = timm.create_model(name, pretrained=False, drop_path_rate=0.2, drop_rate=0.2, **kwargs)
    net = nn.ModuleDict({"backbone": model, "head": nn.Linear(1, 1)})
    net.train()
    x = torch.randn(2, 3, 32, 32)
    before = uncacheable_reasons(model, "backbone", check_grad=False)
    assert before and "in train mode" in before[0]  # control: random or stateful layers in train mode
    freeze(net, "backbone")
    with torch.no_grad():
        expected = model(x)  # through the guard: the eval-mode function
    net.train()
    assert uncacheable_reasons(model, "backbone") == []
    with OutputCache(model), torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
