"""How the spawned gloo ranks of the suite's pure-PyTorch tests start and end.

:func:`init_rank` joins the 2-process job (one torch thread, gloo, a file store, a 60 s timeout).
:func:`exit_rank` ends it: a barrier, then ``os._exit(0)``. Tearing the process group down is where
these short jobs were flaky, differently on each stack: torch 2.6's gloo could hang in
``destroy_process_group`` on one rank (about 1 run in 5 here), and torch 2.14 could abort at
interpreter exit ("terminate called without an active exception", exit code -6) when the group was
left to the exit. Every result is written before :func:`exit_rank` is called; the barrier makes sure
both ranks are past their last collective, and ``os._exit`` skips the C++ teardown that misbehaves.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist


def init_rank(rank: int, world_size: int, init_file: str) -> None:
    """Join the gloo job of ``world_size`` ranks that meets at the file store ``init_file``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )


def exit_rank() -> NoReturn:
    """Wait for every rank, flush the output, and end this process with exit status 0."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
