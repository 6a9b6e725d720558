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
  is a no-op, and whose output is bitwise identical to the original layer in eval mode (checked on
  a probe input for every conversion). The ``state_dict`` keys are unchanged, so checkpoints load
  in both directions. Only layers whose forward is reproduced exactly are converted (the plain
  torch classes and subclasses that do not override ``forward``); others, such as timm
  ``BatchNormAct2d`` (normalization + activation) or EvoNorm, are left for :func:`pin_eval`.

Layers are found by type (``isinstance``), never by class-name strings or channel counts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_freeze import _compat
from lightning_freeze.core.bits import tensors_bitwise_equal

__all__ = [
    "FrozenBatchNorm",
    "FrozenInstanceNorm",
    "check_frozen_equivalent",
    "convert_from_frozen_norm",
    "convert_to_frozen_norm",
    "find_running_stat_norms",
    "frozen_norm_obstacle",
    "is_pinned",
    "is_running_stat_norm",
    "pin_eval",
    "running_stat_buffer_names",
    "unpin_eval",
]


def is_running_stat_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a layer that updates running statistics in train mode.

    True for ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``LazyBatchNorm*`` and ``InstanceNorm*``
    built with ``track_running_stats=True``, and any subclass of them (e.g. timm
    ``BatchNormAct2d``). Also true for the frozen equivalents of this module, which hold running
    statistics but never update them, and for other layers that keep a running average: a module
    that directly owns a floating-point buffer named ``running_*`` and has a ``momentum``
    attribute (e.g. timm ``EvoNorm2dB0`` and its ``running_var``). A module with a ``running_*``
    buffer but no ``momentum`` (``torchvision.ops.FrozenBatchNorm2d``) never updates it.
    """
    if isinstance(module, (FrozenBatchNorm, FrozenInstanceNorm)):
        return True
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        return bool(module.track_running_stats)
    return hasattr(module, "momentum") and bool(_running_buffers(module))


def _running_buffers(module: nn.Module) -> list[str]:
    return [
        name
        for name, buf in module.named_buffers(recurse=False)
        if name.startswith("running_") and buf.is_floating_point()
    ]


def running_stat_buffer_names(module: nn.Module) -> list[str]:
    """Names of the buffers of ``module`` that train mode updates (empty if it is no such layer).

    ``["running_mean", "running_var", "num_batches_tracked"]`` for BatchNorm/InstanceNorm, the
    ``running_*`` buffers (plus ``num_batches_tracked`` if present) for other running-statistics
    layers such as EvoNorm.
    """
    if not is_running_stat_norm(module):
        return []
    names = _running_buffers(module)
    if any(name == "num_batches_tracked" for name, _ in module.named_buffers(recurse=False)):
        names.append("num_batches_tracked")
    return names


def find_running_stat_norms(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """All running-statistics layers in ``module`` (itself included), keyed by dotted name.

    See :func:`is_running_stat_norm` for what counts.

    Args:
        module: the module to search.
        prefix: prepended to every name (``"backbone"`` gives ``"backbone.bn1"``).
    """
    return {name: m for name, m in module.named_modules(prefix=prefix) if is_running_stat_norm(m)}


# --- pinning ---------------------------------------------------------------------------------
def _force_eval_pre_hook(module: nn.Module, args: Any) -> None:
    # Runs right before every forward: whatever called .train() since (user hooks, a .train()
    # inside training_step, LightningModule.unfreeze()), this layer computes in eval mode.
    if module.training:
        module.train(False)


def is_pinned(module: nn.Module) -> bool:
    """Whether :func:`pin_eval` pinned ``module`` (and :func:`unpin_eval` has not undone it)."""
    return any(hook is _force_eval_pre_hook for hook in _compat.module_forward_hooks(module)[0])


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
    newly = 0
    for module in _module_list(modules):
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
        count += bool(_compat.remove_forward_pre_hooks(module, lambda hook: hook is _force_eval_pre_hook))
        if mode is not None:
            module.train(mode)
    return count


def _module_list(modules: dict[str, nn.Module] | list[nn.Module] | nn.Module) -> list[nn.Module]:
    if isinstance(modules, nn.Module):
        return [modules]
    if isinstance(modules, dict):
        return list(modules.values())
    return list(modules)


# --- frozen equivalents -----------------------------------------------------------------------
class _FrozenNormBase(nn.Module):
    """Shared machinery of the frozen norm layers: everything is a buffer, ``train()`` is a no-op."""

    # not scripted: plain Python state for the exact round trip back to the source class
    __jit_ignored_attributes__ = ["_template"]

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        if isinstance(source, _LazyNormBase) and source.has_uninitialized_params():
            raise ValueError(
                f"Cannot freeze {type(source).__name__}: it is still uninitialized (lazy). "
                "Run one forward pass so it knows its number of features, then freeze it."
            )
        self.num_features: int = int(source.num_features)
        self.eps: float = float(source.eps)
        self.momentum = source.momentum
        self.affine: bool = bool(source.affine)
        self.track_running_stats = True
        # A tensor-free copy of the source layer (class, constructor arguments, attributes): the
        # round trip back (:meth:`unfrozen`) loads this layer's values into a copy of it. Not a
        # registered submodule: no state_dict keys, not moved by .to(), ignored by TorchScript.
        # (a SyncBatchNorm's process group is shared, not copied)
        group = getattr(source, "process_group", None)
        template = copy.deepcopy(source, {id(group): group} if group is not None else None)
        unpin_eval(template)
        object.__setattr__(self, "_template", template.to("meta"))
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                tensor = getattr(source, name)  # weight and bias are None without affine
                self.register_buffer(name, None if tensor is None else tensor.detach().clone())
        # input ranks the source class accepts, probed once with its own check (scriptable forward)
        self._min_dim, self._max_dim = _accepted_ranks(source)
        if self._min_dim == self._max_dim:
            self._expected_rank = f"{self._min_dim}D"
        elif self._max_dim > _MAX_PROBED_RANK:
            self._expected_rank = f"at least {self._min_dim}D"
        else:
            self._expected_rank = f"{self._min_dim}D or {self._max_dim}D"
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

    def _check_rank(self, input: torch.Tensor) -> None:
        dim = input.dim()
        if dim < self._min_dim or dim > self._max_dim:
            raise ValueError("expected " + self._expected_rank + " input (got " + str(dim) + "D input)")

    def unfrozen(self) -> nn.Module:
        """A layer of the original class and constructor arguments with the same values, in train mode.

        The tensors are cloned (bitwise equal, same dtype and device as this layer's); the affine
        parameters are new ``nn.Parameter`` objects that require grad.
        """
        layer = copy.deepcopy(self._template)
        with torch.no_grad():
            params = dict(layer.named_parameters(recurse=False))
            buffers = dict(layer.named_buffers(recurse=False))
            for name, value in self._buffers.items():
                if value is not None and (name in params or name in buffers):
                    value = value.detach().clone()
                    setattr(layer, name, nn.Parameter(value) if name in params else value)
        left = [n for n, t in layer.state_dict(keep_vars=True).items() if t is not None and t.is_meta]
        if left:
            raise RuntimeError(f"Cannot restore {type(layer).__name__}: no values for {left}.")
        return layer.train(True)

    def extra_repr(self) -> str:
        source = type(self._template).__name__
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, frozen from {source}"


_MAX_PROBED_RANK = 8


def _accepted_ranks(source: nn.Module) -> tuple[int, int]:
    ok = [rank for rank in range(_MAX_PROBED_RANK + 1) if _compat.norm_accepts_rank(source, rank)]
    if not ok:
        raise TypeError(f"{type(source).__name__}._check_input_dim accepts no input rank up to 8.")
    return ok[0], (2**31 - 1 if ok[-1] == _MAX_PROBED_RANK else ok[-1])


class FrozenBatchNorm(_FrozenNormBase):
    """A BatchNorm (1d/2d/3d/Sync/Lazy) whose statistics and affine terms never change.

    Output is bitwise identical to the source layer in eval mode (same ``F.batch_norm`` call).
    Unlike ``torchvision.ops.FrozenBatchNorm2d`` it works for any input rank, keeps
    ``num_batches_tracked`` so ``state_dict`` keys match the source layer exactly, and
    ``LightningModule.unfreeze()`` cannot make it trainable (it has no parameters). It works with
    ``torch.jit.script``. :meth:`unfrozen` gives back a layer of the source's exact class and
    constructor arguments.

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
        self._check_rank(input)
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class FrozenInstanceNorm(_FrozenNormBase):
    """An InstanceNorm (``track_running_stats=True``) that always normalizes with its stored statistics.

    Output is bitwise identical to the source layer in eval mode (same ``F.instance_norm`` call).
    Works with ``torch.jit.script``.

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
        self._feature_dim: int = _compat.instance_norm_no_batch_dim(source)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize with the stored running statistics (eval-mode InstanceNorm)."""
        self._check_rank(input)
        unbatched = input.dim() == self._feature_dim
        if unbatched:
            input = input.unsqueeze(0)
        out = F.instance_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return out.squeeze(0) if unbatched else out


# the forwards the frozen equivalents reproduce exactly (eval mode); a subclass that overrides
# forward (timm BatchNormAct2d: + activation + drop) computes something else
_REPRODUCED_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward, _InstanceNorm.forward)


def frozen_norm_obstacle(module: nn.Module) -> str | None:
    """Why ``module`` cannot be replaced by a frozen equivalent, or ``None`` if it can.

    Only layers whose forward :class:`FrozenBatchNorm` / :class:`FrozenInstanceNorm` reproduce
    exactly are converted: the plain torch classes (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
    ``LazyBatchNorm*``, ``InstanceNorm*`` with running stats) and subclasses that do not override
    ``forward``, have no submodules and no forward hooks. Everything else (timm ``BatchNormAct2d``,
    EvoNorm, ...) is kept and pinned to eval instead. A candidate must also pass
    :func:`check_frozen_equivalent` (bitwise equal output on a probe input).
    """
    cls = type(module)
    if not isinstance(module, (_BatchNorm, _InstanceNorm)) or not module.track_running_stats:
        return f"{cls.__name__} is not a torch BatchNorm/InstanceNorm with running statistics"
    if cls.forward not in _REPRODUCED_FORWARDS:
        return f"{cls.__name__} overrides forward (it computes more than the normalization)"
    if next(iter(module.children()), None) is not None:
        return f"{cls.__name__} has submodules"
    pre, post = _compat.module_forward_hooks(module)
    if post or any(h is not _force_eval_pre_hook for h in pre):
        return f"{cls.__name__} has forward hooks"
    return None


def _probe_input(module: nn.Module) -> torch.Tensor:
    # deterministic, independent of the global RNG; rank accepted by the class's own check
    low, high = _accepted_ranks(module)
    rank = min(max(low, 3), high, 5)
    if isinstance(module, _InstanceNorm):
        rank = _compat.instance_norm_no_batch_dim(module) + 1
    shape = (2, int(module.num_features)) + (3,) * (rank - 2)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(shape, generator=generator) * 2 + 0.5
    ref = module.running_mean
    return probe.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else torch.float32)


def check_frozen_equivalent(source: nn.Module, frozen: nn.Module) -> str | None:
    """Run ``source`` (in eval mode) and ``frozen`` on a fixed probe input; ``None`` if bitwise equal.

    The probe has the rank the source class accepts, ``num_features`` channels, and values from
    a seeded ``torch.Generator`` (the global RNG is not touched). ``source`` keeps its mode.

    Returns:
        ``None`` when the outputs are bitwise equal, else a sentence saying how they differ.
    """
    probe = _probe_input(source)
    was_training = source.training
    try:
        source.train(False)
        with torch.no_grad():
            expected = source(probe)
            got = frozen(probe)
    finally:
        source.train(was_training)
    if tensors_bitwise_equal(expected, got):
        return None
    diff = (expected.double() - got.double()).abs().max().item() if expected.shape == got.shape else "n/a"
    return f"its frozen equivalent's output differs on a probe input (max abs diff {diff})"


def _replace_in_tree(
    module: nn.Module,
    make: Callable[[str, nn.Module], nn.Module | None],
    prefix: str = "",
) -> tuple[nn.Module, list[str]]:
    # ``make`` returns the replacement, or None to keep the module and search inside it
    new = make(prefix, module)
    if new is not None:
        return new, [prefix]
    replaced: list[str] = []
    for name, child in module.named_children():
        new_child, names = _replace_in_tree(child, make, f"{prefix}.{name}" if prefix else name)
        if new_child is not child:
            setattr(module, name, new_child)
        replaced.extend(names)
    return module, replaced


def convert_to_frozen_norm(
    module: nn.Module, *, kept: dict[str, str] | None = None, prefix: str = ""
) -> tuple[nn.Module, int]:
    """Replace every running-statistics norm layer in ``module`` that can be frozen exactly.

    ``module`` is changed in place; if ``module`` itself is a norm layer a new module is returned.
    Values are cloned and ``state_dict`` keys are unchanged. Each conversion proves itself: the
    frozen layer's output must equal the source layer's eval output bitwise on a probe input
    (:func:`check_frozen_equivalent`). Layers that cannot be converted exactly (see
    :func:`frozen_norm_obstacle`: a subclass that overrides ``forward`` such as timm
    ``BatchNormAct2d``, EvoNorm, a layer with hooks) or whose probe differs are **not** converted
    and not refused: they are left in place, reported in ``kept``, and the caller pins them to
    eval (:func:`pin_eval`; :func:`~lightning_freeze.core.freeze.freeze` does).

    Args:
        module: the module to convert.
        kept: if given, filled with ``{dotted name: reason}`` for each running-statistics layer
            left unconverted.
        prefix: prepended to the names in ``kept``.

    Returns:
        ``(module, number_of_layers_converted)``.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> net, n = convert_to_frozen_norm(net)
        >>> n, type(net[1]).__name__
        (1, 'FrozenBatchNorm')
    """

    def make(name: str, layer: nn.Module) -> nn.Module | None:
        if not is_running_stat_norm(layer) or isinstance(layer, _FrozenNormBase):
            return None
        reason = frozen_norm_obstacle(layer)
        if reason is None:
            frozen = (FrozenBatchNorm if isinstance(layer, _BatchNorm) else FrozenInstanceNorm)(layer)
            reason = check_frozen_equivalent(layer, frozen)
            if reason is None:
                return frozen
        if kept is not None:
            kept[name] = reason
        return None

    module, names = _replace_in_tree(module, make, prefix)
    return module, len(names)


def convert_from_frozen_norm(module: nn.Module) -> tuple[nn.Module, int]:
    """Inverse of :func:`convert_to_frozen_norm`: frozen norm layers become trainable layers again.

    Each new layer is of the exact class and constructor arguments of the layer it was made from
    (a copy of it), with bitwise the same values, in train mode, and its affine parameters require
    grad. They are new objects: an optimizer must be given them.

    Returns:
        ``(module, number_of_layers_converted)``.
    """
    module, names = _replace_in_tree(
        module, lambda _, m: m.unfrozen() if isinstance(m, _FrozenNormBase) else None
    )
    return module, len(names)
