"""``lightning-freeze select``: keep the best variant of each branch, by a validation metric.

A sweep over a branch's settings (``lightning-freeze-train -m ... model.optimizer.lr=...``, packed or
not) writes one checkpoint per job, each holding the same frozen backbone and its own variant of the
trained branch. ``select`` picks, for every branch whose weights differ between the inputs, the input
with the best value of ``<branch>/<metric>`` and writes one checkpoint with the winners, merged as
``lightning-freeze merge`` does (backbones must be bitwise identical; a branch present in several
inputs with the same weights is kept once)::

    cd outputs/train/multiruns/2026-12-04_10-00-00  # the sweep's directory: one job per subdirectory
    lightning-freeze select best.ckpt */checkpoints/last.ckpt --metric val_acc --mode max

The metrics are the ones :class:`~lightning_freeze.MultiBranchModule` stores in every checkpoint it
writes (``checkpoint["multi_branch"]["metrics"]``, e.g. ``"parity/val_acc"``), or, for checkpoints
without them, the ``summary.json`` of the app's job (``<job>/summary.json`` next to
``<job>/checkpoints/``). Exit 0 when written, 2 on bad input (nothing written). Pure PyTorch: no
Lightning import.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# PyTorch and the checkpoint core are imported inside the functions: ``lightning-freeze --help``
# builds this subcommand's parser and must answer without importing torch
from lightning_freeze.cli import checkpoint_tools
from lightning_freeze.cli.checkpoint_tools import add_shared_arguments, check_output, write_output

__all__ = ["SelectError", "SelectResult", "add_parser", "main", "run", "select_checkpoints"]

MODES = ("max", "min")
_PER_BRANCH_HPARAMS = ("branches", "losses", "metrics", "num_classes", "branch_optimizers")


class SelectError(ValueError):
    """Inputs from which no best variant can be chosen (a missing metric, an unknown branch)."""


@dataclass
class SelectResult:
    """What :func:`select_checkpoints` chose and built.

    Attributes:
        checkpoint: the merged checkpoint with the winning variant of every selected branch.
        winners: ``{branch: index of the winning input}``.
        scores: ``{branch: [metric value of each input, None where the input lacks the branch]}``.
    """

    checkpoint: dict[str, Any]
    winners: dict[str, int]
    scores: dict[str, list[float | None]]


def _stored_metrics(checkpoint: Mapping[str, Any], path: str | os.PathLike[str] | None) -> dict[str, float]:
    section = checkpoint.get("multi_branch")
    metrics = section.get("metrics") if isinstance(section, Mapping) else None
    if isinstance(metrics, Mapping) and metrics:
        return {str(k): float(v) for k, v in metrics.items()}
    if path is None:
        return {}
    # a checkpoint of the app without stored metrics: the job's summary.json
    for parent in list(Path(path).resolve().parents)[:2]:
        summary = parent / "summary.json"
        if summary.is_file():
            rows = json.loads(summary.read_text()).get("branches") or []
            return {
                f"{row['name']}/{key}": float(row[key])
                for row in rows
                for key in ("val_acc", "val_loss")
                if row.get(key) is not None
            }
    return {}


def select_checkpoints(
    checkpoints: Sequence[Mapping[str, Any]],
    metric: str,
    mode: str = "max",
    *,
    branches: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    paths: Sequence[str | os.PathLike[str] | None] | None = None,
    ema: bool = False,
) -> SelectResult:
    """Keep the best variant of each branch by ``<branch>/<metric>``, merged into one checkpoint.

    Args:
        checkpoints: loaded checkpoints (see :func:`~lightning_freeze.core.checkpoint.load_checkpoint`).
        metric: the metric name after the branch prefix, e.g. ``"val_acc"`` (``"parity/val_acc"``
            for branch ``parity``); a full key ``"<branch>/<name>"`` restricts the choice to that branch.
        mode: ``"max"`` or ``"min"``: whether a larger or a smaller value is better.
        branches: the branches to choose a variant of; default: every branch whose weights differ
            between the inputs.
        names: how to call each input in messages (default ``"input 1"``, ...).
        paths: the input files, to find a job's ``summary.json`` when a checkpoint stores no metrics.
        ema: take each input's ``FrozenSafeEMA`` weights instead of its raw weights.

    Returns:
        a :class:`SelectResult`; ties go to the first input.

    Raises:
        SelectError: a bad ``mode``/``metric``, an unknown branch, or an input that holds a variant but
            not its metric (the message lists the metrics it has).
        lightning_freeze.core.checkpoint.MergeError: backbones not bitwise identical, or a branch that
            is not selected differs between inputs.
    """
    from lightning_freeze.core.checkpoint import (
        branch_names_in,
        checkpoint_state_dict,
        ema_state_dict,
        merge_checkpoints,
    )

    if mode not in MODES:
        raise SelectError(f"Invalid mode={mode!r}; valid choices: {', '.join(repr(m) for m in MODES)}")
    if not isinstance(metric, str) or not metric or metric.endswith("/"):
        raise SelectError(f"Invalid metric={metric!r}; valid choices: a metric name such as 'val_acc'")
    labels = list(names) if names is not None else [f"input {i + 1}" for i in range(len(checkpoints))]
    if len(checkpoints) < 2:
        raise SelectError(f"select needs at least two input checkpoints, got {len(checkpoints)}")
    read = ema_state_dict if ema else checkpoint_state_dict
    states = [read(c, label) for c, label in zip(checkpoints, labels, strict=True)]
    held = [branch_names_in(state) for state in states]
    everywhere = list(dict.fromkeys(n for names_ in held for n in names_))
    if "/" in metric:
        branch, metric = metric.split("/", 1)
        branches = [*(branches or []), branch]
    if branches is not None:
        unknown = [b for b in branches if b not in everywhere]
        if unknown:
            raise SelectError(
                f"Unknown branch(es) {', '.join(repr(b) for b in unknown)}; valid choices: "
                f"{', '.join(repr(b) for b in everywhere)}"
            )
        chosen = list(dict.fromkeys(branches))
    else:
        chosen = [b for b in everywhere if _differs(states, held, b)]
        if not chosen:
            raise SelectError(
                f"every branch ({', '.join(everywhere)}) is bitwise identical in all inputs: there is no "
                "variant to choose"
            )
    paths = paths or [None] * len(checkpoints)
    stored = [_stored_metrics(c, p) for c, p in zip(checkpoints, paths, strict=True)]

    winners: dict[str, int] = {}
    scores: dict[str, list[float | None]] = {}
    for branch in chosen:
        key = f"{branch}/{metric}"
        for index, names_ in enumerate(held):
            if branch in names_ and key not in stored[index]:
                available = ", ".join(sorted(stored[index])) or "none"
                raise SelectError(
                    f"{labels[index]} holds branch {branch!r} but no metric {key!r}; its metrics: {available}"
                )
        values: list[float | None] = [stored[i][key] if branch in n else None for i, n in enumerate(held)]
        values = [None if v is None or math.isnan(v) else v for v in values]
        candidates = [i for i, v in enumerate(values) if v is not None]
        if not candidates:
            raise SelectError(f"no input has a value of {key!r} (all NaN)")
        # max/min return the first of equal values: ties go to the first input
        winners[branch] = (max if mode == "max" else min)(candidates, key=lambda i: values[i])
        scores[branch] = values

    views = [
        _without_branches(c, [b for b, w in winners.items() if w != index and b in held[index]])
        for index, c in enumerate(checkpoints)
    ]
    merged = merge_checkpoints(views, names=labels, ema=ema).checkpoint
    section = merged.setdefault("multi_branch", {})
    section.pop("merged", None)
    section["metrics"] = {
        key: value
        for index, metrics in enumerate(stored)
        for key, value in metrics.items()
        if key.split("/", 1)[0] in winners and winners[key.split("/", 1)[0]] == index
    }
    section["selected"] = {
        branch: {
            "input": labels[index],
            "metric": f"{branch}/{metric}",
            "mode": mode,
            "value": scores[branch][index],
        }
        for branch, index in winners.items()
    }
    return SelectResult(checkpoint=merged, winners=winners, scores=scores)


def _differs(states: Sequence[Mapping[str, Any]], held: Sequence[list[str]], branch: str) -> bool:
    from lightning_freeze.core.checkpoint import BRANCH_PREFIX, diff_state_dicts

    prefix = f"{BRANCH_PREFIX}{branch}."
    own = [
        {k: v for k, v in s.items() if k.startswith(prefix)}
        for s, n in zip(states, held, strict=True)
        if branch in n
    ]
    return any(diff_state_dicts(own[0], other) for other in own[1:])


def _without_branches(checkpoint: Mapping[str, Any], drop: Sequence[str]) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` without the tensors, configs and EMA entries of ``drop``."""
    from lightning_freeze.core.checkpoint import BRANCH_PREFIX

    out = dict(checkpoint)
    if not drop:
        return out
    prefixes = tuple(f"{BRANCH_PREFIX}{name}." for name in drop)
    if isinstance(out.get("state_dict"), Mapping):
        out["state_dict"] = {k: v for k, v in out["state_dict"].items() if not k.startswith(prefixes)}
    else:  # a plain state_dict file
        out = {k: v for k, v in out.items() if not k.startswith(prefixes)}
    hparams = out.get("hyper_parameters")
    if isinstance(hparams, Mapping):
        hparams = dict(hparams)
        for entry in _PER_BRANCH_HPARAMS:
            if isinstance(hparams.get(entry), Mapping):
                hparams[entry] = {k: v for k, v in hparams[entry].items() if k not in drop}
        out["hyper_parameters"] = hparams
    callbacks = out.get("callbacks")
    if isinstance(callbacks, Mapping):
        out["callbacks"] = {key: _strip_state(state, prefixes) for key, state in callbacks.items()}
    return out


def _strip_state(state: Any, prefixes: tuple[str, ...]) -> Any:
    """Callback state with every mapping entry keyed by a dropped branch's tensors removed (EMA shadows)."""
    if isinstance(state, Mapping):
        return {k: _strip_state(v, prefixes) for k, v in state.items() if not str(k).startswith(prefixes)}
    return state


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``select`` subcommand to the ``lightning-freeze`` parser's subparsers."""
    parser = subparsers.add_parser(
        "select",
        help="keep the best variant of each branch by a validation metric",
        description=(
            "For every branch whose weights differ between the inputs (variants from a sweep), keep the "
            "input with the best <branch>/METRIC and write one checkpoint with the winners, merged as "
            "'merge' does (backbones must be bitwise identical). Exit 0 when written, 2 on bad input."
        ),
    )
    parser.add_argument(
        "--metric",
        required=True,
        help="metric after the branch name, e.g. val_acc (read as '<branch>/val_acc'); or BRANCH/NAME",
    )
    parser.add_argument(
        "--mode", choices=MODES, default="max", help="larger (max, default) or smaller is better"
    )
    parser.add_argument(
        "--branch",
        action="append",
        help="branch to choose a variant of (repeatable); default: every branch that differs",
    )
    add_shared_arguments(parser, writes=True)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``select`` with parsed arguments (from :func:`add_parser`).

    Args:
        args: the parsed arguments.

    Returns:
        the exit status: 0 written.

    Raises:
        ValueError: bad input: a :class:`SelectError`, ``CheckpointError`` or ``MergeError``, or an
            OUT that may not be written.
    """
    from lightning_freeze.core.checkpoint import load_checkpoint

    check_output(args.out, args.inputs, args.force)
    checkpoints = [load_checkpoint(path, unsafe_load=args.unsafe_load) for path in args.inputs]
    result = select_checkpoints(
        checkpoints,
        args.metric,
        args.mode,
        branches=args.branch,
        names=list(args.inputs),
        paths=list(args.inputs),
        ema=args.ema,
    )
    write_output(result.checkpoint, args.out)
    for branch, index in result.winners.items():
        values = ", ".join("-" if v is None else f"{v:.4g}" for v in result.scores[branch])
        print(f"{branch}: best {args.mode} of [{values}] is {args.inputs[index]}")
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-freeze select ...`` standalone (``python -m lightning_freeze.cli.select ...``).

    Args:
        argv: the arguments after ``select`` (default: ``sys.argv[1:]``).

    Returns:
        the exit status: 0 written, 2 on bad input.
    """
    return checkpoint_tools.main(["select", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
