"""Fingerprint throughput: BLAKE2b single thread (version 0.1) vs XXH3-128 in threads, vs memory bandwidth.

Tensor sets with the exact shapes of every parameter and buffer of torchvision's ResNet-50 (25.6 M
parameters, fp32) and of timm's ViT-L/16 (304 M parameters, fp32; ``--vit-scale`` hashes a fraction
of its tensors and extrapolates, labelled as such). The shapes come from models built on the
``meta`` device (no weight init); the tensors are filled with random values.

Methods are measured side by side: in each round every method runs once, in turn, so a machine that
is shared (load average printed) slows them alike; the best round per method is reported.

* ``blake2b-128, 1 thread``: what version 0.1 did on every check.
* ``xxh3-128, 1 thread`` and ``xxh3-128, N threads``: the current default algorithm; ``fingerprint()``
  uses ``min(8, torch.get_num_threads())`` threads unless told otherwise.
* memory bandwidth, with 1 and N torch threads on 256 MiB tensors: ``dst.copy_(src)`` (bytes copied
  per second; reads and writes each byte) and ``src.sum()`` (bytes read per second: the ceiling of
  any hash, which only reads).

Then the cost of the cross-rank check: two forked CPU ranks (gloo) with ResNet-50's tensors each:
the local fingerprint, ``compare_across_ranks`` when ranks agree (one 16-byte all_gather) and when
one rank differs (plus the full gather that names the key).

Run by hand:  python benchmarks/bench_fingerprint.py [--rounds 3] [--vit-scale 1.0] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

from lightning_freeze.core.fingerprint import fingerprint


def _shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[torch.Size, torch.dtype]]:
    with torch.device("meta"):
        model = build()
    return {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}


def _tensor_set(
    shapes: dict[str, tuple[torch.Size, torch.dtype]], fraction: float, device: str
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    keys = list(shapes)
    keep = keys[: max(1, round(len(keys) * fraction))] if fraction < 1 else keys
    out = {}
    for key in keep:
        shape, dtype = shapes[key]
        t = torch.empty(shape, dtype=dtype)
        if dtype.is_floating_point:
            t.uniform_(-1, 1, generator=gen)
        else:
            t.random_(0, 100, generator=gen)
        out[key] = t.to(device)
    return out


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _best(fn: Callable[[], object], rounds: int) -> float:
    return min(_time_once(fn) for _ in range(rounds))


def _time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def memory_bandwidth(threads: int, rounds: int, device: str) -> tuple[float, float]:
    """Bytes per second of ``dst.copy_(src)`` (copied) and ``src.sum()`` (read) on 256 MiB tensors."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(64 << 20, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        copy = _best(lambda: dst.copy_(src), rounds + 2)
        read = _best(lambda: src.sum(), rounds + 2)
    finally:
        torch.set_num_threads(before)
    nbytes = src.numel() * src.element_size()
    return nbytes / copy, nbytes / read


def measure(tensors: dict[str, torch.Tensor], rounds: int, threads: int) -> dict[str, float]:
    """Best seconds per full check for each method, measured in interleaved rounds."""
    methods: dict[str, Callable[[], object]] = {
        "blake2b-128, 1 thread (v0.1)": lambda: fingerprint(tensors, algorithm="blake2b-128", threads=1),
        "xxh3-128, 1 thread": lambda: fingerprint(tensors, algorithm="xxh3-128", threads=1),
        f"xxh3-128, {threads} threads": lambda: fingerprint(tensors, threads=threads),
    }
    if threads > 1:
        methods[f"blake2b-128, {threads} threads"] = lambda: fingerprint(
            tensors, algorithm="blake2b-128", threads=threads
        )
    best = dict.fromkeys(methods, float("inf"))
    for fn in methods.values():
        fn()  # warm up (page faults, thread start)
    for _ in range(rounds):
        for name, fn in methods.items():
            best[name] = min(best[name], _time_once(fn))
    return best


def _cross_rank_worker(rank: int, init_file: str, shapes: dict, rounds: int, queue: object) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from lightning_freeze.core.distributed import compare_across_ranks
    from lightning_freeze.core.fingerprint import tensor_bytes

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    tensors = _tensor_set(shapes, 1.0, "cpu")
    fp = fingerprint(tensors, threads=1)
    compare_across_ranks(fp)  # warm up the connection
    times = {}
    times["fingerprint (each rank, 1 thread)"] = _best(lambda: fingerprint(tensors, threads=1), rounds)
    times["compare_across_ranks, ranks equal"] = _best(lambda: compare_across_ranks(fp), rounds * 10)
    if rank == 1:
        tensor_bytes(tensors["conv1.weight"])[0] ^= 1
    bad = fingerprint(tensors, threads=1)
    times["compare_across_ranks, one rank differs"] = _best(lambda: compare_across_ranks(bad), rounds)
    if rank == 0:
        queue.put(times)  # type: ignore[attr-defined]
    dist.destroy_process_group()


def cross_rank_cost(shapes: dict, rounds: int) -> dict[str, float]:
    """Seconds per call on 2 forked CPU ranks (gloo, loopback), ResNet-50's tensors on each."""
    import multiprocessing
    import tempfile

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            context.Process(target=_cross_rank_worker, args=(rank, f"{tmp}/store", shapes, rounds, queue))
            for rank in (0, 1)
        ]
        for proc in procs:
            proc.start()
        result = queue.get(timeout=600)
        for proc in procs:
            proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--vit-scale", type=float, default=1.0, help="fraction of ViT-L's tensors to hash (extrapolated)"
    )
    parser.add_argument("--device", default="cpu", help="where the tensors live (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="hashing threads")
    args = parser.parse_args()
    threads = args.threads
    import timm
    import torchvision

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, device {args.device}"
    )
    for n in sorted({1, threads}):
        copy, read = memory_bandwidth(n, args.rounds, args.device)
        print(f"memory bandwidth, {n} thread(s): copy_ {copy / 1e9:.1f} GB/s, sum {read / 1e9:.1f} GB/s")
    print()
    sets = [
        ("ResNet-50 (25.6 M params)", torchvision.models.resnet50, 1.0),
        (
            "ViT-L/16 (304 M params)",
            lambda: timm.create_model("vit_large_patch16_224", pretrained=False),
            args.vit_scale,
        ),
    ]
    print("| tensor set | method | ms per check | GB/s | speed-up vs v0.1 |")
    print("|---|---|---:|---:|---:|")
    for label, build, fraction in sets:
        shapes = _shapes(build)
        total = sum(s.numel() * torch.empty(0, dtype=d).element_size() for s, d in shapes.values())
        tensors = _tensor_set(shapes, fraction, args.device)
        scale = total / _nbytes(tensors)
        note = f" (hashed {1 / scale:.0%}, time extrapolated)" if scale > 1.0001 else ""
        results = measure(tensors, args.rounds, threads)
        base = results["blake2b-128, 1 thread (v0.1)"]
        for name, seconds in results.items():
            print(
                f"| {label}{note}, {total / 1e9:.2f} GB | {name} | {seconds * scale * 1e3:.0f} | "
                f"{_nbytes(tensors) / seconds / 1e9:.2f} | {base / seconds:.1f}x |"
            )
        del tensors
    if hasattr(os, "fork") and args.device == "cpu":
        print("\ncross-rank check, 2 CPU ranks (gloo on 127.0.0.1), ResNet-50's tensors on each rank:\n")
        print("| step | ms per call |")
        print("|---|---:|")
        for name, seconds in cross_rank_cost(_shapes(torchvision.models.resnet50), args.rounds).items():
            print(f"| {name} | {seconds * 1e3:.1f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
