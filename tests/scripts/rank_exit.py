"""How the spawned gloo ranks of the suite's pure-PyTorch tests end: a barrier, then ``os._exit(0)``.

Tearing the process group down is where these short jobs were flaky, differently on each stack: torch
2.6's gloo could hang in ``destroy_process_group`` on one rank (about 1 run in 5 here), and torch 2.14
could abort at interpreter exit ("terminate called without an active exception", exit code -6) when
the group was left to the exit. Every result is written before this is called; the barrier makes sure
both ranks are past their last collective, and ``os._exit`` skips the C++ teardown that misbehaves.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import torch.distributed as dist


def exit_rank() -> NoReturn:
    """Wait for every rank, flush the output, and end this process with exit status 0."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
