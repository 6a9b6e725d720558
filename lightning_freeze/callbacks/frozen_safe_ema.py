"""FrozenSafeEMA: a weight EMA that never touches frozen weights, warms up, validates and resumes exactly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from typing_extensions import override

from lightning_freeze.core.distributed import (
    compare_across_ranks,
    copy_full_into,
    describe_rank_mismatch,
    is_sharded,
)
from lightning_freeze.core.ema import BUFFER_MODES, BufferMode, TrainableEMA, check_decay
from lightning_freeze.core.errors import FrozenStateError
from lightning_freeze.core.fingerprint import fingerprint
from lightning_freeze.core.keys import EMA_STATE_PREFIX
from lightning_freeze.core.validation import check_choice, check_int

__all__ = ["FrozenSafeEMA", "load_ema_weights"]


class FrozenSafeEMA(Callback):
    r"""Exponential moving average of the trainable weights, exact for frozen ones, with warm-up.

    A thin Lightning adapter over :class:`~lightning_freeze.core.TrainableEMA`:

    * only parameters with ``requires_grad=True`` are shadowed, in fp32 even for fp16/bf16
      parameters (plus the buffers of the modules that own them, see ``buffers``); frozen tensors
      (e.g. a backbone frozen by :class:`~lightning_freeze.FreezeBackbone`) are never read,
      copied or written, and never stored in checkpoints twice;
    * the update is torch's fused foreach lerp, exact when shadow and weight are equal;
    * the effective decay warms up from 0 (``d(t) = min(decay, 1 - (1 + t) ** -0.75)``, ``t`` = updates
      the tensor already received; see :func:`~lightning_freeze.core.ema.effective_decay`) and is
      logged as ``"ema/decay"``;
    * validation and test run on the EMA weights; the raw weights are restored bitwise after, and
      a checkpoint written meanwhile holds the raw weights. ``trainer.validate/test(ckpt_path=X)``
      evaluates X: its EMA weights when X holds this callback's state (same ``state_key``), else
      X's raw weights (the EMA of an earlier fit averaged other weights and is dropped); an info
      line says which;
    * the shadow and counters live in the callback state: resuming reproduces the uninterrupted run.

    When it acts, in any callback order: the shadow is built at ``on_fit_start`` (after
    ``FreezeBackbone`` froze in ``setup`` and the model is on its device) and the trainable set is
    re-resolved at the first training batch of every epoch (after every epoch-start hook, e.g.
    ``FreezeBackbone(unfreeze_at_epoch=...)``, a phase of ``FreezeBackbone(schedule=...)`` or a
    branch switch): new trainables join from their current value and warm up on their own, newly
    frozen tensors leave. The update runs at the end of a training batch in which an optimizer step
    really happened (gradient accumulation and steps skipped by a gradient scaler do not count).

    Under DDP every rank updates its own shadow from identical parameters, so the shadows are
    identical without any communication (``check_ranks=True`` proves it every epoch). Under FSDP2
    (``ModelParallelStrategy`` / ``fully_shard``) the shadow is a ``DTensor`` sharded like the
    parameters: each rank averages its own shard, with no all-gather per update; it is saved with
    the strategy's (distributed) checkpoint and :meth:`ema_state_dict` ``(full=True)`` gathers full
    tensors. ``FSDPStrategy`` (FSDP1, flat parameters) is refused. (Under DDP, buffers are
    identical only when the model's buffers are, e.g. with SyncBatchNorm; plain BatchNorm
    statistics differ per rank in the raw model too.)

    Args:
        decay: target decay, strictly between 0 and 1. Default ``0.999``.
        warmup: ramp the effective decay up from 0 so that a fresh branch is not hidden behind its
            initial weights. Default ``True``.
        update_every_n_steps: update after every n-th optimizer step (>= 1). Default ``1``.
        start_step: first update after optimizer step ``start_step + 1`` (>= 0); steps are counted
            from 1, and the update after step ``s`` happens when ``s > start_step`` and
            ``(s - start_step) % update_every_n_steps == 0``. The first update copies the weights.
            Default ``0``.
        buffers: buffers of trainable modules (modules owning a trainable parameter, e.g. a
            BatchNorm in the head): ``"copy"`` (default, a copy taken at each update),
            ``"average"`` (floating-point buffers averaged like the weights) or ``"ignore"`` (raw
            buffers used with the EMA weights). Buffers of frozen modules are never read or written.
        validate_with_ema: run validation and test on the EMA weights. Default ``True``.
        check_ranks: in a multi-process job (DDP), compare the parameter shadows of every rank
            at every train epoch end (fingerprints, one 16-byte ``all_gather`` per rank when they
            agree; see :meth:`check_ranks_now`) and raise
            :class:`~lightning_freeze.FrozenStateError` naming the rank that differs. A no-op in a
            single process. Default ``False``.

    Raises:
        ValueError: a bad argument, naming the value and the valid choices; at fit start, a model
            with nothing trainable.

    Example::

        import lightning as L
        from lightning_freeze import FreezeBackbone, FrozenSafeEMA, load_ema_weights

        ema = FrozenSafeEMA(decay=0.999)
        trainer = L.Trainer(max_epochs=10, callbacks=[FreezeBackbone("backbone"), ema])
        trainer.fit(model)                    # validation ran on the EMA weights
        averaged = ema.ema_state_dict()       # keyed as model.state_dict()
        load_ema_weights(fresh_model, "last.ckpt")  # for inference / export
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        buffers: BufferMode = "copy",
        validate_with_ema: bool = True,
        check_ranks: bool = False,
    ) -> None:
        super().__init__()
        self.decay = check_decay(decay)
        self.warmup = bool(warmup)
        self.update_every_n_steps = check_int("update_every_n_steps", update_every_n_steps, minimum=1)
        self.start_step = check_int("start_step", start_step, minimum=0)
        self.buffers = check_choice("buffers", buffers, BUFFER_MODES)
        self.validate_with_ema = bool(validate_with_ema)
        self.check_ranks = bool(check_ranks)
        #: ``{rank: [keys]}`` of the latest :meth:`check_ranks_now` (empty: all ranks agree)
        self.last_rank_check: dict[int, list[str]] = {}

        self.ema: TrainableEMA | None = None
        self.step_count = 0  # optimizer steps really taken (restored on resume)
        self._last_global_step = 0
        self._restored: dict[str, Any] | None = None
        self._loaded_checkpoint_pending = False
        self._fitting = False
        self._needs_sync = False
        self._stepped = False
        self._hooks: dict[int, Any] = {}  # id(optimizer) -> step post-hook handle

    # --- public -------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints: every setting that shapes the average.

        Two instances differing in any of them (``decay``, ``warmup``, ``update_every_n_steps``,
        ``start_step``, ``buffers``) coexist in one Trainer. Two with identical settings would
        compute the same average under the same key: ``Trainer(callbacks=...)`` refuses them
        ("``callback.state_key`` must be unique"); keep one.
        """
        return self._generate_state_key(**self._settings())

    @property
    def num_updates(self) -> int:
        """Number of EMA updates applied so far (0 before fit)."""
        return self.ema.num_updates if self.ema is not None else 0

    def should_update(self, step: int) -> bool:
        """Whether to update after optimizer step ``step`` (counted from 1)."""
        return step > self.start_step and (step - self.start_step) % self.update_every_n_steps == 0

    def ema_state_dict(self, full: bool = False) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed as in ``pl_module.state_dict()`` (load it with ``load_state_dict``).

        Every key of the module's ``state_dict``: shadowed tensors hold their EMA (cast to the
        model's dtype), the others (frozen ones) are the module's own tensors.

        Args:
            full: on a sharded model (FSDP2 / ``ModelParallelStrategy``), gather full tensors
                (a collective: call it on every rank); default: this rank's ``DTensor`` shards.
        """
        if self.ema is None:
            raise RuntimeError(
                "FrozenSafeEMA has no EMA: it is built when Trainer.fit starts (and dropped when "
                "trainer.validate/test loads a checkpoint without EMA state)."
            )
        return self.ema.ema_state_dict(full=full)

    def check_ranks_now(self) -> dict[int, list[str]]:
        """Prove that every rank holds the same EMA of the parameters (a collective: call it on every rank).

        Fingerprints :attr:`~lightning_freeze.core.TrainableEMA.parameter_shadow`
        and compares with every rank
        (:func:`~lightning_freeze.core.distributed.compare_across_ranks`). Buffers are left out:
        plain BatchNorm statistics differ per rank by design.

        Returns:
            ``{}`` when every rank agrees (or in a single process); also kept as :attr:`last_rank_check`.

        Raises:
            FrozenStateError: a rank's shadow differs; the message names the rank and the tensors
                (raised on every rank).
        """
        shadow = self.ema.parameter_shadow if self.ema is not None else {}
        # a sharded (FSDP2) shadow exists once, split over the ranks: nothing to compare it with
        mismatch = compare_across_ranks(fingerprint({k: v for k, v in shadow.items() if not is_sharded(v)}))
        self.last_rank_check = mismatch
        if mismatch:
            keys = list(dict.fromkeys(k for ks in mismatch.values() for k in ks))
            causes = {
                key: f"EMA shadow differs on rank {rank} from the other ranks"
                for rank, ks in sorted(mismatch.items(), reverse=True)
                for key in ks
            }
            raise FrozenStateError(
                "FrozenSafeEMA: the EMA shadows of the parameters differ across ranks (they are updated "
                "from identical parameters and must be identical):\n" + describe_rank_mismatch(mismatch),
                changed=keys,
                causes=causes,
            )
        return mismatch

    # --- fit ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a state restored by an earlier trainer call must not leak into this one: Lightning restores
        # the checkpoint of this call (if any) after setup
        if type(trainer.strategy).__name__ == "FSDPStrategy":
            raise ValueError(
                "FrozenSafeEMA does not support FSDPStrategy (FSDP1): it flattens parameters into shards "
                "that are not tensors of the model's shapes. Valid: ModelParallelStrategy (FSDP2, "
                "fully_shard: the shadow is sharded like the parameters, no communication per update), "
                "DDP or a single device."
            )
        self._restored = None
        self._loaded_checkpoint_pending = stage != "fit"
        swapping = [cb for cb in trainer.callbacks if isinstance(cb, FrozenSafeEMA) and cb.validate_with_ema]
        if len(swapping) > 1:
            raise ValueError(
                f"{len(swapping)} FrozenSafeEMA callbacks have validate_with_ema=True "
                f"(decays {[cb.decay for cb in swapping]}); valid: at most one (they would swap their "
                "weights into the same model), set validate_with_ema=False on the others."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitting = True
        self.ema = None
        self.step_count = 0
        self._last_global_step = trainer.global_step
        self._build_ema(pl_module)
        self._hook_optimizers(trainer)
        self._needs_sync = True
        rank_zero_info(
            f"FrozenSafeEMA: shadowing {len(self.ema.shadow)} trainable tensors "
            f"({self.ema.nbytes / 2**20:.2f} MiB) of {type(pl_module).__name__}"
        )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # re-resolved at the first batch, after every epoch-start hook (unfreezing, branch switches)
        self._needs_sync = True
        self._hook_optimizers(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._needs_sync or self.ema is None:
            return
        self._needs_sync = False
        added, removed = self.ema.sync(pl_module)
        if added or removed:
            rank_zero_info(
                f"FrozenSafeEMA: trainable set changed at epoch {trainer.current_epoch}: "
                f"{len(added)} tensor(s) joined the shadow (from their current value), "
                f"{len(removed)} left it"
            )

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        global_step = trainer.global_step
        if global_step <= self._last_global_step or self.ema is None:
            return  # accumulating gradients: no optimizer step in this batch
        self._last_global_step = global_step
        # an optimizer step counts only when it ran (a gradient scaler skips it on inf/NaN grads)
        stepped = self._stepped or not self._hooks
        self._stepped = False
        if not stepped and not self._hook_optimizers(trainer):
            return  # skipped (a step by an optimizer created since the last hook counts: it was not seen)
        self.step_count += 1
        if self.should_update(self.step_count):
            decay = self.ema.update(pl_module)
            pl_module.log("ema/decay", decay, on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_ranks and self.ema is not None:
            self.check_ranks_now()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitting = False
        self._remove_hooks()

    # --- validation / test on the EMA weights -------------------------------------------------
    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._take_loaded_checkpoint(trainer, pl_module) or not self.validate_with_ema:
            return
        if self.ema is None:
            rank_zero_warn(
                "FrozenSafeEMA: no EMA weights to evaluate with (no fit yet, or the loaded checkpoint holds "
                "no EMA state); running on the raw weights."
            )
        elif not self.ema.swapped:
            self.ema.swap_in(pl_module)

    on_test_start = on_validation_start

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    on_test_end = on_validation_end

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
        self._remove_hooks()

    # --- checkpoints --------------------------------------------------------------------------
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # a checkpoint written during validation (EMA weights swapped in) must hold the raw weights
        if self.ema is not None and self.ema.swapped and "state_dict" in checkpoint:
            checkpoint["state_dict"].update(self.ema.raw_values(pl_module))

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # checkpoints written before the key held every setting keep the state under a key of the
        # decay alone: file it under today's key (Lightning hands each callback its state right after
        # this hook)
        states = checkpoint.get("callbacks")
        old_key = self._generate_state_key(decay=self.decay)
        if isinstance(states, dict) and self.state_key not in states and old_key in states:
            states[self.state_key] = states[old_key]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step_count": self.step_count,
            "last_global_step": self._last_global_step,
            **self._settings(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start (the EMA is built there); strategies that
        # restore after setup call this once the EMA exists
        self._restored = dict(state_dict)
        if self._fitting and self.ema is not None:
            self._build_ema(self.ema.model)

    # --- internals ----------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        # every setting that shapes the average (the state key, saved with the state)
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "update_every_n_steps": self.update_every_n_steps,
            "start_step": self.start_step,
            "buffers": self.buffers,
        }

    def _build_ema(self, pl_module: nn.Module) -> None:
        """The EMA of the restored state (counters included while fitting), else a fresh one if none."""
        restored, self._restored = self._restored, None
        settings = {"decay": self.decay, "warmup": self.warmup, "buffers": self.buffers}
        if restored is not None and restored.get("ema") is not None:
            self.ema = TrainableEMA.from_state_dict(pl_module, restored["ema"], **settings)
        elif self.ema is None:
            self.ema = TrainableEMA(pl_module, **settings)
        if self._fitting and restored is not None:
            self.step_count = int(restored.get("step_count", 0))
            self._last_global_step = int(restored.get("last_global_step", 0))

    def _take_loaded_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """``trainer.validate/test(ckpt_path=X)``: the EMA becomes X's (an earlier fit's EMA averaged
        other weights); ``False`` when X holds none (its raw weights are evaluated, nothing to swap in).
        """
        if not self._loaded_checkpoint_pending or self._fitting:
            return True
        self._loaded_checkpoint_pending = False
        path = trainer.ckpt_path
        if not path:
            return True  # no checkpoint loaded: the model holds the weights the current EMA belongs to
        restored, self.ema = self._restored, None
        if restored is not None and restored.get("ema") is not None:
            self._build_ema(pl_module)
            which = "its EMA weights" if self.validate_with_ema else "its raw weights (validate_with_ema off)"
            rank_zero_info(f"FrozenSafeEMA: evaluating checkpoint {str(path)!r} on {which}.")
            return True
        self._restored = None
        rank_zero_info(
            f"FrozenSafeEMA: checkpoint {str(path)!r} holds no EMA state under {self.state_key!r}: "
            "evaluating its raw weights (the EMA of an earlier fit averaged other weights: dropped)."
        )
        return False

    def _restore(self) -> None:
        if self.ema is not None:
            self.ema.restore()

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._stepped = True

    def _hook_optimizers(self, trainer: pl.Trainer) -> bool:
        """Count the steps of optimizers not hooked yet; ``True`` when there were such optimizers."""
        added = False
        for optimizer in trainer.optimizers:
            if id(optimizer) not in self._hooks and hasattr(optimizer, "register_step_post_hook"):
                self._hooks[id(optimizer)] = optimizer.register_step_post_hook(self._on_optimizer_step)
                added = True
        return added

    def _remove_hooks(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks = {}


def load_ema_weights(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    *,
    state_key: str | None = None,
    strict: bool = True,
    unsafe_load: bool = False,
) -> nn.Module:
    """Load a model with its EMA weights from a Lightning checkpoint written with :class:`FrozenSafeEMA`.

    Every tensor the EMA shadowed gets its average (cast to the model's dtype); every other tensor
    (the frozen ones, which the EMA never touched) gets its raw value from the checkpoint. Use it for
    inference or export: ``model = load_ema_weights(MyModule(...), "last.ckpt").eval()``.

    Args:
        model: the module the checkpoint was written from (a ``LightningModule`` or any
            ``nn.Module`` with the same ``state_dict`` keys). A model sharded with FSDP2
            (``fully_shard``) takes the full tensors of the file, each rank keeping its own slice
            (``torch.distributed.checkpoint.state_dict.set_model_state_dict``; nothing is sent).
        checkpoint: path of the ``.ckpt`` file (read with
            :func:`~lightning_freeze.core.checkpoint.load_checkpoint`, integrity-checked), or the
            loaded checkpoint dict.
        state_key: which ``FrozenSafeEMA`` state when the checkpoint holds several (e.g.
            ``fresh_ema.state_key`` of a ``FrozenSafeEMA`` built with the same settings); default:
            the only one.
        strict: passed to ``model.load_state_dict``.
        unsafe_load: allow pickled objects in the file (``torch.load(weights_only=False)``): only for
            files you trust.

    Returns:
        ``model``, holding the EMA weights.

    Raises:
        CheckpointError: (a ``ValueError``) an unreadable file, or no (or several, without
            ``state_key``) FrozenSafeEMA state in it.
    """
    from lightning_freeze.core.checkpoint import ema_state_dict, load_checkpoint

    if isinstance(checkpoint, Mapping):
        ckpt, source = checkpoint, "checkpoint"
    else:
        ckpt, source = load_checkpoint(checkpoint, unsafe_load=unsafe_load), repr(os.fspath(checkpoint))
    weights = ema_state_dict(ckpt, source, state_key=state_key)
    if any(is_sharded(p) for p in model.parameters()):
        # a sharded (FSDP2) model takes full tensors through torch's distributed state-dict API:
        # every rank holds the file and keeps its own slice, nothing is sent
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=strict))
    else:
        model.load_state_dict(weights, strict=strict)
    # again through the live tensors: a tensor shared under two keys takes the value of the last key
    # in load_state_dict, which may be the raw one
    callbacks = ckpt["callbacks"]  # ema_state_dict checked that the state exists and is unique
    if state_key is None:
        state_key = next(k for k in callbacks if isinstance(k, str) and k.startswith(EMA_STATE_PREFIX))
    shadow = callbacks[state_key]["ema"]["shadow"]
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for key, value in shadow.items():
            if key in live:
                copy_full_into(live[key], value)
    return model
