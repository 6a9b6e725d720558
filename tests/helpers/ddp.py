"""Run a 2-process CPU DDP script (strategy="ddp" re-launches it) and load what each rank saved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def run_ddp_script(script: Path, *args: Path | str, out: Path, timeout: float = 300) -> list[dict[str, Any]]:
    """Run ``python script *args``, assert it exited 0, and return ``out/rank0.pt`` and ``out/rank1.pt``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
