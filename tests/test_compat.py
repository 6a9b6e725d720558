"""lightning_freeze._compat: each wrapper of a private torch/Lightning name, against the installed one.

A failure here means the internal changed in the installed release: the message names it and the
version. Fix the wrapper in ``_compat.py`` (and its docstring's checked versions), nothing else.
"""

from __future__ import annotations

import copy
import pickle

import lightning
import pytest
import torch
from torch import nn

from lightning_freeze import _compat

TORCH = f"torch {torch.__version__}"
LIGHTNING = f"lightning {lightning.__version__}"


def _hook_a(module: nn.Module, args: object) -> None:
    return None


def _hook_b(module: nn.Module, args: object) -> None:
    return None


def test_pre_hooks_are_listed_in_order_on_copies_too_and_only_matching_ones_removed() -> None:
    layer = nn.Linear(2, 2)
    layer.register_forward_pre_hook(_hook_a)
    layer.register_forward_pre_hook(_hook_b)
    assert _compat.module_forward_hooks(layer)[0] == [_hook_a, _hook_b], (
        f"Module._forward_pre_hooks changed in {TORCH}"
    )

    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert _compat.module_forward_hooks(twin)[0] == [_hook_a, _hook_b], TORCH
        assert _compat.remove_forward_pre_hooks(twin, lambda hook: hook is _hook_a) == 1, TORCH
        assert _compat.module_forward_hooks(twin)[0] == [_hook_b], TORCH
    assert _compat.module_forward_hooks(layer)[0] == [_hook_a, _hook_b]  # the original keeps both

    calls: list[str] = []
    layer = nn.Linear(2, 2)
    layer.register_forward_pre_hook(lambda m, a, kw: calls.append("kw"), with_kwargs=True)
    assert _compat.remove_forward_pre_hooks(layer, lambda hook: True) == 1
    layer(torch.zeros(1, 2))  # a removed with_kwargs hook neither runs nor breaks the forward
    assert calls == [], f"hook removal changed in {TORCH}"
    assert _compat.module_forward_hooks(layer)[0] == [], f"hook removal changed in {TORCH}"


def test_module_forward_hooks_sees_a_registered_forward_hook() -> None:
    layer = nn.Linear(2, 2)
    assert not _compat.module_forward_hooks(layer)[1]
    handle = layer.register_forward_hook(lambda m, a, out: None)
    assert _compat.module_forward_hooks(layer)[1], f"Module._forward_hooks changed in {TORCH}"
    handle.remove()
    assert not _compat.module_forward_hooks(layer)[1], TORCH


def test_persistent_buffers_are_the_buffers_the_state_dict_saves() -> None:
    layer = nn.Module()
    layer.register_buffer("kept", torch.ones(1))
    layer.register_buffer("scratch", torch.zeros(1), persistent=False)
    layer.register_buffer("empty", None)
    layer.child = nn.BatchNorm1d(2)  # a child's buffers are not the module's own
    names = [name for name, _ in _compat.persistent_buffers(layer)]
    assert names == ["kept"], f"Module._buffers/_non_persistent_buffers_set changed in {TORCH}: {names}"
    assert [k for k in layer.state_dict() if "." not in k] == names  # what the state_dict saves


def test_foreach_lerp_and_copy_are_the_fused_kernels_and_match_the_plain_loop_bitwise() -> None:
    assert hasattr(torch, "_foreach_lerp_") and hasattr(torch, "_foreach_copy_"), (
        f"torch._foreach_lerp_/_foreach_copy_ are gone in {TORCH}: the EMA falls back to a lerp_ loop"
    )
    gen = torch.Generator().manual_seed(0)
    shadows = [torch.randn(5, generator=gen), torch.randn(3, 2, generator=gen, dtype=torch.float64)]
    sources = [torch.randn(5, generator=gen), torch.randn(3, 2, generator=gen, dtype=torch.float64)]
    fused = [s.clone() for s in shadows]
    _compat.foreach_lerp_(fused, sources, 0.3)
    for shadow, source, out in zip(shadows, sources, fused, strict=True):
        assert torch.equal(out, shadow.clone().lerp_(source, 0.3)), TORCH
    targets = [torch.empty_like(s) for s in sources]
    _compat.foreach_copy_(targets, sources)
    assert all(torch.equal(t, s) for t, s in zip(targets, sources, strict=True)), TORCH


@pytest.mark.parametrize(
    ("layer", "ranks"),
    [
        (nn.BatchNorm1d(3), [2, 3]),
        (nn.BatchNorm2d(3), [4]),
        (nn.BatchNorm3d(3), [5]),
        (nn.InstanceNorm1d(3, track_running_stats=True), [2, 3]),
        (nn.InstanceNorm2d(3, track_running_stats=True), [3, 4]),
        (nn.InstanceNorm3d(3, track_running_stats=True), [4, 5]),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, nn.Module) else None,
)
def test_norm_accepts_rank_is_the_layers_own_input_check(layer: nn.Module, ranks: list[int]) -> None:
    accepted = [rank for rank in range(9) if _compat.norm_accepts_rank(layer, rank)]
    assert accepted == ranks, f"{type(layer).__name__}._check_input_dim changed in {TORCH}: {accepted}"


@pytest.mark.parametrize(
    ("cls", "dim"), [(nn.InstanceNorm1d, 2), (nn.InstanceNorm2d, 3), (nn.InstanceNorm3d, 4)]
)
def test_instance_norm_no_batch_dim(cls: type[nn.Module], dim: int) -> None:
    got = _compat.instance_norm_no_batch_dim(cls(3, track_running_stats=True))
    assert got == dim, f"{cls.__name__}._get_no_batch_dim changed in {TORCH}: {got}"


def test_tensor_version_counts_in_place_writes_but_not_writes_through_data() -> None:
    layer = nn.Linear(2, 2)
    weight = layer.weight
    before = _compat.tensor_version(weight)
    with torch.no_grad():
        weight.add_(1.0)
    assert _compat.tensor_version(weight) > before, f"Tensor._version no longer counts add_ in {TORCH}"
    after_add = _compat.tensor_version(weight)
    weight.data.mul_(2.0)
    assert _compat.tensor_version(weight) == after_add, f"writes through .data now bump _version in {TORCH}"
    layer.load_state_dict({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)})
    assert _compat.tensor_version(weight) > after_add, f"load_state_dict no longer bumps _version in {TORCH}"


def test_is_subprocess_script_launcher_tells_ddp_from_ddp_spawn() -> None:
    trainer = lightning.Trainer
    ddp = trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    spawn = trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False
    )
    assert _compat.is_subprocess_script_launcher(ddp.strategy.launcher), (
        f"lightning.pytorch.strategies.launchers._SubprocessScriptLauncher changed in {LIGHTNING}"
    )
    assert not _compat.is_subprocess_script_launcher(spawn.strategy.launcher), LIGHTNING
    assert not _compat.is_subprocess_script_launcher(None)


def test_private_names_are_reached_only_through_compat() -> None:
    """Outside ``_compat.py`` the package reaches at most 5 ``obj._name`` (docs/development.md's count)."""
    import re
    from pathlib import Path

    package = Path(_compat.__file__).parent
    pattern = re.compile(r"(?<![\w.])(?!self\b|cls\b)[A-Za-z_]\w*(\.\w+)*\._(?!_)[A-Za-z]\w*")
    hits = [
        f"{path.relative_to(package.parent)}:{number}: {match.group(0)}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "_compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for match in pattern.finditer(line)
    ]
    assert len(hits) <= 5, "\n".join(hits)


def test_child_modules_are_the_children_in_order_without_none() -> None:
    block = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    block.register_module("absent", None)  # a registered None, as torchvision's downsample=None
    block.add_module("norm", nn.BatchNorm1d(2))
    assert _compat.child_modules(block) == list(block.children()), f"Module._modules changed in {TORCH}"
    assert len(_compat.child_modules(block)) == 3
