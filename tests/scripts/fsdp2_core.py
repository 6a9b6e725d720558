"""One rank of a 2-process gloo job with an FSDP2 (``fully_shard``) model on CPU (tests/test_sharded.py).

tests/scripts/ddp_all.py calls :func:`run` on both ranks of its process group (tests/test_sharded.py
reads what they wrote); by hand: ``python fsdp2_core.py RANK 2 INIT_FILE OUT_DIR`` once per rank.
Frozen backbone and trainable head, each wrapped by its own ``fully_shard`` (frozen and trainable
parameters never share an all-gather group), trained side by side with an unsharded copy that sees
the same data. Writes OUT_DIR/rank{RANK}.pt with what each check found.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from gloo_rank import init_rank
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode

from lightning_freeze import FreezeBackbone, FrozenSafeEMA, FrozenStateError, load_ema_weights
from lightning_freeze.core import freeze
from lightning_freeze.core.distributed import local_shards
from lightning_freeze.core.ema import TrainableEMA
from lightning_freeze.core.fingerprint import fingerprint


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    return nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16)), nn.Linear(16, 3))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def main(rank: int, world_size: int, init_file: str, out: Path) -> None:
    init_rank(rank, world_size, init_file)
    run(rank, out)
    dist.destroy_process_group()


def run(rank: int, out: Path) -> None:
    """The checks, in a 2-process gloo group that exists already (tests/scripts/ddp_all.py runs them so)."""
    result: dict[str, Any] = {}
    reference, sharded = _model(), _model()
    for model in (reference, sharded):
        freeze(model, ["0"])  # the backbone: requires_grad=False, before sharding
    fully_shard(sharded[0])  # wrapping policy: the frozen backbone alone ...
    fully_shard(sharded[1])  # ... the trainable head alone ...
    fully_shard(sharded)  # ... and the root
    result["requires_grad"] = {k: p.requires_grad for k, p in sharded.named_parameters()}
    result["param_types"] = sorted({type(p).__name__ for p in sharded.parameters()})
    optimizers = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        for m in (reference, sharded)
    ]
    ema_ref, ema = TrainableEMA(reference, decay=0.8), TrainableEMA(sharded, decay=0.8)
    result["sharded"] = ema.sharded
    result["shadow_local_numel"] = sum(s.to_local().numel() for s in ema.shadow.values())
    result["head_local_numel"] = sum(p.to_local().numel() for p in sharded[1].parameters())
    comm_counts = []
    for i in range(4):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i))  # the same batch on both ranks
        _step(reference, optimizers[0], x)
        _step(sharded, optimizers[1], x)
        ema_ref.update()
        with CommDebugMode() as comm:
            ema.update()
        comm_counts.append(comm.get_total_counts())
    result["comm_per_update"] = comm_counts
    full = ema.ema_state_dict(full=True)
    expected = ema_ref.ema_state_dict()
    result["full_types"] = sorted({type(v).__name__ for v in full.values()})
    result["full_equal"] = {k: torch.equal(full[k], expected[k]) for k in expected}
    result["ema_moved"] = not torch.equal(full["1.weight"], reference[1].weight)

    # resume: the strategy's format (torch.distributed.checkpoint, shard by shard), and full tensors
    state = ema.state_dict()
    dcp.save({"shadow": state["shadow"]}, checkpoint_id=out / "dcp")
    resumed = TrainableEMA(sharded, decay=0.8)
    with torch.no_grad():
        for s in resumed.shadow.values():
            s.zero_()
    template = {"shadow": resumed.state_dict()["shadow"]}
    dcp.load(template, checkpoint_id=out / "dcp")
    result["dcp_resumed_equal"] = all(
        torch.equal(resumed.shadow[k].to_local(), ema.shadow[k].to_local()) for k in ema.shadow
    )
    full_state = {**state, "shadow": {k: v.full_tensor() for k, v in state["shadow"].items()}}
    from_full = TrainableEMA.from_state_dict(sharded, full_state)
    result["full_resumed_equal"] = all(
        torch.equal(from_full.shadow[k].to_local(), ema.shadow[k].to_local()) for k in ema.shadow
    )

    # load_ema_weights: a (consolidated) Lightning checkpoint into a fresh sharded model
    ckpt = {
        "state_dict": dict(reference.state_dict()),
        "callbacks": {FrozenSafeEMA(decay=0.8).state_key: {"ema": ema_ref.state_dict()}},
    }
    fresh = _model()
    fully_shard(fresh[0])
    fully_shard(fresh[1])
    fully_shard(fresh)
    load_ema_weights(fresh, ckpt)
    result["load_ema_weights_equal"] = {
        k: torch.equal(v.full_tensor(), expected[k]) for k, v in fresh.state_dict().items()
    }

    # the frozen backbone stayed bitwise (per shard), and FreezeBackbone.check works shard by shard
    callback = FreezeBackbone("0")
    callback.frozen = freeze(_model(), ["0"])  # the record of what is frozen (keys are what matters)
    callback.verifier.reference = fingerprint(
        local_shards(sharded.state_dict(keep_vars=True))[0], callback.frozen.tensor_keys
    )
    result["reference_keys"] = sorted(callback.verifier.reference)
    result["clean_check"] = callback.check(sharded).summary()
    if rank == 1:
        with torch.no_grad():
            sharded[0][2].weight.to_local()[0, 0] += 1.0  # one element of rank 1's shard
    try:
        callback.check(sharded)
        result["corrupt_check"] = None
    except FrozenStateError as err:
        result["corrupt_check"] = {"message": str(err), "changed": err.changed, "causes": err.causes}
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
