"""Weight-EMA update cost, side by side in one process: TrainableEMA vs timm, torch, Lightning, naive.

Run by hand (never part of the test suite)::

    pip install -e ".[bench]"
    python benchmarks/bench_ema.py                      # CPU, and CUDA when available
    python benchmarks/bench_ema.py --device cpu --repeats 10

Model: torchvision ResNet-50 (random init), fp32,
  (a) frozen backbone: only ``fc`` trainable (2.05 M of 25.6 M parameters), backbone BatchNorm in eval;
  (b) fully trainable.
Methods (all decay 0.999, warm-up where the method has one, parameters and buffers):
  TrainableEMA        lightning_freeze.core.TrainableEMA(model).update(model)
  timm ModelEmaV3     timm.utils.ModelEmaV3(model, use_warmup=True).update(model, step)
  torch AveragedModel AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
  Lightning EMA       lightning.pytorch.callbacks.EMAWeightAveraging: its on_train_batch_end
  naive               per tensor of the state_dict: ``v *= d; v += (1 - d) * m`` (the common home-made EMA)

Per-update time: the best of ``--repeats`` rounds (methods interleaved in each round, so machine
noise hits them alike; noise only ever adds time, as with ``timeit``) of the mean of ``--inner``
updates, with CUDA synchronised.
Extra memory: bytes of the tensors the EMA object holds that the model does not (the persistent
cost); on CUDA also the peak allocation during an update above the model's own.
Bandwidth bound: the time of one ``lerp_`` over a flat fp32 tensor with as many elements as there are
trainable parameters (12 bytes per element: read shadow, read weight, write shadow), timed in the same
rounds on the same device.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_freeze.core import TrainableEMA

DECAY = 0.999
BOUND = "single flat lerp_ (bound)"


def tensor_bytes(tensors) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in module.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]


@dataclass
class Method:
    name: str
    update: Callable[[], None]
    held: Callable[[], list[torch.Tensor]]  # the tensors the EMA holds (model tensors are subtracted)


def build_methods(model: nn.Module, skip: set[str]) -> list[Method]:
    methods: list[Method] = []
    if "trainable" not in skip:
        ema = TrainableEMA(model, decay=DECAY, warmup=True, buffers="copy")
        methods.append(Method("TrainableEMA", lambda: ema.update(model), lambda: list(ema.shadow.values())))
    if "timm" not in skip:
        from timm.utils.model_ema import ModelEmaV3

        timm_ema = ModelEmaV3(model, decay=DECAY, use_warmup=True, warmup_power=3 / 4)
        step = [0]

        def timm_update() -> None:
            step[0] += 1
            timm_ema.update(model, step=step[0])

        methods.append(Method("timm ModelEmaV3", timm_update, lambda: module_tensors(timm_ema)))
    if "torch" not in skip:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
        methods.append(
            Method(
                "torch AveragedModel",
                lambda: averaged.update_parameters(model),
                lambda: module_tensors(averaged),
            )
        )
    if "lightning" not in skip:
        import lightning as L
        from lightning.pytorch.callbacks import EMAWeightAveraging

        class Wrapped(L.LightningModule):
            def __init__(self, net: nn.Module) -> None:
                super().__init__()
                self.net = net

        class TrainerStub:
            global_step = 0

        wrapped, stub = Wrapped(model), TrainerStub()
        callback = EMAWeightAveraging(decay=DECAY)
        callback.setup(stub, wrapped, "fit")  # type: ignore[arg-type]

        def lightning_update() -> None:
            stub.global_step += 1
            callback.on_train_batch_end(stub, wrapped, None, None, 0)  # type: ignore[arg-type]

        methods.append(
            Method(
                "Lightning EMAWeightAveraging",
                lightning_update,
                lambda: module_tensors(callback._average_model),
            )
        )
    if "naive" not in skip:
        shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

        def naive_update() -> None:
            with torch.no_grad():
                current = model.state_dict()
                for k, v in shadow.items():
                    v *= DECAY
                    v += (1 - DECAY) * current[k]

        methods.append(Method("naive d*e+(1-d)*m", naive_update, lambda: list(shadow.values())))
    return methods


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(scenario: str, device: torch.device) -> nn.Module:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50().to(device)
    if scenario == "frozen":
        for name, module in model.named_children():
            if name != "fc":
                module.requires_grad_(False)
                module.eval()
    return model


def run(device: torch.device, scenario: str, repeats: int, inner: int, skip: set[str]) -> dict:
    model = make_model(scenario, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_numel = sum(p.numel() for p in trainable)
    model_ptrs = {t.untyped_storage().data_ptr() for t in module_tensors(model)}
    base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    methods = build_methods(model, skip)
    # the bandwidth bound, timed in the same interleaved rounds (same machine noise as the methods)
    flat_a = torch.randn(trainable_numel, device=device)
    flat_b = torch.randn(trainable_numel, device=device)
    methods.append(Method(BOUND, lambda: flat_a.lerp_(flat_b, 0.001), lambda: []))
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    peaks: dict[str, int] = {}
    for m in methods:  # warm-up (first update copies / allocates lazily) and the CUDA peak
        for _ in range(2):
            m.update()
        if device.type == "cuda":
            sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            m.update()
            sync(device)
            peaks[m.name] = torch.cuda.max_memory_allocated(device) - before
    for _ in range(repeats):
        for m in methods:
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                m.update()
            sync(device)
            times[m.name].append((time.perf_counter() - start) / inner)
    results = {}
    for m in methods:
        held = [t for t in m.held() if t.untyped_storage().data_ptr() not in model_ptrs]
        results[m.name] = {
            "time": min(times[m.name]),  # best round: the machine's noise only ever adds time
            "extra_bytes": tensor_bytes(held),
            "peak_transient": peaks.get(m.name),
        }
    del methods
    return {
        "results": results,
        "trainable_numel": trainable_numel,
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "total_numel": sum(p.numel() for p in model.parameters()),
        "base_alloc": base_alloc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=3, help="updates per timed round")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--skip", default="", help="comma-separated: trainable,timm,torch,lightning,naive")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    skip = {s for s in args.skip.split(",") if s}
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}x{args.inner}"
    )
    for device in devices:
        name = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
        )
        print(f"\n### {name}\n")
        print(
            "| scenario | method | time / update (ms) | vs timm | vs bound | extra memory (MB) "
            "| vs trainable bytes |" + (" peak during update (MB) |" if device.type == "cuda" else "")
        )
        print("|---|---|---:|---:|---:|---:|---:|" + ("---:|" if device.type == "cuda" else ""))
        for scenario in ("frozen", "full"):
            out = run(device, scenario, args.repeats, args.inner, skip)
            label = "(a) only fc trainable" if scenario == "frozen" else "(b) fully trainable"
            timm_time = out["results"].get("timm ModelEmaV3", {}).get("time")
            bound = out["results"].pop(BOUND)["time"]
            for method, r in out["results"].items():
                rel = f"{r['time'] / timm_time:.3f}x" if timm_time else "-"
                row = (
                    f"| {label} | {method} | {r['time'] * 1e3:.2f} | {rel} | {r['time'] / bound:.2f}x | "
                    f"{r['extra_bytes'] / 1e6:.1f} | {r['extra_bytes'] / out['trainable_bytes']:.2f}x |"
                )
                if device.type == "cuda":
                    row += f" {(r['peak_transient'] or 0) / 1e6:.1f} |"
                print(row)
            bandwidth = 12 * out["trainable_numel"] / bound
            print(
                f"| {label} | *bound: one lerp_ over {out['trainable_numel'] / 1e6:.2f} M fp32 "
                f"({bandwidth / 1e9:.1f} GB/s)* | {bound * 1e3:.2f} | | 1.00x | "
                f"{out['trainable_bytes'] / 1e6:.1f} (trainable) | 1.00x |"
                + (" |" if device.type == "cuda" else "")
            )


if __name__ == "__main__":
    main()
