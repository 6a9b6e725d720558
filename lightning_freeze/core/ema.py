"""TrainableEMA: an exponential moving average of the *trainable* tensors of a model only.

Pure PyTorch (no Lightning import): usable from a plain training loop; the Lightning callback
:class:`~lightning_freeze.FrozenSafeEMA` is a thin adapter over it.

Three traps of the usual weight EMA, and what this one does instead:

* ``decay * e + (1 - decay) * m`` is not exact when ``e == m``: both products are rounded, so a
  weight that does not change drifts by a few ulps per update. :func:`torch.lerp` computes
  ``e + w * (m - e)`` and is exact when ``e == m`` (``m - e`` is exactly 0), so the shadow of a
  weight that stops moving stays bitwise equal to it.
* Peers deep-copy the whole model and average weights that cannot change. Here only parameters
  with ``requires_grad=True`` (and, optionally, the buffers of the modules that own them) are
  shadowed; frozen tensors are never read, copied or written.
* A high decay from the first step hides a freshly initialised branch behind its initial weights
  for thousands of steps. The effective decay warms up from 0 (see :func:`effective_decay`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_freeze import _compat
from lightning_freeze.core.distributed import copy_full_into, is_sharded
from lightning_freeze.core.validation import check_choice, check_number, choices_of

__all__ = [
    "BUFFER_MODES",
    "WARMUP_POWER",
    "BufferMode",
    "TrainableEMA",
    "effective_decay",
    "trainable_tensors",
]

BufferMode = Literal["copy", "average", "ignore"]
BUFFER_MODES: tuple[str, ...] = choices_of(BufferMode)
WARMUP_POWER = 0.75
_STATE_FORMAT = 1


def effective_decay(decay: float, updates: int, warmup: bool = True) -> float:
    r"""The decay applied at an update of a tensor that has already received ``updates`` updates.

    With warm-up (the ``EMAWarmup`` schedule, as in timm's ``ModelEmaV3`` with ``gamma=1``,
    ``power=3/4``)::

        d(t) = min(decay, 1 - (1 + t) ** -0.75)          t = updates already applied

    so ``d(0) = 0`` (the first update copies the weights), ``d(1) = 0.41``, ``d(10) = 0.834``,
    ``d(100) = 0.969``, ``d(1000) = 0.9944``, and ``d`` reaches 0.999 after about 10,000 updates
    and 0.9999 after about 215,000. A fresh branch's EMA follows it within ~10 updates.
    Without warm-up ``d(0) = 0`` too (the first update copies, like ``AveragedModel`` and timm),
    then ``d(t) = decay``.

    Args:
        decay: the target decay, in (0, 1).
        updates: number of updates the tensor already received (``t`` above), >= 0.
        warmup: apply the warm-up schedule.

    Returns:
        the decay ``d``; the update is ``shadow = lerp(shadow, weight, 1 - d)``.
    """
    if updates <= 0:
        return 0.0
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + updates) ** -WARMUP_POWER)


def trainable_tensors(model: nn.Module, buffers: BufferMode = "copy") -> dict[str, tuple[Tensor, bool]]:
    """The tensors a :class:`TrainableEMA` shadows, keyed as in ``model.state_dict()``.

    * every parameter with ``requires_grad=True``;
    * unless ``buffers="ignore"``: every persistent buffer of a *trainable module*, i.e. a module
      that owns (directly, not through a child) at least one parameter with ``requires_grad=True``.
      The buffers of a module with no trainable parameter of its own (a BatchNorm inside a frozen
      backbone, a ``BatchNorm(affine=False)``) are left alone.

    Only the ``requires_grad`` flags are read: the frozen tensors' values are never touched.
    A tensor shared under several names appears once, under its first name.

    Returns:
        ``{key: (tensor, is_parameter)}`` in module registration order (the same on every rank).
    """
    out: dict[str, tuple[Tensor, bool]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        found = [(n, p, True) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if found and buffers != "ignore":  # a trainable module: its buffers too
            found += [(n, b, False) for n, b in _compat.persistent_buffers(module)]
        for name, tensor, is_param in found:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                out[prefix + name] = (tensor, is_param)
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


@dataclass
class _Entry:
    tensor: Tensor  # the live parameter or buffer of the model
    shadow: Tensor
    lerp: bool  # averaged (True) or copied (False)
    joined_at: int  # value of num_updates when the tensor joined the shadow

    @classmethod
    def of(cls, tensor: Tensor, value: Tensor, lerp: bool, joined_at: int) -> _Entry:
        # the averaged shadow is at least fp32 (bf16/fp16 weights lose the average otherwise)
        dtype = torch.promote_types(tensor.dtype, torch.float32) if lerp else tensor.dtype
        shadow = torch.empty_like(tensor, dtype=dtype)
        copy_full_into(shadow, value)  # a full saved tensor into a sharded shadow: this rank's slice
        return cls(tensor, shadow, lerp, joined_at)


@dataclass
class _Group:
    lerp: bool
    joined_at: int  # -1 for copied tensors
    device: torch.device
    shadow_dtype: torch.dtype
    source_dtype: torch.dtype
    shadows: list[Tensor]
    sources: list[Tensor]


class TrainableEMA:
    r"""Exponential moving average of the trainable tensors of a model, exact for tensors that do not move.

    Only parameters with ``requires_grad=True`` are shadowed (plus, with ``buffers="copy"`` or
    ``"average"``, the buffers of the modules that own them, see :func:`trainable_tensors`);
    frozen tensors are never read, copied or written. The shadow is fp32 (or wider) even for
    fp16/bf16 parameters, lives on each parameter's device, and is updated with torch's fused
    foreach lerp grouped by device and dtype (plain ``lerp_`` loop as fallback).
    ``lerp`` is exact when shadow and weight are equal, so a tensor that stops changing keeps a
    bitwise-equal shadow, unlike ``decay * e + (1 - decay) * m``.

    Parameter references are resolved once (at construction and at :meth:`sync`), not per update.
    When the trainable set changes (unfreezing, switching a branch), call :meth:`sync`: new
    trainables join from their current value (and warm up from 0 on their own), newly frozen ones
    leave the shadow.

    Args:
        model: the model (a ``DistributedDataParallel``/``DataParallel`` wrapper is unwrapped).
            Move it to its device before creating the EMA (a later move is followed, at a cost).
        decay: target decay, strictly between 0 and 1. Default ``0.999``.
        warmup: ramp the effective decay up from 0 (see :func:`effective_decay`). Default ``True``.
        buffers: what to do with the buffers of trainable modules (e.g. the running statistics of
            a BatchNorm in a trainable head): ``"copy"`` (default) keeps a copy taken at each update,
            ``"average"`` averages floating-point buffers like the weights (integer buffers such as
            ``num_batches_tracked`` are copied), ``"ignore"`` leaves them out (the raw buffers are
            used with the EMA weights). Buffers of frozen modules are never read or written.

    Raises:
        ValueError: ``decay`` not in (0, 1), unknown ``buffers``, or no parameter requires grad.

    Example::

        ema = TrainableEMA(model, decay=0.999)
        for x, y in loader:
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.update(model)
        with ema.swapped_into(model):  # EMA weights inside, raw weights restored bitwise after
            evaluate(model)
        torch.save(ema.state_dict(), "ema.pt")
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.999, warmup: bool = True, buffers: BufferMode = "copy"
    ) -> None:
        self.__bind(model, decay, warmup, buffers)
        self.sync()

    def __bind(self, model: nn.Module, decay: float, warmup: bool, buffers: BufferMode) -> None:
        # the state of an EMA bound to `model` with no shadow yet (also for from_state_dict)
        self.decay = check_decay(decay)
        self.warmup = bool(warmup)
        self.buffers = check_choice("buffers", buffers, BUFFER_MODES)
        self.num_updates = 0
        self.last_decay: float | None = None
        self._model = _unwrap(model)
        self._entries: dict[str, _Entry] = {}
        self._groups: list[_Group] = []
        self._swapped: dict[str, tuple[Tensor, Tensor]] | None = None  # key -> (live tensor, raw value)

    # --- construction / trainable set ---------------------------------------------------------
    @classmethod
    def from_state_dict(cls, model: nn.Module, state: Mapping[str, Any], **overrides: Any) -> TrainableEMA:
        """An EMA bound to ``model`` with the shadow and counters of ``state`` (see :meth:`state_dict`).

        Unlike ``TrainableEMA(model).load_state_dict(state)`` it never builds a shadow from the
        current weights first. ``decay``/``warmup``/``buffers`` come from ``state`` unless given in
        ``overrides``.
        """
        _check_state(state)
        config = {k: state[k] for k in ("decay", "warmup", "buffers")}
        unknown = set(overrides) - set(config)
        if unknown:
            raise TypeError(f"Unexpected argument(s) {sorted(unknown)}; valid: {sorted(config)}.")
        ema = cls.__new__(cls)
        ema.__bind(model, **{**config, **overrides})
        ema.load_state_dict(state)
        return ema

    def sync(self, model: nn.Module | None = None) -> tuple[list[str], list[str]]:
        """Re-resolve the trainable set of ``model`` (default: the bound model).

        Tensors that became trainable join the shadow from their current value (their warm-up
        starts at 0); tensors that are no longer trainable leave it. Cheap when nothing changed.
        Passing another model object binds the EMA to it (shadows are matched by key).

        Returns:
            ``(added keys, removed keys)``.

        Raises:
            ValueError: the model has no parameter with ``requires_grad=True``.
        """
        self._require_not_swapped("sync")
        if model is not None:
            self._model = _unwrap(model)
        current = trainable_tensors(self._model, self.buffers)
        if not any(is_param for _, is_param in current.values()):
            total = sum(1 for _ in self._model.parameters())
            raise ValueError(
                f"Nothing to average: {type(self._model).__name__} has 0 trainable of {total} parameters "
                "(requires_grad=True on none). TrainableEMA shadows trainable parameters only; valid: a "
                "model with at least one parameter that requires grad."
            )
        removed = [key for key in self._entries if key not in current]  # dropped by the reordering below
        added = []
        with torch.no_grad(), torch.inference_mode(False):
            for key, (tensor, is_param) in current.items():
                entry = self._entries.get(key)
                lerp = self._averaged(tensor, is_param)
                if entry is not None and entry.shadow.shape == tensor.shape and entry.lerp == lerp:
                    entry.tensor = tensor  # the same tensor, or its replacement under the same name
                    continue
                self._entries[key] = _Entry.of(tensor, tensor.detach(), lerp, self.num_updates)
                added.append(key)
        # keep registration order (identical on every rank, stable groups)
        self._entries = {key: self._entries[key] for key in current}
        self._regroup()
        return added, removed

    def _averaged(self, tensor: Tensor, is_param: bool) -> bool:
        return is_param or (self.buffers == "average" and tensor.is_floating_point())

    def _regroup(self) -> None:
        groups: dict[tuple[Any, ...], _Group] = {}
        for e in self._entries.values():
            if e.shadow.device != e.tensor.device:  # the model moved since
                e.shadow = e.shadow.to(e.tensor.device)
            key = (e.lerp, e.joined_at if e.lerp else -1, e.tensor.device, e.shadow.dtype, e.tensor.dtype)
            group = groups.setdefault(key, _Group(*key, [], []))
            group.shadows.append(e.shadow)
            group.sources.append(e.tensor)
        self._groups = list(groups.values())

    # --- the update ---------------------------------------------------------------------------
    def decay_at(self, updates: int) -> float:
        """:func:`effective_decay` with this EMA's ``decay`` and ``warmup``."""
        return effective_decay(self.decay, updates, self.warmup)

    def update(self, model: nn.Module | None = None) -> float:
        """One averaging step: ``shadow = lerp(shadow, weight, 1 - d)`` for every shadowed tensor.

        ``d`` is :meth:`decay_at` of the number of updates the tensor already received.

        Args:
            model: the model the EMA was built on (default). Another model object is bound first
                (see :meth:`sync`).

        Returns:
            the effective decay applied to the longest-shadowed tensors (also :attr:`last_decay`).
        """
        self._require_not_swapped("update")
        if model is not None and _unwrap(model) is not self._model:
            self.sync(model)
        # one attribute check per group: follows a model moved to another device or dtype
        if any(g.sources[0].device != g.device or g.sources[0].dtype != g.source_dtype for g in self._groups):
            self._regroup()
        groups = self._groups
        oldest = min((g.joined_at for g in groups if g.lerp), default=self.num_updates)
        with torch.no_grad():
            for group in groups:
                if not group.lerp:
                    _compat.foreach_copy_(group.shadows, group.sources)
                    continue
                weight = 1.0 - self.decay_at(self.num_updates - group.joined_at)
                sources = group.sources
                if group.source_dtype != group.shadow_dtype:  # fp16/bf16 weights, fp32 shadow
                    sources = [s.to(group.shadow_dtype) for s in sources]
                # lerp, not decay*e + (1-decay)*m: exact when e == m, so still weights never drift
                _compat.foreach_lerp_(group.shadows, sources, weight)
        self.last_decay = self.decay_at(self.num_updates - oldest)
        self.num_updates += 1
        return self.last_decay

    # --- using the averaged weights -----------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The model whose trainable tensors are averaged (unwrapped from DDP/DataParallel)."""
        return self._model

    @property
    def shadow(self) -> dict[str, Tensor]:
        """The shadow tensors (fp32 or wider for averaged tensors), keyed as in ``model.state_dict()``."""
        return {key: entry.shadow for key, entry in self._entries.items()}

    @property
    def parameter_shadow(self) -> dict[str, Tensor]:
        """The shadows of parameters only (no buffer), keyed as in ``model.state_dict()``.

        Under data parallelism these must be identical on every rank (the parameters are), while
        the buffers of a trainable BatchNorm differ per rank without SyncBatchNorm.
        """
        return {key: e.shadow for key, e in self._entries.items() if isinstance(e.tensor, nn.Parameter)}

    @property
    def sharded(self) -> bool:
        """Whether any shadow is sharded (``DTensor``: the model was sharded with FSDP2 ``fully_shard``).

        A sharded shadow holds only this rank's shard of each tensor (1/world of the memory) and is
        updated without communication; :meth:`ema_state_dict` ``(full=True)`` gathers it.
        """
        return any(is_sharded(e.shadow) for e in self._entries.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the shadow."""
        return sum(entry.shadow.numel() * entry.shadow.element_size() for entry in self._entries.values())

    @property
    def swapped(self) -> bool:
        """Whether the EMA weights are currently swapped into the model."""
        return self._swapped is not None

    def _resolve(self, model: nn.Module | None) -> nn.Module:
        return self._model if model is None else _unwrap(model)

    def _pairs(self, model: nn.Module | None) -> tuple[list[str], list[Tensor], list[Tensor]]:
        # (keys, live tensors, shadows) of the shadowed tensors that are trainable in `model` now:
        # a tensor frozen since the last sync is never written
        live = trainable_tensors(self._resolve(model), self.buffers)
        keys = [k for k, e in self._entries.items() if k in live and live[k][0].shape == e.shadow.shape]
        return keys, [live[k][0] for k in keys], [self._entries[k].shadow for k in keys]

    def swap_in(self, model: nn.Module | None = None) -> dict[str, Tensor]:
        """Copy the EMA weights into the model, keeping the raw values aside; undo with :meth:`restore`.

        Only tensors that are shadowed *and* trainable now are written. Prefer :meth:`swapped_into`.

        Returns:
            the raw values put aside, keyed as in ``model.state_dict()``.
        """
        self._require_not_swapped("swap_in")
        keys, tensors, shadows = self._pairs(model)
        with torch.no_grad():
            raw = [tensor.detach().clone() for tensor in tensors]
            _compat.foreach_copy_(tensors, shadows)
        self._swapped = dict(zip(keys, zip(tensors, raw, strict=True), strict=True))
        return dict(zip(keys, raw, strict=True))

    def raw_values(self, model: nn.Module | None = None) -> dict[str, Tensor]:
        """While swapped: the raw values put aside, under every ``model.state_dict()`` key that names them.

        Lets a checkpoint written while the EMA weights are swapped in hold the raw weights.
        Empty when not swapped.
        """
        if self._swapped is None:
            return {}
        by_id = {id(tensor): raw for tensor, raw in self._swapped.values()}
        state = self._resolve(model).state_dict(keep_vars=True)
        return {key: by_id[id(value)] for key, value in state.items() if id(value) in by_id}

    def restore(self) -> None:
        """Put the raw values back after :meth:`swap_in` (bitwise); no-op when not swapped."""
        if self._swapped is None:
            return
        swapped, self._swapped = self._swapped, None
        with torch.no_grad():
            _compat.foreach_copy_([t for t, _ in swapped.values()], [raw for _, raw in swapped.values()])

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module | None = None) -> Iterator[TrainableEMA]:
        """Context manager: the EMA weights are in ``model`` inside, the raw ones restored bitwise after.

        Only trainable tensors are swapped; frozen tensors are not touched. The raw values are
        restored even when the block raises.

        Example::

            with ema.swapped_into(model):
                val_loss = evaluate(model)
        """
        self.swap_in(model)
        try:
            yield self
        finally:
            self.restore()

    def copy_to(self, model: nn.Module | None = None) -> list[str]:
        """Write the EMA weights into ``model`` for good (cast to each tensor's dtype).

        Returns:
            the keys written (the shadowed tensors that are trainable in ``model``).
        """
        self._require_not_swapped("copy_to")
        keys, tensors, shadows = self._pairs(model)
        with torch.no_grad():
            _compat.foreach_copy_(tensors, shadows)
        return keys

    def ema_state_dict(self, model: nn.Module | None = None, full: bool = False) -> dict[str, Tensor]:
        """The full ``model.state_dict()`` with every shadowed tensor replaced by its EMA.

        Averaged tensors are new tensors cast to the model's dtype; the others (frozen ones) are
        the model's own (detached) tensors, not copies. ``model.load_state_dict(...)`` accepts it.

        On a sharded model (FSDP2 ``fully_shard``: ``DTensor`` parameters) the shadow is sharded
        like the parameters and the values are ``DTensor`` s, unless ``full=True``.

        Args:
            model: the model (default: the bound one).
            full: gather sharded values into full tensors (``DTensor.full_tensor()``, a collective:
                call it on every rank). No effect on a model without sharded tensors.
        """
        by_id = {id(entry.tensor): entry.shadow for entry in self._entries.values()}
        out: dict[str, Tensor] = {}
        for key, value in self._resolve(model).state_dict(keep_vars=True).items():
            if id(value) in by_id:
                value = by_id[id(value)].detach().to(dtype=value.dtype, copy=True)
            elif isinstance(value, Tensor):
                value = value.detach()
            if full and callable(getattr(value, "full_tensor", None)):
                value = value.full_tensor()  # type: ignore[operator]
            out[key] = value
        return out

    # --- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Shadow and counters (no frozen tensor), for ``torch.save`` or a Lightning checkpoint.

        The shadow tensors are returned by reference (like ``nn.Module.state_dict``).
        """
        return {
            "format": _STATE_FORMAT,
            "decay": self.decay,
            "warmup": self.warmup,
            "buffers": self.buffers,
            "num_updates": self.num_updates,
            "shadow": {key: entry.shadow for key, entry in self._entries.items()},
            "joined_at": {key: entry.joined_at for key, entry in self._entries.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore shadow and counters saved by :meth:`state_dict` (exactly, bitwise).

        The shadow afterwards holds exactly the keys of ``state`` (call :meth:`sync` to follow a
        trainable set that changed since). ``decay``/``warmup``/``buffers`` stay as configured.

        Raises:
            KeyError: a key of the saved shadow does not exist in the model.
            ValueError: a saved shadow has another shape than the model's tensor, or ``state``
                is not a TrainableEMA state.
        """
        self._require_not_swapped("load_state_dict")
        _check_state(state)
        live = {**dict(self._model.named_parameters()), **dict(self._model.named_buffers())}
        entries: dict[str, _Entry] = {}
        with torch.no_grad(), torch.inference_mode(False):
            for key, saved in state["shadow"].items():
                tensor = live.get(key)
                if tensor is None:
                    raise KeyError(
                        f"EMA state has a shadow for {key!r}, which {type(self._model).__name__} does not "
                        f"have; valid keys: the model's parameters and buffers, e.g. {list(live)[:5]}."
                    )
                if tuple(saved.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"EMA state shadow {key!r} has shape {tuple(saved.shape)}, the model's tensor "
                        f"{tuple(tensor.shape)}."
                    )
                lerp = self._averaged(tensor, isinstance(tensor, nn.Parameter))
                entries[key] = _Entry.of(tensor, saved, lerp, int(state["joined_at"].get(key, 0)))
        self._entries = entries
        self.num_updates = int(state["num_updates"])
        self._regroup()

    def __repr__(self) -> str:
        numel = sum(entry.shadow.numel() for entry in self._entries.values())
        return (
            f"{type(self).__name__}(decay={self.decay}, warmup={self.warmup}, buffers={self.buffers!r}, "
            f"tensors={len(self._entries)}, numel={numel}, num_updates={self.num_updates})"
        )

    def _require_not_swapped(self, what: str) -> None:
        if self._swapped is not None:
            raise RuntimeError(
                f"TrainableEMA.{what}() while the EMA weights are swapped into the model; call it after "
                "restore() / outside `with ema.swapped_into(model)`."
            )


def check_decay(decay: object) -> float:
    """Return ``decay`` as a float if it is a number strictly between 0 and 1, else raise ``ValueError``."""
    return check_number(
        "decay",
        decay,
        low=0.0,
        high=1.0,
        low_inclusive=False,
        high_inclusive=False,
        valid="a number strictly between 0 and 1 (e.g. 0.999, 0.9999)",
    )


def _check_state(state: Mapping[str, Any]) -> None:
    required = ("shadow", "joined_at", "num_updates", "decay", "warmup", "buffers")
    missing = [k for k in required if k not in state] if isinstance(state, Mapping) else list(required)
    if missing:
        raise ValueError(
            f"Not a TrainableEMA state (missing {missing}); valid: the dict returned by "
            "TrainableEMA.state_dict()."
        )
