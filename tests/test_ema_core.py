"""TrainableEMA (pure PyTorch): exactness for frozen/idle tensors, reference values, warm-up, swap, state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_freeze.core import TrainableEMA, effective_decay, freeze, trainable_tensors, unfreeze


class Net(nn.Module):
    """Conv + BatchNorm backbone, a head with a BatchNorm1d, and a trainable tensor no loss uses."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.idle = nn.Parameter(torch.randn(4, 5))  # trainable, never gets a gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    return x, (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0].mean(dim=(1, 2)) > 0.2).long()


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x, y = batch(seed % 8)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def frozen_backbone_net() -> tuple[Net, torch.optim.Optimizer]:
    model = Net()
    freeze(model, "backbone")  # requires_grad=False + BatchNorm pinned to eval
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    return model, opt


def reference_decay(decay: float, t: int, warmup: bool) -> float:
    """The documented schedule, written out independently of the library."""
    if t == 0:
        return 0.0
    return min(decay, 1.0 - (1.0 + t) ** -0.75) if warmup else decay


# ----------------------------------------------------------------------------------------------
# bitwise exactness (and the control that shows the check can fail)
# ----------------------------------------------------------------------------------------------
UPDATES = 1200
DECAY = 0.9999


@pytest.fixture(scope="module")
def long_run() -> dict[str, object]:
    """1200 SGD steps on a frozen-backbone net with TrainableEMA, a naive full-model EMA and a lerp one."""
    torch.manual_seed(0)
    model, opt = frozen_backbone_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen_keys = [k for k in before if k.startswith("backbone.")]
    versions = {k: v._version for k, v in model.state_dict(keep_vars=True).items() if k in frozen_keys}
    ema = TrainableEMA(model, decay=DECAY)
    # what deep-copying EMAs do: every float tensor of the model, frozen ones included
    naive = {k: v.clone() for k, v in before.items() if v.is_floating_point()}
    lerped = {k: v.clone() for k, v in naive.items()}
    x_val, _ = batch(99)
    for step in range(UPDATES):
        sgd_step(model, opt, step)
        ema.update(model)
        current = model.state_dict()
        with torch.no_grad():
            for key, e in naive.items():
                e.copy_(DECAY * e + (1 - DECAY) * current[key])
            torch._foreach_lerp_(list(lerped.values()), [current[k] for k in lerped], 1 - DECAY)
        if step % 200 == 0:
            with ema.swapped_into(model):
                model.eval()
                model(x_val)
                model.train()
    return dict(
        model=model,
        ema=ema,
        before=before,
        frozen_keys=frozen_keys,
        versions=versions,
        naive=naive,
        lerped=lerped,
    )


def test_frozen_tensors_bitwise_identical_after_1200_updates_at_decay_0_9999(long_run) -> None:
    model, ema, before = long_run["model"], long_run["ema"], long_run["before"]
    frozen_keys = long_run["frozen_keys"]
    after = model.state_dict(keep_vars=True)
    assert len(frozen_keys) == 14  # 2 convs (w, b) + 2 BatchNorms (w, b, mean, var, count)
    assert [k for k in frozen_keys if not torch.equal(after[k], before[k])] == []
    # never written: not even a same-value write (swaps and updates leave the version counter alone)
    assert {k: after[k]._version for k in frozen_keys} == long_run["versions"]
    assert not any(k.startswith("backbone.") for k in ema.shadow)
    # the averaged model carries the frozen tensors exactly
    averaged = ema.ema_state_dict(model)
    assert all(torch.equal(averaged[k], before[k]) for k in frozen_keys)
    # a trainable tensor that never moves keeps a bitwise-equal shadow (lerp is exact when e == m)
    assert torch.equal(ema.shadow["idle"], model.idle.detach())
    # ... while the head really trained and the EMA really averaged
    assert not torch.equal(after["head.0.weight"], before["head.0.weight"])
    assert not torch.equal(ema.shadow["head.0.weight"], after["head.0.weight"])
    assert ema.num_updates == UPDATES


def test_control_naive_formula_changes_frozen_weights(long_run) -> None:
    """The same check on ``decay*e + (1-decay)*m`` fails: the test above is able to fail."""
    before, naive, lerped = long_run["before"], long_run["naive"], long_run["lerped"]
    float_frozen = [k for k in long_run["frozen_keys"] if before[k].is_floating_point()]
    drifted = [k for k in float_frozen if not torch.equal(naive[k], before[k])]
    assert drifted, "the naive formula kept every frozen tensor: the control no longer shows the trap"
    assert [k for k in float_frozen if not torch.equal(lerped[k], before[k])] == []


# ----------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup", [True, False])
def test_ema_matches_float64_reference_recurrence_with_fp32_shadow_for_bf16(warmup: bool) -> None:
    model = nn.ModuleDict({"a": nn.Linear(16, 8), "b": nn.Linear(8, 4).to(torch.bfloat16)})
    decay = 0.99
    ema = TrainableEMA(model, decay=decay, warmup=warmup)
    assert ema.shadow["b.weight"].dtype == torch.float32
    reference = {k: v.detach().double() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for t in range(150):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
        d = ema.update(model)
        expected_d = reference_decay(decay, t, warmup)
        assert d == pytest.approx(expected_d, abs=1e-12)
        for key, p in model.state_dict().items():
            reference[key] = expected_d * reference[key] + (1 - expected_d) * p.double()
    for key, ref in reference.items():
        torch.testing.assert_close(ema.shadow[key].double(), ref, atol=2e-6, rtol=2e-6)


def test_effective_decay_schedule_values() -> None:
    assert effective_decay(0.9999, 0) == 0.0
    assert effective_decay(0.9999, 1) == pytest.approx(1 - 2**-0.75)
    assert effective_decay(0.9999, 10) == pytest.approx(1 - 11**-0.75)
    assert effective_decay(0.999, 10**6) == 0.999
    assert effective_decay(0.9999, 5, warmup=False) == 0.9999
    decays = [effective_decay(0.9999, t) for t in range(1, 2000)]
    assert decays == sorted(decays)


@pytest.mark.parametrize(("warmup", "low", "high"), [(True, 0.5, 1.0), (False, 0.0, 0.1)])
def test_warmup_makes_fresh_head_ema_move_within_10_updates(warmup: bool, low: float, high: float) -> None:
    model, opt = frozen_backbone_net()
    w0 = model.head[0].weight.detach().clone()
    ema = TrainableEMA(model, decay=0.9999, warmup=warmup)
    for step in range(11):  # the first update copies; 10 more
        sgd_step(model, opt, step)
        ema.update(model)
    moved = (ema.shadow["head.0.weight"] - w0).norm() / (model.head[0].weight.detach() - w0).norm()
    assert low <= moved.item() <= high


# ----------------------------------------------------------------------------------------------
# swap, copy, state
# ----------------------------------------------------------------------------------------------
def trained(steps: int = 25) -> tuple[Net, torch.optim.Optimizer, TrainableEMA]:
    model, opt = frozen_backbone_net()
    ema = TrainableEMA(model, decay=0.9)
    for step in range(steps):
        sgd_step(model, opt, step)
        ema.update(model)
    return model, opt, ema


def test_swapped_into_runs_on_ema_weights_and_restores_raw_bitwise() -> None:
    model, _, ema = trained()
    model.eval()
    x, _ = batch(5)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    frozen_versions = {k: v._version for k, v in model.state_dict(keep_vars=True).items() if "backbone" in k}
    reference = copy.deepcopy(model)
    reference.load_state_dict(ema.ema_state_dict(model))
    with torch.no_grad():
        expected, raw_out = reference(x), model(x)
        with ema.swapped_into(model):
            assert ema.swapped
            inside = model(x)
    assert torch.equal(inside, expected) and not torch.equal(inside, raw_out)
    after = model.state_dict(keep_vars=True)
    assert [k for k, v in raw.items() if not torch.equal(after[k], v)] == []
    assert {k: after[k]._version for k in frozen_versions} == frozen_versions  # only trainables swapped
    with pytest.raises(ZeroDivisionError), ema.swapped_into(model):
        1 / 0  # noqa: B018
    assert all(torch.equal(model.state_dict()[k], v) for k, v in raw.items()) and not ema.swapped


def test_copy_to_writes_ema_into_trainable_tensors_only() -> None:
    model, _, ema = trained()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}
    written = ema.copy_to(model)
    assert set(written) == set(ema.shadow) and not any(k.startswith("backbone.") for k in written)
    assert torch.equal(model.head[3].weight, ema.shadow["head.3.weight"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())


def test_shadow_holds_trainable_tensors_and_trainable_module_buffers_only() -> None:
    model, _ = frozen_backbone_net()
    params = [p for p in model.parameters() if p.requires_grad]
    head_bn = model.head[1]
    bn_buffers = [head_bn.running_mean, head_bn.running_var, head_bn.num_batches_tracked]
    copied = TrainableEMA(model, buffers="copy")
    assert copied.nbytes == sum(p.numel() * 4 for p in params) + sum(
        b.numel() * b.element_size() for b in bn_buffers
    )
    assert set(copied.shadow) == {n for n, p in model.named_parameters() if p.requires_grad} | {
        "head.1.running_mean",
        "head.1.running_var",
        "head.1.num_batches_tracked",
    }
    assert TrainableEMA(model, buffers="ignore").nbytes == sum(p.numel() * 4 for p in params)
    # bf16 parameters get an fp32 shadow: twice the parameter bytes
    half = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).to(torch.bfloat16)
    half[0].requires_grad_(False)
    ema = TrainableEMA(half)
    assert ema.nbytes == 2 * sum(p.numel() * p.element_size() for p in half[1].parameters())


def test_trainable_tensors_skips_buffers_of_modules_without_trainable_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False), nn.BatchNorm1d(4))
    model[2].requires_grad_(False)
    keys = set(trainable_tensors(model, "copy"))
    assert keys == {"0.weight", "0.bias"}


def test_sync_adds_new_trainables_from_current_value_and_drops_frozen_ones() -> None:
    model, opt, ema = trained(steps=20)
    unfreeze(model, "backbone")
    freeze(model, "head")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    added, removed = ema.sync(model)
    assert set(added) == {k for k in model.state_dict() if k.startswith("backbone.")}
    assert set(removed) == {k for k in model.state_dict() if k.startswith("head.")}
    conv = model.backbone[0].weight
    assert torch.equal(ema.shadow["backbone.0.weight"], conv.detach())
    # the newcomers warm up on their own: their first update copies, then d(1), d(2), ...
    reference = conv.detach().double().clone()
    for t in range(5):
        sgd_step(model, opt, t)
        ema.update(model)
        d = reference_decay(0.9, t, True)
        reference = d * reference + (1 - d) * conv.detach().double()
    torch.testing.assert_close(ema.shadow["backbone.0.weight"].double(), reference, atol=1e-6, rtol=1e-6)
    assert ema.last_decay == pytest.approx(0.9)  # the longest-shadowed tensors: the idle parameter


def test_state_dict_round_trip_continues_bitwise_identically() -> None:
    model, opt, ema = trained(steps=15)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    model2, opt2 = frozen_backbone_net()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    ema2 = TrainableEMA.from_state_dict(model2, saved["ema"])
    assert ema2.num_updates == 15
    for step in range(15, 30):
        sgd_step(model, opt, step)
        ema.update(model)
        sgd_step(model2, opt2, step)
        ema2.update(model2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))
    assert ema.shadow.keys() == ema2.shadow.keys()
    assert all(torch.equal(ema.shadow[k], ema2.shadow[k]) for k in ema.shadow)


def test_buffers_average_and_copy() -> None:
    model, opt = frozen_backbone_net()
    averaged, copied = TrainableEMA(model, decay=0.8, buffers="average"), TrainableEMA(model, buffers="copy")
    bn = model.head[1]
    reference = bn.running_mean.double().clone()
    for t in range(12):
        sgd_step(model, opt, t)
        averaged.update(model)
        copied.update(model)
        d = reference_decay(0.8, t, True)
        reference = d * reference + (1 - d) * bn.running_mean.double()
    torch.testing.assert_close(
        averaged.shadow["head.1.running_mean"].double(), reference, atol=1e-6, rtol=1e-6
    )
    assert torch.equal(averaged.shadow["head.1.num_batches_tracked"], bn.num_batches_tracked)  # copied
    assert torch.equal(copied.shadow["head.1.running_var"], bn.running_var)


def test_plain_fallback_gives_the_same_bits_as_foreach(monkeypatch: pytest.MonkeyPatch) -> None:
    fused = trained(steps=12)[2]
    torch.manual_seed(0)
    monkeypatch.delattr(torch, "_foreach_lerp_")
    monkeypatch.delattr(torch, "_foreach_copy_")
    plain = trained(steps=12)[2]
    assert all(torch.equal(fused.shadow[k], plain.shadow[k]) for k in fused.shadow)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1, True, "0.9", float("nan")])
def test_bad_decay_is_a_value_error_naming_it(decay: object) -> None:
    with pytest.raises(ValueError, match=r"Invalid decay=.*valid choices: a number strictly between 0 and 1"):
        TrainableEMA(nn.Linear(2, 2), decay=decay)  # type: ignore[arg-type]


def test_bad_buffers_and_nothing_trainable() -> None:
    with pytest.raises(
        ValueError, match=r"Invalid buffers='avg'; valid choices: 'copy', 'average', 'ignore'"
    ):
        TrainableEMA(nn.Linear(2, 2), buffers="avg")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"Nothing to average: Linear has 0 trainable of 2 parameters"):
        TrainableEMA(frozen)


def test_load_state_dict_refuses_unknown_keys_and_shapes() -> None:
    ema = TrainableEMA(nn.Linear(2, 2))
    state = ema.state_dict()
    with pytest.raises(KeyError, match=r"shadow for 'weight'.*does not have"):
        TrainableEMA(nn.Sequential(nn.Linear(2, 2))).load_state_dict(state)
    with pytest.raises(ValueError, match=r"'weight' has shape \(2, 2\), the model's tensor \(3, 2\)"):
        TrainableEMA(nn.Linear(2, 3)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"Not a TrainableEMA state"):
        ema.load_state_dict({"weight": torch.zeros(2, 2)})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_parameters_fp32_shadow_on_device() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)).cuda().to(torch.bfloat16)
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    ema = TrainableEMA(model, decay=0.99)
    assert ema.shadow["1.weight"].device.type == "cuda" and ema.shadow["1.weight"].dtype == torch.float32
    reference = model[1].weight.detach().double()
    for t in range(20):
        with torch.no_grad():
            model[1].weight.add_(0.01)
        ema.update(model)
        d = reference_decay(0.99, t, True)
        reference = d * reference + (1 - d) * model[1].weight.detach().double()
    torch.testing.assert_close(ema.shadow["1.weight"].double(), reference, atol=1e-5, rtol=1e-5)
    with ema.swapped_into(model):
        pass
    assert torch.equal(model[0].weight, frozen)
