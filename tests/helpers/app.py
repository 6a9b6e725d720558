"""Run the training app as a user does: ``python -m lightning_freeze.train`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning_freeze

REPO = Path(lightning_freeze.__file__).resolve().parent.parent


def run_app_ok(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the app with ``args`` in ``cwd`` (one torch thread, this checkout first) and require exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(
        [sys.executable, "-m", "lightning_freeze.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result
