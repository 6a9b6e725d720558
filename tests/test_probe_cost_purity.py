"""The function proof's probe runs a forward only when cheap evidence says the function may have changed.

An all-hit cached epoch spent about half its time in FreezeBackbone's end-of-epoch probe (a full
forward bypassing the cache). The probe now runs at fit end and on demand, and at an epoch end only
when a frozen tensor or the module's ``function_token`` changed.
"""

from __future__ import annotations

import sys
import types

import lightning as L
import pytest
import torch
from helpers.freeze import TinyNet, loaders, make_backbone, trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_freeze import FreezeBackbone, FrozenStateError
from lightning_freeze.core import freeze
from lightning_freeze.core.probe import OutputProbe, function_token


def _activation(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x)


class ViaFunction(nn.Module):
    """Calls a module-level function: replacing that function changes the output, and no token sees it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _activation(x)


class FunctionNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*make_backbone(), ViaFunction())


class EpochEnds(Callback):
    def __init__(self) -> None:
        self.ended: list[int] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ended.append(trainer.current_epoch)


@pytest.fixture
def probe_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    runs: list[str] = []
    original = OutputProbe.check

    def counted(self: OutputProbe, module: nn.Module, name: str = "module") -> object:
        runs.append(name)
        return original(self, module, name)

    monkeypatch.setattr(OutputProbe, "check", counted)
    return runs


def test_an_untouched_fit_runs_the_probe_once_at_fit_end(tmp_path, probe_runs: list[str]) -> None:
    callback = FreezeBackbone()
    train, val = loaders()
    trainer(tmp_path, callbacks=[callback], max_epochs=3).fit(FunctionNet(), train, val)
    assert probe_runs == ["backbone"]  # not one forward per epoch end (3 epochs)
    assert callback.last_probe_check == [] and callback.probes_skipped == []


def test_a_changed_module_is_still_probed_at_the_epoch_end(tmp_path, probe_runs: list[str]) -> None:
    class Tamper(Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.current_epoch == 1:
                pl_module.backbone[3]._forward_pre_hooks.clear()
                pl_module.backbone._forward_pre_hooks.clear()  # pins and guard gone (a bug, user code)
                pl_module.backbone[3].train()  # dropout: no tensor changes

    ends = EpochEnds()
    t = trainer(tmp_path, callbacks=[FreezeBackbone(), Tamper(), ends], max_epochs=3)
    with pytest.raises(FrozenStateError, match=r"backbone: output on the probe input changed"):
        t.fit(FunctionNet(), *loaders())
    assert ends.ended == [0] and probe_runs == ["backbone"]  # epoch 0 skipped, epoch 1 probed


def test_a_replaced_function_the_module_calls_is_caught_at_fit_end(tmp_path, probe_runs: list[str]) -> None:
    here = sys.modules[__name__]
    original = here._activation

    class PatchActivation(Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.current_epoch == 1:
                here._activation = lambda x: torch.tanh(x) * 2.0  # type: ignore[attr-defined]

    ends = EpochEnds()
    callback = FreezeBackbone()
    t = trainer(tmp_path, callbacks=[callback, PatchActivation(), ends], max_epochs=3)
    try:
        with pytest.raises(FrozenStateError, match=r"backbone: output on the probe input changed"):
            t.fit(FunctionNet(), *loaders())
    finally:
        here._activation = original  # type: ignore[attr-defined]
    assert ends.ended == [0, 1, 2]  # invisible to the token: every epoch end passed ...
    assert probe_runs == ["backbone"]  # ... and the fit-end probe caught it


def test_check_on_demand_always_runs_the_probe(tmp_path, probe_runs: list[str]) -> None:
    callback = FreezeBackbone()
    model = FunctionNet()
    trainer(tmp_path, callbacks=[callback], max_epochs=1).fit(model, *loaders())
    probe_runs.clear()
    freeze(model, "backbone")  # the fit gave the model back: freeze it again to check it by hand
    callback.check(model, across_ranks=False)
    callback.check(model, across_ranks=False, probe="if_changed")
    assert probe_runs == ["backbone"] and callback.probes_skipped == ["backbone"]
    with pytest.raises(ValueError, match=r"probe.*'sometimes'.*'always', 'if_changed'"):
        callback.check(model, across_ranks=False, probe="sometimes")  # type: ignore[arg-type]


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("factor", torch.ones(1), persistent=False)
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor + self.eps


def _frozen() -> nn.ModuleDict:
    torch.manual_seed(0)
    net = nn.ModuleDict({"backbone": nn.Sequential(*make_backbone(), Scale()), "head": nn.Linear(8, 2)})
    freeze(net, "backbone")
    return net


def _changes() -> dict[str, object]:
    def forward(net: nn.ModuleDict) -> None:
        body = net["backbone"]
        body.forward = types.MethodType(lambda self, x: nn.Sequential.forward(self, x) * 2, body)

    def data_write(net: nn.ModuleDict) -> None:
        net["backbone"][9].factor.data.fill_(2.0)  # no version-counter bump: only its bits show

    def swap(net: nn.ModuleDict) -> None:
        net["backbone"][2] = nn.ReLU()  # the same class and arguments, another object

    def hook(net: nn.ModuleDict) -> None:
        net["backbone"][4].register_forward_hook(lambda m, i, o: o * 2)

    def attribute(net: nn.ModuleDict) -> None:
        net["backbone"][9].eps = 1e-3

    def global_hook(net: nn.ModuleDict) -> None:
        net.handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)

    def matmul_precision(net: nn.ModuleDict) -> None:
        torch.set_float32_matmul_precision("medium")

    return {
        f.__name__: f for f in (forward, data_write, swap, hook, attribute, global_hook, matmul_precision)
    }


@pytest.mark.parametrize("change", list(_changes()))
def test_function_token_sees_each_change_of_function(change: str) -> None:
    net = _frozen()
    before = function_token(net["backbone"])
    precision = torch.get_float32_matmul_precision()
    try:
        _changes()[change](net)
        assert function_token(net["backbone"]) != before
    finally:
        torch.set_float32_matmul_precision(precision)
        if hasattr(net, "handle"):
            net.handle.remove()


def test_function_token_ignores_what_does_not_change_the_function() -> None:
    net = _frozen()
    before = function_token(net["backbone"])
    x = torch.randn(2, 3, 6, 6)
    net.train()  # the guard puts the layers back in eval before the forward
    with torch.no_grad():
        net["backbone"](x)
    net.eval()
    net.train()
    assert function_token(net["backbone"]) == before
