"""core.probe over nested inputs and outputs: what is captured, recorded and compared, and the messages."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple
from typing import Any

import pytest
import torch
from torch import nn

from lightning_freeze.core.probe import OutputProbe, capture_probe_input

Pair = namedtuple("Pair", "a b")


class Nested(nn.Module):
    """Returns a nested output of tensors and plain values; ``mode`` switches what it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.mode = "same"

    def forward(self, x: torch.Tensor, extra: dict[str, Any], scale: float = 1.0) -> Any:
        y = self.linear(x) * scale + extra["shift"]
        if self.mode == "tensor":
            return y
        if self.mode == "shape":
            return (y[:, :1], {"count": extra["count"], "pair": Pair(y, "tag")})
        if self.mode == "dtype":
            return (y.double(), {"count": extra["count"], "pair": Pair(y, "tag")})
        if self.mode == "value":
            return (y, {"count": extra["count"] + 1, "pair": Pair(y, "tag")})
        if self.mode == "deep":
            return (y, {"count": extra["count"], "pair": Pair(y + 1, "tag")})
        if self.mode == "raise":
            raise RuntimeError("no")
        return (y, {"count": extra["count"], "pair": Pair(y, "tag")})


def _captured(module: nn.Module) -> dict[str, Any]:
    store: dict[str, Any] = {}
    handle = capture_probe_input(module, store)
    x = torch.arange(15.0).reshape(5, 3)
    extra = {"shift": torch.ones(5, 1), "count": 3, "table": torch.zeros(4)}
    module(x, extra, scale=torch.tensor(2.0))
    assert not handle.hooks_dict_ref()  # one-shot: the hook removed itself
    return store


def test_capture_cuts_batch_tensors_to_two_samples_and_keeps_everything_else() -> None:
    module = Nested()
    store = _captured(module)
    (x, extra), kwargs = store["args"], store["kwargs"]
    assert torch.equal(x, torch.arange(6.0).reshape(2, 3))
    assert list(extra) == ["shift", "count", "table"] and extra["count"] == 3
    assert torch.equal(extra["shift"], torch.ones(2, 1))
    assert torch.equal(extra["table"], torch.zeros(4))  # first dimension is not the batch: kept whole
    assert torch.equal(kwargs["scale"], torch.tensor(2.0))
    full, _ = store["full_args"]
    assert torch.equal(full, torch.arange(15.0).reshape(5, 3))  # the whole input, in case cutting fails
    assert full.data_ptr() != 0 and not full.requires_grad


def test_record_keeps_cpu_copies_and_state_dict_round_trips() -> None:
    module = Nested()
    store = _captured(module)
    probe = OutputProbe.record(module, store["args"], store["kwargs"])
    y, rest = probe.output
    assert rest["count"] == 3 and isinstance(rest["pair"], Pair) and rest["pair"].b == "tag"
    assert torch.equal(rest["pair"].a, y)
    again = OutputProbe.from_state_dict(probe.state_dict())
    assert again.check(module, "m") is None
    assert probe.check(module, "m") is None


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("tensor", "output structure on the probe input changed (tuple[2] -> Tensor)"),
        (
            "shape",
            "output[0] on the probe input changed shape/dtype ((2, 2) torch.float32 -> (2, 1) torch.float32)",
        ),
        (
            "dtype",
            "output[0] on the probe input changed shape/dtype ((2, 2) torch.float32 -> (2, 2) torch.float64)",
        ),
        ("value", "output[1]['count'] on the probe input changed (3 -> 4)"),
        ("deep", "output on the probe input changed (max abs diff 1 at output[1]['pair'][0])"),
        ("raise", "raised on the probe input (RuntimeError: no)"),
    ],
)
def test_every_kind_of_change_is_named_where_it_is(mode: str, reason: str) -> None:
    module = Nested()
    store = _captured(module)
    probe = OutputProbe.record(module, store["args"], store["kwargs"])
    module.mode = mode
    mismatch = probe.check(module, "m")
    assert mismatch is not None and str(mismatch) == f"m: {reason}"
    assert mismatch.max_abs_diff == (1.0 if mode == "deep" else float("inf"))


def test_a_changed_tensor_output_names_no_path_and_mapping_types_are_kept() -> None:
    module = nn.Linear(3, 2)
    probe = OutputProbe.record(module, (torch.ones(2, 3),))
    with torch.no_grad():
        module.bias[0] += 0.5
    mismatch = probe.check(module, "lin")
    assert str(mismatch) == "lin: output on the probe input changed (max abs diff 0.5)"
    ordered = OutputProbe.record(nn.Identity(), (OrderedDict(a=torch.ones(1)),))
    assert type(ordered.output) is OrderedDict and type(ordered.args[0]) is OrderedDict


@dataclasses.dataclass
class Out:
    y: torch.Tensor
    note: str = "n"


class DataclassOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> Out:
        return Out(self.linear(x))


def test_a_dataclass_output_is_kept_as_a_cpu_copy_and_compared_field_by_field() -> None:
    """Walked like flatten's dataclasses (before: one opaque leaf whose comparison raised)."""
    module = DataclassOut()
    x = torch.ones(2, 3)
    probe = OutputProbe.record(module, (x,))
    assert isinstance(probe.output, Out) and probe.output.note == "n"
    assert torch.equal(probe.output.y, module(x).y.detach())
    assert probe.check(module, "m") is None
    recorded = probe.output.y.clone()
    with torch.no_grad():
        module.linear.bias[1] -= 0.25
    assert torch.equal(probe.output.y, recorded)  # a copy, not the module's output: it did not move
    mismatch = probe.check(module, "m")
    assert str(mismatch) == "m: output on the probe input changed (max abs diff 0.25 at output.y)"
