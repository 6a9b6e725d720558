"""Configs read from checkpoints may only instantiate allowed targets (lightning_freeze.instantiate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from helpers.multibranch import IN_FEATURES, WIDTH, fixed_batch

from lightning_freeze import MultiBranchModule
from lightning_freeze.instantiate import (
    ALLOWED_TARGETS_ENV,
    TargetNotAllowedError,
    allow_targets,
    check_targets,
    instantiate,
)
from lightning_freeze.train import load_model

LINEAR = "torch.nn.Linear"


def _configs() -> dict[str, Any]:
    return {
        "backbone": {"_target_": LINEAR, "in_features": IN_FEATURES, "out_features": WIDTH},
        "branches": {"a": {"_target_": LINEAR, "in_features": WIDTH, "out_features": 3}},
    }


def _checkpoint(path: Path, hparams: dict[str, Any], model: MultiBranchModule | None = None) -> Path:
    """A Lightning checkpoint of plain containers only: ``torch.load(weights_only=True)`` accepts it."""
    model = model or MultiBranchModule(**_configs())
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": {**dict(model.hparams), **hparams},
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    torch.load(path, weights_only=True)
    return path


@pytest.mark.parametrize("how", ["load_model", "load_from_checkpoint"])
def test_a_checkpoint_cannot_make_loading_open_a_file(tmp_path: Path, how: str) -> None:
    created = tmp_path / "created_by_the_checkpoint.txt"
    evil = {"_target_": "builtins.open", "file": str(created), "mode": "w"}
    path = _checkpoint(tmp_path / "evil.ckpt", {"backbone": evil})
    with pytest.raises(TargetNotAllowedError) as info:
        if how == "load_model":
            load_model(path)
        else:
            MultiBranchModule.load_from_checkpoint(path)
    assert not created.exists()
    message = str(info.value)
    assert message.startswith(
        "Refused to instantiate backbone with _target_='builtins.open': it is not under an allowed prefix."
    )
    assert "allow_targets('builtins')" in message and f"{ALLOWED_TARGETS_ENV}=builtins" in message


def test_nested_targets_and_paths_leaving_the_allowed_packages_are_refused(tmp_path: Path) -> None:
    created = tmp_path / "saved.pt"
    nested = {
        "_target_": "torch.nn.Sequential",
        "_args_": [{"_target_": "torch.nn.modules.module.torch.save", "obj": 1, "f": str(created)}],
    }
    with pytest.raises(TargetNotAllowedError, match=r"defined in module 'torch.serialization'"):
        instantiate(nested, "backbone")
    with pytest.raises(TargetNotAllowedError, match=r"its path goes through module 'warnings'"):
        check_targets({"_target_": "torch.nn.modules.module.warnings.warn"})
    with pytest.raises(TargetNotAllowedError, match=r"no dunders"):
        check_targets({"_target_": "torch.nn.Module.__init__"})
    assert not created.exists()


def test_allow_list_is_extended_by_argument_context_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = {"_target_": "helpers.multibranch.make_backbone"}  # a package of the user's own
    with pytest.raises(TargetNotAllowedError, match=r"_target_='helpers\.multibranch\.make_backbone'"):
        MultiBranchModule(**{**_configs(), "backbone": own})
    with allow_targets(["helpers"]):
        path = _checkpoint(tmp_path / "own.ckpt", {}, MultiBranchModule(**{**_configs(), "backbone": own}))
    with pytest.raises(TargetNotAllowedError, match=r"_target_='helpers\.multibranch\.make_backbone'"):
        load_model(path)
    model = load_model(path, allow_targets=["helpers"])
    x = fixed_batch()
    state = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with allow_targets("helpers"):
        assert torch.equal(MultiBranchModule.load_from_checkpoint(path).eval()(x), model(x))
    monkeypatch.setenv(ALLOWED_TARGETS_ENV, "helpers")
    assert torch.equal(load_model(path)(x), model(x))


def test_shipped_model_configs_are_allowed_by_default() -> None:
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parent.parent / "lightning_freeze" / "conf"
    nodes = [OmegaConf.load(p) for p in sorted((conf / "model").glob("*.yaml"))]
    nodes += [OmegaConf.load(p).head for p in sorted((conf / "branch").glob("*.yaml"))]
    nodes += [OmegaConf.load(p) for p in sorted((conf / "data").glob("*.yaml"))]
    for node in nodes:
        container = OmegaConf.to_container(node, resolve=False)
        check_targets({k: v for k, v in container.items() if k != "defaults"})
