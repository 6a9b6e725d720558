"""Freeze and unfreeze submodules of any ``nn.Module``: no trainer needed.

``freeze`` does the three things a frozen module needs, where ``requires_grad_(False)`` alone does
one: parameters stop requiring grad; running-statistics layers stop updating (pinned to eval, or
replaced by frozen equivalents); and the frozen module runs entirely in eval mode (dropout, drop
path, stochastic depth, attention dropout, ...), so it computes exactly what it will compute at
inference, whatever calls ``.train()``. ``unfreeze`` with the returned :class:`FrozenModules` is
its exact inverse: hooks, flags, modes, classes and values are as before freezing.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lightning_freeze import _compat
from lightning_freeze.core.fingerprint import TensorFingerprint, fingerprint
from lightning_freeze.core.norm import (
    convert_from_frozen_norm,
    convert_to_frozen_norm,
    find_running_stat_norms,
    is_running_stat_norm,
    pin_eval,
    running_stat_buffer_names,
    unpin_eval,
)
from lightning_freeze.core.purity import eval_guard_pre_hook, forced_to_eval, guard_rule, train_behaviour
from lightning_freeze.core.selection import resolve_modules
from lightning_freeze.core.validation import check_choice, choices_of

__all__ = [
    "DROPOUT_MODES",
    "NORM_MODES",
    "DropoutMode",
    "FrozenModules",
    "NormMode",
    "check_choice",  # re-exported from lightning_freeze.core.validation (its home)
    "freeze",
    "frozen_tensor_keys",
    "guard_frozen_module",
    "likely_cause",
    "pin_frozen_layers",
    "unfreeze",
]

#: how :func:`freeze` treats running-statistics norm layers (see :func:`freeze`)
NormMode = Literal["eval", "frozen", "train"]
#: how :func:`freeze` treats dropout-like layers (see :func:`freeze`)
DropoutMode = Literal["eval", "train"]
NORM_MODES: tuple[str, ...] = choices_of(NormMode)
DROPOUT_MODES: tuple[str, ...] = choices_of(DropoutMode)


@dataclass
class FrozenModules:
    """What :func:`freeze` froze, and what it changed (so :func:`unfreeze` can undo it exactly).

    Attributes:
        names: dotted names of the frozen modules (outermost only).
        norm: the ``norm`` mode used.
        dropout: the ``dropout`` mode used.
        parameter_keys: ``state_dict`` keys of the frozen parameters.
        tensor_keys: ``state_dict`` keys of every tensor that must stay bitwise identical
            (parameters and buffers; the running statistics are left out when ``norm="train"``).
        pinned: number of layers newly given a per-layer eval pin: every layer forced to eval
            that behaves differently in train mode (running-statistics layers unless
            ``norm="train"``; dropout-likes, see :func:`~lightning_freeze.core.purity.train_behaviour`,
            with ``dropout="eval"``), whatever mode it was in when frozen.
        converted: number of norm layers replaced by frozen equivalents (``norm="frozen"``).
        kept_pinned: with ``norm="frozen"``, dotted names of the running-statistics layers that
            were not converted (their forward is not reproduced exactly, e.g. timm
            ``BatchNormAct2d`` or EvoNorm) and are pinned to eval instead.
        kept_pinned_reasons: ``{name: reason}`` for each of :attr:`kept_pinned`.
        requires_grad_before: ``{parameter key: requires_grad}`` before freezing, for every
            parameter key inside the frozen modules.
        training_before: ``{module key: training}`` before freezing, for every module inside the
            frozen modules (the frozen modules included).
    """

    names: list[str]
    norm: NormMode = "eval"
    dropout: DropoutMode = "eval"
    parameter_keys: list[str] = field(default_factory=list)
    tensor_keys: list[str] = field(default_factory=list)
    pinned: int = 0
    converted: int = 0
    kept_pinned: list[str] = field(default_factory=list)
    kept_pinned_reasons: dict[str, str] = field(default_factory=dict)
    requires_grad_before: dict[str, bool] = field(default_factory=dict)
    training_before: dict[str, bool] = field(default_factory=dict)

    def fingerprint(self, root: nn.Module) -> dict[str, TensorFingerprint]:
        """Fingerprint of every tensor in :attr:`tensor_keys` (see :func:`fingerprint`)."""
        return fingerprint(root, self.tensor_keys)

    def subset(self, names: Iterable[str]) -> FrozenModules:
        """The record restricted to the frozen modules ``names`` (e.g. to :func:`unfreeze` only them).

        Raises:
            KeyError: a name that is not one of :attr:`names`.
        """
        wanted = list(names)
        unknown = [n for n in wanted if n not in self.names]
        if unknown:
            raise KeyError(f"Not frozen here: {unknown}; frozen modules: {self.names}.")
        prefixes = tuple(f"{n}." for n in wanted)

        def inside(key: str) -> bool:
            return key in wanted or key.startswith(prefixes)

        return dataclasses.replace(
            self,
            names=wanted,
            parameter_keys=[k for k in self.parameter_keys if inside(k)],
            tensor_keys=[k for k in self.tensor_keys if inside(k)],
            kept_pinned=[k for k in self.kept_pinned if inside(k)],
            kept_pinned_reasons={k: v for k, v in self.kept_pinned_reasons.items() if inside(k)},
            requires_grad_before={k: v for k, v in self.requires_grad_before.items() if inside(k)},
            training_before={k: v for k, v in self.training_before.items() if inside(k)},
        )


def pin_frozen_layers(root: nn.Module, names: Iterable[str], *, norm: NormMode, dropout: DropoutMode) -> int:
    """(Re-)pin already frozen modules to eval mode, following the rule of :func:`freeze`.

    Every layer inside the modules is put in eval mode now, except running-statistics layers with
    ``norm="train"`` and all other layers with ``dropout="train"``. Every layer forced to eval that
    behaves differently in train mode (:func:`~lightning_freeze.core.purity.train_behaviour`:
    running-statistics layers, and with ``dropout="eval"`` every dropout-like: ``nn.Dropout*``,
    timm ``DropPath``/``DropBlock2d``, torchvision ``StochasticDepth``, ``nn.MultiheadAttention``
    with dropout, ...) also gets a per-layer pin (:func:`pin_eval`, which holds even when the layer
    is called directly), and each module gets one guard (:func:`guard_frozen_module`) that
    re-applies the rule before every forward of the module.

    Cheap and idempotent; call it whenever layers may have been replaced or put in train mode
    (the Lightning callback calls it at fit start and at every train epoch start). Layers created
    after :func:`freeze` (e.g. by a SyncBatchNorm conversion) are found and pinned too.

    Returns:
        the number of layers newly given a per-layer pin.
    """
    count = 0
    for name in names:
        module = root.get_submodule(name)
        guard_frozen_module(module, norm=norm, dropout=dropout)
        count += pin_eval(
            [
                m
                for m in module.modules()
                if train_behaviour(m) is not None and forced_to_eval(m, norm, dropout)
            ]
        )
        # the rule now, not only at the next forward: the modes read true from the start (a cache
        # keyed by the modes, Lightning's eval-mode check, the user inspecting the model)
        eval_guard_pre_hook(module, (), norm=norm, dropout=dropout)
    return count


def guard_frozen_module(module: nn.Module, *, norm: NormMode, dropout: DropoutMode) -> None:
    """Install (once) a forward pre-hook on a frozen module that re-applies the eval rule.

    Before every forward of ``module`` the hook (:func:`~lightning_freeze.core.purity.eval_guard_pre_hook`)
    puts every layer inside it in eval mode (except running-statistics layers with
    ``norm="train"``, and every other layer with ``dropout="train"``) and pins layers created
    since freezing. It complements the per-layer pins of
    :func:`~lightning_freeze.core.norm.pin_eval`, which also hold when a layer is called directly
    (not through ``module``). No-op when both are ``"train"``.
    """
    if norm == "train" and dropout == "train":
        return
    if guard_rule(module) is None:
        module.register_forward_pre_hook(functools.partial(eval_guard_pre_hook, norm=norm, dropout=dropout))


def _remove_guard(module: nn.Module) -> None:
    _compat.remove_forward_pre_hooks(
        module, lambda hook: isinstance(hook, functools.partial) and hook.func is eval_guard_pre_hook
    )


def frozen_tensor_keys(root: nn.Module, names: Iterable[str], *, norm: NormMode = "eval") -> list[str]:
    """The ``state_dict`` keys of every tensor inside the modules ``names`` that must not change."""
    keys: list[str] = []
    for name in names:
        module = root.get_submodule(name)
        skip: set[str] = set()
        if norm == "train":
            for norm_name, layer in find_running_stat_norms(module, prefix=name).items():
                skip.update(f"{norm_name}.{b}" for b in running_stat_buffer_names(layer))
        keys.extend(k for k in module.state_dict(prefix=f"{name}.", keep_vars=True) if k not in skip)
    return keys


def _warn_tied_parameters(root: nn.Module, selected: dict[str, nn.Module]) -> None:
    inside: dict[int, str] = {}
    for name, module in selected.items():
        for key, param in module.named_parameters(prefix=name, remove_duplicate=False):
            inside.setdefault(id(param), key)
    prefixes = tuple(f"{name}." for name in selected)
    for key, param in root.named_parameters(remove_duplicate=False):
        if id(param) in inside and not key.startswith(prefixes) and param.requires_grad:
            warnings.warn(
                f"freeze: parameter {key!r} is the same tensor as the frozen {inside[id(param)]!r} "
                f"(tied weights), so it is frozen too although its module is not frozen. Untie them "
                f"(e.g. give {key!r} its own copy) or freeze both on purpose.",
                UserWarning,
                stacklevel=3,
            )


def freeze(
    root: nn.Module, modules: str | Iterable[str], *, norm: NormMode = "eval", dropout: DropoutMode = "eval"
) -> FrozenModules:
    """Freeze submodules of ``root``: no gradients, no running-statistics updates, eval-mode compute.

    The rule: a frozen module runs **entirely in eval mode** (every layer inside it, so dropout,
    timm ``DropPath``, torchvision ``StochasticDepth``, the attention dropout of
    ``nn.MultiheadAttention`` and any other train/eval-dependent layer compute as at inference),
    whatever calls ``.train()`` later. Opt-outs: ``norm="train"`` exempts running-statistics
    layers (they train), ``dropout="train"`` exempts every other layer.

    Undo with :func:`unfreeze` (pass the returned :class:`FrozenModules` to restore exactly the
    state before freezing).

    Args:
        root: the model.
        modules: dotted names or ``fnmatch`` patterns of submodules (see
            :func:`~lightning_freeze.core.selection.resolve_modules`).
        norm: ``"eval"`` pins running-statistics layers to eval mode (a forward pre-hook
            re-asserts it whatever calls ``.train()``); ``"frozen"`` replaces those whose forward
            is reproduced exactly by :class:`~lightning_freeze.core.norm.FrozenBatchNorm` /
            ``FrozenInstanceNorm`` (no parameters, immune to ``.train()``, same ``state_dict``
            keys, each conversion checked bitwise on a probe input) and pins the others to eval
            (listed in :attr:`FrozenModules.kept_pinned`); ``"train"`` leaves them updating their
            statistics (explicit opt-in).
        dropout: ``"eval"`` (default) runs every other layer of frozen modules in eval mode, so the
            features a head trains on are the ones it will see at inference; ``"train"`` leaves
            their mode to the caller (dropout stays active in training).

    Returns:
        :class:`FrozenModules` describing what was frozen.

    Raises:
        ValueError: invalid ``norm``/``dropout``, or nothing would be left to train.
        ModuleSelectionError: a name or pattern that resolves to nothing.

    Warns:
        UserWarning: a parameter of a frozen module is tied to (is the same tensor as) a
            parameter of a module that is not frozen; both keys are named.
    """
    check_choice("norm", norm, NORM_MODES)
    check_choice("dropout", dropout, DROPOUT_MODES)
    selected = resolve_modules(root, modules)
    _warn_tied_parameters(root, selected)
    requires_grad_before = {
        key: param.requires_grad
        for name, module in selected.items()
        for key, param in module.named_parameters(prefix=name, remove_duplicate=False)
    }
    training_before = {
        key: m.training
        for name, module in selected.items()
        for key, m in module.named_modules(prefix=name, remove_duplicate=False)
    }
    converted = 0
    kept: dict[str, str] = {}
    for name, module in list(selected.items()):
        module.requires_grad_(False)
        if norm == "frozen":
            new, n = convert_to_frozen_norm(module, kept=kept, prefix=name)
            converted += n
            if new is not module:
                root.set_submodule(name, new)
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
        kept_pinned=list(kept),
        kept_pinned_reasons=kept,
        requires_grad_before=requires_grad_before,
        training_before=training_before,
    )


def unfreeze(
    root: nn.Module, modules: str | Iterable[str] | FrozenModules, *, mode: bool | None = True
) -> list[nn.Parameter]:
    """Undo :func:`freeze` for ``modules``: the exact inverse when given its :class:`FrozenModules`.

    Inside the modules: every hook that freezing installed is removed (the per-layer eval pins and
    the module guard), frozen norm equivalents are converted back to layers of their original
    class and constructor arguments with bitwise the same values (new parameter objects), and
    parameters require grad again.

    Args:
        root: the model.
        modules: names or patterns, as for :func:`freeze`, or the :class:`FrozenModules` that
            :func:`freeze` returned: then the ``requires_grad`` flags are restored exactly as they
            were before freezing (instead of all ``True``).
        mode: train mode to put the unfrozen modules in (``module.train(mode)``). ``None``: with a
            :class:`FrozenModules`, restore every recorded training flag as it was before
            freezing; with names, leave the modes as they are.

    Returns:
        The parameters of the unfrozen modules that require grad now and did not before this call
        (including those of converted-back norm layers); give them to the optimizer (e.g.
        ``optimizer.add_param_group({"params": params})``).

    Example::

        >>> net = nn.ModuleDict({"body": nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
        ...                      "head": nn.Linear(2, 1)})
        >>> before = {k: v.clone() for k, v in net.state_dict().items()}
        >>> frozen = freeze(net, "body", norm="frozen")
        >>> len(unfreeze(net, frozen, mode=None))
        4
        >>> type(net["body"][1]).__name__, all(torch.equal(before[k], v) for k, v in net.state_dict().items())
        ('BatchNorm1d', True)
    """
    record = modules if isinstance(modules, FrozenModules) else None
    if record is not None:
        selected = {name: root.get_submodule(name) for name in record.names}
    else:
        selected = resolve_modules(root, modules)  # type: ignore[arg-type]
    trainable_before = {id(p) for p in root.parameters() if p.requires_grad}
    newly: list[nn.Parameter] = []
    for name, module in selected.items():
        _warn_if_inside_a_guarded_module(root, name)
        for layer in module.modules():
            _remove_guard(layer)
            unpin_eval(layer)
        was_training = module.training
        new, _ = convert_from_frozen_norm(module)
        if new is not module:
            root.set_submodule(name, new)
            module = new
        if record is None:
            module.requires_grad_(True)
        else:
            params = dict(module.named_parameters(prefix=name, remove_duplicate=False))
            for key, flag in record.requires_grad_before.items():
                if key in params:
                    params[key].requires_grad_(flag)
        if mode is not None:
            module.train(mode)
        elif record is not None:
            layers = dict(module.named_modules(prefix=name, remove_duplicate=False))
            for key, flag in record.training_before.items():
                if key in layers:
                    layers[key].training = flag
        else:
            for layer in module.modules():  # converted-back layers come in train mode
                if is_running_stat_norm(layer) and layer.training != was_training:
                    layer.training = was_training
        for param in module.parameters():
            if param.requires_grad and id(param) not in trainable_before:
                trainable_before.add(id(param))
                newly.append(param)
    return newly


def _warn_if_inside_a_guarded_module(root: nn.Module, name: str) -> None:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        outer = ".".join(parts[:i])
        if guard_rule(root.get_submodule(outer)) is not None:
            warnings.warn(
                f"unfreeze: {name!r} lies inside the frozen module {outer!r}, whose guard keeps every "
                f"layer inside it in eval mode: {name!r} gets gradients again but still computes in eval "
                f"mode. Unfreeze {outer!r} itself to train it fully.",
                UserWarning,
                stacklevel=3,
            )
            return


def likely_cause(
    root: nn.Module, key: str, *, norm: NormMode = "eval", optimizer_params: Iterable[torch.Tensor] = ()
) -> str:
    """A best guess, in words, at why the frozen tensor ``key`` of ``root`` changed."""
    module_name, _, tensor_name = key.rpartition(".")
    try:
        owner = root.get_submodule(module_name) if module_name else root
    except AttributeError:
        return "the tensor no longer exists where it was (the module was replaced)"
    param = dict(owner.named_parameters(recurse=False)).get(tensor_name)
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
    if tensor_name in running_stat_buffer_names(owner):
        return (
            f"a buffer of a norm layer ({type(owner).__name__}) that ran in train mode "
            f"(norm={norm!r}, or a layer replaced/created after freezing and not pinned)"
        )
    return "a buffer changed by code outside FreezeBackbone (a hook, a callback or an in-place op)"
