"""The one module that reaches private names of Lightning and torch: one small function per use.

Each function names what it wraps; ``tests/test_compat_*.py`` fail loudly, naming the installed
version, when an internal changes. ``lightning_freeze.core`` imports this module: keep Lightning
imports inside the functions that need them (core stays free of Lightning).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["global_forward_hooks", "module_forward_hooks"]


# --- purity ---
def module_forward_hooks(module: nn.Module) -> tuple[list[Callable[..., Any]], list[Callable[..., Any]]]:
    """``(forward pre-hooks, forward hooks)`` registered on ``module``, each in order.

    Wraps ``nn.Module._forward_pre_hooks`` and ``nn.Module._forward_hooks`` (ordered
    ``{handle id: hook}`` dicts; torch 2.6-2.14). torch has no public way to list a module's hooks.
    """
    return list(module._forward_pre_hooks.values()), list(module._forward_hooks.values())


def global_forward_hooks() -> tuple[list[Callable[..., Any]], list[Callable[..., Any]]]:
    """``(global forward pre-hooks, global forward hooks)``: those of ``register_module_forward_pre_hook``
    and ``register_module_forward_hook``, which run around every module's forward.

    Wraps ``torch.nn.modules.module._global_forward_pre_hooks`` and ``_global_forward_hooks``
    (torch 2.6-2.14); torch has no public way to list them.
    """
    from torch.nn.modules import module as torch_module

    return (
        list(torch_module._global_forward_pre_hooks.values()),
        list(torch_module._global_forward_hooks.values()),
    )
