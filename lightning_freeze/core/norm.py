"""Normalization layers with running statistics: find them, pin them to eval, or freeze them.

The trap this module exists for: ``requires_grad=False`` freezes the *affine* parameters of a
BatchNorm layer, but not its ``running_mean`` / ``running_var`` / ``num_batches_tracked`` buffers.
Those are updated by every forward pass in train mode, and any ``.train()`` call (user code,
``LightningModule.unfreeze()``, a hook override, a plain PyTorch loop) puts the layer back in
train mode.

Two remedies:

* :func:`pin_eval` keeps the layer an ordinary module but forces it to eval mode before every
  forward (a forward pre-hook), so no ``.train()`` call, however late, can make it update.
* :func:`convert_to_frozen_norm` replaces each layer by a :class:`FrozenBatchNorm` /
  :class:`FrozenInstanceNorm` whose statistics *and* affine terms are buffers, whose ``train()``
  is a no-op, and whose output is bitwise identical to the original layer in eval mode. The
  ``state_dict`` keys are unchanged, so checkpoints load in both directions.

Layers are found by type (``isinstance``), never by class-name strings or channel counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = [
    "FrozenBatchNorm",
    "FrozenInstanceNorm",
    "convert_from_frozen_norm",
    "convert_to_frozen_norm",
    "find_dropout_layers",
    "find_running_stat_norms",
    "is_pinned",
    "is_running_stat_norm",
    "pin_eval",
    "unpin_eval",
]


def is_running_stat_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer that updates running statistics in train mode.

    True for ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``LazyBatchNorm*`` and ``InstanceNorm*``
    built with ``track_running_stats=True``, and any subclass of them. Also true for the frozen
    equivalents of this module, which hold running statistics but never update them.
    """
    if isinstance(module, (FrozenBatchNorm, FrozenInstanceNorm)):
        return True
    return isinstance(module, (_BatchNorm, _InstanceNorm)) and bool(module.track_running_stats)


def find_running_stat_norms(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """All running-statistics norm layers in ``module`` (itself included), keyed by dotted name.

    Args:
        module: the module to search.
        prefix: prepended to every name (``"backbone"`` gives ``"backbone.bn1"``).
    """
    return {name: m for name, m in module.named_modules(prefix=prefix) if is_running_stat_norm(m)}


def find_dropout_layers(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """All dropout layers (``nn.Dropout*``, ``nn.AlphaDropout``, ...) in ``module``, keyed by name."""
    return {name: m for name, m in module.named_modules(prefix=prefix) if isinstance(m, _DropoutNd)}


# ---------------------------------------------------------------------------------------------
# pinning
# ---------------------------------------------------------------------------------------------
def _force_eval_pre_hook(module: nn.Module, args: Any) -> None:
    # Runs right before every forward: whatever called .train() since (user hooks, a .train()
    # inside training_step, LightningModule.unfreeze()), this layer computes in eval mode.
    if module.training:
        module.train(False)


def is_pinned(module: nn.Module) -> bool:
    """Whether :func:`pin_eval` pinned ``module`` (and :func:`unpin_eval` has not undone it)."""
    return any(hook is _force_eval_pre_hook for hook in module._forward_pre_hooks.values())


def pin_eval(modules: dict[str, nn.Module] | list[nn.Module] | nn.Module) -> int:
    """Put modules in eval mode now and before every forward, whatever calls ``.train()`` later.

    Idempotent: pinning a pinned module only re-asserts eval mode. The guard is a picklable
    forward pre-hook, so it survives ``copy.deepcopy`` and ``torch.save(model)``.

    Args:
        modules: one module, a list, or a ``{name: module}`` mapping (e.g. from
            :func:`find_running_stat_norms`).

    Returns:
        The number of modules newly pinned (already pinned ones are not counted).
    """
    items = _module_list(modules)
    newly = 0
    for module in items:
        module.train(False)
        if not is_pinned(module):
            module.register_forward_pre_hook(_force_eval_pre_hook)
            newly += 1
    return newly


def unpin_eval(modules: dict[str, nn.Module] | list[nn.Module] | nn.Module, mode: bool | None = None) -> int:
    """Remove the guard installed by :func:`pin_eval`.

    Args:
        modules: as for :func:`pin_eval`.
        mode: if given, call ``module.train(mode)`` after unpinning.

    Returns:
        The number of modules that were pinned.
    """
    count = 0
    for module in _module_list(modules):
        keys = [k for k, hook in module._forward_pre_hooks.items() if hook is _force_eval_pre_hook]
        for key in keys:
            del module._forward_pre_hooks[key]
        count += bool(keys)
        if mode is not None:
            module.train(mode)
    return count


def _module_list(modules: dict[str, nn.Module] | list[nn.Module] | nn.Module) -> list[nn.Module]:
    if isinstance(modules, nn.Module):
        return [modules]
    if isinstance(modules, dict):
        return list(modules.values())
    return list(modules)


# ---------------------------------------------------------------------------------------------
# frozen equivalents
# ---------------------------------------------------------------------------------------------
class _FrozenNormBase(nn.Module):
    """Shared machinery of the frozen norm layers: everything is a buffer, ``train()`` is a no-op."""

    _original_cls: type[nn.Module]

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        if isinstance(source, _LazyNormBase) and source.has_uninitialized_params():
            raise ValueError(
                f"Cannot freeze {type(source).__name__}: it is still uninitialized (lazy). "
                "Run one forward pass so it knows its number of features, then freeze it."
            )
        self.num_features = source.num_features
        self.eps = source.eps
        self.momentum = source.momentum
        self.affine = source.affine
        self.track_running_stats = True
        self._original_cls = type(source)
        with torch.no_grad():
            for name in ("weight", "bias"):
                tensor = getattr(source, name, None)
                self.register_buffer(name, None if tensor is None else tensor.detach().clone())
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, getattr(source, name).detach().clone())
        super().train(False)

    def train(self, mode: bool = True) -> _FrozenNormBase:
        """No-op: a frozen norm layer is always in eval mode."""
        return super().train(False)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # checkpoints of very old BatchNorm versions have no num_batches_tracked: keep ours
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = self.num_batches_tracked.clone()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def unfrozen(self) -> nn.Module:
        """An ordinary (trainable) layer of the original class with the same values, in train mode."""
        cls = self._original_cls
        kwargs: dict[str, Any] = {
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": True,
        }
        if issubclass(cls, _LazyNormBase):
            cls = _LAZY_TO_EAGER.get(cls, nn.BatchNorm2d)
        layer = cls(self.num_features, **kwargs)
        layer = layer.to(device=self.running_mean.device)
        with torch.no_grad():
            for name in ("weight", "bias"):
                value = getattr(self, name)
                if value is not None:
                    param = getattr(layer, name)
                    param.data = value.detach().clone()
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(layer, name, getattr(self, name).detach().clone())
        return layer

    def extra_repr(self) -> str:
        source = self._original_cls.__name__
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, frozen from {source}"


class FrozenBatchNorm(_FrozenNormBase):
    """A BatchNorm (1d/2d/3d/Sync/Lazy) whose statistics and affine terms never change.

    Output is bitwise identical to the source layer in eval mode (same ``F.batch_norm`` call).
    Unlike ``torchvision.ops.FrozenBatchNorm2d`` it works for any input rank, keeps
    ``num_batches_tracked`` so ``state_dict`` keys match the source layer exactly, and
    ``LightningModule.unfreeze()`` cannot make it trainable (it has no parameters).

    Args:
        source: the layer to copy values from (its tensors are cloned).

    Example::

        >>> bn = nn.BatchNorm2d(3)
        >>> frozen = FrozenBatchNorm(bn)
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.equal(frozen(x), bn.eval()(x))
        True
    """

    def __init__(self, source: nn.Module) -> None:
        if not isinstance(source, _BatchNorm) or not source.track_running_stats:
            raise TypeError(
                f"FrozenBatchNorm needs a BatchNorm with running stats, got {type(source).__name__}."
            )
        super().__init__(source)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize with the stored running statistics (eval-mode BatchNorm)."""
        # the source class's own input-rank check (it reads nothing but ``input.dim()``)
        self._original_cls._check_input_dim(self, input)
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class FrozenInstanceNorm(_FrozenNormBase):
    """An InstanceNorm (``track_running_stats=True``) that always normalizes with its stored statistics.

    Output is bitwise identical to the source layer in eval mode (same ``F.instance_norm`` call).

    Args:
        source: the layer to copy values from (its tensors are cloned).
    """

    def __init__(self, source: nn.Module) -> None:
        if not isinstance(source, _InstanceNorm) or not source.track_running_stats:
            raise TypeError(
                "FrozenInstanceNorm needs an InstanceNorm with track_running_stats=True, "
                f"got {type(source).__name__}."
            )
        super().__init__(source)
        self._feature_dim = source._get_no_batch_dim()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize with the stored running statistics (eval-mode InstanceNorm)."""
        unbatched = input.dim() == self._feature_dim
        if unbatched:
            input = input.unsqueeze(0)
        out = F.instance_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return out.squeeze(0) if unbatched else out


_LAZY_TO_EAGER: dict[type[nn.Module], type[nn.Module]] = {
    nn.LazyBatchNorm1d: nn.BatchNorm1d,
    nn.LazyBatchNorm2d: nn.BatchNorm2d,
    nn.LazyBatchNorm3d: nn.BatchNorm3d,
    nn.LazyInstanceNorm1d: nn.InstanceNorm1d,
    nn.LazyInstanceNorm2d: nn.InstanceNorm2d,
    nn.LazyInstanceNorm3d: nn.InstanceNorm3d,
}


def _frozen_equivalent(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm):
        return FrozenBatchNorm(module)
    return FrozenInstanceNorm(module)


def _replace_in_tree(
    module: nn.Module, should_replace: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]
) -> tuple[nn.Module, int]:
    if should_replace(module):
        return make(module), 1
    count = 0
    for name, child in module.named_children():
        new_child, n = _replace_in_tree(child, should_replace, make)
        if new_child is not child:
            setattr(module, name, new_child)
        count += n
    return module, count


def convert_to_frozen_norm(module: nn.Module) -> tuple[nn.Module, int]:
    """Replace every running-statistics norm layer in ``module`` by its frozen equivalent.

    ``module`` is changed in place; if ``module`` itself is a norm layer a new module is returned.
    Values are cloned, ``state_dict`` keys are unchanged, and the eval-mode output is bitwise
    identical.

    Returns:
        ``(module, number_of_layers_converted)``.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> net, n = convert_to_frozen_norm(net)
        >>> n, type(net[1]).__name__
        (1, 'FrozenBatchNorm')
    """
    return _replace_in_tree(
        module,
        lambda m: is_running_stat_norm(m) and not isinstance(m, _FrozenNormBase),
        _frozen_equivalent,
    )


def convert_from_frozen_norm(module: nn.Module) -> tuple[nn.Module, int]:
    """Inverse of :func:`convert_to_frozen_norm`: frozen norm layers become trainable layers again.

    The new layers are of the class the frozen ones were made from, with the same values, and
    their affine parameters require grad. They are new objects: an optimizer must be given them.

    Returns:
        ``(module, number_of_layers_converted)``.
    """
    return _replace_in_tree(module, lambda m: isinstance(m, _FrozenNormBase), lambda m: m.unfrozen())
