"""Peak memory (and time) of ``lightning-freeze diff`` on two large checkpoints.

Run by hand (never part of the test suite)::

    python benchmarks/bench_diff.py                 # two 200 MB checkpoints
    python benchmarks/bench_diff.py --size-mb 500   # the size of the original report
    # the same files, diffed by another checkout of the package (e.g. before a change):
    python benchmarks/bench_diff.py --compare-pythonpath /path/to/old/checkout

Files: two Lightning-style checkpoints (``{"state_dict": ...}``) of ``--size-mb`` MB each, float32
tensors of at most ``--tensor-mb`` MB (default 64, a large backbone's shapes; the old comparison's
peak grew with the largest tensor), written once into a temporary directory. In B
every element of every tensor is one ulp away from A's (the worst case: every tensor changed, so
the whole of each tensor is compared in detail).

Each measurement runs ``python -m lightning_freeze.cli.checkpoint_tools diff A B`` in a fresh child
process and reads the child's peak resident set size (``resource.getrusage(RUSAGE_CHILDREN)
.ru_maxrss``; one child at a time, run from a fresh interpreter per measurement so the maximum is
that child's). It includes the Python + PyTorch baseline, measured the same way on a child that
only imports torch. The table prints MiB and the ratio of the peak above the baseline
to the size of one checkpoint file (the goal: at most about 2).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
print(proc.returncode, peak_kib, wall, cpu.ru_utime + cpu.ru_stime)
sys.stderr.write(proc.stderr[-2000:])
"""


def _build(directory: Path, size_mb: int, tensor_mb: int = 64) -> tuple[Path, Path]:
    import torch

    torch.manual_seed(0)
    total = size_mb * 2**20 // 4  # float32 elements
    chunk = tensor_mb * 2**20 // 4
    a: dict[str, torch.Tensor] = {}
    index = 0
    while total > 0:
        n = min(chunk, total)
        a[f"backbone.layer{index}.weight"] = torch.randn(n)
        total -= n
        index += 1
    b = {k: torch.nextafter(v, torch.full_like(v, float("inf"))) for k, v in a.items()}
    paths = directory / "a.ckpt", directory / "b.ckpt"
    for path, state in zip(paths, (a, b), strict=True):
        torch.save({"state_dict": state, "epoch": 1}, path)
    return paths


def _measure(command: list[str], pythonpath: str) -> tuple[int, float, float, float]:
    """(exit status, peak RSS in MiB, wall s, CPU s) of ``command``, a child of a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(  # not from the checkout: ``python -m`` would import the package from cwd
        [sys.executable, "-c", _MEASURE, *command],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=tempfile.gettempdir(),
    )
    code, peak_kib, wall, cpu = out.stdout.split()
    if int(code) not in (0, 1):
        raise RuntimeError(f"{command} failed ({code}): {out.stderr.strip()}")
    return int(code), int(peak_kib) / 1024, float(wall), float(cpu)


def main(argv: list[str] | None = None) -> None:
    """Build the two checkpoints, diff them with each checkout, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mb", type=int, default=200, help="size of each checkpoint (default 200)")
    parser.add_argument(
        "--compare-pythonpath",
        metavar="PATH",
        help="also diff with the package found on this PYTHONPATH (e.g. a checkout before a change)",
    )
    parser.add_argument(
        "--tensor-mb",
        type=int,
        default=64,
        help="size of the largest tensor (default 64; the old peak grew with it)",
    )
    parser.add_argument("--directory", type=Path, help="where to write the checkpoints (default: a temp dir)")
    args = parser.parse_args(argv)
    for option in ("size_mb", "tensor_mb"):
        if getattr(args, option) < 1:
            flag = "--" + option.replace("_", "-")
            parser.error(f"Invalid {flag}={getattr(args, option)}; valid choices: an integer >= 1")

    here = str(Path(__file__).resolve().parents[1])
    checkouts = {"this checkout": here}
    if args.compare_pythonpath:
        checkouts = {"compared checkout": args.compare_pythonpath, **checkouts}
    with tempfile.TemporaryDirectory(dir=args.directory) as tmp:
        a, b = _build(Path(tmp), args.size_mb, args.tensor_mb)
        file_mib = a.stat().st_size / 2**20
        _, baseline, _, _ = _measure([sys.executable, "-c", "import torch"], here)
        print(
            f"two checkpoints of {file_mib:.0f} MiB each (tensors of at most {args.tensor_mb} MB); "
            f"Python + torch baseline {baseline:.0f} MiB RSS\n"
        )
        print("| package | exit | peak RSS (MiB) | above baseline / one file | wall (s) | CPU (s) |")
        print("|---|---|---|---|---|---|")
        for name, path in checkouts.items():
            command = [sys.executable, "-m", "lightning_freeze.cli.checkpoint_tools", "diff", str(a), str(b)]
            code, peak, wall, cpu = _measure(command, path)
            ratio = (peak - baseline) / file_mib
            print(f"| {name} | {code} | {peak:.0f} | {ratio:.2f} | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
