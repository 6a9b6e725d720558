"""FreezeBackbone, FrozenSafeEMA and MultiBranchModule with a torch.compile-d module (CPU).

Compiled with ``backend="aot_eager"`` (AOTAutograd traces the forward and backward graphs, as
inductor does, without inductor's C++ code generation, too slow for a unit test here), counted by
torch's own ``CompileCounterWithBackend``: every compilation, first or recompile, adds one frame.
Recompile reasons come from torch's recompile logging (``torch._logging.set_logs(recompiles=True)``).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import pytest
import torch
from helpers.freeze import TinyNet, loaders
from helpers.multibranch import fixed_batch, loader, make_module, outputs, trainer
from lightning.pytorch.callbacks import Callback
from torch._dynamo.testing import CompileCounterWithBackend

from lightning_freeze import FreezeBackbone, FrozenSafeEMA


class _Recompiles(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Recompiling" in message:
            self.reasons.append(message)


@pytest.fixture
def recompile_log() -> Any:
    torch._dynamo.reset()
    torch._logging.set_logs(recompiles=True)
    handler = _Recompiles()
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    torch._logging.set_logs()
    torch._dynamo.reset()


class _Record(Callback):
    """Compilations and backbone weights per epoch; compiled vs eager output at validation (EMA in)."""

    def __init__(self, counter: CompileCounterWithBackend, ema: FrozenSafeEMA, log: _Recompiles) -> None:
        self.counter, self.ema, self.recompile_log = counter, ema, log
        self.frames: dict[int, int] = {}
        self.recompiles: dict[int, list[str]] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.swaps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(7))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.frames[trainer.current_epoch] = self.counter.frame_count
        self.recompiles[trainer.current_epoch] = list(self.recompile_log.reasons)
        self.weights[trainer.current_epoch] = {
            k: v.detach().clone() for k, v in pl_module.backbone.named_parameters()
        }

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or self.ema.ema is None:
            return
        with torch.no_grad():
            compiled = pl_module(self.x)  # the compiled forward, EMA weights swapped in
            with torch.compiler.set_stance("force_eager"):
                eager = pl_module(self.x)
                with _raw(self.ema, pl_module):
                    raw = pl_module(self.x)
        self.swaps.append((compiled, eager, raw))


class _raw:
    """Put the raw weights back for a moment (inside the EMA's validation swap)."""

    def __init__(self, ema: FrozenSafeEMA, module: Any) -> None:
        self.ema, self.module = ema, module

    def __enter__(self) -> None:
        self.saved = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict({**self.saved, **self.ema.ema.raw_values(self.module)})

    def __exit__(self, *exc: object) -> None:
        self.module.load_state_dict(self.saved)


def test_compiled_fit_unfreezes_and_trains_the_backbone_with_bounded_recompiles_and_ema_validation(
    tmp_path, recompile_log: _Recompiles
) -> None:
    L.seed_everything(0, verbose=False)
    counter = CompileCounterWithBackend("aot_eager")
    model = TinyNet()
    ema = FrozenSafeEMA(decay=0.5)
    record = _Record(counter, ema, recompile_log)
    freeze = FreezeBackbone("backbone", unfreeze_at_epoch=1)
    t = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        callbacks=[freeze, ema, record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    start = {k: v.detach().clone() for k, v in model.backbone.named_parameters()}
    t.fit(torch.compile(model, backend=counter), *loaders())

    # frozen (bitwise) while frozen, and the unfrozen layers really train under compile
    w = record.weights
    assert all(torch.equal(w[0][k], start[k]) for k in start)
    weights = [k for k in start if k.endswith("weight")]  # (the conv bias before BatchNorm gets no grad)
    for epoch in (1, 2):
        assert [k for k in weights if torch.equal(w[epoch][k], w[epoch - 1][k])] == [], epoch
    assert (
        freeze.last_check is not None and freeze.last_check.summary() == "checked 0 frozen tensors: 0 changed"
    )
    assert freeze._grad_watch == []  # every unfrozen parameter got a gradient at the first step

    # recompilations: some at the unfreeze (requires_grad changed), none in a steady epoch
    frames = record.frames
    assert frames[0] > 0
    unfreeze_compiles = frames[1] - frames[0]
    assert 0 < unfreeze_compiles <= frames[0], (frames, record.recompiles[1])
    assert any("requires_grad" in reason for reason in record.recompiles[1]), record.recompiles[1]
    assert frames[2] == frames[1], record.recompiles[2][len(record.recompiles[1]) :]

    # validation ran the compiled model on the EMA weights (not on stale, captured raw weights)
    assert len(record.swaps) == 3
    for compiled, eager, raw in record.swaps:
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(compiled, raw)


def test_compiled_multi_branch_module_switches_branch_between_stages(tmp_path, recompile_log) -> None:
    L.seed_everything(0, verbose=False)
    counter = CompileCounterWithBackend("aot_eager")
    model = make_module(["a", "b"], active="a")
    model.compile(backend=counter)  # in place: state_dict keys unchanged
    trainer(tmp_path, max_epochs=1, callbacks=[FreezeBackbone()]).fit(model, loader("a"))
    after_a = {k: v.clone() for k, v in model.state_dict().items()}
    before = outputs(model, fixed_batch())
    model.switch_branch("b")
    freeze = FreezeBackbone()
    trainer(tmp_path, max_epochs=1, callbacks=[freeze]).fit(model, loader("b"))
    state = model.state_dict()
    assert [
        k for k in after_a if not k.startswith("branches.b.") and not torch.equal(state[k], after_a[k])
    ] == []
    assert not torch.equal(state["branches.b.0.weight"], after_a["branches.b.0.weight"])
    assert freeze.last_check is not None and freeze.last_check.changed == []
    assert torch.equal(outputs(model, fixed_batch())["a"], before["a"])  # branch a predicts as before
    assert counter.frame_count > 0  # it really ran compiled


def test_stale_compiled_frame_resets_dynamo_once_then_warns(monkeypatch) -> None:
    """The safety net for PyTorch #139476 (torch 2.14 recompiles on requires_grad, so it is forced here)."""
    resets: list[bool] = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(True))
    callback = FreezeBackbone()
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    used.grad = torch.zeros(2)
    callback._grad_watch = [used, unused]  # as after an unfreeze under compile
    callback.on_before_optimizer_step(None, None, None)  # type: ignore[arg-type]
    assert resets == [True] and callback._grad_watch == [used, unused]
    with pytest.warns(UserWarning, match=r"1 unfrozen parameters still got no gradient after recompiling"):
        callback.on_before_optimizer_step(None, None, None)  # type: ignore[arg-type]
    assert resets == [True] and callback._grad_watch == []
    unused.grad = torch.zeros(2)
    callback._grad_watch, callback._dynamo_reset = [used, unused], False
    callback.on_before_optimizer_step(None, None, None)  # type: ignore[arg-type]
    assert resets == [True] and callback._grad_watch == []  # all got gradients: nothing to do
