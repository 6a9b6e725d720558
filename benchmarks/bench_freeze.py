"""Overhead of FreezeBackbone's mechanisms, measured side by side in one process.

1. Per-step overhead on a torchvision ResNet-18 training step (frozen backbone, trainable fc) on
   CPU: the step with plain ``requires_grad_(False)`` vs the same step with ``freeze()``'s guards
   (per-layer and per-module forward pre-hooks), interleaved; plus the per-epoch costs (re-pin and
   fingerprint verification) amortised over the steps of an epoch.
2. Fingerprint time of ResNet-50's frozen tensors (every parameter and buffer) next to one forward.
3. The output-probe check (FreezeBackbone reruns each frozen module on 2 recorded samples at every
   verification, i.e. once per epoch): its time next to one training step, per epoch.

Run by hand:  python benchmarks/bench_freeze.py [--steps-per-epoch 100] [--repeats 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

from lightning_freeze.core import fingerprint, freeze
from lightning_freeze.core.freeze import pin_frozen_layers
from lightning_freeze.core.probe import PROBE_SAMPLES, OutputProbe


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def resnet18_step_overhead(batch: int, size: int, repeats: int, steps_per_epoch: int) -> dict[str, float]:
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10)
    guarded = torchvision.models.resnet18(num_classes=10)
    guarded.load_state_dict(plain.state_dict())
    plain_names = [n for n, _ in plain.named_children() if n != "fc"]
    for name in plain_names:
        plain.get_submodule(name).requires_grad_(False)
        plain.get_submodule(name).eval()  # the best plain PyTorch can do; undone by any .train()
    frozen = freeze(guarded, plain_names)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, train_call: bool) -> None:
        if train_call:
            model.train()  # what user code does; the guards must undo it for the frozen layers
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    opt_plain = torch.optim.SGD(plain.fc.parameters(), lr=0.01)
    opt_guarded = torch.optim.SGD(guarded.fc.parameters(), lr=0.01)
    for _ in range(2):  # warm up both
        step(plain, opt_plain, False)
        step(guarded, opt_guarded, True)
    t_plain, t_guarded = [], []
    for _ in range(repeats):  # interleaved so that machine noise hits both alike
        t_plain += _timed(lambda: step(plain, opt_plain, False), 1)
        t_guarded += _timed(lambda: step(guarded, opt_guarded, True), 1)

    # the guards alone, timed in isolation (deterministic, no convolution noise)
    hooks = [(m, h) for m in guarded.modules() for h in m._forward_pre_hooks.values()]
    n_calls = 2000
    t0 = time.perf_counter()
    for _ in range(n_calls):
        for module, hook in hooks:
            hook(module, (x,))
    guard_s = (time.perf_counter() - t0) / n_calls
    repin_s = statistics.median(
        _timed(lambda: pin_frozen_layers(guarded, frozen.names, norm="eval", dropout="eval"), 20)
    )
    verify_s = statistics.median(_timed(lambda: frozen.fingerprint(guarded), 5))
    step_s = statistics.median(t_plain)
    per_step_s = guard_s + (repin_s + verify_s) / steps_per_epoch
    return {
        "step_plain_ms": step_s * 1e3,
        "step_guarded_ms": statistics.median(t_guarded) * 1e3,
        "hooks": len(hooks),
        "guard_us": guard_s * 1e6,
        "repin_ms": repin_s * 1e3,
        "verify_ms": verify_s * 1e3,
        "frozen_tensors": len(frozen.tensor_keys),
        "overhead_pct": 100 * per_step_s / step_s,
    }


def resnet50_fingerprint(batch: int, size: int) -> dict[str, float]:
    model = torchvision.models.resnet50().eval()
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    fp_s = statistics.median(_timed(lambda: fingerprint(model), 5))
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        model(x)
        fwd_s = statistics.median(_timed(lambda: model(x), 3))
    return {
        "tensors": len(model.state_dict()),
        "mbytes": n_bytes / 2**20,
        "fp_ms": fp_s * 1e3,
        "fwd_ms": fwd_s * 1e3,
    }


def resnet18_probe_cost(batch: int, size: int, repeats: int, steps_per_epoch: int) -> dict[str, float]:
    """Per-epoch cost of the output-probe check of a frozen ResNet-18 backbone (all but ``fc``)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    names = [n for n, _ in model.named_children() if n != "fc"]
    freeze(model, names)
    model.train()
    backbone = torch.nn.Sequential(*(model.get_submodule(n) for n in names))
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    probe = OutputProbe.record(backbone, (x[:PROBE_SAMPLES],))
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.01)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    assert probe.check(backbone, "backbone") is None
    step_s = statistics.median(_timed(step, repeats))
    check_s = statistics.median(_timed(lambda: probe.check(backbone, "backbone"), repeats))
    return {
        "step_ms": step_s * 1e3,
        "check_ms": check_s * 1e3,
        "probe_kib": sum(t.numel() * t.element_size() for t in (*probe.args, probe.output)) / 2**10,
        "epoch_pct": 100 * check_s / (step_s * steps_per_epoch),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    args = parser.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {cpu}, {torch.get_num_threads()} threads")
    r = resnet18_step_overhead(args.batch, args.size, args.repeats, args.steps_per_epoch)
    print(
        f"ResNet-18 step (batch {args.batch}x3x{args.size}x{args.size}, frozen backbone, trainable fc):\n"
        f"  plain requires_grad_(False) step       {r['step_plain_ms']:9.1f} ms (median of {args.repeats})\n"
        f"  with freeze() guards + model.train()   {r['step_guarded_ms']:9.1f} ms (median, interleaved)\n"
        f"  guards ({r['hooks']} forward pre-hooks)        {r['guard_us']:9.1f} us per step\n"
        f"  re-pin at epoch start                  {r['repin_ms']:9.3f} ms per epoch\n"
        f"  verify {r['frozen_tensors']} frozen tensors          {r['verify_ms']:9.1f} ms per epoch\n"
        f"  overhead per step ({args.steps_per_epoch} steps/epoch)   {r['overhead_pct']:9.3f} % of the step"
    )
    p = resnet18_probe_cost(args.batch, args.size, args.repeats, args.steps_per_epoch)
    print(
        f"ResNet-18 output probe ({PROBE_SAMPLES} samples, {p['probe_kib']:.0f} KiB kept):\n"
        f"  one training step                      {p['step_ms']:9.1f} ms (median of {args.repeats})\n"
        f"  probe check (once per epoch)           {p['check_ms']:9.1f} ms\n"
        f"  cost per epoch ({args.steps_per_epoch} steps/epoch)      {p['epoch_pct']:9.3f} % of the epoch"
    )
    f = resnet50_fingerprint(8, args.size)
    print(
        f"ResNet-50 fingerprint of all {f['tensors']} tensors ({f['mbytes']:.1f} MiB): {f['fp_ms']:.1f} ms; "
        f"one forward (batch 8x3x{args.size}x{args.size}, no grad): {f['fwd_ms']:.1f} ms "
        f"-> {f['fp_ms'] / f['fwd_ms']:.2f}x a forward"
    )


if __name__ == "__main__":
    main()
