"""GPU checks: bf16 fit, DDP unfreeze, SyncBatchNorm, FSDP, FSDP2, and the FeatureCache speed table.

Run through ``scripts/gpu_check.sh`` (one section per process, summary at the end), or by hand:
``python scripts/gpu_check.py SECTION [--devices N] [--accelerator cuda|cpu]``.
Sections: bf16, ddp_unfreeze, syncbn, fsdp, fsdp2, cache. Every section exits non-zero with "FAILED: ..."
on the first broken expectation and prints "PASSED <section>: ..." otherwise. ``--accelerator cpu``
runs ddp_unfreeze on gloo (a dry run of the script's logic; the other multi-process sections need
CUDA: Lightning refuses FSDP and SyncBatchNorm on CPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_freeze import FreezeBackbone, FrozenSafeEMA, MultiBranchModule
from lightning_freeze.core import diff_fingerprints, fingerprint
from lightning_freeze.core.distributed import compare_across_ranks, describe_rank_mismatch, local_shards

SECTIONS = ("bf16", "ddp_unfreeze", "syncbn", "fsdp", "fsdp2", "cache")


def fail(message: str) -> None:
    raise SystemExit(f"FAILED: {message}")


def data(n: int = 256, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0].mean(dim=(1, 2)) > 0.1).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def conv_backbone(width: int = 32) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


class Net(L.LightningModule):
    """Backbone + head with a BatchNorm1d (a trainable norm layer)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.backbone = conv_backbone(width)
        self.head = nn.Sequential(
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


class RanksIdentical(Callback):
    """At every train epoch end: every parameter (with ``buffers``, every buffer) equal on all ranks."""

    def __init__(self, buffers: bool = False) -> None:
        self.buffers = buffers
        self.epochs: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        tensors = dict(pl_module.named_parameters())
        if self.buffers:
            tensors.update(pl_module.named_buffers())
        mismatch = compare_across_ranks(fingerprint(local_shards(tensors)[0]))
        if mismatch:
            fail(f"epoch {trainer.current_epoch}: ranks differ:\n{describe_rank_mismatch(mismatch)}")
        self.epochs[trainer.current_epoch] = {
            k: v.detach().float().cpu().clone() for k, v in pl_module.backbone.named_parameters()
        }


def trainer(args: argparse.Namespace, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator=args.accelerator, devices=args.devices, max_epochs=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    defaults.update(kwargs)
    return L.Trainer(**defaults)


# ----------------------------------------------------------------------------------------------
def bf16(args: argparse.Namespace) -> str:
    """bf16-mixed fit on one device with FreezeBackbone, FrozenSafeEMA and MultiBranchModule."""
    L.seed_everything(0, verbose=False)
    model = MultiBranchModule(
        conv_backbone(), {"a": nn.Linear(32, 4), "b": nn.Linear(32, 3)}, active_branch="b"
    )
    frozen_keys = [k for k in model.state_dict() if not k.startswith("branches.b.")]
    before = fingerprint(model, frozen_keys)
    freeze, ema = FreezeBackbone("backbone"), FrozenSafeEMA(decay=0.99)
    t = trainer(args, devices=1, precision="bf16-mixed", callbacks=[freeze, ema])
    t.fit(model, data(), data(64, 1))
    diff = diff_fingerprints(before, fingerprint(model, frozen_keys))
    if diff or freeze.last_check is None or freeze.last_check.changed:
        fail(f"a frozen tensor changed under bf16-mixed: {diff.summary()}")
    return f"{freeze.last_check.summary()}; independent check of backbone + branch a: {diff.summary()}"


def ddp_unfreeze(args: argparse.Namespace) -> str:
    """DDP (NCCL): unfreeze_at_epoch=1, ranks identical every epoch, backbone trains; EMA shadows compared."""
    L.seed_everything(0, verbose=False)
    model = Net()
    record = RanksIdentical()
    freeze = FreezeBackbone("backbone", unfreeze_at_epoch=1)
    ema = FrozenSafeEMA(decay=0.9, check_ranks=True)
    t = trainer(args, strategy="ddp", callbacks=[freeze, ema, record])
    start = {k: v.detach().float().cpu().clone() for k, v in model.backbone.named_parameters()}
    t.fit(model, data(), data(64, 1))
    e = record.epochs
    if any(not torch.equal(e[0][k], start[k]) for k in start):
        fail("the backbone changed while frozen (epoch 0)")
    weights = [k for k in start if k.endswith("weight")]
    stuck = [k for k in weights if torch.equal(e[2][k], e[0][k])]
    if stuck:
        fail(f"unfrozen backbone weights did not train: {stuck}")
    groups = len(t.optimizers[0].param_groups)
    if groups != 2:
        fail(f"expected 2 param groups after the unfreeze, got {groups}")
    return (
        f"world size {t.world_size}: ranks identical after every epoch; backbone trained after the unfreeze"
    )


def syncbn(args: argparse.Namespace) -> str:
    """SyncBatchNorm in the trainable head (Trainer(sync_batchnorm=True)), and a user-converted model."""
    results = []
    for how, norm in (("trainer", "eval"), ("user", "eval"), ("user", "frozen")):
        L.seed_everything(0, verbose=False)
        model = Net()
        if how == "user":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        frozen_keys = [k for k in model.state_dict() if k.startswith("backbone.")]
        before = fingerprint(model, frozen_keys)
        freeze = FreezeBackbone("backbone", norm=norm)
        record = RanksIdentical(buffers=True)  # SyncBatchNorm: the head's statistics too
        t = trainer(args, strategy="ddp", sync_batchnorm=how == "trainer", callbacks=[freeze, record])
        t.fit(model, data(), data(64, 1))
        n_sync = sum(isinstance(m, nn.SyncBatchNorm) for m in model.head.modules())
        if n_sync != 1:
            fail(f"{how}/{norm}: expected the head's BatchNorm as SyncBatchNorm, found {n_sync}")
        diff = diff_fingerprints(before, fingerprint(model, frozen_keys))
        if diff:
            fail(f"{how}/{norm}: frozen backbone changed: {diff.summary()}")
        results.append(f"{how}-converted norm={norm}: {freeze.last_check.summary()}")  # type: ignore[union-attr]
    return "; ".join(results) + "; ranks identical incl. SyncBatchNorm statistics"


class ShardedNet(Net):
    """Net whose backbone and head are wrapped separately (FSDP2 in configure_model)."""

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return  # FSDPStrategy wraps with its auto_wrap_policy instead
        from torch.distributed.fsdp import fully_shard

        dp = mesh["data_parallel"]
        fully_shard(
            self.backbone, mesh=dp
        )  # frozen: its own all-gather group, no gradient, no optimizer state
        fully_shard(self.head, mesh=dp)  # trainable
        fully_shard(self, mesh=dp)


def _sharded_fit(
    args: argparse.Namespace, strategy: Any, tmp: Path
) -> tuple[FreezeBackbone, FrozenSafeEMA, Any]:
    L.seed_everything(0, verbose=False)
    model = ShardedNet()
    freeze, ema = FreezeBackbone("backbone"), FrozenSafeEMA(decay=0.9)
    t = trainer(args, strategy=strategy, max_epochs=2, callbacks=[freeze, ema], default_root_dir=tmp)
    t.fit(model, data(), data(64, 1))
    if freeze.last_check is None or freeze.last_check.changed:
        fail(f"{type(strategy).__name__}: frozen tensors changed: {freeze.last_check}")
    full = ema.ema_state_dict(full=True)
    if any(callable(getattr(v, "full_tensor", None)) for v in full.values()):
        fail("ema_state_dict(full=True) returned sharded tensors")
    t.save_checkpoint(tmp / "ckpt")
    return freeze, ema, t


def fsdp(args: argparse.Namespace) -> str:
    """Lightning FSDPStrategy (FSDP1): FreezeBackbone with backbone and head in separate FSDP units.

    FrozenSafeEMA refuses FSDP1 (flattened parameters): checked here too.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    L.seed_everything(0, verbose=False)
    model = ShardedNet()
    freeze = FreezeBackbone("backbone")
    strategy = FSDPStrategy(auto_wrap_policy={nn.Sequential}, use_orig_params=True)
    t = trainer(args, strategy=strategy, max_epochs=2, callbacks=[freeze])
    t.fit(model, data(), data(64, 1))
    if freeze.last_check is None or freeze.last_check.changed:
        fail(f"FSDPStrategy: frozen tensors changed: {freeze.last_check}")
    try:
        trainer(args, strategy=FSDPStrategy(), max_epochs=1, callbacks=[FrozenSafeEMA()]).fit(
            ShardedNet(), data()
        )
    except ValueError as err:
        if "FSDPStrategy" not in str(err):
            fail(f"FrozenSafeEMA under FSDPStrategy: unexpected error {err}")
    else:
        fail("FrozenSafeEMA under FSDPStrategy: expected a clear refusal")
    return f"world size {t.world_size}: {freeze.last_check.summary()}; FrozenSafeEMA refused FSDP1 clearly"


def fsdp2(args: argparse.Namespace) -> str:
    """ModelParallelStrategy (FSDP2 fully_shard): sharded EMA, distributed checkpoint, resume."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    with tempfile.TemporaryDirectory() as tmp:
        freeze, ema, t = _sharded_fit(args, ModelParallelStrategy(), Path(tmp))
        if t.world_size > 1 and not (ema.ema is not None and ema.ema.sharded):
            fail("FSDP2: the EMA shadow is not sharded")
        shadow = dict(ema.ema.shadow) if ema.ema is not None else {}
        local = {k: v.to_local().clone() if hasattr(v, "to_local") else v.clone() for k, v in shadow.items()}
        # resume from the distributed checkpoint: the same shards come back
        model = ShardedNet()
        resumed = FrozenSafeEMA(decay=0.9)
        t2 = trainer(
            args,
            strategy=ModelParallelStrategy(),
            max_epochs=2,
            callbacks=[FreezeBackbone("backbone"), resumed],
        )
        t2.fit(model, data(), data(64, 1), ckpt_path=Path(tmp) / "ckpt")
        got = resumed.ema.shadow if resumed.ema is not None else {}
        bad = [
            k
            for k in local
            if not torch.equal(local[k], got[k].to_local() if hasattr(got[k], "to_local") else got[k])
        ]
        if bad:
            fail(f"FSDP2: EMA shadows not restored from the distributed checkpoint: {bad}")
    return f"world size {t.world_size}: {freeze.last_check.summary()}; sharded EMA saved and resumed"  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------------
class _EpochTimer(Callback):
    """Seconds per training epoch, with the device synchronised at both ends."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


class _ResNet50Head(L.LightningModule):
    """Frozen torchvision ResNet-50 (random init, fc removed) + a trainable linear head."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        torch.manual_seed(0)
        self.backbone = torchvision.models.resnet50(weights=None)
        self.backbone.fc = nn.Identity()
        self.head = nn.Linear(2048, 1000)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.01)


def cache(args: argparse.Namespace) -> str:
    """Images/s, ResNet-50 + head, bf16, batch 256 at 224 px: uncached, all-hit FeatureCache, skip_pipeline.

    The last of 4 epochs is timed (all-hit for the cache, skipped for skip_pipeline, which skips from
    epoch 3). Prints a Markdown table for docs/feature-cache.md; fails if the skip run's head is not
    bitwise the cached run's head.
    """
    from lightning_freeze import FeatureCache

    samples, batch = 2048, 256
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (samples,), generator=g)
    rows: dict[str, float] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    probe_mismatches: list[str] = []
    for name in ("uncached", "FeatureCache (memory, all hit)", "skip_pipeline"):
        # verify="warn" so that the table prints either way; a probe mismatch fails the section after it
        # (the probe once reported a change under bf16-mixed here with 0 tensors changed: TF32 kernels)
        freeze = FreezeBackbone("backbone", verify="warn")
        callbacks: list[Any] = [freeze, timer := _EpochTimer()]
        if name != "uncached":
            callbacks.append(FeatureCache("backbone", skip_pipeline=name == "skip_pipeline"))
        model = _ResNet50Head()
        t = trainer(args, devices=1, precision="bf16-mixed", max_epochs=4, callbacks=callbacks)
        t.fit(model, DataLoader(TensorDataset(x, y), batch_size=batch))
        rows[name] = samples / timer.times[-1]
        heads[name] = {k: v.detach().cpu() for k, v in model.head.state_dict().items()}
        probe_mismatches += [f"{name}: {m}" for m in freeze.last_probe_check]
    if not all(
        torch.equal(heads["skip_pipeline"][k], v) for k, v in heads["FeatureCache (memory, all hit)"].items()
    ):
        fail("the skip_pipeline run's head differs from the cached run's head")
    device = torch.cuda.get_device_name(0)
    table = [
        f"ResNet-50 (weights=None, frozen) + linear head, bf16-mixed, batch {batch} at 224 px, {samples} "
        f"in-memory samples, {device}, torch {torch.__version__}; images/s of the 4th epoch:",
        "",
        "| run | images/s | vs uncached |",
        "|---|---|---|",
    ]
    table += [f"| {name} | {ips:,.0f} | {ips / rows['uncached']:.2f}x |" for name, ips in rows.items()]
    print("\n".join(table), flush=True)
    if probe_mismatches:
        fail("FreezeBackbone's output probe reported a change: " + "; ".join(probe_mismatches))
    return "; ".join(f"{name} {ips:,.0f} images/s" for name, ips in rows.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=SECTIONS)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        fail("no CUDA device (run scripts/gpu_check.sh: it reports 'no CUDA' instead)")
    if args.accelerator == "cpu" and args.section != "ddp_unfreeze":
        fail(f"section {args.section!r} needs CUDA; only ddp_unfreeze has a CPU dry run")
    torch.set_float32_matmul_precision("high")
    summary = globals()[args.section](args)
    if L.fabric.utilities.rank_zero.rank_zero_only.rank == 0:
        print(f"PASSED {args.section} ({args.accelerator}, devices={args.devices}): {summary}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
