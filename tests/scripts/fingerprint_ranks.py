"""One rank of a 2-process gloo job that checks fingerprints across ranks.

tests/test_core_distributed.py spawns both ranks and calls :func:`main` in each; by hand:
``python fingerprint_ranks.py RANK 2 INIT_FILE OUT_DIR`` once per rank.
Writes OUT_DIR/rank{RANK}.json: what compare_across_ranks / gather_fingerprints returned in each
scenario, and how many full gathers (all_gather_object) each scenario needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from gloo_rank import exit_rank, init_rank
from torch import nn

from lightning_freeze.core.distributed import compare_across_ranks, gather_fingerprints
from lightning_freeze.core.fingerprint import fingerprint, tensor_bytes


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def main(rank: int, world_size: int, init_file: str, out: Path) -> None:
    init_rank(rank, world_size, init_file)
    full_gathers = 0
    all_gather_object = dist.all_gather_object

    def counting_all_gather_object(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal full_gathers
        full_gathers += 1
        return all_gather_object(*args, **kwargs)

    dist.all_gather_object = counting_all_gather_object
    model = _model()
    model(torch.randn(1, 3, 6, 6))  # materialise the lazy layer (same seed: same weights)
    results: dict[str, object] = {}

    def scenario(name: str, fp: dict) -> None:
        nonlocal full_gathers
        full_gathers = 0
        mismatch = compare_across_ranks(fp)
        results[name] = {
            "mismatch": {str(r): keys for r, keys in mismatch.items()},
            "full_gathers": full_gathers,
        }

    scenario("identical", fingerprint(model))
    gathered = gather_fingerprints(fingerprint(model))
    results["gathered_equal"] = len(gathered) == world_size and all(g == gathered[0] for g in gathered)

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if rank == 1:  # one bit of one element of one weight, on rank 1 only
        tensor_bytes(state["0.weight"])[17] ^= 0x01
    scenario("rank1_weight_bit", fingerprint(state))

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if rank == 1:
        state["1.running_var"][0] = -0.0 if rank else 0.0
        state["1.running_var"][1] = state["1.running_var"][1] * 1.0000001
        del state["3.bias"]
    scenario("rank1_buffer_and_missing_key", fingerprint(state))

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if rank == 0:  # with two ranks rank 0 is the reference on a tie: rank 1 is named
        state["3.bias"].add_(1)
    scenario("rank0_changed", fingerprint(state))

    (out / f"rank{rank}.json").write_text(json.dumps(results))
    exit_rank()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
