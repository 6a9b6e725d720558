"""Freeze and unfreeze submodules of any ``nn.Module``: no trainer needed.

``freeze`` does the three things a frozen module needs, where ``requires_grad_(False)`` alone does
one: parameters stop requiring grad; running-statistics norm layers stop updating (pinned to eval,
or replaced by frozen equivalents); dropout inside is pinned to eval by default, so the frozen
module computes exactly what it will compute at inference.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from lightning_freeze.core.fingerprint import TensorFingerprint, fingerprint
from lightning_freeze.core.norm import (
    convert_from_frozen_norm,
    convert_to_frozen_norm,
    find_dropout_layers,
    find_running_stat_norms,
    is_pinned,
    is_running_stat_norm,
    pin_eval,
    unpin_eval,
)
from lightning_freeze.core.selection import resolve_modules

__all__ = [
    "DROPOUT_MODES",
    "NORM_MODES",
    "FrozenModules",
    "check_choice",
    "freeze",
    "frozen_tensor_keys",
    "guard_frozen_module",
    "likely_cause",
    "pin_frozen_layers",
    "unfreeze",
]

NORM_MODES: tuple[str, ...] = ("eval", "frozen", "train")
DROPOUT_MODES: tuple[str, ...] = ("eval", "train")
_NORM_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ``ValueError`` naming both."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Invalid {name}={value!r}; valid choices: {', '.join(repr(c) for c in choices)}.")
    return value


@dataclass
class FrozenModules:
    """What :func:`freeze` froze.

    Attributes:
        names: dotted names of the frozen modules (outermost only).
        norm: the ``norm`` mode used.
        dropout: the ``dropout`` mode used.
        parameter_keys: ``state_dict`` keys of the frozen parameters.
        tensor_keys: ``state_dict`` keys of every tensor that must stay bitwise identical
            (parameters and buffers; the running statistics are left out when ``norm="train"``).
        pinned: number of norm/dropout layers pinned to eval.
        converted: number of norm layers replaced by frozen equivalents.
    """

    names: list[str]
    norm: str = "eval"
    dropout: str = "eval"
    parameter_keys: list[str] = field(default_factory=list)
    tensor_keys: list[str] = field(default_factory=list)
    pinned: int = 0
    converted: int = 0

    def fingerprint(self, root: nn.Module) -> dict[str, TensorFingerprint]:
        """Fingerprint of every tensor in :attr:`tensor_keys` (see :func:`fingerprint`)."""
        return fingerprint(root, self.tensor_keys)


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def pin_frozen_layers(root: nn.Module, names: Iterable[str], *, norm: str, dropout: str) -> int:
    """(Re-)pin the norm and dropout layers of already frozen modules to eval mode.

    Cheap and idempotent; call it whenever layers may have been replaced or put in train mode
    (the Lightning callback calls it at fit start and at every train epoch start). Layers created
    after :func:`freeze` (e.g. by a SyncBatchNorm conversion) are found and pinned too.

    Returns:
        the number of layers newly pinned.
    """
    count = 0
    for name in names:
        module = root.get_submodule(name)
        guard_frozen_module(module, norm=norm, dropout=dropout)
        if norm == "eval":
            count += pin_eval(find_running_stat_norms(module))
        if dropout == "eval":
            count += pin_eval(find_dropout_layers(module))
    return count


def _repin_pre_hook(module: nn.Module, args: object, *, norm: str, dropout: str) -> None:
    # Runs before every forward of a frozen module: layers created or replaced inside it since the
    # last pin (a SyncBatchNorm conversion, user code in a hook that runs after ours) are pinned
    # before they can compute in train mode.
    for layer in module.modules():
        if (norm == "eval" and is_running_stat_norm(layer)) or (
            dropout == "eval" and isinstance(layer, _DropoutNd)
        ):
            if layer.training or not is_pinned(layer):
                pin_eval(layer)


def _is_repin_hook(hook: object) -> bool:
    return isinstance(hook, functools.partial) and hook.func is _repin_pre_hook


def guard_frozen_module(module: nn.Module, *, norm: str, dropout: str) -> None:
    """Install (once) a forward pre-hook on a frozen module that re-pins its norm/dropout layers.

    Complements the per-layer guard of :func:`~lightning_freeze.core.norm.pin_eval`: it also
    covers layers that replaced the pinned ones after freezing. No-op when nothing is pinned
    (``norm="train"`` or ``"frozen"`` with ``dropout="train"``).
    """
    if norm != "eval" and dropout != "eval":
        return
    if not any(_is_repin_hook(h) for h in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(functools.partial(_repin_pre_hook, norm=norm, dropout=dropout))


def _remove_guard(module: nn.Module) -> None:
    for key in [k for k, h in module._forward_pre_hooks.items() if _is_repin_hook(h)]:
        del module._forward_pre_hooks[key]


def frozen_tensor_keys(root: nn.Module, names: Iterable[str], *, norm: str = "eval") -> list[str]:
    """The ``state_dict`` keys of every tensor inside the modules ``names`` that must not change."""
    keys: list[str] = []
    for name in names:
        module = root.get_submodule(name)
        skip: set[str] = set()
        if norm == "train":
            for norm_name in find_running_stat_norms(module, prefix=name):
                skip.update(f"{norm_name}.{b}" for b in _NORM_STAT_BUFFERS)
        keys.extend(k for k in module.state_dict(prefix=f"{name}.", keep_vars=True) if k not in skip)
    return keys


def freeze(
    root: nn.Module, modules: str | Iterable[str], *, norm: str = "eval", dropout: str = "eval"
) -> FrozenModules:
    """Freeze submodules of ``root``: no gradients, no running-statistics updates, no dropout.

    Args:
        root: the model.
        modules: dotted names or ``fnmatch`` patterns of submodules (see
            :func:`~lightning_freeze.core.selection.resolve_modules`).
        norm: ``"eval"`` pins running-statistics norm layers to eval mode (a forward pre-hook
            re-asserts it whatever calls ``.train()``); ``"frozen"`` replaces them by
            :class:`~lightning_freeze.core.norm.FrozenBatchNorm` / ``FrozenInstanceNorm`` (no
            parameters, immune to ``.train()``, same ``state_dict`` keys); ``"train"`` leaves them
            updating their statistics (explicit opt-in).
        dropout: ``"eval"`` (default) pins dropout inside frozen modules to eval, so the features
            a head trains on are the ones it will see at inference; ``"train"`` keeps it active.

    Returns:
        :class:`FrozenModules` describing what was frozen.

    Raises:
        ValueError: invalid ``norm``/``dropout``, or nothing would be left to train.
        ModuleSelectionError: a name or pattern that resolves to nothing.
    """
    check_choice("norm", norm, NORM_MODES)
    check_choice("dropout", dropout, DROPOUT_MODES)
    selected = resolve_modules(root, modules)
    converted = 0
    for name in list(selected):
        module = selected[name]
        module.requires_grad_(False)
        if norm == "frozen":
            new, n = convert_to_frozen_norm(module)
            converted += n
            if new is not module:
                _set_submodule(root, name, new)
                selected[name] = new
    pinned = pin_frozen_layers(root, selected, norm=norm, dropout=dropout)
    names = list(selected)
    parameter_keys = [
        f"{name}.{p}"
        for name, module in selected.items()
        for p, _ in module.named_parameters(remove_duplicate=False)
    ]
    return FrozenModules(
        names=names,
        norm=norm,
        dropout=dropout,
        parameter_keys=parameter_keys,
        tensor_keys=frozen_tensor_keys(root, names, norm=norm),
        pinned=pinned,
        converted=converted,
    )


def unfreeze(root: nn.Module, modules: str | Iterable[str], *, mode: bool = True) -> list[nn.Parameter]:
    """Undo :func:`freeze` for ``modules``: parameters require grad, norm/dropout layers are unpinned.

    Frozen norm equivalents are converted back to trainable layers (new parameter objects).

    Args:
        root: the model.
        modules: names or patterns, as for :func:`freeze`.
        mode: train mode to put the unfrozen modules in.

    Returns:
        The parameters of the unfrozen modules that did not require grad before; give them to
        the optimizer (e.g. ``optimizer.add_param_group({"params": params})``).
    """
    selected = resolve_modules(root, modules)
    newly: list[nn.Parameter] = []
    for name, module in selected.items():
        trainable_before = {id(p) for p in module.parameters() if p.requires_grad}
        new, _ = convert_from_frozen_norm(module)
        if new is not module:
            _set_submodule(root, name, new)
            module = new
        unpin_eval(
            list(find_running_stat_norms(module).values()) + list(find_dropout_layers(module).values())
        )
        for param in module.parameters():
            param.requires_grad_(True)
            if id(param) not in trainable_before:  # includes layers converted back from frozen norms
                newly.append(param)
        module.train(mode)
    return newly


def likely_cause(
    root: nn.Module, key: str, *, norm: str = "eval", optimizer_params: Iterable[torch.Tensor] = ()
) -> str:
    """A best guess, in words, at why the frozen tensor ``key`` of ``root`` changed."""
    module_name, _, tensor_name = key.rpartition(".")
    try:
        owner = root.get_submodule(module_name) if module_name else root
    except AttributeError:
        return "the tensor no longer exists where it was (the module was replaced)"
    param = owner._parameters.get(tensor_name)
    if param is not None:
        if any(p is param for p in optimizer_params):
            if param.requires_grad:
                return (
                    "a parameter the optimizer held, with requires_grad re-enabled "
                    "(e.g. LightningModule.unfreeze() or user code)"
                )
            return (
                "a parameter the optimizer held (weight decay/momentum can move it even without a gradient)"
            )
        if param.requires_grad:
            return "requires_grad was re-enabled (e.g. LightningModule.unfreeze()) and something updated it"
        return (
            "changed by code outside FreezeBackbone (a hook, a callback, an in-place op or a checkpoint load)"
        )
    if tensor_name in _NORM_STAT_BUFFERS and find_running_stat_norms(owner):
        return (
            f"a buffer of a norm layer ({type(owner).__name__}) that ran in train mode "
            f"(norm={norm!r}, or a layer replaced/created after freezing and not pinned)"
        )
    return "a buffer changed by code outside FreezeBackbone (a hook, a callback or an in-place op)"
