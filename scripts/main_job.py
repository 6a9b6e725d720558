"""The main job (``make run``): staged training on the bundled digits, end to end, with the real CLIs.

1. stage 1: backbone + branch ``digit`` on half A          (lightning-freeze-train experiment=stage1)
2. stage 2: + branch ``parity`` on half B, frozen backbone (experiment=stage2 init_from=<stage 1>),
   with the feature cache (``callbacks=[default,freeze_backbone,feature_cache]``, a disk store)
3. stage 3: two new branches ``mod3`` and ``high`` trained in parallel on the frozen backbone
   (a joblib multirun: -m launcher=joblib experiment=stage3 branch=mod3,high), sharing stage 2's cache
4. ``lightning-freeze merge``: one checkpoint with all four branches; then a learning-rate sweep of
   branch ``mod3`` trained as packed variants in one process (``launcher=packed``) and
   ``lightning-freeze select`` keeping the best
5. a summary table: each branch's test accuracy (from the merged checkpoint, each on its own data),
   branch ``digit``'s accuracy after stage 1 and in the merged checkpoint (identical: its logits are
   compared bit for bit), the frozen-tensor checks ("0 changed") and ``lightning-freeze diff`` of the
   backbone. Exit status 1 when any of these checks fails.

Usage: ``python scripts/main_job.py [--out DIR] [--quick]`` (``--quick``: 1 epoch per stage).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from lightning_freeze.stages import load_model, read_previous_stage


def _console_script(name: str, module: str) -> list[str]:
    """The installed console script next to this interpreter, else ``python -m module``."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return [found] if found else [sys.executable, "-m", module]


def _run(step: str, command: list[str]) -> None:
    print(f"\n=== {step} ===\n$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        sys.exit(f"main job: {step} failed with exit status {result.returncode}")
    print(f"--- {step}: {time.perf_counter() - start:.1f} s", flush=True)


@torch.no_grad()
def _test_predictions(model: Any, branch: str, data_cfg: dict[str, Any]) -> tuple[float, torch.Tensor]:
    """Accuracy of ``branch`` on the test split of its own data, and its logits (eval mode, CPU)."""
    datamodule = instantiate(data_cfg)
    datamodule.setup("test")
    logits, targets = [], []
    for x, y in datamodule.test_dataloader():
        logits.append(model(x, branch=branch))
        targets.append(y)
    all_logits = torch.cat(logits)
    accuracy = (all_logits.argmax(dim=1) == torch.cat(targets)).float().mean().item()
    return accuracy, all_logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default outputs/main_job/<time>)"
    )
    parser.add_argument("--quick", action="store_true", help="1 epoch per stage (smoke test)")
    args = parser.parse_args(argv)
    out = (args.out or Path("outputs/main_job") / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train = _console_script("lightning-freeze-train", "lightning_freeze.train")
    tool = _console_script("lightning-freeze", "lightning_freeze.cli.checkpoint_tools")
    extra = ["trainer.max_epochs=1"] if args.quick else []
    # stages 2 and 3: the frozen backbone is computed once per sample, in one disk cache that the
    # parallel jobs of stage 3 share with stage 2 (same samples, same backbone bits: all hits)
    cached = [
        "callbacks=[default,freeze_backbone,feature_cache]",
        f"callbacks.feature_cache.directory={out / 'feature_cache'}",
    ]
    started = time.perf_counter()

    stage1 = out / "stage1"
    _run(
        "stage 1: backbone + branch 'digit' (half A)",
        [*train, "experiment=stage1", f"hydra.run.dir={stage1}", *extra],
    )
    stage1_ckpt = stage1 / "checkpoints" / "last.ckpt"
    stage2 = out / "stage2"
    _run(
        "stage 2: + branch 'parity' (half B), frozen backbone",
        [*train, "experiment=stage2", f"init_from={stage1_ckpt}", f"hydra.run.dir={stage2}", *cached, *extra],
    )
    stage2_ckpt = stage2 / "checkpoints" / "last.ckpt"
    stage3 = out / "stage3"
    _run(
        "stage 3: branches 'mod3' and 'high' in parallel (joblib multirun)",
        [
            *train,
            "-m",
            "launcher=joblib",
            "experiment=stage3",
            f"init_from={stage2_ckpt}",
            "branch=mod3,high",
            f"hydra.sweep.dir={stage3}",
            *cached,
            # two jobs side by side: one log line per epoch each (naming its branch), no progress bars
            "~callbacks.progress_bar",
            "+trainer.enable_progress_bar=false",
            "+trainer.enable_model_summary=false",
            *extra,
        ],
    )
    stage3_ckpts = [
        stage3 / "0_mod3" / "checkpoints" / "last.ckpt",
        stage3 / "1_high" / "checkpoints" / "last.ckpt",
    ]
    merged_ckpt = out / "merged.ckpt"
    _run("merge", [*tool, "merge", str(merged_ckpt), *map(str, stage3_ckpts)])
    sweep = out / "stage3_lr_sweep"
    lrs = ["0.001", "0.003", "0.01"]
    _run(
        "stage 3b: a learning-rate sweep of branch 'mod3' as packed variants (launcher=packed: one process, "
        "the backbone served by the feature cache)",
        [
            *train,
            "-m",
            "launcher=packed",
            "experiment=stage3",
            f"init_from={stage2_ckpt}",
            "branch=mod3",
            f"model.optimizer.lr={','.join(lrs)}",
            f"hydra.sweep.dir={sweep}",
            *cached,
            "quiet=true",
            *extra,
        ],
    )
    sweep_ckpts = [sweep / f"{i}_mod3" / "checkpoints" / "last.ckpt" for i in range(len(lrs))]
    _run(
        "select: the best learning rate of the sweep by validation accuracy",
        [*tool, "select", str(out / "mod3_best.ckpt"), *map(str, sweep_ckpts), "--metric", "val_acc"],
    )

    # ---- summary -------------------------------------------------------------------------------
    records: dict[str, dict[str, Any]] = {}
    for ckpt in (stage1_ckpt, stage2_ckpt, *stage3_ckpts):
        records.update(read_previous_stage(ckpt).record)
    merged = load_model(merged_ckpt)
    failures = []
    rows = []
    merged_logits: dict[str, torch.Tensor] = {}
    for name in merged.branch_names:
        record = records[name]
        accuracy, merged_logits[name] = _test_predictions(merged, name, record["data"])
        rows.append((name, record["task"], record["data"].get("half"), record["stage"], accuracy))
    stage1_acc, stage1_logits = _test_predictions(load_model(stage1_ckpt), "digit", records["digit"]["data"])
    merged_acc = next(r[4] for r in rows if r[0] == "digit")
    identical = torch.equal(stage1_logits, merged_logits["digit"])
    if not (identical and stage1_acc == merged_acc):
        failures.append("branch 'digit' changed between stage 1 and the merged checkpoint")

    checks = []
    for label, run_dir in (
        ("stage 2", stage2),
        ("stage 3 mod3", stage3 / "0_mod3"),
        ("stage 3 high", stage3 / "1_high"),
    ):
        summary = json.loads((run_dir / "summary.json").read_text())
        checks.append(f"{label}: {summary['frozen_check']}")
        if summary["frozen_changed"] != 0:
            failures.append(f"{label}: {summary['frozen_check']}")
    diff = subprocess.run(
        [*tool, "diff", str(stage1_ckpt), str(merged_ckpt), "--only", "backbone"],
        capture_output=True,
        text=True,
        check=False,
    )
    if diff.returncode != 0:
        failures.append(f"backbone differs between stage 1 and merged: {diff.stdout.strip()}")

    lines = [
        "",
        f"=== main job summary ({time.perf_counter() - started:.0f} s) ===",
        f"{'branch':<8} {'task':<7} {'data':<7} {'trained in':<11} {'test_acc':>8}",
        *(f"{n:<8} {t:<7} {'half ' + str(h):<7} {'stage ' + str(s):<11} {a:>8.4f}" for n, t, h, s, a in rows),
        f"branch 'digit' test accuracy: after stage 1 {stage1_acc:.4f}, "
        f"in the merged checkpoint {merged_acc:.4f}: "
        + ("identical (logits bitwise equal)" if identical else "CHANGED"),
        "frozen tensors: " + "; ".join(checks),
        f"backbone, stage 1 vs merged (lightning-freeze diff --only backbone): exit {diff.returncode} "
        + ("(bitwise identical)" if diff.returncode == 0 else "(differs)"),
        f"merged checkpoint: {merged_ckpt}",
    ]
    print("\n".join(lines), flush=True)
    if failures:
        print("main job FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
