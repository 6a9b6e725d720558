"""The suite's 2-process CPU DDP launch (strategy="ddp" re-launches the script) and what each rank saved."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: tests/scripts/ddp_all.py: every DDP scenario of the suite in one launch
DDP_ALL = Path(__file__).resolve().parents[1] / "scripts" / "ddp_all.py"


def run_ddp_script(script: Path, *args: Path | str, timeout: float = 900) -> None:
    """Run ``python script *args`` and assert it exited 0 (its stderr's end in the message).

    The seed Lightning exports (``PL_GLOBAL_SEED``) is not passed on: an in-process test that seeded
    before must not change what the script's processes draw.
    """
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def load_ranks(out: Path) -> list[dict[str, Any]]:
    """``out/rank0.pt`` and ``out/rank1.pt``: what each rank of a scenario saved."""
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def spawn_gloo_ranks(target: Callable[..., None], out: Path, world_size: int = 2) -> list[int | None]:
    """Run ``target(rank, world_size, init_file, out)`` in ``world_size`` spawned processes; their exit codes.

    Spawned, not forked: forking a process that already ran autograd threads fails. A rank still
    running after 90 s is killed (its exit code then is not 0).
    """
    context = multiprocessing.get_context("spawn")
    init_file = str(out / "store")
    procs = [
        context.Process(target=target, args=(rank, world_size, init_file, out)) for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=90)
        if proc.is_alive():
            proc.kill()
    return [proc.exitcode for proc in procs]
