"""``FeatureCache(skip_pipeline=True)``: epochs that train on the cached features, loading no sample."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import BatchSampler, DataLoader

from lightning_freeze.core.feature_cache import sample_keys

if TYPE_CHECKING:
    from lightning_freeze.callbacks.feature_cache import FeatureCache


class _RecordingSampler:
    """Stands in for a ``BatchSampler``'s sampler: yields the same indices, records them per pass."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.indices: list[int] = []

    def __iter__(self) -> Any:
        self.indices = indices = []
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
    """What the fit loop iterates in a skipped epoch: the loader's batch sampler, batches from the table."""

    def __init__(self, skip: _SkipPipeline, loader: DataLoader) -> None:
        self.skip = skip
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        return self.skip._batches(self.loader)

    def __getattr__(self, name: str) -> Any:  # dataset, batch_size, ... as trainer.train_dataloader
        if name in ("loader", "skip"):
            raise AttributeError(name)
        return getattr(self.loader, name)


class _SkipPipeline:
    """The ``skip_pipeline=True`` mode of :class:`FeatureCache` (one module).

    Every normal training epoch records, per dataset index (from the loader's sampler), the sample
    key the module saw and the target. After a complete epoch in which every sample hit the cache
    under one module key, the next epochs iterate the loader's batch sampler and yield
    ``(indices, targets)``; the module's call returns the stored features of those indices.
    """

    def __init__(self, owner: FeatureCache) -> None:
        self.owner = owner
        self.name = owner.modules[0]
        self.table: dict[int, tuple[bytes, torch.Tensor]] = {}
        self.off: str | None = None
        self.said: set[str] = set()
        self.ready = False
        self.ready_state: bytes | None = None
        self.ready_digest: bytes | None = None
        self.skipped_epochs = 0
        self._reset_epoch()
        self._loader: DataLoader | None = None
        self._combined: Any = None
        self._recorder: tuple[BatchSampler, _RecordingSampler] | None = None
        self._pending: list[tuple[bool, list[int]]] = []
        self._current: tuple[bool, list[int]] | None = None
        self._served = 0

    # -- bookkeeping -------------------------------------------------------------------------------
    def _reset_epoch(self) -> None:
        self.mode = "normal"
        self.fell_back = False
        self._ep_ok = True
        self._ep_all_hit = True
        self._ep_count = 0
        self._ep_states: set[bytes] = set()

    def _info(self, message: str) -> None:
        if message not in self.said:
            self.said.add(message)
            rank_zero_info(f"FeatureCache: {message}")

    def _turn_off(self, reason: str) -> None:
        self.off = reason
        self.ready = False
        self._info(f"skip_pipeline does not apply ({reason}); every epoch loads its samples.")

    def reset(self) -> None:
        """A new fit: start over (its loader may give other samples under the same indices)."""
        self.table.clear()
        self.skipped_epochs = 0
        self.off = None
        self.ready = False
        self._reset_epoch()

    # -- hooks ---------------------------------------------------------------------------------------
    def epoch_start(self, trainer: pl.Trainer) -> None:
        self._reset_epoch()
        self._pending.clear()
        if self.off:
            return
        if trainer.world_size > 1:
            return self._turn_off("multi-process training: only single-process runs are supported")
        combined = trainer.fit_loop._combined_loader
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
        cache = self.owner.caches.get(self.name)
        # the fit loop calls iter() on the loader after this hook only in these cases
        iterates_after = (
            trainer.current_epoch > 0
            and not trainer.fit_loop.is_resuming
            and not trainer.fit_loop.epoch_loop.restarting
        )
        if not (self.ready and cache is not None and cache.enabled and iterates_after):
            return
        if cache.current_tensor_digest() != self.ready_digest:
            self.ready = False
            self._info(
                f"{self.name}'s parameters/buffers changed since its features were cached: "
                "skip_pipeline falls back to loading the samples until they are cached again."
            )
            return
        self._loader, self._combined = loader, combined
        combined.flattened = [_CachedEpoch(self, loader)]
        self.mode = "skip"
        self._info(
            f"skip_pipeline: from epoch {trainer.current_epoch} on, training batches are the cached "
            f"features of {self.name} and the stored targets, in the sampler's order (no sample is loaded)."
        )

    def batch_start(self, batch: Any) -> None:
        cache = self.owner.caches.get(self.name)
        if cache is None:
            return
        self._calls0 = cache.calls
        self._current = None
        if self.mode == "skip" and self._pending:
            self._current = self._pending.pop(0)
            if self._current[0]:
                self._served = 0
                cache.redirect = self._serve

    def batch_end(self, batch: Any) -> None:
        cache = self.owner.caches.get(self.name)
        if cache is None:
            return
        cache.redirect = None
        if self.mode == "skip":
            if self._current is not None and self._current[0] and self._served != 1:
                raise RuntimeError(
                    f"FeatureCache(skip_pipeline=True): {self.name} was not called in a training batch; "
                    "in this mode the model must call it once per batch on the batch input x "
                    "(batch = (x, y)). Use skip_pipeline=False for this model."
                )
            return
        if self.off or not self._ep_ok:
            return
        if not (
            isinstance(batch, (tuple, list))
            and len(batch) == 2
            and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in batch)
            and batch[0].shape[0] == batch[1].shape[0]
        ):
            return self._turn_off("training batches are not (x, y) pairs of tensors with one batch size")
        x, y = batch
        if cache.calls - self._calls0 != 1 or cache.last_call is None:
            if cache.enabled and not self.owner.random_inputs:
                self._turn_off(f"{self.name} is not called exactly once per training batch")
            self._ep_ok = False
            return
        state, keys, misses = cache.last_call
        if len(keys) != x.shape[0] or sample_keys([x[:1]], b"|")[0] != keys[0]:
            return self._turn_off(f"{self.name} is not called on the batch input x of batch = (x, y)")
        recorder = self._recorder[1] if self._recorder else None
        indices = recorder.indices[self._ep_count : self._ep_count + len(keys)] if recorder else []
        if len(indices) != len(keys):  # the sampler was iterated before it was wrapped (epoch 0 with workers)
            self._ep_ok = False
            return
        self._ep_count += len(keys)
        self._ep_states.add(state)
        self._ep_all_hit &= misses == 0
        targets = y.detach().to("cpu", copy=True)
        for row, (index, key) in enumerate(zip(indices, keys, strict=True)):
            known = self.table.get(index)
            if known is not None and known[0] != key:
                self._ep_ok = False
                self._info(
                    f"skip_pipeline: sample {index} gave {self.name} another input than before (random "
                    "augmentation?): the pipeline is not deterministic, so every epoch loads its samples."
                )
                return
            self.table[index] = (key, targets[row])

    def epoch_end(self) -> None:
        cache = self.owner.caches.get(self.name)
        if self.mode == "skip":
            self._restore_loader()
            self.skipped_epochs += 1
            if self.fell_back:
                self.ready = False
            return
        recorder = self._recorder[1] if self._recorder else None
        self.ready = bool(
            not self.off
            and cache is not None
            and cache.enabled
            and self._ep_ok
            and self._ep_all_hit
            and self._ep_count > 0
            and recorder is not None
            and self._ep_count == len(recorder.indices)
            and len(self._ep_states) == 1
        )
        if self.ready:
            self.ready_state = next(iter(self._ep_states))
            self.ready_digest = cache._tensors  # type: ignore[union-attr]

    def restore(self) -> None:
        """Put back the fit loop's loader and the sampler (teardown, exception)."""
        self._restore_loader()
        self._restore_recorder()
        cache = self.owner.caches.get(self.name)
        if cache is not None:
            cache.redirect = None

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

    def _batches(self, loader: DataLoader) -> Any:
        # the DataLoader draws its base seed from the global RNG on every new iterator: so do we,
        # so that the RNG stream (dropout in the head, ...) is the same as with loading
        if not (loader.persistent_workers and loader.num_workers > 0 and loader._iterator is not None):
            torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
        self._pending.clear()
        for indices in loader.batch_sampler:  # type: ignore[union-attr]
            indices = [int(i) for i in indices]
            if all(i in self.table for i in indices):
                self._pending.append((True, indices))
                yield (
                    torch.tensor(indices, dtype=torch.int64),
                    torch.stack([self.table[i][1] for i in indices]),
                )
            else:  # a sample never seen: load this batch
                self._pending.append((False, indices))
                self.fell_back = True
                yield self._load(loader, indices)

    @staticmethod
    def _load(loader: DataLoader, indices: list[int]) -> Any:
        return loader.collate_fn([loader.dataset[i] for i in indices])

    def _serve(self, *args: Any, **kwargs: Any) -> Any:
        """The module's forward in a skipped batch: the stored features of the batch's indices."""
        cache = self.owner.caches[self.name]
        self._served += 1
        indices = self._current[1] if self._current else []
        x = args[0] if len(args) == 1 and not kwargs else None
        if (
            self._served > 1
            or not isinstance(x, torch.Tensor)
            or x.dim() != 1
            or x.dtype != torch.int64
            or x.tolist() != indices
        ):
            what = "more than once" if self._served > 1 else "on something else than the batch input x"
            raise RuntimeError(
                f"FeatureCache(skip_pipeline=True): {self.name} was called {what} in a training batch; "
                "in this mode x of batch = (x, y) carries the dataset indices whose cached features the "
                "call returns, so the model must call it once per batch on x, unchanged. Use "
                "skip_pipeline=False for this model."
            )
        state = cache._current_state(x.device.type)
        if state is not None and state == self.ready_state:
            output = cache.stored_output(state, [self.table[i][0] for i in indices], x.device)
            if output is not None:
                return output
        # the module key changed (a changed buffer, an unfreeze, ...) or an entry is gone: load
        self.fell_back = True
        self._info(
            f"{self.name} no longer matches its cached features (changed parameters/buffers/mode, or "
            "unfrozen): skip_pipeline loads the samples again."
        )
        real = self._load(self._loader, indices)[0].to(x.device)  # type: ignore[arg-type]
        cache.redirect = None
        try:
            return cache._forward(real)
        finally:
            cache.redirect = self._serve
