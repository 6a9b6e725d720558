"""Cache the outputs of a frozen module, keyed by each sample's input bits and the module's bits.

A frozen backbone computes the same features for the same sample every epoch. :class:`OutputCache`
attaches to such a module (no trainer needed) and serves its output from a store instead of
recomputing it, **exactly**:

* **Sample key**: XXH3-128 over each sample's row of every tensor argument (exact bits, dtype,
  per-sample shape; :func:`~lightning_freeze.core.cache_keys.sample_keys`), any tensor argument
  without the batch dimension whole, and an exact encoding of the other arguments
  (:mod:`lightning_freeze.core.structure`); a call with an argument that has no exact encoding is
  computed, not cached. Hashed on the CPU (the ``FeatureCache`` callback hashes the host tensors
  a batch had before it moved to the device; on its own, inputs on an accelerator are copied to the
  host). Two different inputs share a key with probability at most ``n**2 / 2**129`` for ``n``
  cached samples (non-adversarial data), and the module key must match as well.
* **Module key**: BLAKE2b-128 over the fingerprint of every parameter and buffer (bits, dtype,
  shape), the type, ``extra_repr`` and train/eval mode of every submodule, the input's device
  type, the autocast state and dtype, the float32-matmul/TF32/cuDNN/deterministic flags and the
  torch version. Another checkpoint, a changed buffer, another mode or precision never hits.
  With ``tensor_check="call"`` (default) every call compares cheap tokens (identity, data
  pointer, version counter of every tensor, modes, autocast state), so in-place updates are seen
  at the next call; with ``"refresh"`` (the Lightning callback) the tensors are hashed again only
  after :meth:`OutputCache.refresh` or ``load_state_dict``. Writes through ``tensor.data`` (which
  bypass version counters) are seen only after a refresh.
* **Outputs**: a hit rebuilds the output with the structure and types of a miss (tuples, lists,
  namedtuples, dicts, dataclasses, HF ``ModelOutput``); an output that cannot be rebuilt exactly
  switches the cache off.
* **Stores**: a failing disk store turns itself off with one warning (see
  :class:`~lightning_freeze.core.cache_stores.DiskStore`); results never change.
* **Exact**: an entry holds the bits the module produced for that sample. Batches whose samples
  all miss run the module on the batch as given, so a run in a fixed order computes every batch
  exactly as without the cache. With shuffling a sample may be served from another batch than
  the one it would be computed in now; batched kernels can differ in the last bits between batch
  compositions, so shuffled runs match an uncached run closely, not bitwise.

Only a module that cannot change its output or itself is cached: no parameter requires grad, and
no running-statistics norm layer, dropout, ``DropPath``/``StochasticDepth`` or attention with
dropout would run in train mode (pinned or freeze-guarded layers run in eval and are accepted;
:class:`UncacheableModuleError` otherwise). Random augmentation before
the module makes every input new: such calls only miss (the Lightning callback detects it and
stops caching training batches).

Example::

    >>> backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval().requires_grad_(False)
    >>> cache = OutputCache(backbone)              # store="memory" by default
    >>> x = torch.randn(3, 4)
    >>> with cache:                                # attached: backbone(x) goes through the cache
    ...     first, second = backbone(x), backbone(x)
    >>> torch.equal(first, second), cache.stats["hits"], cache.stats["misses"]
    (True, 3, 3)
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_freeze import _compat
from lightning_freeze.core.cache_keys import (
    KEY_BYTES,
    RowDigestMemo,
    combine_row_digests,
    context_flags,
    module_modes,
    module_state_key,
    row_digests,
    sample_keys,
    tensor_digest,
    tensor_key,
)
from lightning_freeze.core.cache_stores import (
    MEMORY_DEVICES,
    STORES,
    DiskStore,
    Entry,
    MemoryStore,
    check_max_bytes,
    check_writable_directory,
    entry_bytes,
    make_store,
)
from lightning_freeze.core.purity import purity_reasons, train_behaviour
from lightning_freeze.core.structure import (
    Structure,
    UnsupportedStructure,
    flatten,
    flatten_exact,
    unflatten,
)
from lightning_freeze.core.validation import check_choice

__all__ = [
    "KEY_BYTES",
    "MEMORY_DEVICES",
    "STORES",
    "DiskStore",
    "MemoryStore",
    "OutputCache",
    "UncacheableModuleError",
    "bypass_output_caches",
    "check_max_bytes",
    "check_writable_directory",
    "make_store",
    "module_state_key",
    "sample_keys",
    "tensor_digest",
    "uncacheable_reasons",
]

_log = logging.getLogger(__name__)


class UncacheableModuleError(ValueError):
    """A module whose output is not a pure function of its input: it must not be cached."""


def uncacheable_reasons(module: nn.Module, prefix: str = "", check_grad: bool = True) -> list[str]:
    """Why ``module``'s output may change between two calls on the same input (empty: cacheable).

    Checks that no parameter requires grad (it would be trained, and its output would need a
    gradient) and that no layer that is random or updates state in train mode would run in train
    mode: the one rule of :mod:`lightning_freeze.core.purity` (running-statistics norm layers,
    dropout, ``DropPath``/``StochasticDepth``/``DropBlock``, ``nn.MultiheadAttention`` with
    dropout; pinned layers and layers a freeze guard forces to eval count as eval). A custom layer
    that branches on ``self.training`` is not detected: put the module in eval mode (or freeze it
    with ``FreezeBackbone``) to be safe.

    Args:
        module: the module.
        prefix: its name, used in the messages.
        check_grad: also refuse parameters that require grad (``False`` under ``torch.no_grad()``,
            where a trainable module is as constant as a frozen one).
    """
    return purity_reasons(module, prefix, check_grad=check_grad)


def _mode_sensitive_layers(module: nn.Module) -> list[nn.Module]:
    """The submodules whose train/eval mode changes what they compute (see :func:`uncacheable_reasons`).

    ``module`` itself first; then every layer :func:`~lightning_freeze.core.purity.train_behaviour`
    knows (the one rule the freeze guard and the cacheability check share).
    """
    return [module] + [m for m in module.modules() if m is not module and train_behaviour(m) is not None]


def _same_structure(entries: Sequence[Entry | None]) -> bool:
    """Whether the stored entries of a batch share one structure (one output of one call)."""
    specs = [e[0] for e in entries if e is not None]
    return all(spec is specs[0] or spec == specs[0] for spec in specs)


def _stack_entries(entries: Sequence[Entry], device: torch.device) -> Any | None:
    """The batched output of per-sample entries (same structure), on ``device``.

    ``None`` when the structure names a class that is not loaded in this process.
    """
    leaves = [torch.stack([e[1][j] for e in entries]).to(device) for j in range(len(entries[0][1]))]
    try:
        return unflatten(leaves, entries[0][0])
    except UnsupportedStructure:
        return None


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------
_BYPASS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "lightning_freeze_bypass_caches", default=False
)


@contextlib.contextmanager
def bypass_output_caches() -> Iterator[None]:
    """Inside this block every attached :class:`OutputCache` computes (and neither reads nor stores).

    For calls that must see the module's real function, such as ``FreezeBackbone``'s output probe:
    a cached output would only prove that the cache is consistent with itself.
    """
    token = _BYPASS.set(True)
    try:
        yield
    finally:
        _BYPASS.reset(token)


class _CachedForward:
    """What :meth:`OutputCache.attach` puts in ``module.forward``.

    Pickling or deep-copying the module gives a copy with its own, uncached forward.
    """

    def __init__(self, cache: OutputCache) -> None:
        self.cache = cache

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.cache._forward(*args, **kwargs)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return _plain_forward, (self.cache.module,)


def _plain_forward(module: nn.Module) -> Callable[..., Any]:
    return type(module).forward.__get__(module)


class _RefreshOnLoad:
    """The load_state_dict post-hook of an attached module: the next call hashes its tensors again.

    A pickled or deep-copied module gets a hook that does nothing (the copy is not cached).
    """

    def __init__(self, cache: OutputCache) -> None:
        self.cache = weakref.ref(cache)

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        cache = self.cache()
        if cache is not None:
            cache.refresh()

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return _IgnoreLoad, ()


class _IgnoreLoad:
    """What a copy of a module keeps of :class:`_RefreshOnLoad`: nothing to refresh."""

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        return None


class OutputCache:
    """Serve a frozen module's output from a store; compute it only for samples not seen before.

    Attach it (``attach()``, or ``with cache:``) and call the module as usual: the forward is
    replaced on the instance only, so ``state_dict``, hooks and the module's class are unchanged,
    and :meth:`detach` restores the plain forward. A call is cached when one of its tensor
    arguments has a batch dimension, every other argument has an exact encoding, and its output is
    a tensor, or tensors in tuples/lists/namedtuples/dicts/dataclasses, with that batch dimension
    first (e.g. a feature pyramid, a ``ModelOutput``); any other call runs the module as usual
    (``stats["bypassed"]``).

    Args:
        module: the frozen module (no parameter requiring grad, stochastic layers in eval mode).
        store: ``"memory"`` (default) or ``"disk"``, or a store object.
        directory: cache folder, required for ``store="disk"``.
        max_bytes: optional budget in bytes. When an entry would exceed it, the cache stops
            admitting new entries (what is stored stays and keeps hitting; other samples are
            computed every time) and ``stats["full"]`` becomes True. For the disk store the budget
            counts the files of the current module key already in the folder.
        device: memory store only: ``"cpu"`` (default, host RAM) or ``"output"`` (keep entries on
            the device that produced them, e.g. GPU memory).
        on_uncacheable: ``"raise"`` (default) raises :class:`UncacheableModuleError` when the
            module becomes uncacheable (e.g. unfrozen); ``"disable"`` switches the cache off for
            good and calls ``on_disable`` with the reason.
        on_disable: called once with a message when the cache switches itself off.
        name: the module's name in messages and parameter names (default: its class name).
        tensor_check: ``"call"`` (default): every call compares the version counters of the
            module's tensors (in-place updates are seen at the next call); ``"refresh"``: the
            tensors are hashed again only after :meth:`refresh` and ``load_state_dict`` (the lean
            per-call path the ``FeatureCache`` callback uses, refreshing at every Trainer call,
            training epoch and validation run).
        on_info: called once per message that explains a call not being cached (default: this
            module's logger at INFO).

    Attributes:
        stats: ``hits``, ``misses`` (samples), ``bypassed`` (calls not cacheable), ``stored``,
            ``bytes`` (held by the store), ``rejected`` (samples not admitted: budget full),
            ``corrupt`` (invalid disk files found), ``compute_s`` (seconds spent computing misses),
            ``time_saved_s`` (hits x mean compute time per missed sample, an estimate).
        enabled: False once the cache switched itself off (calls run the plain module).
        lookup: when False, calls run the plain module without hashing (e.g. random inputs).
        storing: when False, misses are computed but not stored.

    Raises:
        ValueError: unknown ``store``/``device``/``on_uncacheable``, ``max_bytes <= 0``, or a
            missing/unwritable ``directory``.
    """

    def __init__(
        self,
        module: nn.Module,
        store: Literal["memory", "disk"] | MemoryStore | DiskStore = "memory",
        directory: str | os.PathLike[str] | None = None,
        max_bytes: int | None = None,
        device: Literal["cpu", "output"] = "cpu",
        on_uncacheable: Literal["raise", "disable"] = "raise",
        on_disable: Callable[[str], None] | None = None,
        name: str | None = None,
        tensor_check: Literal["call", "refresh"] = "call",
        on_info: Callable[[str], None] | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"OutputCache caches an nn.Module, got {type(module).__name__}.")
        self.module = module
        self.max_bytes = check_max_bytes(max_bytes)
        self.store = (
            store if isinstance(store, (MemoryStore, DiskStore)) else make_store(store, directory, device)
        )
        self.on_uncacheable = check_choice("on_uncacheable", on_uncacheable, ("raise", "disable"))
        self.on_disable = on_disable
        self.tensor_check = check_choice("tensor_check", tensor_check, ("call", "refresh"))
        self.on_info = on_info
        self.name = name or type(module).__name__
        self._prefix = name or ""
        self.enabled = True
        self.lookup = True
        self.storing = True
        self.disabled_reason: str | None = None
        # calls of the attached forward (outside bypass_output_caches); (module key, sample keys, misses)
        # of the latest call that looked the samples up
        self.calls = 0
        self.last_call: tuple[bytes, list[bytes], int] | None = None
        # when set, every call of the attached forward goes to it instead (see FeatureCache skip_pipeline)
        self.redirect: Callable[..., Any] | None = None
        # row digests of batch tensors computed where the batch was born (FeatureCache: on the host)
        self.digests: RowDigestMemo | None = None
        self._said: set[str] = set()
        self._refreshes = 0
        self._stale = True
        self._watched: list[nn.Module] = []
        self._load_hook: Any = None
        self._token: tuple[Any, ...] | None = None
        self._tensor_token: tuple[Any, ...] | None = None
        self._tensors: bytes | None = None
        self._state: bytes | None = None
        self._compute_samples = 0
        self.stats: dict[str, Any] = {}
        self.reset_stats()

    # -- public -----------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the counters (``bytes`` keeps reporting what the store holds)."""
        self.stats.update(
            hits=0,
            misses=0,
            bypassed=0,
            stored=0,
            rejected=0,
            corrupt=0,
            full=False,
            compute_s=0.0,
            time_saved_s=0.0,
            bytes=self.store.bytes,
        )
        self._compute_samples = 0
        self._corrupt_base = getattr(self.store, "corrupt", 0)

    @property
    def attached(self) -> bool:
        """Whether the module's forward currently goes through this cache."""
        fwd = self.module.__dict__.get("forward")
        return isinstance(fwd, _CachedForward) and fwd.cache is self

    def attach(self, check: bool = True) -> OutputCache:
        """Route ``module(...)`` through the cache.

        Args:
            check: first check that the module is cacheable now (:meth:`check`). Every call
                checks again whenever the module changed.

        Raises:
            UncacheableModuleError: the module is trainable or has stochastic layers in train mode.
            RuntimeError: another cache is attached to the module.
        """
        fwd = self.module.__dict__.get("forward")
        if fwd is not None and not self.attached:
            raise RuntimeError(
                f"{self.name} already has an instance-level forward (another OutputCache?): detach it first."
            )
        if check:
            self.check()
        self.module.forward = _CachedForward(self)  # type: ignore[method-assign]
        if self._load_hook is None:  # load_state_dict (also through a parent) is seen at the next call
            self._load_hook = self.module.register_load_state_dict_post_hook(_RefreshOnLoad(self))
        self.refresh()
        return self

    def detach(self) -> None:
        """Restore the module's own forward (the store keeps its entries)."""
        if self.attached:
            del self.module.forward
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def __enter__(self) -> OutputCache:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def check(self, name: str | None = None, check_grad: bool = True) -> None:
        """Raise :class:`UncacheableModuleError` if the module cannot be cached now.

        Args:
            name: the module's name for the message (default: its class name).
            check_grad: also refuse parameters that require grad (see :func:`uncacheable_reasons`).
        """
        reasons = uncacheable_reasons(self.module, prefix=name or "", check_grad=check_grad)
        if reasons:
            raise UncacheableModuleError(
                f"Cannot cache {name or self.name}: " + "; ".join(reasons) + ". Freeze it first "
                "(lightning_freeze.core.freeze or the FreezeBackbone callback with norm='eval'/'frozen' "
                "and dropout='eval'), or do not cache it."
            )

    def refresh(self) -> None:
        """Hash the module's tensors again at the next call (sees even writes through ``tensor.data``).

        Called by :meth:`attach`, after every ``load_state_dict`` of the module (or of a module
        that contains it), and by the ``FeatureCache`` callback at the start of every Trainer call
        and every training epoch.
        """
        self._refreshes += 1
        self._stale = True  # the next call hashes again (the last digest stays readable until then)
        self._token = None
        self._tensor_token = None

    def disable(self, reason: str) -> None:
        """Switch the cache off for good: calls run the plain module; ``on_disable(reason)`` once."""
        if self.enabled:
            self.enabled = False
            self.disabled_reason = reason
            if self.on_disable is not None:
                self.on_disable(reason)

    def call_keys(self, *args: Any, **kwargs: Any) -> list[bytes] | None:
        """The sample keys a call ``module(*args, **kwargs)`` is looked up under (``None``: not cached).

        Computes nothing and touches no store.
        """
        call = self._call_keys(args, kwargs)
        return None if call is None else call[3]

    @property
    def state_key(self) -> bytes | None:
        """Module key of the latest cached call (``None`` before the first)."""
        return self._state

    # -- internals -------------------------------------------------------------------------------
    def _plain(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)

    def current_tensor_digest(self) -> bytes:
        """:func:`tensor_digest` of the module; hashed again only after a change it can see.

        With ``tensor_check="call"`` a change is any tensor whose identity, data pointer, version
        counter, dtype or device changed; with ``"refresh"`` only :meth:`refresh` (and
        ``load_state_dict``) make it hash again, and a digest asked for after a refresh but before
        the next call does not stand in for that call's (the call hashes again).
        """
        if self.tensor_check == "refresh" and self._stale:
            return tensor_digest(self.module)
        return self._tensor_digest(self._tensor_state())

    def _tensor_state(self) -> tuple[Any, ...]:
        if self.tensor_check == "refresh":
            return (self._refreshes,)
        tensors = [*self.module.parameters(), *self.module.buffers()]
        return (
            self._refreshes,
            tuple((id(t), t.data_ptr(), _compat.tensor_version(t), t.dtype, t.device) for t in tensors),
        )

    def _tensor_digest(self, tensor_token: tuple[Any, ...]) -> bytes:
        if self._tensors is None or self._tensor_token != tensor_token:  # hash only when a tensor changed
            self._tensors = tensor_digest(self.module)
            self._tensor_token = tensor_token
        return self._tensors

    def _call_token(self, device_type: str, grad: bool) -> tuple[Any, ...]:
        """What is read at every call to decide whether the module key must be derived again."""
        if self.tensor_check == "refresh":
            # lean: the tensors, requires_grad and the modes of layers whose mode cannot change
            # the output are read again only after refresh(); the grad mode, precision flags and
            # the modes of mode-sensitive layers at every call
            return (
                self._refreshes,
                grad,
                tuple(m.training for m in self._watched),
                context_flags(device_type),
            )
        return (
            self._tensor_state(),
            grad and any(p.requires_grad for p in self.module.parameters()),
            grad,
            module_modes(self.module),
            context_flags(device_type),
        )

    def _current_state(self, device_type: str) -> bytes | None:
        """The module key now, or ``None`` when the module is no longer cacheable (cache disabled).

        The key is derived again only when :meth:`_call_token` changed (or after :meth:`refresh`).
        """
        module = self.module
        grad = torch.is_grad_enabled()
        if self._stale:
            self._watched = _mode_sensitive_layers(module)
        token = self._call_token(device_type, grad)
        if self._stale or token != self._token:
            reasons = uncacheable_reasons(module, prefix=self._prefix, check_grad=grad)
            if reasons:
                message = f"{self.name} is no longer cacheable: " + "; ".join(reasons)
                if self.on_uncacheable == "raise":
                    raise UncacheableModuleError(message)
                self.disable(message + "; the cache is off from now on")
                return None
            if self._stale:
                self._tensors = None
            self._tensor_digest(token[0] if self.tensor_check == "call" else (self._refreshes,))
            self._state = module_state_key(module, device_type, tensors=self._tensors)
            self._token = token
            self._stale = False
            self.store.held_bytes(self._state)  # the disk store scans what other runs stored
            self.stats["bytes"] = self.store.bytes
        return self._state

    def _info(self, message: str) -> None:
        """Say ``message`` once (to ``on_info``, else this module's logger at INFO)."""
        if message in self._said:
            return
        self._said.add(message)
        if self.on_info is not None:
            self.on_info(message)
        else:
            _log.info(message)

    def _call_keys(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[list[torch.Tensor], Structure, list[bool], list[bytes]] | None:
        """Leaves, structure, batched-leaf mask and sample keys of a call; ``None``: not cacheable.

        Every tensor anywhere in the arguments contributes its exact bits: a tensor whose dim 0 is
        the batch size (that of the first tensor with a dim 0) row by row to its sample's key, any
        other tensor whole to every key. Every other argument is encoded exactly
        (:mod:`lightning_freeze.core.structure`); a call with an argument that has no exact
        encoding is computed, not cached (one info line).
        """
        try:
            leaves, spec = flatten((tuple(args), dict(sorted(kwargs.items()))))
        except UnsupportedStructure as err:
            self.stats["bypassed"] += 1
            self._info(
                f"FeatureCache: {self.name} was called with an argument the cache key cannot encode "
                f"exactly ({err}); such calls are computed, not cached."
            )
            return None
        batch = next((t.shape[0] for t in leaves if t.dim() > 0), 0)
        if not batch:
            self.stats["bypassed"] += 1
            return None
        batched = [t.dim() > 0 and t.shape[0] == batch for t in leaves]
        context = [json.dumps([spec, batched], separators=(",", ":")).encode()]
        digests = []
        for t, is_batched in zip(leaves, batched, strict=True):
            if is_batched:
                known = self.digests.lookup(t) if self.digests is not None else None
                digests.append(known if known is not None else row_digests(t))
            else:
                context.append(tensor_key(t))
        return leaves, spec, batched, combine_row_digests(digests, b"|".join(context))

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if _BYPASS.get():  # e.g. FreezeBackbone's output probe: not counted as a call
            return self._plain(*args, **kwargs)
        self.calls += 1
        self.last_call = None
        if self.redirect is not None:
            return self.redirect(*args, **kwargs)
        if not (self.enabled and self.lookup):
            return self._plain(*args, **kwargs)
        call = self._call_keys(args, kwargs)
        if call is None:
            return self._plain(*args, **kwargs)
        leaves, spec, batched, keys = call
        batch = len(keys)
        device = leaves[batched.index(True)].device
        state = self._current_state(device.type)
        if state is None:
            return self._plain(*args, **kwargs)
        failed = self.store.failed
        entries = [self.store.get(state, k) for k in keys]
        self.stats["corrupt"] = getattr(self.store, "corrupt", 0) - self._corrupt_base
        if self.store.failed != failed:  # the store broke during these reads: compute, as uncached
            return self._plain(*args, **kwargs)
        missing = [i for i, e in enumerate(entries) if e is None]
        if len(missing) < batch and not _same_structure(entries):
            missing = list(range(batch))  # cannot be assembled: compute the batch as given
            entries = [None] * batch
        self.last_call = (state, keys, len(missing))
        self.stats["hits"] += batch - len(missing)
        self.stats["misses"] += len(missing)
        if not missing:
            output = _stack_entries(entries, device)  # type: ignore[arg-type]
            if output is not None:
                self._account_saved()
                return output
            missing = list(range(batch))  # a class of the stored structure is not loaded here

        if len(missing) == batch:
            output = self._timed(args, kwargs, batch)
            flat = self._flatten_output(output, batch)
            if flat is None:
                return output
            self._store(state, keys, flat[1], flat[0])
            self._account_saved()
            return output

        # mixed batch: compute the missing samples only, assemble in the batch's order
        index = torch.tensor(missing, device=device)
        try:
            flatten_exact((tuple(args), dict(sorted(kwargs.items()))))
            sub_args, sub_kwargs = unflatten(
                [t.index_select(0, index) if b else t for t, b in zip(leaves, batched, strict=True)], spec
            )
        except UnsupportedStructure:  # arguments that do not rebuild exactly: compute the batch as given
            return self._plain(*args, **kwargs)
        output = self._timed(sub_args, sub_kwargs, len(missing))
        flat = self._flatten_output(output, len(missing))
        hit = next(e for e in entries if e is not None)
        if flat is None or flat[1] != hit[0]:
            # cannot assemble: recompute the whole batch plainly (correct, just not cached)
            return self._plain(*args, **kwargs)
        computed, structure = flat
        self._store(state, [keys[i] for i in missing], structure, computed)
        position = {i: n for n, i in enumerate(missing)}
        out_leaves = []
        for j, leaf in enumerate(computed):
            rows = [
                leaf[position[i]] if e is None else e[1][j].to(device)  # type: ignore[index]
                for i, e in enumerate(entries)
            ]
            out_leaves.append(torch.stack(rows))
        self._account_saved()
        return unflatten(out_leaves, structure)

    def _flatten_output(self, output: Any, batch: int) -> tuple[list[torch.Tensor], Structure] | None:
        """Leaves and structure of an output a hit can rebuild exactly; ``None`` (cache off) otherwise."""
        try:
            leaves, structure = flatten_exact(output)
        except UnsupportedStructure as err:
            self._unsupported(output, str(err))
            return None
        if not leaves or any(
            type(t) is not torch.Tensor or t.dim() == 0 or t.shape[0] != batch for t in leaves
        ):
            self._unsupported(
                output, "not every tensor in it is a plain tensor with the batch dimension first"
            )
            return None
        return leaves, structure

    def stored_output(self, state: bytes, keys: Sequence[bytes], device: torch.device) -> Any | None:
        """The batched output stored under ``state`` for ``keys`` (on ``device``); ``None`` if one is missing.

        Counts the samples as hits. Used to serve a batch without calling the module.
        """
        entries = [self.store.get(state, k) for k in keys]
        if not entries or any(e is None for e in entries):
            return None
        output = _stack_entries(entries, device) if _same_structure(entries) else None  # type: ignore[arg-type]
        if output is None:
            return None
        self.count_hits(len(keys))
        return output

    def count_hits(self, samples: int) -> None:
        """Count ``samples`` served from the store without a call of the module as hits."""
        self.stats["hits"] += samples
        self._account_saved()

    def _timed(self, args: Sequence[Any], kwargs: Mapping[str, Any], samples: int) -> Any:
        start = time.perf_counter()
        output = self._plain(*args, **kwargs)
        self.stats["compute_s"] += time.perf_counter() - start
        self._compute_samples += samples
        return output

    def _account_saved(self) -> None:
        if self._compute_samples:
            self.stats["time_saved_s"] = self.stats["hits"] * self.stats["compute_s"] / self._compute_samples

    def _unsupported(self, output: Any, why: str) -> None:
        self.stats["bypassed"] += 1
        self.disable(
            f"{self.name} returned a {type(output).__qualname__} that a cache hit cannot rebuild exactly "
            f"({why}); outputs are cached when they are tensors with the batch dimension first, in "
            "tuples, lists, namedtuples, dicts or dataclasses (HF ModelOutput); the cache is off from now on"
        )

    def _store(
        self,
        state: bytes,
        keys: Sequence[bytes],
        structure: Structure,
        leaves: Sequence[torch.Tensor],
    ) -> None:
        if not self.storing:
            return
        if self.stats["full"] and self.max_bytes is not None:
            self.stats["rejected"] += len(keys)
            return
        target = None if isinstance(self.store, MemoryStore) and self.store.device == "output" else "cpu"
        copies = [t.detach().to(target, copy=True) if target else t.detach().clone() for t in leaves]
        for row, key in enumerate(keys):
            sample = [c[row] for c in copies]
            if self.max_bytes is not None:
                if self.store.held_bytes(state) + entry_bytes(sample) > self.max_bytes:
                    self.stats["full"] = True
                    self.stats["rejected"] += 1
                    continue
                sample = [s.clone() for s in sample]  # own storage: the budget counts what is kept
            added = self.store.put(state, key, structure, sample)
            self.stats["stored"] += bool(added)
        self.stats["bytes"] = self.store.bytes
