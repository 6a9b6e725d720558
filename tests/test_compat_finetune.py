"""The private torch/Lightning names reached by lightning_freeze._compat (section finetune) still exist."""

from __future__ import annotations

import lightning
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.optim import lr_scheduler

from lightning_freeze import _compat

VERSIONS = f"torch {torch.__version__}, lightning {lightning.__version__}"


def _sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)


def test_child_schedulers_reads_the_schedulers_inside_sequential_and_chained() -> None:
    opt = _sgd()
    a, b = lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(opt, 0.9)
    seq = lr_scheduler.SequentialLR(opt, [a, b], milestones=[2])
    assert _compat.child_schedulers(seq) == [a, b], f"SequentialLR._schedulers changed in {VERSIONS}"
    chained = lr_scheduler.ChainedScheduler([a, b])
    assert _compat.child_schedulers(chained) == [a, b], f"ChainedScheduler._schedulers changed in {VERSIONS}"
    assert _compat.child_schedulers(a) == []


def test_last_lr_list_is_the_list_behind_get_last_lr() -> None:
    sched = lr_scheduler.StepLR(_sgd(), step_size=1)
    values = _compat.last_lr_list(sched)
    assert values is not None, f"LRScheduler._last_lr is gone in {VERSIONS}"
    values.append(0.5)
    assert sched.get_last_lr()[-1] == 0.5, f"get_last_lr() no longer reads _last_lr in {VERSIONS}"


def test_ddp_strategy_still_has_the_wrapper_builders() -> None:
    for name in ("_setup_model", "_register_ddp_hooks"):
        assert callable(getattr(DDPStrategy, name, None)), f"DDPStrategy.{name} is gone in {VERSIONS}"


def test_is_compiled_sees_each_way_of_compiling() -> None:
    assert not _compat.is_compiled(nn.Linear(2, 2))
    module = nn.Sequential(nn.Linear(2, 2))
    module[0].compile()
    assert _compat.is_compiled(module), f"nn.Module._compiled_call_impl changed in {VERSIONS}"
    assert _compat.is_compiled(nn.Sequential(torch.compile(nn.Linear(2, 2)))), (
        f"OptimizedModule._orig_mod changed in {VERSIONS}"
    )
    from helpers.freeze import TinyNet
    from lightning.pytorch.utilities.compile import from_compiled

    model = from_compiled(torch.compile(TinyNet()))
    assert _compat.is_compiled(model), f"LightningModule._compiler_ctx changed in {VERSIONS}"
