"""Shared test configuration: tiny models, CPU, few threads (the suite runs on 2 cores)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("PL_DISABLE_FORK", "1")
torch.set_num_threads(1)
# Lightning's hints about dataloader workers and small logging intervals are noise for tiny tests.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def multibranch_stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One stage-1 training (backbone + branch "a", see ``helpers.multibranch.run_stage1``) per session.

    Its checkpoint path; tests read it, never write it (copy it first to change it).
    """
    from helpers.multibranch import run_stage1

    return run_stage1(tmp_path_factory.mktemp("multibranch_stage1"))


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory, multibranch_stage1: Path) -> Path:
    """Every 2-process CPU DDP scenario of the suite, run once per session in one launch.

    ``tests/scripts/ddp_all.py`` (real Lightning ``strategy="ddp"``, ``accelerator="cpu"``,
    ``devices=2``, gloo): one process start and one process group for all of them instead of one
    launch per scenario. Returns the directory holding ``<scenario>/rank{0,1}.pt``; tests read it,
    never write it.
    """
    from helpers.ddp import DDP_ALL, run_ddp_script

    out = tmp_path_factory.mktemp("ddp_runs")
    run_ddp_script(DDP_ALL, out, multibranch_stage1)
    return out


def _run_ok(args: list[str], *, cwd: Path | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (
        f"{args}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


@pytest.fixture(scope="session")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist, and the wheel built from the unpacked sdist (as `python -m build` does).

    Built with the setuptools of this environment (no build isolation, no download) from a copy of the
    files a release is made of, so the checkout gets no build/ or *.egg-info.
    """
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).write_bytes((REPO / name).read_bytes())
    _run_ok(["cp", "-r", str(REPO / "lightning_freeze"), str(source)])
    _run_ok(["find", str(source), "-name", "__pycache__", "-prune", "-exec", "rm", "-rf", "{}", "+"])
    out = root / "dist"
    backend = "import sys, setuptools.build_meta as b; print(getattr(b, sys.argv[1])(sys.argv[2]))"
    sdist = out / _run_ok([sys.executable, "-c", backend, "build_sdist", str(out)], cwd=source).split()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "unpacked", filter="data")
    (unpacked,) = (root / "unpacked").iterdir()
    wheel = out / _run_ok([sys.executable, "-c", backend, "build_wheel", str(out)], cwd=unpacked).split()[-1]
    return {"sdist": sdist, "wheel": wheel}
