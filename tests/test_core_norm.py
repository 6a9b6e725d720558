"""Norm layers: found by type, pinned against .train(), frozen equivalents with identical output."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_freeze.core import (
    FrozenBatchNorm,
    FrozenInstanceNorm,
    convert_from_frozen_norm,
    convert_to_frozen_norm,
    find_running_stat_norms,
    is_running_stat_norm,
    pin_eval,
    unpin_eval,
)


class MyNorm(nn.BatchNorm2d):
    """A user subclass with a name that gives nothing away."""


class BatchNormLookalike(nn.Module):
    """Has 'BatchNorm' in its name and a running_mean, but no running statistics are updated."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(4))


def test_found_by_type_not_by_name() -> None:
    net = nn.Sequential(
        nn.BatchNorm1d(4),
        nn.BatchNorm2d(4),
        nn.BatchNorm3d(4),
        nn.SyncBatchNorm(4),
        nn.LazyBatchNorm2d(),
        nn.InstanceNorm2d(4, track_running_stats=True),
        nn.InstanceNorm2d(4),  # no running stats: nothing to pin
        MyNorm(4),
        BatchNormLookalike(),
        nn.LayerNorm(4),
        nn.GroupNorm(2, 4),
    )
    assert sorted(find_running_stat_norms(net)) == ["0", "1", "2", "3", "4", "5", "7"]
    assert not is_running_stat_norm(nn.BatchNorm2d(4, track_running_stats=False))


def test_pinned_layer_ignores_any_later_train_call() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    net[1].running_mean.fill_(0.5)
    before = copy.deepcopy(net[1].state_dict())
    pin_eval(find_running_stat_norms(net))
    net.train()  # what Lightning hooks, LightningModule.unfreeze() and plain loops do
    assert net[1].training  # the flag is set, but the guard runs before each forward
    net(torch.randn(8, 3, 5, 5))
    assert not net[1].training
    for key, value in net[1].state_dict().items():
        assert torch.equal(value, before[key]), key


def test_pin_survives_deepcopy_and_pickle_and_can_be_removed() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    pin_eval(net[1])
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        clone.train()
        clone(torch.randn(4, 3, 5, 5))
        assert int(clone[1].num_batches_tracked) == 0
    assert unpin_eval(net[1], mode=True) == 1
    net(torch.randn(4, 3, 5, 5))
    assert int(net[1].num_batches_tracked) == 1


def _trained(layer: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    if isinstance(layer, nn.LazyBatchNorm2d):
        layer(torch.randn(*shape))
    for _ in range(3):
        layer(torch.randn(*shape) * 3 + 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    return layer.eval()


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.BatchNorm1d(4), (8, 4)),
        (nn.BatchNorm1d(4), (8, 4, 5)),
        (nn.BatchNorm2d(4), (8, 4, 3, 3)),
        (nn.BatchNorm3d(4), (8, 4, 2, 2, 2)),
        (nn.SyncBatchNorm(4), (8, 4, 3, 3)),
        (nn.LazyBatchNorm2d(), (8, 4, 3, 3)),
        (MyNorm(4, affine=False), (8, 4, 3, 3)),
        (nn.InstanceNorm1d(4, affine=True, track_running_stats=True), (8, 4, 7)),
        (nn.InstanceNorm2d(4, track_running_stats=True), (8, 4, 5, 5)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(len(v)),
)
def test_frozen_equivalent_is_bitwise_identical_and_loads_both_ways(
    layer: nn.Module, shape: tuple[int, ...]
) -> None:
    layer = _trained(layer, shape)
    x = torch.randn(*shape)
    net, n = convert_to_frozen_norm(nn.Sequential(copy.deepcopy(layer)))
    frozen = net[0]
    assert n == 1 and isinstance(frozen, (FrozenBatchNorm, FrozenInstanceNorm))
    assert torch.equal(frozen(x), layer(x))
    frozen.train()  # immune
    assert not frozen.training and torch.equal(frozen(x), layer(x))
    assert list(frozen.parameters()) == []  # LightningModule.unfreeze() has nothing to re-enable
    assert list(frozen.state_dict()) == list(layer.state_dict())

    # unconverted checkpoint -> converted model and back, exactly
    fresh_frozen = convert_to_frozen_norm(nn.Sequential(_fresh_like(layer, shape)))[0]
    fresh_frozen.load_state_dict(nn.Sequential(layer).state_dict())
    assert torch.equal(fresh_frozen[0](x), layer(x))
    plain = nn.Sequential(_fresh_like(layer, shape))
    plain.load_state_dict(net.state_dict())
    assert torch.equal(plain.eval()(x), layer(x))

    # and the inverse conversion gives a trainable layer of the original class with the same values
    back, m = convert_from_frozen_norm(net)
    assert m == 1 and not isinstance(back[0], (FrozenBatchNorm, FrozenInstanceNorm))
    assert all(p.requires_grad for p in back[0].parameters())
    assert torch.equal(back[0].eval()(x), layer(x))


def _fresh_like(layer: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    fresh = (
        type(layer)(4, affine=layer.affine, track_running_stats=True)
        if not isinstance(layer, nn.LazyBatchNorm2d)
        else nn.BatchNorm2d(4)
    )
    return fresh


def test_frozen_norm_survives_save_and_deepcopy() -> None:
    frozen = FrozenBatchNorm(_trained(nn.BatchNorm2d(4), (8, 4, 3, 3)))
    buffer = io.BytesIO()
    torch.save(frozen, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(loaded(x), frozen(x))
    assert torch.equal(copy.deepcopy(frozen)(x), frozen(x))
    assert "frozen from BatchNorm2d" in repr(frozen)


def test_uninitialized_lazy_norm_cannot_be_frozen() -> None:
    with pytest.raises(ValueError, match="still uninitialized"):
        FrozenBatchNorm(nn.LazyBatchNorm2d())


def test_wrong_input_rank_is_still_rejected() -> None:
    frozen = FrozenBatchNorm(nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="expected 4D input"):
        frozen(torch.randn(2, 4))


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.BatchNorm1d(4), (8, 4)),
        (nn.BatchNorm2d(4), (8, 4, 3, 3)),
        (nn.SyncBatchNorm(4), (8, 4, 3, 3)),
        (nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (8, 4, 5, 5)),
        (nn.InstanceNorm2d(4, track_running_stats=True), (4, 5, 5)),  # unbatched
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(len(v)),
)
def test_frozen_norms_script_with_torchscript(layer: nn.Module, shape: tuple[int, ...]) -> None:
    layer = _trained(layer, (8, *shape[-3:]) if len(shape) == 3 else shape)
    frozen = convert_to_frozen_norm(nn.Sequential(layer))[0][0]
    scripted = torch.jit.script(nn.Sequential(frozen))
    x = torch.randn(*shape)
    assert torch.equal(scripted(x), layer(x))
    with pytest.raises(Exception, match=r"expected .*D input \(got 1D input\)"):
        scripted(torch.randn(4))


class TaggedNorm(nn.BatchNorm2d):
    """A subclass with its own constructor argument (the old round trip dropped it)."""

    def __init__(self, num_features: int, tag: str = "default", **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)
        self.tag = tag


@pytest.mark.parametrize(
    "make",
    [
        lambda: TaggedNorm(4, tag="custom", eps=1e-3, momentum=0.3),
        lambda: nn.BatchNorm2d(4, eps=1e-3, momentum=None, affine=False),
        lambda: nn.BatchNorm2d(4, eps=1e-4, momentum=0.01, dtype=torch.float64),
    ],
    ids=["subclass", "affine_false", "float64"],
)
def test_round_trip_restores_the_exact_class_arguments_and_values(make: Callable[[], nn.Module]) -> None:
    layer = make()
    dtype = layer.running_mean.dtype
    for _ in range(3):
        layer(torch.randn(8, 4, 3, 3, dtype=dtype) * 3 + 1)
    original = copy.deepcopy(layer)
    net, n = convert_to_frozen_norm(nn.Sequential(layer))
    back, m = convert_from_frozen_norm(net)
    restored = back[0]
    assert n == m == 1 and type(restored) is type(original)
    assert repr(restored) == repr(original)
    assert {k: v for k, v in vars(restored).items() if not k.startswith("_")} == {
        k: v for k, v in vars(original).items() if not k.startswith("_")
    }  # constructor arguments and attributes (tag, eps, momentum, affine, training=True)
    state, expected = restored.state_dict(), original.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) and state[k].dtype == expected[k].dtype for k in state)
    assert all(p.requires_grad for p in restored.parameters())


def test_a_conversion_that_would_change_the_output_is_not_made() -> None:
    layer = _trained(nn.BatchNorm2d(4), (8, 4, 3, 3))
    plain_forward = layer.forward
    layer.forward = lambda x: torch.relu(plain_forward(x))  # an instance patch the class check misses
    kept: dict[str, str] = {}
    rng = torch.get_rng_state()
    net, n = convert_to_frozen_norm(nn.Sequential(layer), kept=kept)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe does not consume the global RNG
    assert n == 0 and net[0] is layer
    assert kept == {"0": kept["0"]} and "output differs on a probe input (max abs diff" in kept["0"]


def test_subclasses_that_compute_more_are_not_converted() -> None:
    class NormAct(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(super().forward(x))

    kept: dict[str, str] = {}
    net, n = convert_to_frozen_norm(nn.Sequential(NormAct(4), MyNorm(4)), kept=kept, prefix="body")
    assert n == 1 and isinstance(net[1], FrozenBatchNorm) and type(net[0]) is NormAct
    assert kept == {"body.0": "NormAct overrides forward (it computes more than the normalization)"}
