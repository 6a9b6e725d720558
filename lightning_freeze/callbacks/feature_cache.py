"""FeatureCache: compute a frozen module once per sample; later epochs train only what follows it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import BatchSampler, DataLoader
from typing_extensions import override

from lightning_freeze.callbacks.freeze_backbone import FreezeBackbone
from lightning_freeze.core.feature_cache import (
    MEMORY_DEVICES,
    STORES,
    DiskStore,
    MemoryStore,
    OutputCache,
    UncacheableModuleError,
    check_max_bytes,
    make_store,
    sample_keys,
    uncacheable_reasons,
)
from lightning_freeze.core.norm import is_pinned
from lightning_freeze.core.selection import resolve_modules
from lightning_freeze.core.validation import check_choice

__all__ = ["FeatureCache"]

# random-augmentation detection: after the first epoch of a fit, this many training samples with
# not a single hit (or a whole epoch) mean the inputs never repeat
_RANDOM_INPUT_SAMPLES = 64

#: the off-switch happens when FreezeBackbone unfreezes the module, not because of its norm/dropout options
_SET_HINT, _UNFROZEN = " (norm='train' or dropout='train' in FreezeBackbone)", " (it was unfrozen)"


class FeatureCache(Callback):
    r"""Cache the outputs of frozen submodules: each sample's features are computed once, then reused.

    From stage 2 on, the backbone is frozen and bitwise constant, yet every epoch recomputes its
    forward pass, most of a training step. With this callback the first epoch computes and stores
    the output of each named module per sample; later epochs (and validation/test/predict) serve
    it from the store, so only what follows the module (the branches) runs.

    **Exact.** An entry is keyed by the sample's input bits (BLAKE2b-128 of the raw bytes, dtype
    and shape) *and* the module's key (BLAKE2b-128 over the bits of every parameter and buffer,
    the mode of every submodule, device type, autocast state/dtype, matmul/cuDNN flags and the
    torch version): another checkpoint, a changed buffer, another mode or precision never hits.
    A served output is bitwise what the module produced for that sample; with a fixed batch
    order (``shuffle=False``) a run ends with bitwise the same weights as without the cache.
    With shuffling a sample may be served from another batch composition than it would be computed
    in now, so results match an uncached run closely (batched kernels can differ in the last bit).
    See :mod:`lightning_freeze.core.feature_cache` for the collision bound.

    **Refuses what it cannot cache.** At fit start, a module with a parameter that requires grad,
    or with a norm/dropout layer that will run in train mode (``FreezeBackbone(norm="train")`` or
    ``dropout="train"``), raises :class:`~lightning_freeze.core.feature_cache.UncacheableModuleError`.
    Freeze the module with :class:`~lightning_freeze.FreezeBackbone` (any callback order).
    When ``FreezeBackbone(unfreeze_at_epoch=...)`` unfreezes it, the cache switches itself off
    (one info line). When the inputs never repeat (random augmentation before the module: no hit
    in the first ``64`` training samples after the first epoch), training batches stop being cached
    (one info line); use deterministic transforms for cached stages, or augment in feature space
    after the frozen module.

    **Skip the data pipeline too** (``skip_pipeline=True``). Once a complete training epoch has hit
    the cache for every sample under one module key (the pipeline is deterministic: every dataset
    index gave the same input bits as before), later epochs no longer load, decode or collate any
    sample: they iterate the loader's batch sampler (same order, same ``set_epoch``, same draws from
    the global RNG) and yield ``(indices, targets)``; the module's call on ``indices`` returns the
    stored features of those samples, bitwise what it computed. With a fresh memory store this is
    epoch 3 on (epoch 1 computes, epoch 2 checks); with a disk store filled by an earlier run,
    epoch 2 on. Applies when: one module (no pattern), one training ``DataLoader`` with a torch
    ``BatchSampler``, training batches ``(x, y)`` of tensors, and the model calls the module exactly
    once per batch on ``x`` unchanged (``self.backbone(x)``), single process. Otherwise every epoch
    loads its samples (one info line). A module whose key changes (a changed parameter or buffer,
    another mode or precision, an unfreeze) is never served: its batches are loaded and computed
    again (one info line), and skipping resumes only after another all-hit epoch.

    The module's forward is replaced on the instance during ``fit``/``validate``/``test``/
    ``predict`` only and restored at teardown: ``state_dict`` keys, checkpoints and inference outside
    the Trainer are unchanged. Nothing of the cache goes into checkpoints.

    Args:
        modules: dotted name(s) of the frozen submodules whose outputs are cached (``fnmatch``
            patterns allowed). Default ``"backbone"``.
        store: ``"memory"`` (default): host RAM (or device memory with ``device="output"``),
            kept by this callback across ``fit``/``test`` calls (free it with :meth:`clear`);
            ``"disk"``: one checksummed file per sample under ``directory``, reused by later runs,
            resumed runs and parallel jobs (atomic writes; corrupt or foreign files are rebuilt).
            Under DDP use ``"disk"``: every rank then hits the samples the other ranks computed.
        directory: cache folder, required for ``store="disk"`` (created if missing).
        max_bytes: optional budget in bytes; when full, no new entries are admitted (stored ones
            keep hitting, the others are computed every epoch) and the fit-end report says so.
        device: memory store only: ``"cpu"`` (default) or ``"output"`` (where the module computed,
            e.g. GPU memory: no host transfer on a hit).
        skip_pipeline: once every training sample is cached and the inputs repeat, train later
            epochs on the cached (feature, target) pairs in the sampler's order without loading
            samples (see above). Default False.

    Attributes:
        stats: ``hits``, ``misses`` (samples), ``bytes`` (held by the store), ``hit_rate``,
            ``time_saved_s`` (estimate: hits x mean compute time per missed sample) and more, summed
            over the modules, for this process since the start of the latest fit (``validate``/
            ``test``/``predict`` calls on the same model add to it); per module under ``"modules"``;
            ``skipped_epochs``: training epochs run on the cached features (``skip_pipeline``).

    Raises:
        ValueError: unknown ``store``/``device``, ``max_bytes <= 0``, ``store="disk"`` without a
            writable ``directory``, invalid ``modules``, a non-bool ``skip_pipeline``, or
            ``skip_pipeline=True`` with more than one module or a pattern.
        ModuleSelectionError: (at setup) a module name that is not a submodule.
        UncacheableModuleError: (at fit start) a module that is trainable or random in train mode.

    Example::

        import lightning as L
        from lightning_freeze import FeatureCache, FreezeBackbone

        trainer = L.Trainer(
            max_epochs=10,
            callbacks=[
                FreezeBackbone("backbone"),
                FeatureCache("backbone", store="disk", directory="cache/"),
            ],
        )
        trainer.fit(model)  # epoch 1 computes the backbone once per sample, epochs 2-10 reuse it
        print(trainer.callbacks[-1].stats)  # {"hits": ..., "misses": ..., "bytes": ..., ...}
    """

    def __init__(
        self,
        modules: str | Sequence[str] = "backbone",
        store: Literal["memory", "disk"] = "memory",
        directory: str | os.PathLike[str] | None = None,
        max_bytes: int | None = None,
        device: Literal["cpu", "output"] = "cpu",
        skip_pipeline: bool = False,
    ) -> None:
        super().__init__()
        names = (
            [modules] if isinstance(modules, str) else list(modules) if isinstance(modules, Sequence) else []
        )
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(
                f"Invalid modules={modules!r}; valid choices: a dotted submodule name or fnmatch pattern "
                "(e.g. 'backbone'), or a non-empty list of them."
            )
        self.modules = names
        if not isinstance(skip_pipeline, bool):
            raise ValueError(f"Invalid skip_pipeline={skip_pipeline!r}; valid choices: True, False.")
        if skip_pipeline and (len(names) != 1 or any(c in names[0] for c in "*?[")):
            raise ValueError(
                f"skip_pipeline=True needs exactly one module (no pattern), got modules={modules!r}; "
                "valid choices: one dotted submodule name, e.g. 'backbone'."
            )
        self.skip_pipeline = skip_pipeline
        self.store_kind = check_choice("store", store, STORES)
        self.device = check_choice("device", device, MEMORY_DEVICES)
        self.max_bytes = check_max_bytes(max_bytes)
        self.directory = directory
        self.store: MemoryStore | DiskStore = make_store(store, directory, device)
        self.caches: dict[str, OutputCache] = {}
        self.stats: dict[str, Any] = {}
        self.random_inputs = False
        self._first_epoch: int | None = None
        # training samples looked up / hit in the current epoch, per module (augmentation detection)
        self._epoch_hits: dict[str, int] = {}
        self._epoch_lookups: dict[str, int] = {}
        self._batch_start: dict[str, tuple[int, int]] = {}
        self._skip = _SkipPipeline(self) if skip_pipeline else None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules)

    # ------------------------------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._attach(pl_module)
        if stage == "fit":
            self.random_inputs = False
            self._first_epoch = None
            if self._skip is not None:
                self._skip.reset()
        self._update_stats()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(pl_module)  # a module replaced since setup (e.g. a norm layer converted) is caught
        for name, cache in self.caches.items():
            reasons = _reasons_during_training(cache.module, name)
            if reasons:
                raise UncacheableModuleError(
                    f"FeatureCache cannot cache {name}: " + "; ".join(reasons) + ". Freeze it with "
                    "FreezeBackbone (norm='eval' or 'frozen', dropout='eval'; any callback order), or "
                    f"remove {name!r} from FeatureCache(modules=...)."
                )
            cache.reset_stats()
        if trainer.world_size > 1 and isinstance(self.store, MemoryStore):
            rank_zero_info(
                "FeatureCache: store='memory' under multi-process training keeps one cache per rank; "
                "the sampler gives each rank other samples every epoch, so later epochs hit less often. "
                "store='disk' with a shared directory lets every rank hit what the others computed."
            )
        self._update_stats()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._first_epoch is None:
            self._first_epoch = trainer.current_epoch
        verified = _verified_by_freeze_backbone(trainer)
        for name, cache in self.caches.items():
            if not any(name == v or name.startswith(v + ".") for v in verified):
                # once per epoch, also see writes that bypass version counters (tensor.data)
                cache.refresh()
        self._epoch_hits = {name: 0 for name in self.caches}
        self._epoch_lookups = {name: 0 for name in self.caches}
        if self._skip is not None:
            self._skip.epoch_start(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._first_epoch is None:  # resumed into an epoch whose start hook Lightning skipped
            self._first_epoch = trainer.current_epoch
        for name, cache in self.caches.items():
            cache.lookup = not self.random_inputs
            self._batch_start[name] = (cache.stats["hits"], cache.stats["misses"])
        if self._skip is not None:
            self._skip.batch_start(batch)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._skip is not None:
            self._skip.batch_end(batch)
        if self.random_inputs:
            return
        for name, cache in self.caches.items():
            hits0, misses0 = self._batch_start.get(name, (0, 0))
            hits = cache.stats["hits"] - hits0
            self._epoch_hits[name] = self._epoch_hits.get(name, 0) + hits
            self._epoch_lookups[name] = (
                self._epoch_lookups.get(name, 0) + hits + cache.stats["misses"] - misses0
            )
        if trainer.current_epoch == self._first_epoch:
            return
        for name, cache in self.caches.items():
            lookups = self._epoch_lookups[name]
            if _never_hits(cache, self._epoch_hits[name], lookups) and lookups >= _RANDOM_INPUT_SAMPLES:
                self._stop_caching_training(name, lookups, trainer.current_epoch)
                break

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skip is not None:
            self._skip.epoch_end()
        if (
            not self.random_inputs
            and self._first_epoch is not None
            and trainer.current_epoch > self._first_epoch
        ):
            for name, cache in self.caches.items():
                lookups = self._epoch_lookups.get(name, 0)
                if lookups and _never_hits(cache, self._epoch_hits.get(name, 0), lookups):
                    self._stop_caching_training(name, lookups, trainer.current_epoch)
                    break
        self._update_stats()

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._lookup_on()

    @override
    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._lookup_on()

    @override
    def on_predict_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._lookup_on()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update_stats()
        rank_zero_info(self.report())

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update_stats()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update_stats()

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update_stats()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._update_stats()
        if self._skip is not None:
            self._skip.restore()
        for cache in self.caches.values():
            cache.detach()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning does not call teardown after an exception: leave the model as it was
        self.teardown(trainer, pl_module, "fit")

    # ------------------------------------------------------------------------------------------
    # public helpers
    # ------------------------------------------------------------------------------------------
    def report(self) -> str:
        """One line per module: hit rate, hits/misses, bytes and store, estimated time saved."""
        lines = []
        for name, s in self.stats.get("modules", {}).items():
            line = (
                f"FeatureCache: {name}: {100 * s['hit_rate']:.1f}% hits "
                f"({s['hits']} hits, {s['misses']} misses), "
                f"{_human_bytes(s['bytes'])} in the {self.store_kind} store, ~{s['time_saved_s']:.1f} s saved"
            )
            if s["full"]:
                line += f"; max_bytes={self.max_bytes} reached: {s['rejected']} sample(s) not admitted"
            if s["corrupt"]:
                line += f"; {s['corrupt']} corrupt/foreign file(s) rebuilt"
            if s["disabled"]:
                line += f"; switched off: {s['disabled'].replace(_SET_HINT, _UNFROZEN)}"
            lines.append(line)
        if self.random_inputs:
            lines.append("FeatureCache: training batches were not cached (inputs never repeat).")
        if self.stats.get("skipped_epochs"):
            lines.append(
                f"FeatureCache: skip_pipeline: {self.stats['skipped_epochs']} training epoch(s) ran on the "
                "cached features without loading samples."
            )
        return "\n".join(lines) or "FeatureCache: no module cached."

    def clear(self) -> None:
        """Drop every entry of the memory store (the disk store's files are left in place)."""
        if isinstance(self.store, MemoryStore):
            self.store.clear()
        self._update_stats()

    # ------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------
    def _attach(self, pl_module: pl.LightningModule) -> None:
        """One attached OutputCache per selected module (kept while the module object is the same)."""
        selected = resolve_modules(pl_module, self.modules)
        previous, self.caches = self.caches, {}
        for name, module in selected.items():
            cache = previous.pop(name, None)
            if cache is None or cache.module is not module:
                if cache is not None:
                    cache.detach()
                cache = OutputCache(
                    module,
                    store=self.store,
                    max_bytes=self.max_bytes,
                    on_uncacheable="disable",
                    on_disable=lambda reason: rank_zero_info(
                        f"FeatureCache: {reason.replace(_SET_HINT, _UNFROZEN)}."
                    ),
                    name=name,
                )
            # checked at fit start: FreezeBackbone may come later in the callback list
            self.caches[name] = cache if cache.attached else cache.attach(check=False)
        for cache in previous.values():
            cache.detach()

    def _lookup_on(self) -> None:
        for cache in self.caches.values():
            cache.lookup = True

    def _stop_caching_training(self, name: str, lookups: int, epoch: int) -> None:
        self.random_inputs = True
        for cache in self.caches.values():
            cache.lookup = False
        rank_zero_info(
            f"FeatureCache: {name} got {lookups} training samples in epoch {epoch} and none had been seen "
            "before: its inputs never repeat (random augmentation before the module?). Training batches "
            "are no longer cached (validation/test still are). To cache, use deterministic transforms for "
            "this stage, or augment in feature space (after the frozen module)."
        )

    def _update_stats(self) -> None:
        per_module = {}
        for name, cache in self.caches.items():
            s = dict(cache.stats)
            lookups = s["hits"] + s["misses"]
            s["hit_rate"] = s["hits"] / lookups if lookups else 0.0
            s["disabled"] = cache.disabled_reason
            per_module[name] = s
        totals = {
            key: sum(s[key] for s in per_module.values())
            for key in (
                "hits",
                "misses",
                "bypassed",
                "stored",
                "rejected",
                "corrupt",
                "time_saved_s",
                "compute_s",
            )
        }
        lookups = totals["hits"] + totals["misses"]
        self.stats = {
            **totals,
            "bytes": self.store.bytes,
            "hit_rate": totals["hits"] / lookups if lookups else 0.0,
            "store": self.store_kind,
            "random_inputs": self.random_inputs,
            "skipped_epochs": self._skip.skipped_epochs if self._skip is not None else 0,
            "modules": per_module,
        }


def _never_hits(cache: OutputCache, hits: int, lookups: int) -> bool:
    """No hit in ``lookups`` samples, although the cache was on and admitting entries."""
    return cache.enabled and hits == 0 and lookups > 0 and not cache.stats["full"]


def _verified_by_freeze_backbone(trainer: pl.Trainer) -> list[str]:
    """Modules whose tensors a FreezeBackbone(verify="raise") fingerprints at every epoch end.

    Any change to them fails the run at that epoch's end, so re-hashing them at every epoch start
    (to catch writes through ``tensor.data``) would only repeat that work.
    """
    names: list[str] = []
    for callback in trainer.callbacks:
        if (
            isinstance(callback, FreezeBackbone)
            and callback.verify == "raise"
            and callback.frozen is not None
        ):
            names += callback._still_frozen_names()
    return names


def _reasons_during_training(module: nn.Module, name: str) -> list[str]:
    """What :func:`uncacheable_reasons` will say once the Trainer puts the model in train mode."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.train()
        for m in module.modules():
            if is_pinned(m):
                m.train(False)  # pinned layers are put back in eval before every forward
        return uncacheable_reasons(module, prefix=name)
    finally:
        for m, mode in modes:
            m.training = mode


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


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
