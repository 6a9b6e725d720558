"""The one home of the private torch and Lightning names the package relies on.

A private name (``obj._name`` of torch or Lightning) can change in any minor release without notice.
Every use the package cannot replace with a public route lives here, one small function per use, each
docstring naming the internal it wraps and the versions it was checked with, each tested in
``tests/test_compat*.py`` by a test that fails naming the installed version when the internal changes.
Nothing else in ``lightning_freeze/`` reads a private name of torch or Lightning. docs/development.md
lists what this module wraps and why.

Rules for this module: no module-level import of Lightning or Hydra (``lightning_freeze.core`` imports
it and must stay Lightning-free: import inside the function); one section per owner, headed
``# --- <owner> ---``; add a function only when no public route exists.

Checked with torch 2.6.0 and 2.14.1, lightning 2.5.0 and 2.6.6 (the floors and the newest: ``make
test-oldest`` and ``make test``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from torch import nn

# --- floors ---


def remove_forward_pre_hooks(module: nn.Module, matches: Callable[[Callable[..., Any]], bool]) -> int:
    """Remove every forward pre-hook of ``module`` for which ``matches(hook)`` is true; return how many.

    Wraps ``nn.Module._forward_pre_hooks`` (torch 2.6-2.14), for hooks found on a copy or an unpickled
    module, where no ``RemovableHandle`` exists (see :func:`module_forward_hooks`). Also drops the
    hook's entry in ``_forward_pre_hooks_with_kwargs`` as ``RemovableHandle.remove`` does.
    """
    hooks = module._forward_pre_hooks
    keys = [key for key, hook in hooks.items() if matches(hook)]
    with_kwargs = getattr(module, "_forward_pre_hooks_with_kwargs", {})
    for key in keys:
        del hooks[key]
        with_kwargs.pop(key, None)
    return len(keys)


def persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, buffer)`` of the buffers ``module`` owns directly and saves in its ``state_dict``.

    Wraps ``nn.Module._buffers`` and ``_non_persistent_buffers_set`` (torch 2.6-2.14):
    ``named_buffers`` does not say which buffers are persistent. Registration order; ``None``
    buffers left out.
    """
    skip = module._non_persistent_buffers_set
    return [(name, buf) for name, buf in module._buffers.items() if buf is not None and name not in skip]


def foreach_lerp_(shadows: list[torch.Tensor], sources: list[torch.Tensor], weight: float) -> None:
    """``shadow.lerp_(source, weight)`` for each pair, fused where the backend has the kernel.

    Wraps ``torch._foreach_lerp_`` (torch 2.6-2.14; no public foreach API). Bitwise the same as
    the loop of ``lerp_``, which is the fallback when the kernel is missing.
    """
    if hasattr(torch, "_foreach_lerp_"):
        try:
            torch._foreach_lerp_(shadows, sources, weight)
            return
        except NotImplementedError:  # a backend without the fused kernel
            pass
    for shadow, source in zip(shadows, sources, strict=True):
        shadow.lerp_(source, weight)


def foreach_copy_(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``target.copy_(source)`` for each pair, fused where the backend has the kernel.

    Wraps ``torch._foreach_copy_`` (torch 2.6-2.14; no public foreach API); the loop of ``copy_``
    is the fallback.
    """
    if hasattr(torch, "_foreach_copy_"):
        try:
            torch._foreach_copy_(targets, sources)
            return
        except NotImplementedError:
            pass
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


def norm_accepts_rank(module: nn.Module, rank: int) -> bool:
    """Whether a torch BatchNorm/InstanceNorm layer accepts inputs of ``rank`` dimensions.

    Wraps ``_BatchNorm._check_input_dim`` / ``_InstanceNorm._check_input_dim`` (torch 2.6-2.14),
    the check each class (and a subclass) runs first in its forward; probed on a meta tensor, so
    nothing is computed.
    """
    try:
        module._check_input_dim(torch.empty((1,) * rank, device="meta"))
    except ValueError:
        return False
    return True


def instance_norm_no_batch_dim(module: nn.Module) -> int:
    """The input rank of an unbatched input of a torch InstanceNorm layer (1d: 2, 2d: 3, 3d: 4).

    Wraps ``_InstanceNorm._get_no_batch_dim`` (torch 2.6-2.14).
    """
    return int(module._get_no_batch_dim())


def tensor_version(tensor: torch.Tensor) -> int | None:
    """The in-place write counter of ``tensor`` (bumped by ``copy_``, ``add_``, ``load_state_dict``...).

    Wraps ``Tensor._version`` (torch 2.6-2.14): no public counter. Writes through ``tensor.data``
    do not bump it. ``None`` for an inference tensor (made under ``torch.inference_mode``), which has none.
    """
    if tensor.is_inference():
        return None
    return int(tensor._version)


def is_subprocess_script_launcher(launcher: object) -> bool:
    """Whether ``launcher`` (``trainer.strategy.launcher``) re-runs the command line in each child.

    Wraps ``lightning.pytorch.strategies.launchers._SubprocessScriptLauncher`` (lightning 2.5-2.6):
    the launcher of ``strategy="ddp"`` on a process-per-device start, which runs ``sys.argv`` again;
    no public attribute tells it from ``ddp_spawn``'s launcher. ``False`` on a Lightning without the
    class (``tests/test_compat.py`` fails there, naming the version).
    """
    try:
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
    except ImportError:  # pragma: no cover - a Lightning that renamed it
        return False
    return isinstance(launcher, _SubprocessScriptLauncher)


# --- purity ---
def module_forward_hooks(module: nn.Module) -> tuple[list[Callable[..., Any]], list[Callable[..., Any]]]:
    """``(forward pre-hooks, forward hooks)`` registered on ``module``, each in order.

    Wraps ``nn.Module._forward_pre_hooks`` and ``nn.Module._forward_hooks`` (ordered
    ``{handle id: hook}`` dicts; torch 2.6-2.14). torch has no public way to list a module's hooks;
    the package's own pre-hooks (eval pins, the freeze guard) must be found again on a
    ``copy.deepcopy`` or an unpickled model, where no kept ``RemovableHandle`` points at them.
    """
    return list(module._forward_pre_hooks.values()), list(module._forward_hooks.values())


def child_modules(module: nn.Module) -> list[nn.Module]:
    """The direct submodules of ``module`` (``module.children()``, duplicates kept), in order.

    Wraps ``nn.Module._modules`` (torch 2.6-2.14): ``children()`` is a generator over
    ``named_children()``, which builds a set per call; the freeze guard walks every layer of a
    frozen module at every forward, and this list is about 6x cheaper per layer (ResNet-18: 60 us
    down to 10 us a call).
    """
    return [m for m in module._modules.values() if m is not None]


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


def fit_loop_combined_loader(trainer: Any) -> Any:
    """``trainer.fit_loop._combined_loader``: the ``CombinedLoader`` the fit loop iterates this epoch.

    Lightning has no public route to replace what the training epoch iterates; ``skip_pipeline``
    sets the (public) ``CombinedLoader.flattened`` of this object in ``on_train_epoch_start``.
    ``None`` before the fit loop set up its data.
    """
    return getattr(trainer.fit_loop, "_combined_loader", None)


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


def model_checkpoint_every_n_train_steps(callback: Any) -> int:
    """``ModelCheckpoint(every_n_train_steps=...)``; wraps ``ModelCheckpoint._every_n_train_steps``."""
    return int(callback._every_n_train_steps or 0)


def model_checkpoint_train_time_interval(callback: Any) -> timedelta | None:
    """``ModelCheckpoint(train_time_interval=...)``; wraps ``ModelCheckpoint._train_time_interval``."""
    return callback._train_time_interval


def model_checkpoint_saves_on_train_epoch_end(callback: Any, trainer: Any) -> bool:
    """Whether ``callback`` saves at the train epoch end (``True``) or at validation end.

    Wraps ``ModelCheckpoint._should_save_on_train_epoch_end(trainer)``.
    """
    return bool(callback._should_save_on_train_epoch_end(trainer))


def attach_datamodule(trainer: Any, model: Any, datamodule: Any) -> None:
    """Attach ``datamodule`` to ``trainer`` as ``Trainer.fit(model, datamodule=...)`` does, without fitting.

    Its checkpoints then carry the datamodule's hyper-parameters and state. Wraps
    ``trainer._data_connector.attach_data(model, datamodule=...)``.
    """
    trainer._data_connector.attach_data(model, datamodule=datamodule)
