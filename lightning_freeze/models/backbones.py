"""Backbone factories: a tiny CNN that is fast on CPU, and torchvision classification models.

``weights`` is the same everywhere: ``None`` (random initialisation), a torchvision weights name
(``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...; torchvision downloads it once into its cache), or the path
of a local file: a plain ``state_dict``, a torchvision checkpoint, or a Lightning checkpoint of a
:class:`~lightning_freeze.MultiBranchModule` (its ``backbone.*`` tensors are used).

Local files are read with the package's safe loader
(:func:`~lightning_freeze.core.checkpoint_io.load_checkpoint`: ``torch.load(weights_only=True)`` after a
CRC check), which refuses files that pickle code. ``unsafe_load=True`` lifts that for a file you trust.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_freeze.core.checkpoint_io import load_checkpoint
from lightning_freeze.core.validation import check_choice, check_int

__all__ = [
    "TORCHVISION_BACKBONES",
    "TinyCNN",
    "TorchvisionBackbone",
    "load_backbone_weights",
    "tiny_cnn",
    "torchvision_backbone",
]

#: the torchvision models :func:`torchvision_backbone` can build (the keys of :data:`TORCHVISION_BACKBONES`)
TorchvisionBackbone = Literal[
    "resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"
]
#: torchvision model name -> the name of its classifier attribute (replaced by ``nn.Identity``)
TORCHVISION_BACKBONES: dict[str, str] = {
    "resnet18": "fc",
    "resnet34": "fc",
    "resnet50": "fc",
    "mobilenet_v3_small": "classifier",
    "mobilenet_v3_large": "classifier",
    "efficientnet_b0": "classifier",
}


class TinyCNN(nn.Sequential):
    """Three 3x3 convolutions with BatchNorm, global average pooling: ``(N, C, H, W) -> (N, 2*width)``.

    Small enough to train on 8x8 digits in seconds on a CPU, and it has BatchNorm layers, so it
    shows the running-statistics trap that :class:`~lightning_freeze.FreezeBackbone` closes.

    Args:
        in_channels: image channels. Default 1.
        width: channels of the first convolution (the others have ``2 * width``). Default 32.

    Attributes:
        out_features: size of the feature vector, ``2 * width``.
    """

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        check_int("width", width, minimum=1)
        check_int("in_channels", in_channels, minimum=1)
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_features = 2 * width


def tiny_cnn(
    in_channels: int = 1, width: int = 32, weights: str | Path | None = None, unsafe_load: bool = False
) -> TinyCNN:
    """Build a :class:`TinyCNN`, optionally loading ``weights`` from a local file.

    Args:
        in_channels: image channels. Default 1.
        width: channels of the first convolution. Default 32.
        weights: ``None`` (default) or the path of a local checkpoint / ``state_dict``.
        unsafe_load: read ``weights`` with ``torch.load(weights_only=False)``, which runs code
            pickled in the file: only for a file you trust. Default ``False`` (safe loading).

    Returns:
        the backbone; ``backbone.out_features == 2 * width``.
    """
    model = TinyCNN(in_channels, width)
    if weights is not None:
        load_backbone_weights(model, weights, unsafe_load=unsafe_load)
    return model


def torchvision_backbone(
    name: TorchvisionBackbone,
    weights: str | Path | None = None,
    in_channels: int = 3,
    unsafe_load: bool = False,
) -> nn.Module:
    """A torchvision classification model without its classifier: images -> feature vector.

    Args:
        name: one of :data:`TORCHVISION_BACKBONES` (``"resnet18"``, ``"mobilenet_v3_small"``, ...).
        weights: ``None`` (default, random init, nothing downloaded), a torchvision weights name of
            that model (``"DEFAULT"``, ``"IMAGENET1K_V1"``; downloaded once into torchvision's cache),
            or the path of a local file (see the module docstring).
        in_channels: image channels. With a value other than 3 the first convolution is replaced;
            pretrained kernels are summed (1 channel) or repeated and rescaled over channels.
        unsafe_load: read a local ``weights`` file with ``torch.load(weights_only=False)``, which
            runs code pickled in the file: only for a file you trust. Default ``False``.

    Returns:
        the model with its classifier replaced by ``nn.Identity``; ``out_features`` is set.

    Example::

        backbone = torchvision_backbone("resnet18", weights=None, in_channels=1)
        backbone(torch.zeros(2, 1, 32, 32)).shape  # torch.Size([2, 512])
    """
    import torchvision

    check_choice("name", name, tuple(TORCHVISION_BACKBONES))
    named_weights = None
    local_file: Path | None = None
    if weights is not None:
        weight_enum = torchvision.models.get_model_weights(name)
        choices = list(dict.fromkeys(["DEFAULT", *weight_enum.__members__]))
        if str(weights) in choices:
            named_weights = weight_enum[str(weights)]  # DEFAULT is an alias member of the enum
        elif Path(weights).expanduser().is_file():
            local_file = Path(weights).expanduser()
        else:
            raise ValueError(
                f"Invalid weights={str(weights)!r} for {name}: neither a torchvision weights name "
                f"(valid choices: {', '.join(choices)}) nor an existing file."
            )
    model = torchvision.models.get_model(name, weights=named_weights)
    head_attr = TORCHVISION_BACKBONES[name]
    head = getattr(model, head_attr)
    # resnet's fc is that Linear; mobilenet/efficientnet classifiers start with one after pooling
    first_linear = next(m for m in head.modules() if isinstance(m, nn.Linear))
    setattr(model, head_attr, nn.Identity())
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    if local_file is not None:
        load_backbone_weights(model, local_file, ignore_prefixes=(f"{head_attr}.",), unsafe_load=unsafe_load)
    model.out_features = first_linear.in_features
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )
    with torch.no_grad():
        if in_channels == 1:
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        else:
            repeats = -(-in_channels // conv.weight.shape[1])
            new.weight.copy_(conv.weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (3 / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    model.set_submodule(name, new)


def _extract_state_dict(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights={str(path)!r} holds no state_dict (a mapping of tensor names to tensors).")
    if any(k.startswith("backbone.") for k in obj):  # a MultiBranchModule checkpoint
        obj = {k.removeprefix("backbone."): v for k, v in obj.items() if k.startswith("backbone.")}
    return obj


def load_backbone_weights(
    model: nn.Module, weights: str | Path, ignore_prefixes: tuple[str, ...] = (), unsafe_load: bool = False
) -> nn.Module:
    """Load a local checkpoint into a backbone, exactly (strict; errors name the keys).

    The file is read with the safe loader
    (:func:`~lightning_freeze.core.checkpoint_io.load_checkpoint`), which refuses files that pickle
    Python objects: unpickling them would run code named in the file.

    Args:
        model: the backbone.
        weights: path of a ``state_dict`` file, a torchvision checkpoint or a Lightning checkpoint
            (``backbone.*`` keys are used when present).
        ignore_prefixes: keys starting with these are skipped (e.g. a classifier ``"fc."``).
        unsafe_load: read the file with ``torch.load(weights_only=False)``, which runs code pickled
            in it: only for a file you trust. Default ``False``.

    Returns:
        ``model``.

    Raises:
        FileNotFoundError: no such file.
        lightning_freeze.core.checkpoint_io.CheckpointError: the file is corrupt, truncated, not a
            checkpoint, or pickles objects that safe loading refuses (the message says so and
            names ``unsafe_load=True``).
        ValueError: the weights do not fit ``model`` (the message names the keys).
    """
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights={str(weights)!r}: no such file.")
    obj = load_checkpoint(path, unsafe_load=unsafe_load)
    state = {k: v for k, v in _extract_state_dict(obj, path).items() if not k.startswith(ignore_prefixes)}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"weights={str(weights)!r} does not fit {type(model).__name__}: "
            f"missing keys {result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]}."
        )
    return model
