"""Packed sweep vs jobs one after another: N learning rates of a branch on a frozen ResNet-18.

The sweep is ``lightning-freeze-train -m`` stage 2 (frozen torchvision ResNet-18, ``weights=None``,
random init from a 1-batch stage 1) over ``model.optimizer.lr`` (``--variants`` values) for an MLP
branch (``branch=folder``, dropout 0), on synthetic 64x64 RGB images in an ImageFolder. Each row
runs the same sweep through the real CLI:

* ``packed``: ``launcher=packed`` (one process, one backbone pass per batch for all variants);
* ``sequential``: ``launcher=basic`` (the jobs one after another in one process);
* ``sequential_cache``: ``launcher=basic`` with ``callbacks=[default,freeze_backbone,feature_cache]``
  and one disk store shared by the jobs (the first job fills it, the others only hit);
* ``packed_aug`` / ``sequential_aug``: the same two launchers with random augmentation of every
  training batch (a per-sample horizontal flip and a random shift, drawn from the global generator
  in ``on_after_batch_transfer``): no input repeats, so no cache can help; the situation of a
  DINOv2-style linear evaluation with augmentation, where packing is what is left;
* ``joblib``: ``launcher=joblib`` with ``hydra.launcher.n_jobs=2`` (2 worker processes; not run by
  default);
* ``single``: one job alone (the memory reference).

Wall time and peak memory (the largest sum of RSS over the process tree, sampled every 0.1 s) are
measured per run; the rows are interleaved over ``--repeats`` rounds, the 1-minute load average is
recorded before each run (the machine may be shared) and the table gives the median and the range
of each row; one untimed job first (``--warmup``) compiles the bytecode and warms the file caches,
which the first timed run would otherwise pay alone. The packed and sequential checkpoints are
compared bitwise at the end. A packed sweep of N variants cannot be more than N times faster than N
jobs; a ratio above N is load noise.

    python benchmarks/bench_packed.py --variants 4 --images 512 --epochs 3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
LRS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
ROWS = ("packed", "sequential", "sequential_cache", "packed_aug", "sequential_aug", "single")


def _augmented_image_folder() -> type:
    """``ImageFolderDataModule`` whose training batches are randomly flipped and shifted (no cache hits)."""
    import lightning as L

    from lightning_freeze.data import ImageFolderDataModule

    class AugmentedImageFolderDataModule(ImageFolderDataModule):
        def on_after_batch_transfer(self, batch: object, dataloader_idx: int) -> object:
            trainer = self.trainer
            if trainer is None or not trainer.training:
                return batch
            x, y = batch  # type: ignore[misc]
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            shift = [int(v) for v in torch.randint(-4, 5, (2,))]
            return x.roll(shift, dims=(-2, -1)), y

    assert issubclass(AugmentedImageFolderDataModule, L.LightningDataModule)
    return AugmentedImageFolderDataModule


def __getattr__(name: str) -> type:  # the app instantiates data._target_=bench_packed.Augmented...
    if name == "AugmentedImageFolderDataModule":
        return _augmented_image_folder()
    raise AttributeError(name)


def _write_images(root: Path, count: int, classes: int = 4, size: int = 64) -> None:
    """Synthetic learnable images: each class a different mean colour plus noise, as PNG files."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        c = i % classes
        base = torch.zeros(3, 1, 1)
        base[c % 3] = 0.5 + 0.1 * (c // 3)
        pixels = (base + 0.25 * torch.rand(3, size, size, generator=generator)).clamp(0, 1)
        array = (pixels.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(root / f"class{c}" / f"{i:05d}.png")


def _run(args: list[str], cwd: Path, threads: int) -> tuple[float, int, str]:
    """Run the app; return (wall seconds, peak RSS of the process tree in bytes, output)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks")]),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_freeze.train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    root = psutil.Process(proc.pid)
    peak = 0
    output: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            rss = 0
            for p in tree:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - start
    reader.join()
    text = "".join(output)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(args)}\n{text[-3000:]}")
    return wall, peak, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="synthetic images (80%% train, 20%% val)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--variants", type=int, default=4, help=f"learning rates (at most {len(LRS)})")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed single jobs before the rounds (bytecode, file caches)"
    )
    parser.add_argument("--launchers", default=",".join(ROWS), help=f"rows, from {', '.join(ROWS)}, joblib")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if not 2 <= args.variants <= len(LRS):
        parser.error(f"--variants={args.variants}; valid choices: 2 to {len(LRS)}")
    lrs = ",".join(str(lr) for lr in LRS[-args.variants :])

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_packed_"))
    images = work / "images"
    if not images.is_dir():
        _write_images(images, args.images)
    common = [
        "quiet=true",
        "model=resnet18",
        # the app instantiates model.* detached from the root config: ${trainer.max_epochs} would not resolve
        f"model.scheduler.T_max={args.epochs}",
        "data=image_folder",
        f"data.root={images}",
        "data.num_workers=0",
        "data.batch_size=64",
        "branch=folder",
        "branch.head.dropout=0.0",
        "trainer.deterministic=true",
        "logger=none",
    ]
    stage1 = work / "stage1" / "checkpoints" / "last.ckpt"
    if not stage1.is_file():
        _run(
            [
                *common,
                "branch.name=base",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=1",
                f"hydra.run.dir={work / 'stage1'}",
            ],
            work,
            args.threads,
        )
    stage2 = [
        *common,
        "stage=2",
        f"init_from={stage1}",
        "branch.name=probe",
        "callbacks=[default,freeze_backbone]",
        f"trainer.max_epochs={args.epochs}",
    ]
    augment = ["data._target_=bench_packed.AugmentedImageFolderDataModule"]
    commands = {
        "packed": ["-m", *stage2, f"model.optimizer.lr={lrs}", "launcher=packed"],
        "sequential": ["-m", *stage2, f"model.optimizer.lr={lrs}", "launcher=basic"],
        "sequential_cache": [
            "-m",
            *stage2,
            f"model.optimizer.lr={lrs}",
            "launcher=basic",
            "callbacks=[default,freeze_backbone,feature_cache]",
        ],
        "packed_aug": ["-m", *stage2, *augment, f"model.optimizer.lr={lrs}", "launcher=packed"],
        "sequential_aug": ["-m", *stage2, *augment, f"model.optimizer.lr={lrs}", "launcher=basic"],
        "joblib": ["-m", *stage2, f"model.optimizer.lr={lrs}", "launcher=joblib", "hydra.launcher.n_jobs=2"],
        "single": ["-m", *stage2, "model.optimizer.lr=0.01", "launcher=basic"],
    }
    chosen = args.launchers.split(",")
    unknown = [name for name in chosen if name not in commands]
    if unknown:
        parser.error(f"--launchers: unknown {unknown}; valid choices: {', '.join(commands)}")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    for index in range(args.warmup):
        # the first run of a fresh checkout compiles bytecode and reads every file cold: not a row's cost
        _run([*commands["single"], f"hydra.sweep.dir={work / f'warmup_{index}'}"], work, args.threads)
    for round_ in range(args.repeats):
        for name in chosen:
            load = os.getloadavg()[0]
            sweep_dir = work / f"{name}_{round_}"
            extra = [f"hydra.sweep.dir={sweep_dir}"]
            if name == "sequential_cache":  # a fresh store per round, shared by the round's jobs
                extra.append(f"callbacks.feature_cache.directory={work / f'store_{round_}'}")
            wall, peak, text = _run([*commands[name], *extra], work, args.threads)
            if name.startswith("packed") and "as packed variants in one process" not in text:
                raise RuntimeError(f"the packed launcher did not pack:\n{text[-2000:]}")
            results[name].append({"wall_s": wall, "peak_rss_mb": peak / 2**20, "load_1min": load})
            print(
                f"{name:<11} round {round_}: {wall:7.1f} s  peak {peak / 2**20:7.0f} MiB  load {load:.2f}",
                flush=True,
            )

    summary: dict[str, object] = {}
    for name, runs in results.items():
        walls = [r["wall_s"] for r in runs]
        summary[name] = {
            "wall_s": walls,
            "median_s": statistics.median(walls),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "load_1min": [r["load_1min"] for r in runs],
        }
    n = args.variants
    # what each row is measured against: the same data without / with augmentation
    reference = {"packed": "sequential", "sequential_cache": "sequential", "packed_aug": "sequential_aug"}
    print(f"\n{n} learning rates, {args.images} images, {args.epochs} epochs, {args.threads} threads/process")
    print("| row | wall time, median (range) | speed-up, median (range) | peak memory | vs single job |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        row = summary[name]
        assert isinstance(row, dict)
        walls = row["wall_s"]
        ref = reference.get(name)
        speed = "-"
        if ref in results:
            ratios = [b["wall_s"] / a["wall_s"] for a, b in zip(runs, results[ref], strict=True)]
            speed = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) vs {ref}"
            row["speedup"] = ratios
        single = summary.get("single")
        memory = f"{row['peak_rss_mb'] / single['peak_rss_mb']:.2f}x" if isinstance(single, dict) else "-"
        print(
            f"| {name} | {row['median_s']:.1f} s ({min(walls):.1f}-{max(walls):.1f}) | {speed} | "
            f"{row['peak_rss_mb']:.0f} MiB | {memory} |"
        )
    loads = [r["load_1min"] for runs in results.values() for r in runs]
    print(
        f"1-minute load average before the runs: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"ceiling: {n} packed variants are at most {n}x faster than {n} sequential jobs; goal with "
        f"augmentation: at least {0.7 * n:.1f}x"
    )
    for packed, sequential in (("packed", "sequential"), ("packed_aug", "sequential_aug")):
        if packed in chosen and sequential in chosen:
            same = _compare(work / f"{packed}_0", work / f"{sequential}_0")
            print(f"{packed} vs {sequential} checkpoints: {same}")
            summary[f"bitwise_{packed}"] = same
    summary["config"] = {
        "images": args.images,
        "epochs": args.epochs,
        "variants": args.variants,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


def _compare(packed: Path, sequential: Path) -> str:
    equal = 0
    jobs = sorted(p.name for p in packed.iterdir() if p.name[0].isdigit())
    for job in jobs:
        a = torch.load(packed / job / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        b = torch.load(sequential / job / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        equal += a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return f"{equal}/{len(jobs)} jobs bitwise identical"


if __name__ == "__main__":
    main()
