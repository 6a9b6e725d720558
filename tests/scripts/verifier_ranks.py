"""One rank of a 2-process gloo job: FrozenVerifier's cross-rank check in a plain PyTorch loop.

tests/test_core_verifier.py spawns both ranks and calls :func:`main` in each; by hand:
``python verifier_ranks.py RANK 2 INIT_FILE OUT_DIR`` once per rank.
Writes OUT_DIR/rank{RANK}.json: the clean check's summary, then (rank 1 starting from another
frozen weight than rank 0) what every rank's check raised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from gloo_rank import exit_rank, init_rank
from torch import nn

from lightning_freeze.core.errors import FrozenStateError
from lightning_freeze.core.verifier import FrozenVerifier


def main(rank: int, world_size: int, init_file: str, out: Path) -> None:
    init_rank(rank, world_size, init_file)
    torch.manual_seed(0)  # the same weights on every rank
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net[0].requires_grad_(False)
    result: dict[str, object] = {}
    verifier = FrozenVerifier()
    verifier.record(net, ["0.weight", "0.bias"])
    result["clean"] = verifier.check(net).summary()  # type: ignore[union-attr]
    if rank == 1:  # this rank starts from another frozen weight: its own check is clean, the ranks differ
        with torch.no_grad():
            net[0].weight[0, 0] += 1
    verifier.record(net, ["0.weight", "0.bias"])
    try:
        verifier.check(net)
        result["error"] = None
    except FrozenStateError as err:
        result["error"], result["changed"] = str(err), err.changed
    result["rank_check"] = {str(r): keys for r, keys in verifier.last_rank_check.items()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    exit_rank()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
