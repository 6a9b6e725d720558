"""Each trained branch draws from its own random stream: a dropout variant cannot change a sibling."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from helpers.multibranch import CLASSES, WIDTH, loader, make_backbone, trainer
from torch import nn

from lightning_freeze import FreezeBackbone, MultiBranchModule
from lightning_freeze.core.random_stream import RandomStream, derive_seed

SETTINGS = {"drop": {"lr": 0.02}, "plain_a": {"lr": 0.01}, "plain_b": {"lr": 0.05}}


def head(dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES["a"]))


def fit(model: MultiBranchModule, root, shuffle: bool = True, **kwargs):
    torch.manual_seed(1)  # the run's seed: the data order and every branch's stream derive from it
    fit_trainer = trainer(root, deterministic=True, callbacks=[FreezeBackbone()], **kwargs)
    fit_trainer.fit(model, loader("a", shuffle=shuffle), loader("a", 32, 1, False))
    return fit_trainer


def branch_state(model: MultiBranchModule, name: str) -> dict[str, torch.Tensor]:
    prefix = f"branches.{name}."
    return {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], f"{what}: {len(differ)} of {len(a)} tensors differ: {differ}"


@pytest.fixture(scope="module")
def initial() -> tuple[nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(0)
    return make_backbone(), {"drop": head(0.5), "plain_a": head(0.0), "plain_b": head(0.0)}


@pytest.fixture(scope="module")
def packed(initial, tmp_path_factory) -> MultiBranchModule:
    backbone, heads = initial
    model = MultiBranchModule(
        copy.deepcopy(backbone),
        copy.deepcopy(heads),
        train_branches=list(SETTINGS),
        branch_optimizers=SETTINGS,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
    )
    fit(model, tmp_path_factory.mktemp("packed"), max_epochs=3)
    return model


def solo(initial, name: str, root, **kwargs) -> MultiBranchModule:
    backbone, heads = initial
    model = MultiBranchModule(
        copy.deepcopy(backbone),
        {name: copy.deepcopy(heads[name])},
        optimizer=functools.partial(torch.optim.AdamW, **SETTINGS[name]),
    )
    fit(model, root, **{"max_epochs": 3, **kwargs})
    return model


@pytest.mark.parametrize("name", ["plain_a", "plain_b", "drop"])
def test_each_variant_ends_bitwise_at_its_solo_run_with_shuffled_data_and_a_dropout_sibling(
    initial, packed, name, tmp_path
) -> None:
    # main before per-branch streams: the dropout variant drew from the global stream, so the second
    # epoch's shuffle differed from the solo runs' and every variant diverged
    alone = solo(initial, name, tmp_path)
    assert_bitwise(branch_state(packed, name), branch_state(alone, name), f"variant {name!r}")
    assert not torch.equal(branch_state(packed, name)["0.weight"], initial[1][name][0].weight)  # it trained


def test_variants_sharing_a_stream_name_draw_what_the_head_alone_draws(initial, tmp_path) -> None:
    # what launcher=packed does: every variant of head "drop" is seeded as the job's branch "drop"
    backbone, heads = initial
    model = MultiBranchModule(
        copy.deepcopy(backbone),
        {"v0": copy.deepcopy(heads["drop"]), "v1": copy.deepcopy(heads["drop"])},
        train_branches=["v0", "v1"],
        branch_optimizers={"v0": SETTINGS["drop"], "v1": {"lr": 0.001}},
        random_streams={"v0": "drop", "v1": "drop"},
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
    )
    fit(model, tmp_path / "packed", max_epochs=3)
    alone = solo(initial, "drop", tmp_path / "solo")
    assert_bitwise(branch_state(model, "v0"), branch_state(alone, "drop"), "variant v0")
    seeds = {model.random_stream("v0").seed, model.random_stream("v1").seed, alone.random_stream("drop").seed}
    assert len(seeds) == 1
    assert not torch.equal(branch_state(model, "v0")["0.weight"], branch_state(model, "v1")["0.weight"])


def test_resume_continues_the_branch_stream_exactly(initial, tmp_path) -> None:
    # unshuffled data (Lightning does not restore the global generator on resume): what differs
    # between a resumed and an uninterrupted run is then only the dropout masks of the head
    full = solo(initial, "drop", tmp_path / "full", shuffle=False)
    first = solo(initial, "drop", tmp_path / "first", shuffle=False, max_epochs=1)
    path = tmp_path / "epoch1.ckpt"
    first.trainer.save_checkpoint(path)
    backbone, heads = initial
    resumed = MultiBranchModule(
        copy.deepcopy(backbone),
        {"drop": copy.deepcopy(heads["drop"])},
        optimizer=functools.partial(torch.optim.AdamW, **SETTINGS["drop"]),
    )
    torch.manual_seed(12345)  # a resuming process seeded otherwise: the checkpoint's stream wins
    fit_trainer = trainer(
        tmp_path / "resumed", deterministic=True, callbacks=[FreezeBackbone()], max_epochs=3
    )
    fit_trainer.fit(resumed, loader("a", shuffle=False), loader("a", 32, 1, False), ckpt_path=path)
    assert_bitwise(branch_state(resumed, "drop"), branch_state(full, "drop"), "resumed head")
    saved = torch.load(path, weights_only=True)["multi_branch"]["random_streams"]
    assert set(saved) == {"drop"} and saved["drop"]["seed"] == derive_seed(1, "drop")


def test_a_stream_leaves_the_global_generators_untouched_and_replays() -> None:
    torch.manual_seed(3)
    before = torch.get_rng_state()
    stream = RandomStream(derive_seed(3, "x"))
    with stream.active("cpu"):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with stream.active("cpu"):
        second = torch.rand(4)
    replay = RandomStream(derive_seed(3, "x"))
    with replay.active("cpu"):
        assert torch.equal(torch.rand(4), first)
    restored = RandomStream(0)
    restored.load_state_dict(replay.state_dict())
    with restored.active("cpu"):
        assert torch.equal(torch.rand(4), second)
    assert derive_seed(3, "x") != derive_seed(3, "y") and derive_seed(3, "x") != derive_seed(4, "x")


def test_bad_random_streams_give_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"Invalid random_streams=\{'a': ''\}.*valid choices"):
        MultiBranchModule(make_backbone(), {"a": head(0.0)}, random_streams={"a": ""})
    with pytest.raises(KeyError, match="random_streams names unknown branch"):
        MultiBranchModule(make_backbone(), {"a": head(0.0)}, random_streams={"zz": "a"})
