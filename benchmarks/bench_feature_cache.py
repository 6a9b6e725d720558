"""FeatureCache speed on a frozen torchvision ResNet-18 + linear head, measured side by side.

Rows, each a full Lightning fit of ``--epochs`` epochs on the same samples (shuffled):

* ``uncached``: FreezeBackbone only (the backbone runs every epoch);
* ``cached (memory)``: FreezeBackbone + FeatureCache(store="memory");
* ``skip pipeline (memory)``: FeatureCache(store="memory", skip_pipeline=True): from epoch 3 on
  (epoch 1 computes, epoch 2 verifies inputs and targets) no sample is loaded but the random check;
* ``precomputed (hand-written)``: features computed once in a plain loop, then the head trained on
  a TensorDataset of (feature, target) pairs in the same Lightning loop (its "epoch 1" includes the
  precompute);
* with ``--disk``: FeatureCache(store="disk"), and a fresh process after a first one filled it.

Each row runs for in-memory tensors and for real JPEG files read through
``torchvision.datasets.ImageFolder`` (decode, resize, crop, normalize: deterministic). The rows are
interleaved round by round (U, C, S, P, U, C, S, P, ...) so that a shared, loaded machine slows them
alike; the last epoch is reported as median [min-max] with "vs hand-written" ratios and the load
average, after a key-throughput line (``sample_keys`` GB/s next to ``tensor.clone()`` GB/s).

Run by hand:  python benchmarks/bench_feature_cache.py [--quick] [--samples 512] [--size 96] [--disk]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_freeze import FeatureCache, FreezeBackbone

FEATURES = 512  # ResNet-18 without its fc


class Classifier(L.LightningModule):
    """Frozen ResNet-18 trunk (fc removed) + a trainable linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torchvision.models.resnet18(weights=None)
        self.backbone.fc = nn.Identity()
        self.head = nn.Linear(FEATURES, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)


class HeadOnly(L.LightningModule):
    """The head alone, trained on precomputed features."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.01)


class EpochTimer(L.Callback):
    """Seconds per training epoch, from before every callback's epoch start to after every epoch end.

    ``around(callbacks)`` puts the start first and the end last in the list, so every row counts the
    epoch hooks of all its callbacks (FreezeBackbone's check, FeatureCache's bookkeeping) alike.
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def around(self, callbacks: list[Any]) -> list[Any]:
        return [self, *callbacks, _EpochEnd(self)]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.times.append(time.perf_counter() - self._t0)


class _EpochEnd(L.Callback):
    def __init__(self, timer: EpochTimer) -> None:
        self.timer = timer

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.timer.stop()


def dataset(args: argparse.Namespace) -> Any:
    """In-memory tensors, or an ImageFolder over ``args.jpeg_dir`` (see :func:`write_jpegs`)."""
    if args.jpeg_dir:
        from torchvision import transforms

        transform = transforms.Compose(
            [
                transforms.Resize(args.size),
                transforms.CenterCrop(args.size),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )
        return torchvision.datasets.ImageFolder(args.jpeg_dir, transform=transform)
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(args.samples, 3, args.size, args.size, generator=g),
        torch.randint(0, 10, (args.samples,), generator=g),
    )


def write_jpegs(directory: str, samples: int, size: int, classes: int = 10) -> None:
    """``samples`` JPEG files (smooth random images, 1.25x ``size``, quality 90) in ``classes`` folders."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    side = int(size * 1.25)
    for i in range(samples):
        folder = Path(directory) / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        low = torch.rand(3, side // 8, side // 8, generator=g)
        image = F.interpolate(low[None], size=(side, side), mode="bilinear")[0]
        pixels = (image.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def targets(data: Any) -> torch.Tensor:
    if isinstance(data, TensorDataset):
        return data.tensors[1]
    return torch.tensor(data.targets)


def _trainer(epochs: int, callbacks: list[Any]) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def run(mode: str, args: argparse.Namespace, directory: str | None = None) -> dict[str, Any]:
    """One fit; returns per-epoch seconds and the cache's stats."""
    data = dataset(args)
    timer = EpochTimer()
    callbacks: list[Any] = [FreezeBackbone("backbone")]
    cache = None
    if mode == "cached":
        cache = FeatureCache("backbone", store="memory")
    elif mode == "skip":
        cache = FeatureCache("backbone", store="memory", skip_pipeline=True)
    elif mode == "disk":
        cache = FeatureCache("backbone", store="disk", directory=directory)
    if cache is not None:
        callbacks.append(cache)
    model = Classifier()
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    _trainer(args.epochs, timer.around(callbacks)).fit(model, loader)
    return {
        "epochs": timer.times,
        "stats": {k: v for k, v in (cache.stats if cache else {}).items() if k != "modules"},
    }


def precomputed(args: argparse.Namespace) -> dict[str, Any]:
    """The hand-written script: features once (no_grad, eval), then the head on a TensorDataset."""
    data = dataset(args)
    model = Classifier().eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        feats = torch.cat([model.backbone(x) for x, _ in DataLoader(data, batch_size=args.batch_size)])
    precompute = time.perf_counter() - t0
    timer = EpochTimer()
    _trainer(args.epochs, timer.around([])).fit(
        HeadOnly(model.head),
        DataLoader(TensorDataset(feats, targets(data)), batch_size=args.batch_size, shuffle=True),
    )
    times = list(timer.times)
    times[0] += precompute
    return {"epochs": times, "stats": {"bytes": feats.numel() * feats.element_size()}}


def miss_overhead(args: argparse.Namespace, repeats: int = 15) -> dict[str, float]:
    """First-epoch overhead, isolated: one batch through the frozen trunk, plain vs all-miss cached.

    Interleaved (plain, cached, plain, ...) in one process, medians: a loaded machine slows both.
    The cached call hashes the inputs, runs the trunk, copies and stores the features; the module
    key is computed before the first timed call (once per fit in a real run, about as long as
    FreezeBackbone's fingerprint check).
    """
    from lightning_freeze.core import OutputCache, freeze

    model = Classifier()
    freeze(model, "backbone")
    trunk = model.backbone
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    plain, cached, hits = [], [], []
    cache = OutputCache(trunk)
    with torch.no_grad():
        trunk(x)  # warm-up
        with cache:
            trunk(x)  # computes the module key (once per fit in a real run)
        for _ in range(repeats):
            t0 = time.perf_counter()
            trunk(x)
            plain.append(time.perf_counter() - t0)
            with cache:
                cache.store.clear()  # every sample misses (the module key is computed once, as in a fit)
                t0 = time.perf_counter()
                trunk(x)
                cached.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                trunk(x)  # every sample hits
                hits.append(time.perf_counter() - t0)
    p, c = statistics.median(plain), statistics.median(cached)
    return {"plain_s": p, "miss_s": c, "overhead": c / p - 1, "hit_s": statistics.median(hits)}


def _median(runs: list[dict[str, Any]], epoch: int) -> float:
    return statistics.median(r["epochs"][epoch] for r in runs)


def key_throughput(batch: int, size: int, repeats: int = 5) -> dict[str, float]:
    """GB/s of ``sample_keys`` next to ``tensor.clone()`` on one float32 batch (medians, interleaved)."""
    from lightning_freeze.core.feature_cache import sample_keys

    x = torch.randn(batch, 3, size, size)
    keys, clones = [], []
    sample_keys([x])  # warm-up (thread pool)
    for _ in range(repeats):
        t0 = time.perf_counter()
        sample_keys([x])
        keys.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        x.clone()
        clones.append(time.perf_counter() - t0)
    gb = x.numel() * x.element_size() / 1e9
    return {
        "bytes": gb * 1e9,
        "sample_keys_gbps": gb / statistics.median(keys),
        "clone_gbps": gb / statistics.median(clones),
    }


def proof_floor(args: argparse.Namespace, repeats: int = 9) -> dict[str, float]:
    """The work a cached epoch cannot skip without giving up its exactness, timed alone (fastest of 9).

    Per epoch: FeatureCache's epoch-start hash of the backbone's tensors (``tensor_digest``: a
    ``tensor.data`` write bumps no version counter, so only the bits tell), FreezeBackbone's
    epoch-end fingerprint of the same tensors and its ``function_token``. Per batch of the plain
    cache: loading and collating the input samples (the key is of the exact input bits, which the
    hand-written script never loads) and hashing them (``sample_keys``).
    """
    from lightning_freeze.core import freeze
    from lightning_freeze.core.cache_keys import tensor_digest
    from lightning_freeze.core.feature_cache import sample_keys
    from lightning_freeze.core.fingerprint import fingerprint
    from lightning_freeze.core.probe import function_token

    model = Classifier()
    freeze(model, "backbone")
    trunk = model.backbone
    data = dataset(argparse.Namespace(**{**vars(args), "jpeg_dir": None}))
    loader = DataLoader(data, batch_size=args.batch_size)
    x = next(iter(loader))[0]
    jobs = {
        "cache_hash_s": lambda: tensor_digest(trunk),
        "fingerprint_s": lambda: fingerprint(trunk.state_dict(keep_vars=True)),
        "function_token_s": lambda: function_token(trunk),
        "collate_s": lambda: next(iter(loader)),
        "key_s": lambda: sample_keys([x]),
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for job in jobs.values():
        job()  # warm-up
    for _ in range(repeats):  # interleaved
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - t0)
    out = {name: min(ts) for name, ts in times.items()}  # a floor: each piece at its fastest
    out["per_epoch_s"] = out["cache_hash_s"] + out["fingerprint_s"] + out["function_token_s"]
    out["per_batch_s"] = out["collate_s"] + out["key_s"]
    return out


ROWS = ("uncached", "cached (memory)", "skip pipeline (memory)", "precomputed (hand-written)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="at least 3 (skip_pipeline skips from epoch 3)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="128 samples at 64 px, 3 epochs, 2 rounds (< 2 min)"
    )
    parser.add_argument("--data", choices=["both", "memory", "jpeg"], default="both")
    parser.add_argument("--disk", action="store_true", help="also the disk-store rows (1st and 2nd process)")
    parser.add_argument("--worker", choices=["disk"], help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    parser.add_argument("--jpeg-dir", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--overhead-only", action="store_true", help="only the isolated miss-path overhead")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.size, args.epochs, args.repeats = 128, 64, 3, 2
    if args.epochs < 3:
        parser.error(f"--epochs={args.epochs}; valid choices: 3 or more (skip_pipeline skips from epoch 3)")
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)

    if args.worker == "disk":  # the second process of the disk row
        print(json.dumps(run("disk", args, args.directory)))
        return
    measure(args)


def _rounds(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every row once per round, rounds interleaved: a loaded machine slows every row alike."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ROWS}
    for _ in range(args.repeats):
        runs["uncached"].append(run("uncached", args))
        runs["cached (memory)"].append(run("cached", args))
        runs["skip pipeline (memory)"].append(run("skip", args))
        runs["precomputed (hand-written)"].append(precomputed(args))
    if args.disk:
        with tempfile.TemporaryDirectory() as directory:
            runs["disk, 1st process"] = [run("disk", args, directory)]
            command = [sys.executable, __file__, "--worker", "disk", "--directory", directory]
            command += [
                f"--{k.replace('_', '-')}={getattr(args, k)}"
                for k in ("size", "samples", "batch_size", "epochs", "threads")
            ]
            command += [f"--jpeg-dir={args.jpeg_dir}"] if args.jpeg_dir else []
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs["disk, 2nd process"] = [json.loads(out.strip().splitlines()[-1])]
    return runs


def measure(args: argparse.Namespace) -> None:
    """All rows for in-memory tensors and JPEG files, printed as one Markdown table."""
    keys = key_throughput(16 if args.quick else 64, 224)
    print(
        f"key throughput on one {16 if args.quick else 64}x3x224x224 float32 batch "
        f"({keys['bytes'] / 1e6:.0f} MB): "
        f"sample_keys {keys['sample_keys_gbps']:.2f} GB/s, tensor.clone() {keys['clone_gbps']:.2f} GB/s "
        f"({args.threads} threads; load average {os.getloadavg()[0]:.1f})"
    )
    overhead = miss_overhead(args, repeats=5 if args.quick else 15)
    print(
        f"isolated miss path, batch {args.batch_size} at {args.size} px: plain trunk "
        f"{1000 * overhead['plain_s']:.0f} ms, cached (all miss) {1000 * overhead['miss_s']:.0f} ms: "
        f"{100 * overhead['overhead']:+.1f}%; all hit {1000 * overhead['hit_s']:.0f} ms; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    floor = proof_floor(args)
    print(
        f"per-epoch proof, timed alone: FeatureCache's epoch-start hash {1000 * floor['cache_hash_s']:.1f} ms"
        f" + FreezeBackbone's epoch-end fingerprint {1000 * floor['fingerprint_s']:.1f} ms + function token "
        f"{1000 * floor['function_token_s']:.1f} ms = {1000 * floor['per_epoch_s']:.1f} ms; plain cache per "
        f"batch: load and collate the inputs {1000 * floor['collate_s']:.2f} ms + their keys "
        f"{1000 * floor['key_s']:.2f} ms; load average {os.getloadavg()[0]:.1f}"
    )
    if args.overhead_only:
        return
    load_before = os.getloadavg()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    kinds = ["memory", "jpeg"] if args.data == "both" else [args.data]
    for kind in kinds:
        with tempfile.TemporaryDirectory() as jpeg_dir:
            args.jpeg_dir = None
            if kind == "jpeg":
                args.jpeg_dir = jpeg_dir
                write_jpegs(jpeg_dir, args.samples, args.size)
            results[kind] = _rounds(args)
    args.jpeg_dir = None
    load_after = os.getloadavg()
    print(
        f"\nResNet-18 (weights=None, frozen) + linear head, {args.samples} samples of "
        f"3x{args.size}x{args.size} "
        f"(in-memory tensors; JPEG files through ImageFolder: decode, resize, crop, normalize), batch "
        f"{args.batch_size}, shuffled, {args.epochs} epochs, "
        f"CPU {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__}; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (1 min); last epoch (skip_pipeline skips from epoch 3): median "
        f"[min-max] of {args.repeats} interleaved rounds\n"
    )
    header = "| run |"
    for kind in kinds:
        what = "in-memory tensors" if kind == "memory" else "JPEG files"
        header += f" last epoch, {what} (s) | vs hand-written |"
    print(header + " hit rate |")
    print("|---|" + "---|---|" * len(kinds) + "---|")
    table: dict[str, Any] = {}
    for name in results[kinds[0]]:
        line = f"| {name} |"
        for kind in kinds:
            rs = results[kind].get(name)
            if not rs:
                line += " - | - |"
                continue
            last = [r["epochs"][-1] for r in rs]
            pre = statistics.median(r["epochs"][-1] for r in results[kind]["precomputed (hand-written)"])
            med = statistics.median(last)
            line += f" {med:.3f} [{min(last):.3f}-{max(last):.3f}] | {med / pre:.2f}x |"
            table.setdefault(name, {})[kind] = {
                "last_s": last,
                "vs_hand_written": med / pre,
                "all": [r["epochs"] for r in rs],
            }
        stats = results[kinds[0]][name][-1]["stats"]
        lookups = stats.get("hits", 0) + stats.get("misses", 0)
        print(line + (f" {100 * stats['hits'] / lookups:.1f}% |" if lookups else " - |"))
    print("\ntargets: cached later epoch within 1.5x of the hand-written epoch, skip_pipeline within 1.1x")
    batches = -(-args.samples // args.batch_size)
    for kind in kinds:
        hand = statistics.median(r["epochs"][-1] for r in results[kind]["precomputed (hand-written)"])
        skip = (hand + floor["per_epoch_s"]) / hand
        cached = (hand + floor["per_epoch_s"] + batches * floor["per_batch_s"]) / hand
        print(
            f"what the exact proof alone costs ({kind}, hand-written epoch {1000 * hand:.1f} ms, "
            f"{batches} batches; parts timed alone, an estimate): skip_pipeline {skip:.2f}x (the per-epoch "
            f"proof), cached {cached:.2f}x (the proof, and loading and keying the in-memory inputs)"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "load": [load_before, load_after],
                    "key_throughput": keys,
                    "miss_overhead": overhead,
                    "proof_floor": floor,
                    "results": table,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
