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
from typing_extensions import override

from lightning_freeze.callbacks.skip_pipeline import _SkipPipeline, check_batch_keys
from lightning_freeze.core.cache_keys import RowDigestMemo
from lightning_freeze.core.feature_cache import (
    MEMORY_DEVICES,
    STORES,
    DiskStore,
    MemoryStore,
    OutputCache,
    UncacheableModuleError,
    check_max_bytes,
    make_store,
)
from lightning_freeze.core.purity import inherited_guard_rule, purity_reasons
from lightning_freeze.core.selection import resolve_modules
from lightning_freeze.core.structure import tensor_leaves
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

    **Exact.** An entry is keyed by the sample's input bits (XXH3-128 over the exact bits, dtype and
    shape of its row of every tensor argument; other arguments encoded exactly, or the call is not
    cached) *and* the module's key (the bits of every parameter and buffer, the mode of every
    submodule, device type, autocast state/dtype, matmul/cuDNN flags and the torch version): another
    checkpoint, a changed buffer, another mode or precision never hits. The module's tensors are
    hashed again at the start of every Trainer call, training epoch and validation run and after
    ``load_state_dict`` (writes through ``tensor.data`` included), not at every batch. Batches are
    keyed by their host tensors (kept from before the move to the device), so a hit copies no input
    back to the host.
    A served output is bitwise what the module produced for that sample, with the same structure
    and types (tuples, namedtuples, dicts, dataclasses, HF ``ModelOutput``); with a fixed batch
    order (``shuffle=False``) a run ends with bitwise the same weights as without the cache.
    With shuffling a sample may be served from another batch composition than it would be computed
    in now, so results match an uncached run closely (batched kernels can differ in the last bit).
    A disk store that fails (full disk, read-only folder, I/O error) turns itself off with one
    warning and the fit goes on uncached. See ``docs/feature-cache.md`` for the collision bound.

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
    the cache for every sample under one module key *and* every dataset index gave the same input
    bits and target bits as in an earlier epoch, later epochs no longer load, decode or collate any
    sample: they iterate the loader's batch sampler (same order, same ``set_epoch``, same draws from
    the global RNG) and yield batches whose input is a zero placeholder shaped like ``x`` and whose
    target is the recorded one; the module's call on the placeholder returns the stored features,
    bitwise what it computed. Epoch 1 records, epoch 2 verifies, epochs 3+ skip. Every skipped epoch
    first loads 32 random indices and compares their input keys and targets with the records (a
    change loads the epoch). Applies when: one module (no pattern), one training ``DataLoader`` with
    a torch ``BatchSampler``, training batches of two tensors (``(x, y)``, or a dict named by
    ``input_key``/``target_key``), and the model calls the module exactly once per batch on ``x``
    itself; under DDP every rank skips its own indices. Otherwise every epoch loads its samples
    (one info line). A module whose key changes is never served: its batches are loaded and computed
    again (one info line). See ``docs/feature-cache.md`` for the residual risk of the random check.

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
        input_key: ``skip_pipeline`` only: the entry of a training batch that is the module's input:
            a dict key, or a position in a tuple/list batch (default: position 0; required for
            dict batches).
        target_key: ``skip_pipeline`` only: the entry that is the target (default: position 1;
            required for dict batches).

    Attributes:
        stats: ``hits``, ``misses`` (samples), ``bytes`` (held by the store), ``hit_rate``,
            ``time_saved_s`` (estimate: hits x mean compute time per missed sample) and more, summed
            over the modules, for this process since the start of the latest fit (``validate``/
            ``test``/``predict`` calls on the same model add to it); per module under ``"modules"``;
            ``skipped_epochs``: training epochs run on the cached features (``skip_pipeline``).

    Raises:
        ValueError: unknown ``store``/``device``, ``max_bytes <= 0``, ``store="disk"`` without a
            writable ``directory``, invalid ``modules``, a non-bool ``skip_pipeline``, or
            ``skip_pipeline=True`` with more than one module or a pattern, or a bad
            ``input_key``/``target_key``; (in the first training batch) a dict batch without them,
            or a name the batch lacks.
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
        input_key: str | int | None = None,
        target_key: str | int | None = None,
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
        check_batch_keys(input_key, target_key, skip_pipeline)
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
        self._skip = _SkipPipeline(self, input_key, target_key) if skip_pipeline else None
        self._memo = RowDigestMemo()

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
        self._refresh()  # every Trainer call (fit/validate/test/predict) sees every write before it
        self._key_batches_on_host(pl_module)
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
            reasons = _reasons_during_training(pl_module, name)
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
        self._refresh()  # every training epoch sees every write before it (also through tensor.data)
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
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refresh()  # a validation run inside fit sees what the training epoch before it wrote

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
        self._refresh()  # training after a validation run inside an epoch sees what it changed
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
        transfer = pl_module.__dict__.get("transfer_batch_to_device")
        if isinstance(transfer, _HostKeyedTransfer) and transfer.owner is self:
            del pl_module.transfer_batch_to_device
        self._memo.clear()

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
                    # tensors are hashed again at every Trainer call, training epoch and validation
                    # run (and load_state_dict), not at every batch
                    tensor_check="refresh",
                    on_info=rank_zero_info,
                )
            cache.digests = self._memo
            # checked at fit start: FreezeBackbone may come later in the callback list
            self.caches[name] = cache if cache.attached else cache.attach(check=False)
        for cache in previous.values():
            cache.detach()

    def _refresh(self) -> None:
        for cache in self.caches.values():
            cache.refresh()

    def _key_batches_on_host(self, pl_module: pl.LightningModule) -> None:
        """Hash every batch's tensors on the host, before Lightning moves them to the device.

        Wraps ``pl_module.transfer_batch_to_device`` on the instance (restored at teardown): a
        cached module called on a tensor of the moved batch, unchanged, finds its row digests
        there, so inputs on an accelerator are never copied back to the host for their keys.
        """
        current = pl_module.__dict__.get("transfer_batch_to_device")
        if isinstance(current, _HostKeyedTransfer):
            if current.owner is self:
                return
            del pl_module.transfer_batch_to_device  # another FeatureCache's: ours takes over
        pl_module.transfer_batch_to_device = _HostKeyedTransfer(  # type: ignore[method-assign]
            self, self._memo, pl_module.transfer_batch_to_device
        )

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


class _HostKeyedTransfer:
    """``transfer_batch_to_device`` of a module with a :class:`FeatureCache`: keys come from the host batch.

    Files every CPU tensor of the batch under the tensor that carries the same values after the
    move; the module's call hashes the host rows of the tensor it gets (never a device copy), and
    tensors it is never called on are never hashed. A copy or pickle of the module gets its plain
    method back.
    """

    def __init__(self, owner: FeatureCache, memo: RowDigestMemo, original: Any) -> None:
        self.owner = owner
        self.memo = memo
        self.__wrapped__ = original  # Lightning's is_overridden() looks through it

    def __call__(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        memo = self.memo
        memo.clear()
        host = tensor_leaves(batch)
        moved = self.__wrapped__(batch, device, dataloader_idx)
        if any(c.enabled and c.lookup for c in self.owner.caches.values()):
            placed = tensor_leaves(moved)
            if len(placed) == len(host):
                for h, m in zip(host, placed, strict=True):
                    if h.device.type == "cpu" and h.dim() > 0:
                        memo.remember(h, m)
        return moved

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        method = self.__wrapped__
        return _plain_transfer, (method.__self__,)


def _plain_transfer(module: pl.LightningModule) -> Any:
    return type(module).transfer_batch_to_device.__get__(module)


def _never_hits(cache: OutputCache, hits: int, lookups: int) -> bool:
    """No hit in ``lookups`` samples, although the cache was on and admitting entries."""
    return cache.enabled and hits == 0 and lookups > 0 and not cache.stats["full"]


def _reasons_during_training(root: nn.Module, name: str) -> list[str]:
    """What :func:`uncacheable_reasons` will say once the Trainer puts the model in train mode.

    The one rule of :mod:`lightning_freeze.core.purity`: pinned layers and layers a freeze guard
    (on the module or above it) forces to eval count as eval.
    """
    module = root.get_submodule(name)
    return purity_reasons(module, name, during_training=True, guards=inherited_guard_rule(root, name))


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
