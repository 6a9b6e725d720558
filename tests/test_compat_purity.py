"""The private torch names wrapped in lightning_freeze/_compat.py (section purity) keep their meaning."""

from __future__ import annotations

import torch
from torch import nn

from lightning_freeze._compat import global_forward_hooks, module_forward_hooks

VERSION = f"torch {torch.__version__}"


def _pre(module: nn.Module, args: object) -> None:
    return None


def _post(module: nn.Module, args: object, output: object) -> None:
    return None


def test_module_forward_hooks_lists_what_was_registered_in_order() -> None:
    layer = nn.Linear(2, 2)
    assert module_forward_hooks(layer) == ([], []), VERSION
    handles = [layer.register_forward_pre_hook(_pre), layer.register_forward_hook(_post)]
    second = layer.register_forward_pre_hook(print)
    assert module_forward_hooks(layer) == ([_pre, print], [_post]), (
        f"nn.Module._forward_pre_hooks/_forward_hooks changed meaning in {VERSION}"
    )
    for handle in (*handles, second):
        handle.remove()
    assert module_forward_hooks(layer) == ([], []), VERSION


def test_global_forward_hooks_lists_the_module_wide_hooks() -> None:
    before = global_forward_hooks()
    pre = nn.modules.module.register_module_forward_pre_hook(_pre)
    post = nn.modules.module.register_module_forward_hook(_post)
    try:
        now = global_forward_hooks()
        assert now == (before[0] + [_pre], before[1] + [_post]), (
            f"torch.nn.modules.module._global_forward_(pre_)hooks changed meaning in {VERSION}"
        )
    finally:
        pre.remove()
        post.remove()
    assert global_forward_hooks() == before, VERSION
