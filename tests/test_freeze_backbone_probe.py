"""The proof sees function: each frozen module must reproduce its output on a recorded probe input."""

from __future__ import annotations

import types

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers.freeze import WIDTH, TinyNet, loaders, make_backbone, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_freeze import FreezeBackbone, FrozenStateError
from lightning_freeze.core.probe import OutputProbe, run_module


# ---------------------------------------------------------------------------------------------
# core: pure PyTorch
# ---------------------------------------------------------------------------------------------
class MultiOut(nn.Module):
    """BatchNorm + dropout with tuple and dict outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.drop(self.bn(self.lin(x)))
        return h, {"sum": h.sum(dim=1), "idx": h.argmax(dim=1)}


def test_probe_reproduces_tuple_and_dict_outputs_bitwise() -> None:
    module = MultiOut().eval()
    probe = OutputProbe.record(module, (torch.randn(2, 4),))
    assert isinstance(probe.output, tuple) and set(probe.output[1]) == {"sum", "idx"}
    assert probe.check(module, "m") is None


def test_check_consumes_no_random_number_changes_no_buffer_builds_no_graph() -> None:
    module = MultiOut().eval()
    probe = OutputProbe.record(module, (torch.randn(2, 4),))
    module.train()  # BatchNorm would update its statistics, dropout would draw random numbers
    buffers = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    mismatch = probe.check(module, "backbone")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in buffers.items())
    assert mismatch is not None and str(mismatch).startswith(
        "backbone: output on the probe input changed (max abs diff "
    )
    out = run_module(module, (torch.randn(2, 4),))
    assert out[0].grad_fn is None and not out[0].requires_grad


def test_probe_state_dict_round_trips_through_a_weights_only_file(tmp_path) -> None:
    module = MultiOut().eval()
    probe = OutputProbe.record(module, (torch.randn(2, 4),), {})
    torch.save(probe.state_dict(), tmp_path / "probe.pt")
    loaded = OutputProbe.from_state_dict(torch.load(tmp_path / "probe.pt", weights_only=True))
    assert loaded.check(module, "m") is None
    with torch.no_grad():
        module.lin.bias[0] += 1e-3
    assert loaded.check(module, "m") is not None


# ---------------------------------------------------------------------------------------------
# FreezeBackbone: changes of function that no fingerprint sees
# ---------------------------------------------------------------------------------------------
class Scale(nn.Module):
    """A non-persistent buffer: not in the state_dict, so no fingerprint covers it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("factor", torch.ones(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class ScaledNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*make_backbone(), Scale())


class BatchNormSiLU(nn.BatchNorm2d):
    """A BatchNorm subclass that does more than normalise (like timm's BatchNormAct2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x)) - 0.5


def _replace_forward(module: L.LightningModule) -> None:
    backbone = module.backbone
    backbone.forward = types.MethodType(lambda self, x: nn.Sequential.forward(self, x) * 2.0, backbone)


def _train_mode_without_pins(module: L.LightningModule) -> None:
    for layer in module.backbone.modules():
        layer._forward_pre_hooks.clear()  # the pins and the guard gone (a bug, or user code)
    module.backbone[3].train()  # dropout: no buffer, no parameter changes


def _change_buffer(module: L.LightningModule) -> None:
    module.backbone[9].factor.fill_(1.5)


def _convert(module: L.LightningModule) -> None:
    old = module.backbone[1]
    new = BatchNormSiLU(WIDTH)
    new.load_state_dict(old.state_dict())  # the same state_dict: no fingerprint changes
    new.requires_grad_(False)
    module.backbone[1] = new.eval()


class Tamper(Callback):
    """Changes the frozen backbone's function at the start of epoch 1 (after FreezeBackbone's hook)."""

    def __init__(self, change) -> None:
        self.change = change

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.change(pl_module)


@pytest.mark.parametrize(
    "change", [_replace_forward, _train_mode_without_pins, _change_buffer, _convert], ids=lambda f: f.__name__
)
def test_a_change_of_function_is_caught_and_names_the_module(tmp_path, change) -> None:
    model = ScaledNet()
    callback = FreezeBackbone()
    train, val = loaders()
    t = trainer(tmp_path, callbacks=[callback, Tamper(change)], max_epochs=2)
    with pytest.raises(FrozenStateError) as err:
        t.fit(model, train, val)
    assert "backbone: output on the probe input changed (max abs diff " in str(err.value)
    assert err.value.changed == ["backbone"]  # no tensor changed: only the function
    assert "checked 14 frozen tensors: 0 changed; 1 of 1 probe output(s) changed" in str(err.value)
    assert t.current_epoch == 1  # caught at the end of the epoch it happened in


def test_verify_warn_warns_about_a_changed_function(tmp_path) -> None:
    train, val = loaders()
    t = trainer(tmp_path, callbacks=[FreezeBackbone(verify="warn"), Tamper(_replace_forward)], max_epochs=2)
    with pytest.warns(UserWarning, match=r"backbone: output on the probe input changed"):
        t.fit(ScaledNet(), train, val)


def test_the_probe_records_two_samples_and_passes_on_an_untouched_fit(tmp_path) -> None:
    callback = FreezeBackbone()
    train, val = loaders()
    trainer(tmp_path, callbacks=[callback], max_epochs=2).fit(ScaledNet(), train, val)
    probe = callback.probes["backbone"]
    assert probe.args[0].shape == (2, 3, 6, 6) and probe.output.shape == (2, WIDTH)
    assert callback.last_probe_check == []


def test_verifying_does_not_change_what_training_computes(tmp_path) -> None:
    class DropHead(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Sequential(nn.Dropout(0.3), *self.head)  # the trainable part draws random numbers

    results = []
    for verify in ("raise", "off"):
        torch.manual_seed(0)
        model = DropHead()
        train, val = loaders()
        trainer(tmp_path, callbacks=[FreezeBackbone(verify=verify)], max_epochs=2).fit(model, train, val)
        results.append(model.state_dict())
    assert all(torch.equal(v, results[1][k]) for k, v in results[0].items())


def test_a_resumed_run_checks_against_the_first_runs_probe(tmp_path) -> None:
    class LeakyNet(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.backbone[2] = nn.LeakyReLU(0.5)  # same state_dict, another function

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    train, val = loaders()
    trainer(tmp_path, callbacks=[FreezeBackbone(), ckpt], max_epochs=1, enable_checkpointing=True).fit(
        TinyNet(), train, val
    )
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("FreezeBackbone"))
    assert state["probes"]["backbone"]["args"][0].shape == (2, 3, 6, 6)
    # the checkpoint entry keeps its format (the verifier's part is "fingerprints" and "probes")
    assert list(state) == [
        "modules", "norm", "unfreeze_at_epoch", "unfrozen", "fingerprints", "probes", "schedule"
    ]  # fmt: skip
    assert sorted(state["fingerprints"]) == sorted(TinyNet().backbone.state_dict(prefix="backbone."))
    t = trainer(tmp_path, callbacks=[FreezeBackbone()], max_epochs=2)
    with pytest.raises(FrozenStateError, match=r"backbone: output on the probe input changed"):
        t.fit(LeakyNet(), train, val, ckpt_path=path)


def test_fingerprints_written_by_version_0_1_still_verify() -> None:
    """A resumed run may carry BLAKE2b-128 fingerprints (version 0.1): they verify, and a change is caught."""
    from lightning_freeze.core.fingerprint import fingerprint as fingerprint_of

    net = torch.nn.Sequential(torch.nn.Linear(3, 4))
    callback = FreezeBackbone("0")
    old = fingerprint_of(net, algorithm="blake2b-128")
    assert not any(":" in fp.digest for fp in old.values())  # the old, unprefixed format
    callback.verifier.reference = dict(old)
    assert callback.check(net).summary() == "checked 2 frozen tensors: 0 changed"
    with torch.no_grad():
        net[0].bias[0] += 1
    with pytest.raises(FrozenStateError, match=r"0\.bias"):
        callback.check(net)
