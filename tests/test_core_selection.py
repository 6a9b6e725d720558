"""resolve_modules: dotted names, fnmatch patterns, overlaps and error messages."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_freeze.core import ModuleSelectionError, resolve_modules


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleDict(
            {"layer1": nn.Linear(2, 2), "layer2": nn.Linear(2, 2), "layer3": nn.Linear(2, 2)}
        )
        self.head = nn.Linear(2, 2)


def test_dotted_name_and_pattern() -> None:
    net = Net()
    assert list(resolve_modules(net, "backbone.layer2")) == ["backbone.layer2"]
    assert list(resolve_modules(net, "backbone.layer[12]")) == ["backbone.layer1", "backbone.layer2"]
    assert resolve_modules(net, "head")["head"] is net.head


def test_overlaps_are_deduplicated_outermost_wins() -> None:
    net = Net()
    assert list(resolve_modules(net, ["backbone.layer1", "backbone", "backbone.*", "backbone"])) == [
        "backbone"
    ]


def test_unknown_name_names_it_the_closest_names_and_children() -> None:
    with pytest.raises(ModuleSelectionError) as err:
        resolve_modules(Net(), "backbone.layr1")
    message = str(err.value)
    assert "Net has no submodule 'backbone.layr1'" in message
    assert "closest valid names: 'backbone.layer1'" in message
    assert "top-level children: 'backbone', 'head'" in message
    assert isinstance(err.value, KeyError)


def test_pattern_matching_nothing_is_an_error() -> None:
    with pytest.raises(ModuleSelectionError, match=r"Pattern 'neck\.\*' matches no submodule of Net"):
        resolve_modules(Net(), "neck.*")


def test_empty_selection_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty selection"):
        resolve_modules(Net(), [])
