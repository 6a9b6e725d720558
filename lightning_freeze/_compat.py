"""The one module that reaches private names of Lightning and torch.

Each function wraps one use of a private name that has no public route, says in its docstring
what it wraps, and has a test (``tests/test_compat_*.py``) that fails loudly, naming the
Lightning/torch version, when the internal changes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# --- finetune ---


def child_schedulers(scheduler: Any) -> list[Any]:
    """The schedulers inside a ``SequentialLR`` / ``ChainedScheduler`` (their private ``_schedulers``).

    ``[]`` for any other scheduler. torch has no public accessor (only the ``state_dict`` key).
    """
    return list(getattr(scheduler, "_schedulers", None) or [])


def last_lr_list(scheduler: Any) -> list[Any] | None:
    """The list behind ``scheduler.get_last_lr()`` (private ``_last_lr``), to append a new group's entry.

    ``get_last_lr()`` is public but returns copies of tensor lrs; the list itself must grow with the
    optimizer or a resume restores one entry too few. ``None`` before the scheduler's first step.
    """
    values = getattr(scheduler, "_last_lr", None)
    return values if isinstance(values, list) else None


def rebuild_ddp_wrapper(strategy: Any, module: nn.Module) -> nn.Module:
    """A new ``DistributedDataParallel`` wrapper of ``module``, built by Lightning's ``DDPStrategy``.

    Wraps the private ``DDPStrategy._setup_model`` (the wrapper with the strategy's own arguments)
    and ``DDPStrategy._register_ddp_hooks`` (its communication hooks): Lightning has no public way
    to re-wrap a model whose trainable parameters changed mid-fit.
    """
    wrapped = strategy._setup_model(module)
    strategy.model = wrapped
    strategy._register_ddp_hooks()
    return wrapped


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` runs compiled: Lightning's private ``_compiler_ctx`` (``trainer.fit`` of a
    ``torch.compile``-d module), torch's private ``nn.Module._compiled_call_impl`` (``module.compile()``
    on it or a submodule), or a ``torch.compile``-d submodule (``OptimizedModule._orig_mod``)."""
    if getattr(module, "_compiler_ctx", None):
        return True
    return any(
        getattr(m, "_compiled_call_impl", None) is not None or hasattr(m, "_orig_mod")
        for m in module.modules()
    )
