"""Functional proof that a frozen module still computes what it computed: a recorded probe.

Fingerprints prove that a frozen module's *tensors* did not change. They cannot see a change of
*function*: a replaced ``forward``, a layer left in train mode, a conversion that computes something
else from the same ``state_dict``. A :class:`OutputProbe` closes that gap: it keeps a small fixed
input of the module (e.g. the first two samples that reached it in the first training batch) and
the module's output on it, and :meth:`OutputProbe.check` reruns the module on that input and
compares.

A check must not perturb training, so :func:`run_module` runs the module

* under ``torch.no_grad()`` (no autograd graph) and outside autocast (the reference and every
  check compute in the probe input's own dtype);
* inside ``torch.random.fork_rng`` (no random number is consumed: a dropout layer wrongly left in
  train mode draws from a forked generator, and the training run draws the same numbers as
  without the check);
* with every buffer of the module snapshotted and restored afterwards (a norm layer wrongly in
  train mode changes its running statistics during the probe; they are put back bitwise);
* with full-precision float32 kernels and no kernel autotuning (:func:`exact_kernels`: TF32 off for
  matmuls and cuDNN, cuDNN deterministic and not benchmarking). The reference is recorded early in
  the fit and checked later: TF32 rounding with a cuDNN algorithm chosen under other conditions
  (free memory, autotuning) differed there by far more than the device tolerance on a frozen
  ResNet-50 under ``bf16-mixed`` on a GPU, with no tensor changed. The training run's own settings
  are restored after each call.

The module runs in whatever train/eval state it is in, with its own hooks, exactly like a training
forward would: if a training forward would compute something else, the probe does too.

Cost: a check is one forward of the module on the probe input. :func:`function_token` is the cheap
evidence that says when a check can be skipped: it changes whenever anything a probe could see
changes, except the code the module calls (a monkeypatched library function) and tensors kept
as plain attributes (not parameters or buffers). ``FreezeBackbone`` compares it at each epoch
end and runs the probe only when it changed, and always at fit end.

Comparison: bitwise (``torch.equal``) on CPU and whenever ``torch.are_deterministic_algorithms_enabled()``
is set. On other devices without deterministic algorithms, kernels (cuDNN autotuning, atomics) may
legitimately differ in the last bits between two calls, so outputs must agree within
``atol + rtol * max|reference|`` (:data:`DEVICE_RTOL`, :data:`DEVICE_ATOL`); set
``torch.use_deterministic_algorithms(True)`` (and ``torch.backends.cudnn.benchmark = False``) to
get the bitwise check there too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_freeze import _compat
from lightning_freeze.core.feature_cache import bypass_output_caches
from lightning_freeze.core.fingerprint import fingerprint
from lightning_freeze.core.structure import map_tensors, named_leaves, tensor_leaves

__all__ = [
    "DEVICE_ATOL",
    "DEVICE_RTOL",
    "PROBE_SAMPLES",
    "OutputProbe",
    "ProbeMismatch",
    "capture_probe_input",
    "exact_kernels",
    "function_token",
    "kernel_settings",
    "run_module",
]

PROBE_SAMPLES = 2
DEVICE_RTOL = 1e-3
DEVICE_ATOL = 1e-5


@dataclass
class ProbeMismatch:
    """How a module's output on its probe input differs from the recorded one.

    Attributes:
        module: dotted name of the module.
        reason: what differs, in words (``"output on the probe input changed (max abs diff 0.25)"``).
        max_abs_diff: the largest absolute difference over all output tensors (``inf`` when the
            output's structure, shape or dtype changed, or the module raised).
    """

    module: str
    reason: str
    max_abs_diff: float

    def __str__(self) -> str:
        return f"{self.module}: {self.reason}"


@dataclass
class OutputProbe:
    """A module's recorded output on a small fixed input.

    Attributes:
        args: positional inputs (tensors and nested tuples/lists/dicts of them, on CPU).
        kwargs: keyword inputs, same form.
        output: the recorded output (tensor, tuple/list/dict of tensors, on CPU).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any

    @classmethod
    def record(
        cls, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> OutputProbe:
        """Run ``module`` on ``args``/``kwargs`` (see :func:`run_module`) and keep the output.

        Inputs and output are kept on CPU, detached (small: use a few samples).
        """
        kwargs = dict(kwargs or {})
        output = run_module(module, args, kwargs)
        return cls(args=_to_cpu(args), kwargs=_to_cpu(kwargs), output=_to_cpu(output))

    def check(self, module: nn.Module, name: str = "module") -> ProbeMismatch | None:
        """Rerun ``module`` on the probe input and compare with the recorded output.

        Args:
            module: the module (on any device; the probe input is moved to its device).
            name: the module's dotted name, for the message.

        Returns:
            ``None`` when the output is reproduced (bitwise, or within tolerance on a device
            without deterministic algorithms, see the module docstring), else a
            :class:`ProbeMismatch`.
        """
        device = _module_device(module)
        try:
            output = run_module(module, _to_device(self.args, device), _to_device(self.kwargs, device))
        except Exception as err:  # a changed forward that no longer accepts the input
            return ProbeMismatch(
                name, f"raised on the probe input ({type(err).__name__}: {err})", float("inf")
            )
        exact = device.type == "cpu" or torch.are_deterministic_algorithms_enabled()
        return _compare(self.output, output, name, exact=exact)

    def state_dict(self) -> dict[str, Any]:
        """Plain containers of CPU tensors (loadable with ``torch.load(weights_only=True)``)."""
        return {"args": list(self.args), "kwargs": dict(self.kwargs), "output": self.output}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> OutputProbe:
        """Inverse of :meth:`state_dict`."""
        return cls(args=tuple(state["args"]), kwargs=dict(state["kwargs"]), output=state["output"])


def run_module(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
    """Call ``module(*args, **kwargs)`` without perturbing anything a training run depends on.

    No autograd graph, no autocast, no random number consumed from the global (CPU and the
    module's CUDA device) generators, every buffer of ``module`` restored bitwise afterwards.
    Train/eval flags and hooks are left as they are: the call computes what a training forward
    would compute.

    Returns:
        the module's output, detached.
    """
    device = _module_device(module)
    rng_devices = [device] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=rng_devices))
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        stack.enter_context(exact_kernels())
        stack.enter_context(_buffers_restored(module))
        stack.enter_context(bypass_output_caches())  # the module's real function, not a cached output
        return module(*args, **(kwargs or {}))


def _exact_kernel_flags() -> list[tuple[Any, str, Any]]:
    """``(namespace, attribute, exact value)`` of the torch settings :func:`exact_kernels` forces."""
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    if hasattr(cuda.matmul, "fp32_precision"):  # torch >= 2.9: TF32 per backend (the legacy flags
        # raise on read once both APIs were used, so only the new one is touched)
        tf32 = [(cuda.matmul, "fp32_precision", "ieee"), (cudnn.conv, "fp32_precision", "ieee")]
        tf32.append((cudnn.rnn, "fp32_precision", "ieee"))
    else:
        tf32 = [(cuda.matmul, "allow_tf32", False), (cudnn, "allow_tf32", False)]
    return [*tf32, (cudnn, "benchmark", False), (cudnn, "deterministic", True)]


def kernel_settings() -> tuple[Any, ...]:
    """The current values of the settings :func:`exact_kernels` forces (TF32, cuDNN autotuning)."""
    return tuple(getattr(space, attribute) for space, attribute, _ in _exact_kernel_flags())


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """Full-precision float32 kernels (no TF32), cuDNN deterministic and not autotuning; restored after.

    What :func:`run_module` computes under, so that a probe recorded at one time and checked at
    another uses the same arithmetic whatever the training run set.
    """
    flags = _exact_kernel_flags()
    saved = [getattr(space, attribute) for space, attribute, _ in flags]
    try:
        for space, attribute, value in flags:
            setattr(space, attribute, value)
        yield
    finally:
        for (space, attribute, _), value in zip(reversed(flags), reversed(saved), strict=True):
            setattr(space, attribute, value)


_SIMPLE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _simple(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return isinstance(value, _SIMPLE)


def function_token(module: nn.Module, state_tensors: Iterable[str] = ()) -> tuple[Any, ...]:
    """Cheap evidence of everything but tensor values that decides ``module``'s function.

    Equal tokens taken at two times mean the module computes the same function at both, provided
    its ``state_dict`` tensors kept their values (a fingerprint check says so) and no code it calls
    was replaced. The token holds, for every submodule: the module object itself (a replaced
    module is another object), its class and the class's ``forward``, an instance-level
    ``forward``, its forward (pre-)hooks, and its plain attributes of simple types (numbers,
    strings, ``None``, dtypes, devices, tuples of them: ``p``, ``eps``, ``stride``, ...); the dtype
    and device of every parameter and buffer; the exact bits of every buffer that is not in the
    ``state_dict`` (non-persistent buffers: no fingerprint covers them); the global forward hooks
    and the TF32, cuDNN and deterministic-algorithm settings (:func:`kernel_settings`; the
    probe itself computes with exact kernels whatever they are). Train/eval flags are
    left out (the freeze guard sets them before every forward; a removed guard shows as a changed
    hook).

    Not seen: a replaced function that the module calls (``torch.nn.functional.relu = ...``, a
    patched library helper) and tensors kept as plain attributes: only a probe run sees those.

    Args:
        module: the module.
        state_tensors: names (relative to ``module``) of the buffers that are in the
            ``state_dict`` and checked by fingerprints; default: every persistent buffer.

    Returns:
        a tuple; compare two with ``==`` (modules and hooks by identity).
    """
    persistent = set(state_tensors) or set(module.state_dict(keep_vars=True))
    parts: list[Any] = []
    for name, sub in module.named_modules(remove_duplicate=False):
        cls = type(sub)
        attributes = tuple(
            (key, repr(value))
            for key, value in vars(sub).items()
            if not key.startswith("_") and key != "training" and _simple(value)
        )
        pre, post = _compat.module_forward_hooks(sub)
        parts.append(
            (name, sub, cls, cls.forward, vars(sub).get("forward"), tuple(pre), tuple(post), attributes)
        )
    parts.append(tuple((n, t.dtype, t.device) for n, t in module.named_parameters(remove_duplicate=False)))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    parts.append(tuple((n, t.dtype, t.device) for n, t in buffers.items()))
    transient = {n: t for n, t in buffers.items() if n not in persistent}
    parts.append(tuple((n, fp.digest) for n, fp in fingerprint(transient).items()))
    pre, post = _compat.global_forward_hooks()
    parts.append((tuple(pre), tuple(post)))
    parts.append((kernel_settings(), torch.are_deterministic_algorithms_enabled()))
    return tuple(parts)


def capture_probe_input(
    module: nn.Module, store: dict[str, Any], samples: int = PROBE_SAMPLES
) -> torch.utils.hooks.RemovableHandle:
    """Register a one-shot forward pre-hook that keeps the first ``samples`` samples of the next input.

    The hook removes itself after the first call. It stores ``store["args"]``/``store["kwargs"]``:
    every tensor whose first dimension equals the batch size (that of the first tensor input) is
    cut to its first ``samples`` rows; other values are kept whole. Tensors are detached clones.

    Returns:
        the hook's handle (remove it to cancel before the module runs).
    """
    handle: torch.utils.hooks.RemovableHandle

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        handle.remove()
        batch = next((t.shape[0] for t in tensor_leaves((args, kwargs)) if t.dim() > 0), None)
        store["args"] = _take(args, batch, samples)
        store["kwargs"] = _take(kwargs, batch, samples)
        store["full_args"] = _take(args, None, samples)
        store["full_kwargs"] = _take(kwargs, None, samples)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    return handle


# ---------------------------------------------------------------------------------------------
# internals
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _take(obj: Any, batch: int | None, samples: int) -> Any:
    def cut(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if batch is not None and t.dim() > 0 and t.shape[0] == batch:
            t = t[:samples]
        return t.clone()

    return map_tensors(obj, cut)


def _to_cpu(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.detach().to("cpu", copy=True))


def _to_device(obj: Any, device: torch.device) -> Any:
    return map_tensors(obj, lambda t: t.to(device))


def _compare(reference: Any, output: Any, name: str, *, exact: bool) -> ProbeMismatch | None:
    ref_items, out_items = named_leaves(reference, "output"), named_leaves(output, "output")
    if [p for p, _ in ref_items] != [p for p, _ in out_items]:
        return ProbeMismatch(
            name,
            f"output structure on the probe input changed ({_structure(reference)} -> {_structure(output)})",
            float("inf"),
        )
    worst, worst_path = 0.0, ""
    for (path, ref), (_, out) in zip(ref_items, out_items, strict=True):
        if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor):
            if ref != out:
                return ProbeMismatch(
                    name, f"{path} on the probe input changed ({ref!r} -> {out!r})", float("inf")
                )
            continue
        if ref.shape != out.shape or ref.dtype != out.dtype:
            return ProbeMismatch(
                name,
                f"{path} on the probe input changed shape/dtype ({tuple(ref.shape)} {ref.dtype} -> "
                f"{tuple(out.shape)} {out.dtype})",
                float("inf"),
            )
        out = out.detach().to(ref.device)
        if torch.equal(ref, out):
            continue
        if ref.is_floating_point() or ref.is_complex():
            if torch.allclose(ref, out, rtol=0.0, atol=0.0, equal_nan=True):
                continue
            diff = (ref.double() - out.double()).abs()
            nan_mismatch = ref.isnan() != out.isnan()
            diff = torch.where(ref.isnan() & out.isnan(), torch.zeros_like(diff), diff)
            max_diff = float("inf") if bool(nan_mismatch.any()) else float(diff.max())
            scale = float(ref.double().abs().nan_to_num(0.0, 0.0, 0.0).max())
            if not exact and max_diff <= DEVICE_ATOL + DEVICE_RTOL * scale:
                continue
        else:
            max_diff = float((ref.long() - out.long()).abs().max())
        if max_diff >= worst:
            worst, worst_path = max_diff, path
    if worst_path:
        where = "" if worst_path == "output" else f" at {worst_path}"
        return ProbeMismatch(
            name, f"output on the probe input changed (max abs diff {worst:.3g}{where})", worst
        )
    return None


def _structure(obj: Any) -> str:
    """The top level of an output, for a message (``"tuple[2]"``, ``"dict['a', 'b']"``, ``"Tensor"``)."""
    if isinstance(obj, torch.Tensor):
        return "Tensor"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__}[{len(obj)}]"
    if isinstance(obj, dict):
        return f"dict[{', '.join(map(repr, obj))}]"
    return type(obj).__name__
