"""core.verifier.FrozenVerifier in plain PyTorch loops: no Trainer, no Lightning."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_freeze import _compat
from lightning_freeze.core import FrozenStateError, FrozenVerifier, freeze
from lightning_freeze.core.fingerprint import fingerprint

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import verifier_ranks
from helpers.ddp import spawn_gloo_ranks

FROZEN = ["0", "1"]  # a Linear and a BatchNorm1d in front of a trainable head
BN_CAUSE = (
    "a buffer of a norm layer (BatchNorm1d) that ran in train mode (norm='eval', or a layer "
    "replaced/created after freezing and not pinned)"
)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _frozen_keys(net: nn.Module) -> list[str]:
    return [k for k in net.state_dict() if k.startswith(("0.", "1."))]


def _train(net: nn.Module, verifier: FrozenVerifier, steps: int = 3) -> None:
    """A plain training loop: SGD on the trainable parameters, probes recorded after each step."""
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    net.train()
    for _ in range(steps):
        loss = net(torch.randn(8, 3)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        verifier.record_probes(net)


def _started(verify: str = "raise", **kwargs: Any) -> tuple[nn.Sequential, FrozenVerifier]:
    """A net with 0 and 1 frozen (core.freeze: BatchNorm pinned), the reference and probe capture set."""
    net = _net()
    freeze(net, FROZEN)
    verifier = FrozenVerifier(verify, **kwargs)  # type: ignore[arg-type]
    verifier.record(net, _frozen_keys(net))
    verifier.capture(net, FROZEN)
    return net, verifier


def test_a_plain_loop_keeps_frozen_tensors_bitwise_and_the_verifier_proves_it() -> None:
    net, verifier = _started()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert verifier.capturing
    _train(net, verifier)
    assert not verifier.capturing and list(verifier.probes) == FROZEN
    diff = verifier.check(net)
    assert diff is verifier.last_check
    assert diff is not None and diff.summary() == "checked 7 frozen tensors: 0 changed"
    assert (
        verifier.last_probe_check == [] and verifier.probes_skipped == [] and verifier.last_rank_check == {}
    )
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in _frozen_keys(net))
    assert not torch.equal(before["3.weight"], after["3.weight"])  # the head did train
    # the probe of the Linear is its output on the first two samples of its first input
    probe = verifier.probes["0"]
    assert probe.args[0].shape == (2, 3)
    assert torch.equal(probe.output, net[0](probe.args[0]))


def test_control_a_norm_layer_left_in_train_mode_is_named_with_its_cause() -> None:
    """requires_grad=False alone (no pin): BatchNorm's running statistics move, the verifier says so."""
    net = _net()
    net[:2].requires_grad_(False)
    verifier = FrozenVerifier()
    verifier.record(net, _frozen_keys(net))
    _train(net, verifier)
    with pytest.raises(FrozenStateError) as info:
        verifier.check(net)
    keys = ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert info.value.changed == keys
    assert info.value.causes == dict.fromkeys(keys, BN_CAUSE)
    assert str(info.value) == (
        "FrozenVerifier: 3 frozen tensor(s)/module(s) changed since the reference was recorded "
        "(checked 7 frozen tensors: 3 changed; 0 of 0 probe output(s) changed):\n"
        + "\n".join(f"  - {key}: {BN_CAUSE}" for key in keys)
    )


def test_a_replaced_forward_is_caught_by_the_probe_even_when_no_tensor_changed() -> None:
    net, verifier = _started(owner="MyLoop", since="epoch 0")
    _train(net, verifier)
    assert verifier.check(net, probe="if_changed") is not None
    assert verifier.probes_skipped == FROZEN  # nothing changed: no forward run
    linear = net[0]
    linear.forward = lambda x: nn.functional.linear(x, linear.weight * 2, linear.bias)  # type: ignore[method-assign]
    with pytest.raises(FrozenStateError) as info:
        verifier.check(net, probe="if_changed")  # the function token changed: the probe runs
    assert verifier.probes_skipped == ["1"]
    assert info.value.changed == ["0"]
    reason = info.value.causes["0"]
    assert reason.startswith("output on the probe input changed (max abs diff ")
    assert str(info.value) == (
        "MyLoop: 1 frozen tensor(s)/module(s) changed since epoch 0 "
        f"(checked 7 frozen tensors: 0 changed; 1 of 2 probe output(s) changed):\n  - 0: {reason}"
    )
    assert [str(m) for m in verifier.last_probe_check] == [f"0: {reason}"]


def test_only_the_probes_of_the_modules_asked_for_run() -> None:
    net, verifier = _started()
    _train(net, verifier)
    net[0].forward = lambda x: x[:, :4] * 0  # type: ignore[method-assign]
    diff = verifier.check(net, modules=["1"])
    assert diff is not None and diff.changed == [] and verifier.last_probe_check == []
    with pytest.raises(FrozenStateError, match=r"  - 0: output on the probe input changed"):
        verifier.check(net)


def test_warn_reports_the_same_message_and_returns_the_diff() -> None:
    net, raising = _started()
    messages: list[str] = []
    warning = FrozenVerifier("warn", warn=messages.append)
    warning.record(net, _frozen_keys(net))
    with torch.no_grad():
        net[0].bias[1] += 1
    with pytest.raises(FrozenStateError) as info:
        raising.check(net)
    diff = warning.check(net)
    assert diff is not None and diff.changed == ["0.bias"]
    assert messages == [str(info.value)]
    assert "  - 0.bias: changed by code outside FreezeBackbone" in messages[0]
    default = FrozenVerifier("warn")
    default.record(net, ["0.weight"])
    with torch.no_grad():
        net[0].weight[0, 0] += 1
    with pytest.warns(UserWarning, match=r"^FrozenVerifier: 1 frozen tensor\(s\)/module\(s\) changed"):
        default.check(net)


def test_an_optimizer_holding_a_frozen_parameter_is_named_as_the_likely_cause() -> None:
    net, verifier = _started()
    held = list(net.parameters())  # an optimizer built over every parameter, frozen ones included
    with torch.no_grad():
        net[0].weight.mul_(0.9)  # what its weight decay does to a frozen weight
    with pytest.raises(FrozenStateError) as info:
        verifier.check(net, optimizer_params=held)
    assert info.value.causes["0.weight"] == (
        "a parameter the optimizer held (weight decay/momentum can move it even without a gradient)"
    )


def test_off_records_and_checks_nothing() -> None:
    net = _net()
    verifier = FrozenVerifier("off")
    verifier.record(net, _frozen_keys(net))
    verifier.capture(net, FROZEN)
    assert verifier.reference is None and not verifier.capturing
    assert _compat.module_forward_hooks(net[0]) == ([], [])
    with torch.no_grad():
        net[0].bias += 1
    assert verifier.check(net) is None and verifier.last_check is None


def test_state_dict_round_trips_through_a_weights_only_checkpoint() -> None:
    net, verifier = _started()
    _train(net, verifier)
    buffer = io.BytesIO()
    torch.save(verifier.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = FrozenVerifier()
    assert resumed.load_state_dict(state) is True
    assert resumed.reference == verifier.reference
    assert list(resumed.probes) == FROZEN
    for name in FROZEN:
        assert torch.equal(resumed.probes[name].output, verifier.probes[name].output)
        assert torch.equal(resumed.probes[name].args[0], verifier.probes[name].args[0])
    assert resumed.check(net).summary() == "checked 7 frozen tensors: 0 changed"  # type: ignore[union-attr]
    net[1].forward = lambda x: x  # type: ignore[method-assign]
    with pytest.raises(FrozenStateError, match=r"  - 1: output on the probe input changed"):
        resumed.check(net)


def test_a_freeze_backbone_checkpoint_entry_of_any_version_loads() -> None:
    """The callback's entry (extra keys; BLAKE2b-128 digests of version 0.1) gives reference and probes."""
    net, verifier = _started()
    _train(net, verifier)
    old = {
        "modules": FROZEN,
        "norm": "eval",
        "unfreeze_at_epoch": None,
        "unfrozen": False,
        "fingerprints": {
            k: [fp.digest, fp.dtype, list(fp.shape)]
            for k, fp in fingerprint(net, _frozen_keys(net), algorithm="blake2b-128").items()
        },
        "probes": verifier.state_dict()["probes"],
    }
    resumed = FrozenVerifier()
    assert resumed.load_state_dict(old, modules=["1"]) is True
    assert list(resumed.probes) == ["1"]  # only the modules still frozen
    assert resumed.check(net).summary() == "checked 7 frozen tensors: 0 changed"  # type: ignore[union-attr]
    with torch.no_grad():
        net[1].running_var[0] = -0.0 if float(net[1].running_var[0]) == 0.0 else 0.0
    with pytest.raises(FrozenStateError, match=r"^FrozenVerifier: 2 frozen") as info:
        resumed.check(net)
    assert info.value.changed == ["1.running_var", "1"]  # the tensor, and the probe output it moves
    fresh = FrozenVerifier()
    assert fresh.load_state_dict({"probes": old["probes"]}) is False
    assert fresh.reference is None and list(fresh.probes) == FROZEN


def test_release_stops_verifying_unfrozen_modules_but_keeps_what_stays_pinned() -> None:
    net, verifier = _started()
    _train(net, verifier)
    verifier.release(["1"], keep=["1.running_mean", "1.running_var"])
    assert list(verifier.reference or {}) == ["0.weight", "0.bias", "1.running_mean", "1.running_var"]
    assert list(verifier.probes) == ["0"]
    with torch.no_grad():
        net[1].weight += 1  # unfrozen: no longer verified
    assert verifier.check(net).summary() == "checked 4 frozen tensors: 0 changed"  # type: ignore[union-attr]
    with torch.no_grad():
        net[1].running_var += 1  # kept: still verified
    with pytest.raises(FrozenStateError) as info:
        verifier.check(net)
    assert info.value.changed == ["1.running_var"]


def test_release_and_stop_capture_remove_pending_capture_hooks() -> None:
    net = _net()
    verifier = FrozenVerifier()
    verifier.capture(net, FROZEN)
    assert len(_compat.module_forward_hooks(net[0])[0]) == 1
    verifier.release(["0"])
    assert _compat.module_forward_hooks(net[0]) == ([], [])
    assert verifier.capturing  # "1" still awaits its input
    verifier.stop_capture()
    assert _compat.module_forward_hooks(net[1]) == ([], []) and not verifier.capturing
    net(torch.randn(4, 3))
    assert verifier.record_probes(net) == [] and verifier.probes == {}


def test_reset_forgets_everything() -> None:
    net, verifier = _started()
    _train(net, verifier)
    verifier.check(net)
    verifier.capture(net, ["3"])
    verifier.reset()
    assert verifier.reference is None and verifier.probes == {} and verifier.last_check is None
    assert not verifier.capturing and _compat.module_forward_hooks(net[3]) == ([], [])
    assert verifier.check(net) is None


def test_bad_arguments_name_the_value_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"^Invalid verify='loud'; valid choices: 'raise', 'warn', 'off'\.$"):
        FrozenVerifier("loud")  # type: ignore[arg-type]
    net, verifier = _started()
    with pytest.raises(
        ValueError, match=r"^Invalid probe='sometimes'; valid choices: 'always', 'if_changed'\.$"
    ):
        verifier.check(net, probe="sometimes")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match=r"No tensor named '9\.weight' to fingerprint"):
        verifier.record(net, ["9.weight"])


def test_the_core_verifier_imports_no_lightning() -> None:
    code = (
        "import sys; import lightning_freeze.core.verifier; "
        "print(sorted(m for m in ('lightning', 'pytorch_lightning') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.distributed
def test_two_gloo_ranks_raise_the_same_error_naming_the_rank_that_differs(tmp_path: Path) -> None:
    assert spawn_gloo_ranks(verifier_ranks.main, tmp_path) == [0, 0]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0]["clean"] == results[1]["clean"] == "checked 2 frozen tensors: 0 changed"
    assert results[0]["rank_check"] == results[1]["rank_check"] == {"1": ["0.weight"]}
    message = results[0]["error"]
    assert message == results[1]["error"]  # every rank raises, with the same text
    assert results[0]["changed"] == results[1]["changed"] == ["0.weight"]
    assert message == (
        "FrozenVerifier: 1 frozen tensor(s)/module(s) changed since the reference was recorded "
        "(checked 2 frozen tensors: 0 changed; 0 of 0 probe output(s) changed; 1 rank(s) differ):\n"
        "  - the ranks disagree (frozen tensors must be identical on every rank):\n"
        "    rank 1 differs on 1 tensor(s): '0.weight'"
    )
