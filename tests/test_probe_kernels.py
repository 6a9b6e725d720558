"""The output probe computes with exact float32 kernels whatever the training run set (TF32, autotuning).

A probe is recorded early in a fit and checked later; on a GPU, TF32 rounding with a cuDNN algorithm
chosen under other conditions made a frozen ResNet-50's probe differ beyond tolerance under bf16-mixed
with no tensor changed. These checks run on CPU: the settings are global torch flags, read inside the
module's forward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_freeze.core.probe import OutputProbe, function_token, kernel_settings, run_module


def _fast_values() -> list[object]:
    """The values a speed-minded run sets: TF32 on, cuDNN autotuning, not deterministic."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return ["tf32", "tf32", "tf32", True, False]
    return [True, True, True, False]


def _set(values: list[object]) -> None:
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    if hasattr(cuda.matmul, "fp32_precision"):
        spaces = [
            (cuda.matmul, "fp32_precision"),
            (cudnn.conv, "fp32_precision"),
            (cudnn.rnn, "fp32_precision"),
        ]
    else:
        spaces = [(cuda.matmul, "allow_tf32"), (cudnn, "allow_tf32")]
    spaces += [(cudnn, "benchmark"), (cudnn, "deterministic")]
    for (space, attribute), value in zip(spaces, values, strict=True):
        setattr(space, attribute, value)


@pytest.fixture
def fast_settings():
    saved = list(kernel_settings())
    _set(_fast_values())
    yield kernel_settings()
    _set(saved)


class _SettingsSeen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self._seen: list[tuple[object, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._seen.append(kernel_settings())
        return self.linear(x)


def _exact() -> tuple[object, ...]:
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return ("ieee", "ieee", "ieee", False, True)
    return (False, False, False, True)


def test_probe_runs_with_exact_kernels_and_restores_the_run_s_settings(fast_settings) -> None:
    module = _SettingsSeen()
    x = torch.randn(2, 4)
    token = function_token(module)
    probe = OutputProbe.record(module, (x,))
    assert probe.check(module) is None
    run_module(module, (x,))
    assert module._seen == [_exact()] * 3
    assert kernel_settings() == fast_settings  # the training run's settings are back
    assert function_token(module) == token


def test_settings_are_restored_when_the_forward_raises(fast_settings) -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_module(Broken(), (torch.zeros(1),))
    assert kernel_settings() == fast_settings


def test_function_token_reads_the_settings_when_the_legacy_and_new_tf32_apis_were_mixed() -> None:
    """torch >= 2.9 raises on reading the legacy matmul precision once both APIs were used."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has only the legacy TF32 API")
    saved = list(kernel_settings())
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        function_token(nn.Linear(2, 2))  # raised RuntimeError ("mix of the legacy and new APIs")
    finally:
        _set(saved)
