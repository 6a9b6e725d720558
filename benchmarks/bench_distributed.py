"""Distributed costs, CPU, 2 forked gloo processes: cross-rank check per epoch, sharded vs all-gather EMA.

Run by hand (never part of the test suite)::

    python benchmarks/bench_distributed.py                     # defaults below
    python benchmarks/bench_distributed.py --repeats 5 --steps 20

(a) **Cross-rank check vs epoch time.** A frozen ResNet-like conv backbone (``--width``; 4 stages)
    with a trainable linear head under ``DistributedDataParallel`` (gloo). One "epoch" is
    ``--steps`` training steps on a ``--batch`` of 3x64x64 images per rank. The check is what
    ``FreezeBackbone.check`` adds under DDP: :func:`~lightning_freeze.core.distributed.compare_across_ranks`
    on the fingerprints it already computed (one 16-byte ``all_gather`` per rank). Reported with the
    fingerprinting itself (done once per check in a single process too) for scale.
(b) **Sharded EMA vs all-gather EMA per update.** A trainable MLP (``--layers`` x Linear(``--hidden``))
    wrapped with FSDP2 ``fully_shard`` per layer. ``TrainableEMA`` keeps a shard-local ``DTensor`` shadow
    and lerps this rank's shard (no communication); the all-gather EMA is what an EMA that needs full
    tensors does: ``full_tensor()`` of every parameter, then a lerp over a full fp32 shadow.

Times: the best of ``--repeats`` rounds (noise only ever adds time), rank 0's clock, after a barrier.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lightning_freeze.core import freeze
from lightning_freeze.core.distributed import compare_across_ranks
from lightning_freeze.core.ema import TrainableEMA
from lightning_freeze.core.fingerprint import fingerprint


def _backbone(width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for stage in range(4):
        out = width * 2**stage
        layers += [
            nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
            nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
        ]  # fmt: skip
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return min(times)


def _rank(rank: int, args: argparse.Namespace, init_file: str, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=300)
    )
    lines: list[str] = []
    # (a) cross-rank check vs an epoch
    torch.manual_seed(0)
    model = nn.Sequential(_backbone(args.width), nn.Linear(args.width * 8, 10))
    frozen = freeze(model, ["0"])
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    x = torch.randn(args.batch, 3, 64, 64)
    y = torch.randint(0, 10, (args.batch,))

    def epoch() -> None:
        for _ in range(args.steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()

    fp = fingerprint(model, frozen.tensor_keys)
    frozen_bytes = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k in fp)
    t_epoch = _best(epoch, args.repeats)
    t_fp = _best(lambda: fingerprint(model, frozen.tensor_keys), args.repeats * 3)
    t_cmp = _best(lambda: compare_across_ranks(fp), args.repeats * 20)
    lines += [
        f"(a) frozen backbone: {len(fp)} tensors, {frozen_bytes / 2**20:.1f} MiB; "
        f"epoch = {args.steps} DDP steps of batch {args.batch} per rank",
        f"    epoch time                         {t_epoch * 1e3:10.1f} ms",
        f"    fingerprint (every check, 1 process too) {t_fp * 1e3:7.2f} ms  "
        f"({t_fp / t_epoch:.2%} of an epoch)",
        f"    cross-rank compare (added by DDP)  {t_cmp * 1e3:10.3f} ms  ({t_cmp / t_epoch:.4%} of an epoch)",
    ]
    # (b) sharded EMA vs all-gather EMA
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    mlp = nn.Sequential(*[nn.Linear(args.hidden, args.hidden) for _ in range(args.layers)])
    for layer in mlp:
        fully_shard(layer)
    fully_shard(mlp)
    ema = TrainableEMA(mlp, decay=0.999)
    params = [p for p in mlp.parameters()]
    full_shadow = [p.full_tensor().detach().float().clone() for p in params]

    def allgather_update() -> None:
        with torch.no_grad():
            full = [p.full_tensor() for p in params]
            torch._foreach_lerp_(full_shadow, full, 0.001)

    numel = sum(p.numel() for p in params)
    t_sharded = _best(ema.update, args.repeats * 5)
    t_gather = _best(allgather_update, args.repeats * 5)
    local = sum(s.to_local().numel() for s in ema.shadow.values())
    lines += [
        f"(b) trainable MLP {args.layers} x Linear({args.hidden}): {numel / 1e6:.2f} M parameters, "
        f"fully_shard per layer, 2 ranks",
        f"    sharded EMA (TrainableEMA)   {t_sharded * 1e3:8.2f} ms/update, "
        f"shadow {local * 4 / 2**20:.1f} MiB per rank",
        f"    all-gather EMA               {t_gather * 1e3:8.2f} ms/update, "
        f"shadow {numel * 4 / 2**20:.1f} MiB per rank  ({t_gather / t_sharded:.1f}x slower)",
    ]
    if rank == 0:
        (out / "report.txt").write_text("\n".join(lines) + "\n")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        procs = [context.Process(target=_rank, args=(r, args, str(out / "store"), out)) for r in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        print(f"torch {torch.__version__}, CPU, 2 gloo processes x 1 thread")
        print((out / "report.txt").read_text(), end="")


if __name__ == "__main__":
    main()
