"""Packed sweep vs jobs one after another vs joblib: 8 learning rates of a branch on a frozen ResNet-18.

The sweep is ``lightning-freeze-train -m`` stage 2 (frozen torchvision ResNet-18, ``weights=None``,
random init from a 1-batch stage 1) over ``model.optimizer.lr`` (8 values) for an MLP branch
(``branch=folder``, dropout 0 so that the variants are bitwise the jobs), on synthetic 64x64 RGB
images in an ImageFolder. Each launcher runs the same sweep through the real CLI:

* ``packed``: ``launcher=packed`` (one process, one backbone pass per batch for all 8 variants);
* ``sequential``: ``launcher=basic`` (8 jobs one after another in one process);
* ``joblib``: ``launcher=joblib`` with ``hydra.launcher.n_jobs=2`` (2 worker processes);
* ``single``: one job alone (the memory reference: "peak memory at most 1.5x a single job").

Wall time and peak memory (the largest sum of RSS over the process tree, sampled every 0.1 s) are
measured per run; the runs are interleaved over ``--repeats`` rounds and the 1-minute load average
is recorded before each run (the machine may be shared). The packed and sequential checkpoints are
compared bitwise at the end.

    python benchmarks/bench_packed.py --images 1536 --epochs 3 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
LRS = "0.0003,0.001,0.003,0.01,0.03,0.1,0.3,1.0"


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
        "PYTHONPATH": str(REPO),
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
    parser.add_argument("--images", type=int, default=1536, help="synthetic images (80%% train, 20%% val)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--launchers", default="packed,sequential,joblib,single")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

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
    commands = {
        "packed": ["-m", *stage2, f"model.optimizer.lr={LRS}", "launcher=packed"],
        "sequential": ["-m", *stage2, f"model.optimizer.lr={LRS}", "launcher=basic"],
        "joblib": ["-m", *stage2, f"model.optimizer.lr={LRS}", "launcher=joblib", "hydra.launcher.n_jobs=2"],
        "single": ["-m", *stage2, "model.optimizer.lr=0.01", "launcher=basic"],
    }
    chosen = args.launchers.split(",")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    for round_ in range(args.repeats):
        for name in chosen:
            load = os.getloadavg()[0]
            sweep_dir = work / f"{name}_{round_}"
            wall, peak, text = _run([*commands[name], f"hydra.sweep.dir={sweep_dir}"], work, args.threads)
            if name == "packed" and "as packed variants in one process" not in text:
                raise RuntimeError(f"the packed launcher did not pack:\n{text[-2000:]}")
            results[name].append({"wall_s": wall, "peak_rss_mb": peak / 2**20, "load_1min": load})
            print(
                f"{name:<11} round {round_}: {wall:7.1f} s  peak {peak / 2**20:7.0f} MiB  load {load:.2f}",
                flush=True,
            )

    summary = {}
    for name, runs in results.items():
        summary[name] = {
            "wall_s": min(r["wall_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "load_1min": [r["load_1min"] for r in runs],
        }
    print("\n| launcher | wall time (s) | vs sequential | peak memory (MiB) | vs single job |")
    print("|---|---:|---:|---:|---:|")
    for name, row in summary.items():
        speed = summary.get("sequential", {}).get("wall_s")
        single = summary.get("single", {}).get("peak_rss_mb")
        wall, peak = row["wall_s"], row["peak_rss_mb"]
        faster = f"{speed / wall:.2f}x faster" if speed else "-"
        memory = f"{peak / single:.2f}x" if single else "-"
        print(f"| {name} | {wall:.1f} | {faster} | {peak:.0f} | {memory} |")
    if "packed" in chosen and "sequential" in chosen:
        same = _compare(work / "packed_0", work / "sequential_0")
        print(f"\npacked vs sequential checkpoints: {same}")
        summary["bitwise"] = same
    summary["config"] = {
        "images": args.images,
        "epochs": args.epochs,
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
