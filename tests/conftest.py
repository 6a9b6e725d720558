"""Shared test configuration: tiny models, CPU, few threads (the suite runs on 2 cores)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("PL_DISABLE_FORK", "1")
torch.set_num_threads(1)
# Lightning's hints about dataloader workers and small logging intervals are noise for tiny tests.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
