"""``FeatureCache(skip_pipeline=True)``: epochs that train on the cached features, loading no sample.

A normal training epoch records, per dataset index (from the loader's sampler), the key of the
input the module saw and the target. An epoch *verifies* the pipeline when every sample hit the
cache under one module key with the same input bits and target bits as in an earlier epoch of
this fit (under DDP: on any rank; the records are gathered). The epochs after it iterate the
loader's batch sampler (same order, same ``set_epoch``, same draws from the global RNG) and yield
batches of the same structure whose input is a zero placeholder and whose target is the recorded
one; the module's call on that placeholder returns the stored features of the batch's indices.

Before a skipped epoch serves anything it loads ``CHECK_SAMPLES`` random indices and compares their
input keys and targets with the records: a difference (the data changed) makes the epoch load its
samples and the records start over. Anything unexpected in a skipped batch (the module not called
on the placeholder, a changed module key, a missing entry) loads that batch and calls the module
on the real input: one info line, never an error.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import BatchSampler, DataLoader

from lightning_freeze import _compat
from lightning_freeze.core.feature_cache import (
    MemoryStore,
    module_state_key,
    sample_keys,
    uncacheable_reasons,
)
from lightning_freeze.core.structure import UnsupportedStructure, unflatten

if TYPE_CHECKING:
    from lightning_freeze.callbacks.feature_cache import FeatureCache
    from lightning_freeze.core.feature_cache import OutputCache

__all__ = ["CHECK_SAMPLES", "check_batch_keys"]

#: random indices every skipped epoch loads and compares (input key and target) before serving
CHECK_SAMPLES = 32


def check_batch_keys(input_key: Any, target_key: Any, skip_pipeline: bool) -> None:
    """Validate ``FeatureCache(input_key=..., target_key=...)`` (the batch entries ``skip_pipeline`` uses).

    Raises:
        ValueError: a key that is not a ``str``/``int``, two equal keys, or keys without ``skip_pipeline``.
    """
    for name, key in (("input_key", input_key), ("target_key", target_key)):
        if key is not None and (isinstance(key, bool) or not isinstance(key, (str, int))):
            raise ValueError(
                f"Invalid {name}={key!r}; valid choices: None (position 0/1 of an (x, y) batch), a dict "
                "key of the training batch (str) or a position in a tuple/list batch (int)."
            )
    if input_key is not None and input_key == target_key:
        raise ValueError(
            f"input_key and target_key are both {input_key!r}; valid choices: two different batch entries."
        )
    if (input_key is not None or target_key is not None) and not skip_pipeline:
        raise ValueError(
            f"input_key={input_key!r}/target_key={target_key!r} name the batch entries of "
            "skip_pipeline=True; valid choices: set skip_pipeline=True, or leave them None."
        )


class _RecordingSampler:
    """Stands in for a ``BatchSampler``'s sampler: yields the same indices, records them per pass."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.indices: list[int] = []
        self.passes = 0

    def __iter__(self) -> Any:
        self.indices = indices = []
        self.passes += 1
        for index in self.inner:
            indices.append(int(index))
            yield index

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:  # set_epoch, generator, ... of the wrapped sampler
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class _CachedEpoch:
    """What the fit loop iterates in a skipped epoch: the loader's batch sampler, batches from the records."""

    def __init__(self, skip: _SkipPipeline, loader: DataLoader) -> None:
        self.skip = skip
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        return self.skip.cached_batches(self.loader)

    def __getattr__(self, name: str) -> Any:  # dataset, sampler, batch_sampler... (set_epoch goes through)
        if name in ("loader", "skip"):
            raise AttributeError(name)
        return getattr(self.loader, name)


@dataclass
class _Layout:
    """Where x and y sit in a training batch, and what x looks like (for the placeholder)."""

    kind: type
    keys: tuple[Any, ...]
    input_key: Any
    target_key: Any
    sample_shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False


@dataclass
class _Record:
    key: bytes  # sample_keys([x]) of the sample's input as the module received it
    cache_key: bytes  # the OutputCache's key of that call (what the store holds it under)
    target: torch.Tensor  # the target row, on the CPU


@dataclass
class _Features:
    """The verified features of every recorded index, one tensor per output leaf (see ``_gathered``)."""

    state: bytes  # the module key they are stored under
    generation: int  # MemoryStore.generation when gathered
    structure: Any = None
    leaves: list[torch.Tensor] | None = None  # None: they could not be gathered (not tried again)
    rows: torch.Tensor | None = None  # dataset index -> row of the leaves (-1: not recorded)


# one recorded batch: dataset indices, input keys, the cache's keys, the targets (CPU)
_Batch = tuple[list[int], list[bytes], list[bytes], torch.Tensor]


def _same_tensor(a: Any, x: torch.Tensor | None) -> bool:
    """``a`` is ``x`` itself or a view of all of it with the same layout (bitwise ``x``)."""
    return isinstance(a, torch.Tensor) and (
        a is x
        or (
            x is not None
            and a.data_ptr() == x.data_ptr()
            and a.dtype == x.dtype
            and a.shape == x.shape
            and a.stride() == x.stride()
            and a.device == x.device
        )
    )


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank (``[obj]`` in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


class _SkipPipeline:
    """The ``skip_pipeline=True`` mode of :class:`FeatureCache` (one module). See the module docstring."""

    def __init__(self, owner: FeatureCache, input_key: Any = None, target_key: Any = None) -> None:
        self.owner = owner
        self.name = owner.modules[0]
        self.input_key = input_key
        self.target_key = target_key
        self.table: dict[int, _Record] = {}
        self.layout: _Layout | None = None
        self.off: str | None = None
        self.said: set[str] = set()
        self.ready = False
        self.ready_state: bytes | None = None
        self.skipped_epochs = 0
        self.trainer: pl.Trainer | None = None
        self._loader: DataLoader | None = None
        self._combined: Any = None
        self._recorder: tuple[BatchSampler, _RecordingSampler] | None = None
        self._pending: list[tuple[bool, list[int]]] = []
        self._current: tuple[bool, list[int]] | None = None
        self._targets: torch.Tensor | None = None
        self._placeholders: dict[int, torch.Tensor] = {}
        # memory store: the verified features as one tensor per leaf (row of each dataset index)
        self._features: _Features | None = None
        self._off_at_start = False
        self._reset_epoch()

    # -- bookkeeping -------------------------------------------------------------------------------
    def _reset_epoch(self) -> None:
        self.mode = "normal"
        self.fell_back = False
        self._load_rest = False
        self._ep_ok = True
        self._ep_all_hit = True
        self._ep_count = 0
        self._ep_states: set[bytes] = set()
        self._ep_records: list[_Batch] = []
        self._epoch_state: bytes | bool | None = None
        self._calls = 0
        self._on_x = False
        self._x: torch.Tensor | None = None

    def _info(self, message: str) -> None:
        if message not in self.said:
            self.said.add(message)
            rank_zero_info(f"FeatureCache: {message}")

    def _turn_off(self, reason: str) -> None:
        self.off = reason
        self.ready = False
        self._info(f"skip_pipeline does not apply ({reason}); every epoch loads its samples.")

    @property
    def cache(self) -> OutputCache | None:
        return self.owner.caches.get(self.name)

    def reset(self) -> None:
        """A new fit: start over (its loader may give other samples under the same indices)."""
        self.table.clear()
        self.layout = None
        self.skipped_epochs = 0
        self.off = None
        self.ready = False
        self._placeholders.clear()
        self._features = None
        self._reset_epoch()

    # -- batch structure -------------------------------------------------------------------------------
    def _split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(x, y) of a training batch; ``None`` (skip_pipeline turned off) when it has another form.

        Raises:
            ValueError: a dict batch without ``input_key``/``target_key``, or a key the batch lacks.
        """
        if isinstance(batch, Mapping):
            keys = tuple(batch)
            if self.input_key is None or self.target_key is None:
                raise ValueError(
                    f"FeatureCache(skip_pipeline=True): training batches are dicts with keys {list(keys)}; "
                    f"name the input and the target, e.g. FeatureCache(input_key={keys[0]!r}, "
                    f"target_key={keys[-1]!r}, ...); valid choices: {', '.join(map(repr, keys))}."
                )
            ik, tk = self.input_key, self.target_key
        elif isinstance(batch, (tuple, list)):
            keys = tuple(range(len(batch)))
            ik = 0 if self.input_key is None else self.input_key
            tk = 1 if self.target_key is None else self.target_key
        else:
            self._turn_off("training batches are neither (x, y) tuples/lists nor dicts")
            return None
        for name, key in (("input_key", ik), ("target_key", tk)):
            if key not in keys:
                raise ValueError(
                    f"FeatureCache(skip_pipeline=True): {name}={key!r} is not an entry of the training "
                    f"batch ({type(batch).__name__}); valid choices: {', '.join(map(repr, keys))}."
                )
        if len(keys) != 2:
            others = [k for k in keys if k not in (ik, tk)]
            self._turn_off(f"training batches have entries besides the input and the target: {others}")
            return None
        x, y = batch[ik], batch[tk]
        if not (
            isinstance(x, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and x.dim() > 0
            and y.dim() > 0
            and x.shape[0] == y.shape[0]
        ):
            self._turn_off("the batch's input and target are not tensors with one batch size")
            return None
        layout = _Layout(
            type(batch),
            keys,
            ik,
            tk,
            tuple(x.shape[1:]),
            x.dtype,
            x.device,
            x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last),
        )
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            self._turn_off("training batches differ in structure, input shape, dtype, device or layout")
            return None
        return x, y

    def _make_batch(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        layout = self.layout
        assert layout is not None
        if layout.kind in (tuple, list) or not issubclass(layout.kind, Mapping):
            items = [x, y] if layout.input_key == 0 else [y, x]
            return tuple(items) if layout.kind is tuple else list(items)
        values = {layout.input_key: x, layout.target_key: y}
        out = {k: values[k] for k in layout.keys}
        try:
            return layout.kind(out)
        except Exception:  # a Mapping type that cannot be built from a dict
            return out

    def _placeholder(self, size: int) -> torch.Tensor:
        """Zeros shaped, typed and laid out like the batch input x, on its device (one per batch size)."""
        ph = self._placeholders.get(size)
        if ph is None:
            layout = self.layout
            assert layout is not None
            ph = torch.zeros((size, *layout.sample_shape), dtype=layout.dtype, device=layout.device)
            if layout.channels_last:
                ph = ph.contiguous(memory_format=torch.channels_last)
            self._placeholders[size] = ph
        return ph

    # -- hooks ---------------------------------------------------------------------------------------
    def epoch_start(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self._reset_epoch()
        self._pending.clear()
        self._off_at_start = bool(self.off)  # the same on every rank (decided on gathered flags)
        if self.off:
            return
        combined = _compat.fit_loop_combined_loader(trainer)
        loaders = combined.flattened if combined is not None else []
        if len(loaders) != 1 or not isinstance(loaders[0], DataLoader):
            return self._turn_off("it needs exactly one training DataLoader")
        loader = loaders[0]
        batch_sampler = loader.batch_sampler
        if not isinstance(batch_sampler, BatchSampler):
            return self._turn_off(
                "the training DataLoader has no torch BatchSampler (batch_size=None or custom)"
            )
        if not isinstance(batch_sampler.sampler, _RecordingSampler):
            self._restore_recorder()
            recorder = _RecordingSampler(batch_sampler.sampler)
            batch_sampler.sampler = recorder
            self._recorder = (batch_sampler, recorder)
        cache = self.cache
        # the fit loop calls iter() on the loader after this hook only in these cases
        iterates_after = (
            trainer.current_epoch > 0
            and not trainer.fit_loop.is_resuming
            and not trainer.fit_loop.epoch_loop.restarting
        )
        if not (self.ready and cache is not None and cache.enabled and iterates_after):
            return
        self._loader, self._combined = loader, combined
        combined.flattened = [_CachedEpoch(self, loader)]
        self.mode = "skip"
        self._info(
            f"skip_pipeline: from epoch {trainer.current_epoch} on, training batches are the cached "
            f"features of {self.name} and the recorded targets, in the sampler's order (no sample is "
            f"loaded but {CHECK_SAMPLES} random ones checked per epoch)."
        )

    def batch_start(self, batch: Any) -> None:
        cache = self.cache
        if cache is None or self.off:
            return
        self._calls, self._on_x, self._x = 0, False, None
        if self.mode == "skip":
            self._current = self._pending.pop(0) if self._pending else None
            split = self._split(batch) if self._current is not None and self._current[0] else None
            self._x = split[0] if split is not None else None
            cache.redirect = self._serve
            return
        if not self._ep_ok:
            return
        split = self._split(batch)
        if split is None:
            return
        self._x = split[0]
        cache.redirect = self._spy

    def batch_end(self, batch: Any) -> None:
        cache = self.cache
        if cache is None:
            return
        cache.redirect = None
        if self.off:
            return
        if self.mode == "skip":
            if self._current is not None and self._current[0] and self._calls == 0:
                # the model did not use the served features: stop serving, load from here on
                self._load_rest = True
                self._turn_off(f"{self.name} was not called in a training batch that skipped loading")
            return
        if not self._ep_ok or self._x is None:
            return
        if self._calls != 1 or cache.last_call is None:
            if cache.enabled and not self.owner.random_inputs:
                self._turn_off(f"{self.name} is not called exactly once per training batch")
            self._ep_ok = False
            return
        if not self._on_x:
            return self._turn_off(
                f"{self.name} is not called on the batch input x itself (a dtype conversion, copy or "
                "memory-format change of x, or another tensor)"
            )
        x = self._x
        y = self._split(batch)[1]  # type: ignore[index]
        state, cache_keys, misses = cache.last_call
        recorder = self._recorder[1] if self._recorder else None
        n = len(cache_keys)
        indices = recorder.indices[self._ep_count : self._ep_count + n] if recorder else []
        if len(indices) != n or n != x.shape[0]:  # the sampler was iterated before it was wrapped
            self._ep_ok = False
            return
        self._ep_count += n
        self._ep_states.add(state)
        self._ep_all_hit &= misses == 0
        # one entry per batch (compact to gather across ranks): indices, input keys, cache keys, targets
        self._ep_records.append((indices, sample_keys([x]), cache_keys, y.detach().to("cpu", copy=True)))

    def epoch_end(self) -> None:
        if self._off_at_start:
            return
        skipped = self.mode == "skip"
        if skipped:
            self._restore_loader()
            self.skipped_epochs += 1
        cache = self.cache
        recorder = self._recorder[1] if self._recorder else None
        mine = {
            "off": self.off,
            "fell_back": self.fell_back,
            "ok": bool(
                cache is not None
                and cache.enabled
                and self._ep_ok
                and self._ep_count > 0
                and recorder is not None
                and self._ep_count == len(recorder.indices)
            ),
            "all_hit": self._ep_all_hit,
            "states": self._ep_states,
            "records": self._ep_records,
        }
        # every rank gets every rank's flags and records: the same decisions everywhere, so all ranks
        # skip the same epochs (and meet in the same collective calls)
        ranks = _gather(mine)
        off = next((r["off"] for r in ranks if r["off"]), None)
        if off is not None:
            self.off, self.ready = off, False
            return
        if skipped:
            self.ready = self.ready and not any(r["fell_back"] for r in ranks)
            return
        verified = all(r["ok"] for r in ranks)
        for r in ranks:
            for index, record in _rows(r["records"]):
                known = self.table.get(index)
                if known is None:
                    verified = False
                elif known.key != record.key or not _same_bits(known.target, record.target):
                    what = "input" if known.key != record.key else "target"
                    return self._turn_off(
                        f"sample {index} gave another {what} than in an earlier epoch (random "
                        "augmentation or targets drawn per access?): the pipeline is not deterministic"
                    )
                self.table[index] = record
        states = set().union(*(r["states"] for r in ranks))
        self.ready = verified and all(r["all_hit"] for r in ranks) and len(states) == 1
        self._features = None
        if self.ready:
            self.ready_state = next(iter(states))
            self._targets = _dense_targets(self.table)

    def restore(self) -> None:
        """Put back the fit loop's loader and the sampler (teardown, exception)."""
        self._restore_loader()
        self._restore_recorder()
        cache = self.cache
        if cache is not None:
            cache.redirect = None

    # -- the module's call ---------------------------------------------------------------------------
    def _plain_call(self, *args: Any, **kwargs: Any) -> Any:
        """The cached forward (no hooks run twice), with this redirect out of the way."""
        cache = self.cache
        assert cache is not None
        redirect, cache.redirect = cache.redirect, None
        try:
            return cache.module.forward(*args, **kwargs)
        finally:
            cache.redirect = redirect

    def _spy(self, *args: Any, **kwargs: Any) -> Any:
        """A normal epoch's call: note whether it is the one call, on x itself, then compute/look up."""
        self._calls += 1
        self._on_x = self._calls == 1 and len(args) == 1 and not kwargs and _same_tensor(args[0], self._x)
        return self._plain_call(*args, **kwargs)

    def _serve(self, *args: Any, **kwargs: Any) -> Any:
        """A skipped epoch's call: the stored features of the batch's indices, or the real computation."""
        self._calls += 1
        current = self._current
        if current is None or not current[0]:  # a batch that was loaded: the usual cached call
            return self._plain_call(*args, **kwargs)
        indices = current[1]
        x = args[0] if len(args) == 1 and not kwargs else None
        if self._calls == 1 and _same_tensor(x, self._x):
            output = self._stored(indices, x.device)  # type: ignore[union-attr]
            if output is not None:
                return output
            reason = (
                f"{self.name} no longer matches its cached features (changed parameters/buffers/mode, "
                "or unfrozen) or an entry is gone: skip_pipeline loads the samples again."
            )
        else:
            self._turn_off(
                f"{self.name} was called on something else than the batch input, or more than once, in a "
                "training batch that skipped loading; that batch was loaded and computed"
            )
            reason = ""
        # load this batch and compute on its real input (what the verified epoch saw the model do)
        self.fell_back = True
        self._load_rest = True
        if reason:
            self._info(reason)
        real = self._load_x(indices)
        return self._plain_call(real) if real is not None else self._plain_call(*args, **kwargs)

    def _stored(self, indices: list[int], device: torch.device) -> Any | None:
        cache = self.cache
        assert cache is not None
        if self._epoch_state is None:  # the first served call of the epoch: check the module once
            module = cache.module
            reasons = uncacheable_reasons(module, prefix=self.name, check_grad=torch.is_grad_enabled())
            state = None
            if not reasons and cache.enabled:
                state = module_state_key(module, device.type, tensors=cache.current_tensor_digest())
            self._epoch_state = state if state is not None and state == self.ready_state else False
        if not self._epoch_state:
            return None
        features = self._gathered(self._epoch_state)  # type: ignore[arg-type]
        if features is not None and features.leaves is not None and features.rows is not None:
            rows = features.rows[torch.tensor(indices, dtype=torch.int64)]
            leaves = [leaf.index_select(0, rows.to(leaf.device)).to(device) for leaf in features.leaves]
            cache.count_hits(len(indices))
            return unflatten(leaves, features.structure)
        return cache.stored_output(self._epoch_state, [self.table[i].cache_key for i in indices], device)  # type: ignore[arg-type]

    def _gathered(self, state: bytes) -> _Features | None:
        """The memory store's entries of every recorded index under ``state``, gathered once.

        Gathered again after the records or the store changed (``FeatureCache.clear()``); ``None``
        for a disk store (its files are read per batch, as in any epoch). Entries that cannot be
        gathered (e.g. a per-rank memory store under DDP holds only its rank's samples) are not
        tried again until then: ``leaves`` is ``None`` and batches are served entry by entry.
        """
        cache = self.cache
        store = cache.store if cache is not None else None
        if not isinstance(store, MemoryStore):
            return None
        found = self._features
        if found is not None and found.state == state and found.generation == store.generation:
            return found
        self._features = _Features(state, store.generation)  # until gathered: serve entry by entry
        indices = sorted(self.table)
        gathered = store.gather(state, [self.table[i].cache_key for i in indices])
        if gathered is None:
            return self._features
        structure, leaves = gathered
        try:
            unflatten(leaves, structure)  # a class of the structure that is not loaded here
        except UnsupportedStructure:
            return self._features
        rows = torch.full((indices[-1] + 1,), -1, dtype=torch.int64)
        rows[torch.tensor(indices, dtype=torch.int64)] = torch.arange(len(indices))
        self._features = _Features(state, store.generation, structure, leaves, rows)
        return self._features

    # -- loading -------------------------------------------------------------------------------------
    def _load(self, loader: DataLoader, indices: list[int]) -> Any:
        return loader.collate_fn([loader.dataset[i] for i in indices])

    def _to_model(self, batch: Any) -> Any:
        """The batch as the training step gets it: the module's public batch-transfer hooks."""
        module = self.trainer.lightning_module  # type: ignore[union-attr]
        batch = module.on_before_batch_transfer(batch, 0)
        batch = module.transfer_batch_to_device(batch, module.device, 0)
        return module.on_after_batch_transfer(batch, 0)

    def _load_x(self, indices: list[int]) -> torch.Tensor | None:
        if self._loader is None:
            return None
        split = self._split(self._to_model(self._load(self._loader, indices)))
        return split[0] if split is not None else None

    def _data_unchanged(self, loader: DataLoader) -> bool:
        """Load ``CHECK_SAMPLES`` random recorded indices: same input keys and targets as recorded?"""
        chosen = random.Random().sample(sorted(self.table), min(CHECK_SAMPLES, len(self.table)))
        with _global_rng_kept():
            split = self._split(self._to_model(self._load(loader, chosen)))
        ok = split is not None
        if ok:
            x, y = split  # type: ignore[misc]
            keys, targets = sample_keys([x]), y.detach().cpu()
            ok = all(
                keys[row] == self.table[i].key and _same_bits(targets[row], self.table[i].target)
                for row, i in enumerate(chosen)
            )
        return all(_gather(ok))

    def cached_batches(self, loader: DataLoader) -> Iterator[Any]:
        # the DataLoader draws its base seed from the global RNG on every new iterator (not again
        # with persistent workers, whose iterator the earlier, loading epochs created): so do we,
        # so that the random stream (dropout in the head, ...) is the one of an epoch that loads
        if not (loader.persistent_workers and loader.num_workers > 0):
            torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
        self._pending.clear()
        if not self._data_unchanged(loader):
            self._info(
                f"skip_pipeline: the data changed since its features were verified ({CHECK_SAMPLES} random "
                "samples checked at the epoch start): this epoch loads its samples, and skipping resumes "
                "after another verified epoch."
            )
            self.table.clear()
            self._features = None
            self.fell_back = self._load_rest = True
        targets = self._targets
        for batch_indices in loader.batch_sampler:  # type: ignore[union-attr]
            indices = [int(i) for i in batch_indices]
            if self._load_rest or targets is None or not all(i in self.table for i in indices):
                self.fell_back |= not self._load_rest
                self._pending.append((False, indices))
                yield self._load(loader, indices)
            else:
                self._pending.append((True, indices))
                y = targets[torch.tensor(indices, dtype=torch.int64)]
                yield self._make_batch(self._placeholder(len(indices)), y)

    # -- internals -----------------------------------------------------------------------------------
    def _restore_loader(self) -> None:
        if self._combined is not None and self._loader is not None:
            if isinstance(self._combined.flattened[0], _CachedEpoch):
                self._combined.flattened = [self._loader]
        self._combined = self._loader = None
        self.mode = "normal"

    def _restore_recorder(self) -> None:
        if self._recorder is not None:
            batch_sampler, recorder = self._recorder
            if batch_sampler.sampler is recorder:
                batch_sampler.sampler = recorder.inner
            self._recorder = None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (dtype and shape too; ``-0.0`` differs from ``0.0``, NaN equals its own bits)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    return torch.equal(a, b)


def _rows(batches: list[_Batch]) -> Iterator[tuple[int, _Record]]:
    """(index, record) of every sample of the recorded batches."""
    for indices, keys, cache_keys, targets in batches:
        for row, index in enumerate(indices):
            yield index, _Record(keys[row], cache_keys[row], targets[row])


def _dense_targets(table: dict[int, _Record]) -> torch.Tensor:
    """One tensor of every recorded target, row = dataset index (a skipped batch is one gather)."""
    first = next(iter(table.values())).target
    out = torch.zeros((max(table) + 1, *first.shape), dtype=first.dtype)
    for index, record in table.items():
        out[index] = record.target
    return out


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Leave torch's CPU (and initialised CUDA) RNG, Python's ``random`` and NumPy's RNG as they were."""
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    state = random.getstate()
    try:
        import numpy as np

        np_state: Any = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        np, np_state = None, None
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(state)
        if np is not None:
            np.random.set_state(np_state)
