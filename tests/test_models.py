"""Backbone and branch factories used by the configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_freeze.models import linear_head, mlp_head, tiny_cnn, torchvision_backbone


def test_tiny_cnn_features_and_batchnorm() -> None:
    backbone = tiny_cnn(in_channels=1, width=8)
    assert backbone(torch.randn(3, 1, 8, 8)).shape == (3, backbone.out_features) == (3, 16)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()) == 3


@pytest.mark.parametrize(("name", "features"), [("resnet18", 512), ("mobilenet_v3_small", 576)])
def test_torchvision_backbones_without_classifier(name: str, features: int) -> None:
    backbone = torchvision_backbone(name, weights=None, in_channels=1).eval()
    assert backbone.out_features == features
    assert backbone(torch.randn(2, 1, 32, 32)).shape == (2, features)


def test_torchvision_bad_weights_name_lists_choices_without_downloading() -> None:
    with pytest.raises(
        ValueError, match=r"Invalid weights='IMAGENET22K' for resnet18: .*DEFAULT, IMAGENET1K_V1"
    ):
        torchvision_backbone("resnet18", weights="IMAGENET22K")
    with pytest.raises(ValueError, match=r"Invalid name='vgg'; valid choices: 'resnet18'"):
        torchvision_backbone("vgg")


def test_weights_from_a_local_state_dict_and_a_multibranch_checkpoint(tmp_path) -> None:
    trained = tiny_cnn(width=4)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    torch.save(trained.state_dict(), tmp_path / "plain.pt")
    prefixed = {f"backbone.{k}": v for k, v in trained.state_dict().items()}
    prefixed["branches.a.weight"] = torch.zeros(2, 8)
    torch.save({"state_dict": prefixed}, tmp_path / "stage.ckpt")
    for file in ("plain.pt", "stage.ckpt"):
        loaded = tiny_cnn(width=4, weights=tmp_path / file)
        for key, value in trained.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_weights_that_do_not_fit_name_the_keys(tmp_path) -> None:
    torch.save(tiny_cnn(width=4).state_dict(), tmp_path / "w4.pt")
    with pytest.raises(FileNotFoundError, match=r"weights='.*missing.pt': no such file"):
        tiny_cnn(width=4, weights=tmp_path / "missing.pt")
    with pytest.raises(RuntimeError, match=r"size mismatch for 0.weight"):
        tiny_cnn(width=8, weights=tmp_path / "w4.pt")
    torch.save({"0.weight": torch.zeros(4, 1, 3, 3)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"does not fit TinyCNN: missing keys \['1.weight'"):
        tiny_cnn(width=4, weights=tmp_path / "partial.pt")


def test_resnet_weights_from_a_local_torchvision_checkpoint(tmp_path) -> None:
    import torchvision

    full = torchvision.models.resnet18(num_classes=1000)
    torch.save(full.state_dict(), tmp_path / "resnet18.pth")  # with fc.*: skipped
    backbone = torchvision_backbone("resnet18", weights=str(tmp_path / "resnet18.pth"))
    assert torch.equal(backbone.conv1.weight, full.conv1.weight)
    assert torch.equal(backbone.layer4[1].bn2.running_var, full.layer4[1].bn2.running_var)


def test_heads() -> None:
    assert linear_head(16, 3)(torch.randn(2, 16)).shape == (2, 3)
    head = mlp_head(16, 4, hidden=8, dropout=0.1)
    assert head(torch.randn(2, 16)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"Invalid num_classes=0; valid choices: an integer >= 1"):
        linear_head(16, 0)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: mlp_head(16, 4, dropout="0.1"),
            r"Invalid dropout='0.1'; valid choices: a probability in \[0, 1\)\.",
        ),
        (
            lambda: mlp_head(16, 4, dropout=1.0),
            r"Invalid dropout=1.0; valid choices: a probability in \[0, 1\)\.",
        ),
        (lambda: mlp_head(16, 4, hidden=True), r"Invalid hidden=True; valid choices: an integer >= 1\."),
        (lambda: tiny_cnn(in_channels=0), r"Invalid in_channels=0; valid choices: an integer >= 1\."),
        (lambda: tiny_cnn(width=2.5), r"Invalid width=2.5; valid choices: an integer >= 1\."),
    ],
)
def test_bad_factory_arguments_name_the_value_and_the_choices(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_torchvision_backbone_names_are_the_literal_type() -> None:
    import typing

    from lightning_freeze.core.validation import choices_of
    from lightning_freeze.models.backbones import TORCHVISION_BACKBONES, TorchvisionBackbone

    assert choices_of(TorchvisionBackbone) == tuple(TORCHVISION_BACKBONES)
    assert typing.get_type_hints(torchvision_backbone)["name"] == TorchvisionBackbone


class _CreatesAFile:
    """Unpickling this calls ``builtins.open(path, "w")``: a file appears if the loader runs it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_weights_that_pickle_code_are_refused_unless_unsafe_load(tmp_path) -> None:
    from lightning_freeze.core.checkpoint import CheckpointError

    trained = tiny_cnn(width=4)
    marker = tmp_path / "created_by_unpickling"
    crafted = tmp_path / "crafted.pt"
    torch.save({"state_dict": trained.state_dict(), "payload": _CreatesAFile(str(marker))}, crafted)
    for build in (
        lambda **kw: tiny_cnn(width=4, weights=crafted, **kw),
        lambda **kw: torchvision_backbone("resnet18", weights=crafted, **kw),
    ):
        with pytest.raises(CheckpointError) as err:
            build()
        assert str(err.value) == (
            f"{str(crafted)!r}: it pickles Python objects that weights_only loading refuses (global "
            "io.open is not on the allow-list): loading them would import and run code named in "
            "the file; only if you trust this file, load it with unsafe_load=True (CLI: --unsafe-load)"
        )
        assert not marker.exists()  # nothing in the file ran
    # control: the opt-in really unpickles (and so runs) the payload, and loads the weights
    loaded = tiny_cnn(width=4, weights=crafted, unsafe_load=True)
    assert marker.exists()
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
