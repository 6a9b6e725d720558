"""Model-zoo backbones with random layers: FreezeBackbone's defaults freeze them AND FeatureCache caches them.

Each backbone has a layer that draws random numbers in train mode (timm ``DropPath``, torchvision
``StochasticDepth``, timm ``DropBlock2d``, timm ViT attention dropout, ``nn.MultiheadAttention``
dropout). A short fit with ``FreezeBackbone()`` + ``FeatureCache()`` must end bitwise where the
same fit without the cache ends (head, whole state_dict, outputs), with the later epoch served
from the cache.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers.trainer import cpu_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_freeze import FeatureCache, FreezeBackbone
from lightning_freeze.core.feature_cache import bypass_output_caches
from lightning_freeze.core.purity import train_behaviour

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

SAMPLES, BATCH, EPOCHS = 8, 4, 2


class Encoder(nn.Module):
    """nn.TransformerEncoder (nn.MultiheadAttention applies its dropout functionally) over 4x4 patches."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, stride=8)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.3, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(x).flatten(2).transpose(1, 2)).mean(dim=1)


ZOO: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "timm_drop_path": (
        lambda: timm.create_model("test_convnext", drop_path_rate=0.1, ls_init_value=1.0, num_classes=0),
        "DropPath",
    ),
    "torchvision_stochastic_depth": (lambda: torchvision.models.efficientnet_b0(), "StochasticDepth"),
    "timm_drop_block": (
        lambda: timm.create_model("test_resnet", drop_block_rate=0.2, zero_init_last=False, num_classes=0),
        "DropBlock2d",
    ),
    "timm_vit_attention_dropout": (
        lambda: timm.create_model("test_vit", img_size=32, attn_drop_rate=0.2, num_classes=0),
        "Dropout",
    ),
    "multihead_attention_dropout": (Encoder, "MultiheadAttention"),
}


class Classifier(L.LightningModule):
    def __init__(self, backbone: nn.Module, features: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).flatten(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(SAMPLES, 3, 32, 32, generator=g), torch.randint(0, 2, (SAMPLES,), generator=g)
    )


@pytest.fixture(scope="module", params=list(ZOO))
def zoo_model(request: pytest.FixtureRequest) -> tuple[str, Classifier]:
    make, kind = ZOO[request.param]
    torch.manual_seed(0)
    backbone = make()
    kinds = {type(m).__name__ for m in backbone.modules() if train_behaviour(m) is not None}
    assert kind in kinds, f"{request.param} was meant to have a {kind}: {sorted(kinds)}"
    with torch.no_grad():
        # non-trivial running statistics (random init leaves e.g. efficientnet_b0's features ~1e-14)
        for _ in range(3):
            backbone.train()(torch.randn(8, 3, 32, 32) * 2 + 0.5)
        features = backbone.eval()(torch.zeros(1, 3, 32, 32)).flatten(1).shape[1]
    return request.param, Classifier(backbone.train(), features)


def _fit(model: Classifier, tmp_path, callbacks: list) -> Classifier:
    model = copy.deepcopy(model)
    L.seed_everything(0, verbose=False)
    loader = DataLoader(_data(), batch_size=BATCH, shuffle=False)
    cpu_trainer(tmp_path, max_epochs=EPOCHS, callbacks=callbacks, num_sanity_val_steps=0).fit(model, loader)
    return model


def test_frozen_and_cached_fit_is_bitwise_the_uncached_fit(
    zoo_model: tuple[str, Classifier], tmp_path
) -> None:
    name, model = zoo_model
    # control: the backbone really is random in train mode, so an unpinned layer would show
    x = _data().tensors[0]
    control = copy.deepcopy(model.backbone).train()
    with torch.no_grad():
        first = control(x)
        assert any(not torch.equal(first, control(x)) for _ in range(3)), name

    uncached = _fit(model, tmp_path / "uncached", [FreezeBackbone()])
    cache = FeatureCache()
    cached = _fit(model, tmp_path / "cached", [FreezeBackbone(), cache])

    assert cache.stats["hits"] == (EPOCHS - 1) * SAMPLES  # every later-epoch sample served from the cache
    assert cache.stats["misses"] == SAMPLES
    for key, value in uncached.head.state_dict().items():
        assert torch.equal(cached.head.state_dict()[key], value), key
    assert not torch.equal(uncached.head.weight, model.head.weight)  # the head did train
    state = cached.state_dict()
    assert all(torch.equal(state[k], v) for k, v in uncached.state_dict().items())
    with torch.no_grad(), bypass_output_caches():
        assert torch.equal(cached.eval()(x), uncached.eval()(x))
