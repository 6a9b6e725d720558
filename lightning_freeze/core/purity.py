"""One rule for "this module runs as a pure function during training".

A module is a pure function of its input when calling it twice on the same input gives the same
bits and changes nothing: no parameter is trained, and no layer inside it computes with its
train-mode behaviour. The layers that behave differently in train mode (:func:`train_behaviour`):

* running-statistics norm layers (``BatchNorm*``, ``SyncBatchNorm``, ``InstanceNorm*`` with
  ``track_running_stats=True``, timm ``BatchNormAct2d`` and EvoNorm ``running_var``): they update
  their statistics and normalize with the batch's;
* dropout-likes with a non-zero probability: every ``nn.Dropout*`` (``_DropoutNd``), the attention
  dropout of ``nn.MultiheadAttention`` (applied functionally), ``nn.RReLU``, timm ``DropPath`` and
  ``DropBlock2d``, torchvision ``StochasticDepth`` and ``DropBlock2d/3d``.

A layer computes with its eval behaviour when it is called if it is in eval mode, or it is pinned
(:func:`~lightning_freeze.core.norm.pin_eval`), or it lies inside a module guarded by
:func:`~lightning_freeze.core.freeze.freeze` whose rule forces it to eval (the guard re-applies
the rule before every forward of the module). :func:`impure_layers` applies exactly that; the
freeze guard (:func:`eval_guard_pre_hook`), ``FeatureCache``/``OutputCache``'s cacheability check
(:func:`~lightning_freeze.core.feature_cache.uncacheable_reasons`) and ``FreezeBackbone``'s
function proof all use this module, so whatever ``freeze`` (or ``FreezeBackbone``) freezes with
its defaults is cacheable.

A custom layer that branches on ``self.training`` is not recognised by :func:`train_behaviour`;
inside a module frozen with the defaults it runs in eval mode anyway (the guard puts *every*
layer in eval mode).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from lightning_freeze import _compat
from lightning_freeze.core.norm import (
    FrozenBatchNorm,
    FrozenInstanceNorm,
    is_pinned,
    is_running_stat_norm,
    pin_eval,
)

__all__ = [
    "eval_guard_pre_hook",
    "forced_to_eval",
    "guard_rule",
    "impure_layers",
    "inherited_guard_rule",
    "purity_reasons",
    "train_behaviour",
]

#: dropout-likes of optional libraries, found by type once their module is imported:
#: (module, class name, attribute holding the drop probability)
_OPTIONAL_RANDOM_LAYERS: tuple[tuple[str, str, str], ...] = (
    ("timm.layers.drop", "DropPath", "drop_prob"),
    ("timm.layers.drop", "DropBlock2d", "drop_prob"),
    ("torchvision.ops.stochastic_depth", "StochasticDepth", "p"),
    ("torchvision.ops.drop_block", "DropBlock2d", "p"),  # DropBlock3d subclasses it
)


@functools.cache
def _random_attribute(cls: type) -> str | None:
    # the class's module is imported once an instance exists, so a per-class answer never goes stale
    for module_name, class_name, attribute in _OPTIONAL_RANDOM_LAYERS:
        known = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(known, type) and issubclass(cls, known):
            return attribute
    return None


def train_behaviour(layer: nn.Module) -> str | None:
    """What ``layer`` computes differently in train mode, in words; ``None`` when nothing known.

    Only the layer itself is looked at (not its children). See the module docstring for the
    layers recognised.

    Example::

        >>> train_behaviour(nn.Dropout(0.1)), train_behaviour(nn.Dropout(0.0)), train_behaviour(nn.ReLU())
        ('draws random numbers (Dropout p=0.1)', None, None)
    """
    if isinstance(layer, (FrozenBatchNorm, FrozenInstanceNorm)):
        return None  # holds running statistics, but its train() is a no-op: never updates them
    if is_running_stat_norm(layer):
        return f"updates its running statistics ({type(layer).__name__})"
    if isinstance(layer, _DropoutNd):
        return f"draws random numbers ({type(layer).__name__} p={layer.p})" if layer.p > 0 else None
    if isinstance(layer, nn.MultiheadAttention):
        if layer.dropout > 0:
            return f"draws random numbers (MultiheadAttention dropout={layer.dropout})"
        return None
    if isinstance(layer, nn.RReLU):
        return "draws random numbers (RReLU)" if layer.lower != layer.upper else None
    attribute = _random_attribute(type(layer))
    if attribute is not None:
        prob = float(getattr(layer, attribute, 0.0) or 0.0)
        return f"draws random numbers ({type(layer).__name__} {attribute}={prob:g})" if prob > 0 else None
    return None


def forced_to_eval(layer: nn.Module, norm: str, dropout: str) -> bool:
    """Whether the freeze rule (``norm``/``dropout`` modes of :func:`~lightning_freeze.core.freeze.freeze`)
    puts ``layer`` in eval mode: a frozen module runs entirely in eval mode, except running-statistics
    layers with ``norm="train"`` and every other layer with ``dropout="train"``."""
    if is_running_stat_norm(layer):
        return norm != "train"
    return dropout == "eval"


def eval_guard_pre_hook(module: nn.Module, args: object, *, norm: str, dropout: str) -> None:
    """The freeze guard: a forward pre-hook that applies :func:`forced_to_eval` to every layer inside.

    Whatever called ``.train()`` since (Lightning, ``LightningModule.unfreeze()``, a ``.train()``
    in ``training_step``), the module computes in eval mode (but for the opted-out layers); layers
    created or replaced inside it since (a SyncBatchNorm conversion) get their per-layer pin before
    they can compute in train mode. Cheap: only layers found in train mode are looked at.
    """
    stack = [module]
    while stack:
        layer = stack.pop()
        stack.extend(_compat.child_modules(layer))
        if not layer.training or not forced_to_eval(layer, norm, dropout):
            continue
        layer.training = False  # not .train(False): that would recurse once per layer
        if _needs_layer_pin(layer) and not is_pinned(layer):
            pin_eval(layer)


def _needs_layer_pin(layer: nn.Module) -> bool:
    return train_behaviour(layer) is not None and not isinstance(layer, (FrozenBatchNorm, FrozenInstanceNorm))


def guard_rule(module: nn.Module) -> tuple[str, str] | None:
    """``(norm, dropout)`` of the freeze guard installed on ``module``, or ``None`` when it has none."""
    for hook in _compat.module_forward_hooks(module)[0]:
        if isinstance(hook, functools.partial) and hook.func is eval_guard_pre_hook:
            return hook.keywords["norm"], hook.keywords["dropout"]
    return None


def inherited_guard_rule(root: nn.Module, name: str) -> list[tuple[str, str]]:
    """The guard rules of the modules strictly above ``root.get_submodule(name)`` (outermost first)."""
    rules = []
    parts = name.split(".") if name else []
    for i in range(len(parts)):
        rule = guard_rule(root.get_submodule(".".join(parts[:i])))
        if rule is not None:
            rules.append(rule)
    return rules


@contextlib.contextmanager
def _modes_as_in_training(module: nn.Module) -> Iterator[None]:
    # what the Trainer does at every train epoch start: module.train() (classes may override it)
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.train()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def impure_layers(
    module: nn.Module,
    prefix: str = "",
    *,
    during_training: bool = False,
    guards: list[tuple[str, str]] | None = None,
) -> dict[str, str]:
    """The layers inside ``module`` that would compute with their train-mode behaviour when it is called.

    A layer counts when :func:`train_behaviour` names something and it would be in train mode
    when it runs: it is in train mode now (or, with ``during_training``, once the Trainer calls
    ``.train()`` on the model), it is not pinned, and no freeze guard on ``module``, on a module
    between ``module`` and the layer, or in ``guards`` forces it to eval.

    Args:
        module: the module.
        prefix: its dotted name (the keys are prefixed with it).
        during_training: judge the modes after a ``.train()`` call on the model instead of now.
        guards: rules of the guards of modules above ``module`` (:func:`inherited_guard_rule`).

    Returns:
        ``{dotted name: what it does in train mode}``; empty when the module is pure.
    """
    context = _modes_as_in_training(module) if during_training else contextlib.nullcontext()
    found: dict[str, str] = {}
    with context:
        Entry = tuple[str, nn.Module, tuple[tuple[str, str], ...]]
        stack: list[Entry] = [(prefix, module, tuple(guards or ()))]
        while stack:
            name, layer, rules = stack.pop()
            rule = guard_rule(layer)
            if rule is not None:
                rules = (*rules, rule)
            children = [(f"{name}.{n}" if name else n, child, rules) for n, child in layer.named_children()]
            stack.extend(reversed(children))
            why = train_behaviour(layer)
            if why is None or not layer.training or is_pinned(layer):
                continue
            if any(forced_to_eval(layer, norm, dropout) for norm, dropout in rules):
                continue
            found[name] = why
    return found


def purity_reasons(
    module: nn.Module,
    prefix: str = "",
    *,
    check_grad: bool = True,
    during_training: bool = False,
    guards: list[tuple[str, str]] | None = None,
) -> list[str]:
    """Why ``module`` is not a pure function (empty: it is); see :func:`impure_layers`.

    Args:
        module: the module.
        prefix: its name, used in the messages.
        check_grad: also count parameters that require grad (they would be trained).
        during_training: judge the modes after the Trainer's ``.train()`` call.
        guards: rules of the freeze guards above ``module`` (:func:`inherited_guard_rule`).
    """
    name = prefix or type(module).__name__
    reasons = []
    if check_grad:
        trainable = [n for n, p in module.named_parameters(prefix=prefix) if p.requires_grad]
        if trainable:
            shown = ", ".join(trainable[:3]) + (", ..." if len(trainable) > 3 else "")
            reasons.append(f"{name} is trainable ({len(trainable)} parameter(s) require grad: {shown})")
    impure = impure_layers(module, prefix, during_training=during_training, guards=guards)
    if impure:
        shown = ", ".join(n or name for n in list(impure)[:3]) + (", ..." if len(impure) > 3 else "")
        reasons.append(
            f"{name} has {len(impure)} norm/dropout layer(s) in train mode ({shown}): their output "
            "changes from call to call (norm='train' or dropout='train' in FreezeBackbone)"
        )
    return reasons
