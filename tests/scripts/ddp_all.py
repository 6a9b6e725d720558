"""Every 2-process CPU DDP (gloo) scenario of the suite in one launch (tests/conftest.py: ``ddp_runs``).

Usage: python ddp_all.py OUT_DIR STAGE1_CKPT [SCENARIO ...]  (default: every scenario, in this order)

``strategy="ddp"`` re-runs this command line for rank 1, so both processes run the same scenarios in
the same order; the first Trainer starts rank 1 and the process group, every later Trainer finds them.
Each scenario is the ``main`` of its own script (which still runs alone: ``python freeze_ema_ddp.py
OUT``) and writes what that script writes, into ``OUT_DIR/<scenario>/``:

* ``freeze_ema``: freeze_ema_ddp.py (FreezeBackbone + FrozenSafeEMA);
* ``module_stage2``: module_ddp_stage2.py (stage 2 of a MultiBranchModule from STAGE1_CKPT);
* ``packed``: packed_ddp.py (three packed branches, and one of them alone);
* ``unfreeze``: unfreeze_ddp.py (unfreeze_at_epoch, straight and resumed);
* ``unfreeze_schedule``: unfreeze_schedule_ddp.py (a two-phase schedule, straight and resumed);
* ``feature_cache``: feature_cache_ddp.py ``cached`` then ``plain`` (one shared disk store);
* ``feature_cache_skip``: feature_cache_ddp.py ``skip`` (a store of its own, empty at the start);
* ``fsdp2``: fsdp2_core.py's checks of FSDP2 (``fully_shard``, torch only) in the same process group
  (torch >= 2.7: torch 2.6's FSDP2 does not run on CPU);
* ``ranks``: ranks_ddp.py (one rank's tensor corrupted; both fits raise, on every rank), last.

Each rank ends through ``gloo_rank.exit_rank`` once every scenario has written its results: torch
2.14's gloo aborted one run's rank at interpreter exit ("terminate called without an active
exception"), which failed the whole launch.

Between scenarios the process state a fit leaves behind is reset to what a fresh launch has: the seed
Lightning exports (``PL_GLOBAL_SEED``, ``PL_SEED_WORKERS``) and torch's deterministic-algorithms flag.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feature_cache_ddp
import freeze_ema_ddp
import fsdp2_core
import module_ddp_stage2
import packed_ddp
import ranks_ddp
import unfreeze_ddp
import unfreeze_schedule_ddp
from gloo_rank import exit_rank


def _feature_cache(out: Path, stage1: Path) -> None:
    feature_cache_ddp.main(out, "cached")
    feature_cache_ddp.main(out, "plain")


def _fsdp2(out: Path, stage1: Path) -> None:
    if not torch.distributed.is_initialized():
        raise SystemExit(
            "fsdp2 runs in the process group a Lightning scenario started: name one before it "
            "(e.g. freeze_ema fsdp2), or run it alone: python fsdp2_core.py RANK 2 INIT_FILE OUT_DIR"
        )
    if Version(torch.__version__).release >= (2, 7):  # torch 2.6's FSDP2 does not run on CPU
        fsdp2_core.run(torch.distributed.get_rank(), out)


SCENARIOS: dict[str, Callable[[Path, Path], None]] = {
    "freeze_ema": lambda out, stage1: freeze_ema_ddp.main(out),
    "module_stage2": lambda out, stage1: module_ddp_stage2.main(stage1, out),
    "packed": lambda out, stage1: packed_ddp.main(out),
    "unfreeze": lambda out, stage1: unfreeze_ddp.main(out),
    "unfreeze_schedule": lambda out, stage1: unfreeze_schedule_ddp.main(out),
    "feature_cache": _feature_cache,
    "feature_cache_skip": lambda out, stage1: feature_cache_ddp.main(out, "skip"),
    "fsdp2": _fsdp2,
    "ranks": lambda out, stage1: ranks_ddp.main(out),
}


def main(out: Path, stage1: Path, names: list[str]) -> None:
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; valid choices: {', '.join(SCENARIOS)}")
    deterministic = torch.are_deterministic_algorithms_enabled()
    for name in names or SCENARIOS:
        for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
            os.environ.pop(key, None)
        torch.use_deterministic_algorithms(deterministic)
        (out / name).mkdir(parents=True, exist_ok=True)
        SCENARIOS[name](out / name, stage1)
    if torch.distributed.is_initialized():
        exit_rank()  # every result is written: end without the gloo teardown (see gloo_rank.py)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
