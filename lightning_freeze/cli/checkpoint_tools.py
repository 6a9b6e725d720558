"""``lightning-freeze diff``, ``merge`` and ``select``: prove a stage left tensors untouched,
combine branches trained in parallel on one frozen backbone into one checkpoint, and keep the best
variant of each branch from a sweep (:mod:`lightning_freeze.cli.select`).

Pure PyTorch (no Lightning import), so the tools start fast and work on any ``torch.save`` file::

    lightning-freeze diff stage1.ckpt stage2.ckpt --only backbone   # exit 0: backbone bitwise equal
    lightning-freeze merge all.ckpt stage2_b.ckpt stage2_c.ckpt      # one checkpoint, branches a, b, c
    lightning-freeze select best.ckpt multirun/*/checkpoints/last.ckpt --metric val_acc --mode max

Exit status: ``diff`` 0 when nothing (under ``--only``) differs, 1 when something does; ``merge``
and ``select`` 0 when written. All exit 2 on bad input (missing, unreadable, corrupt or truncated
file, not a checkpoint, a file that needs ``--unsafe-load``; for ``merge`` and ``select`` also
inputs without branches, different backbones or colliding branch names; for ``select`` also a
missing metric or an unknown branch) with a one-line error on stderr and nothing written.

``diff`` memory-maps both files and compares each tensor in small chunks: its peak memory is about
the two files' size, whatever the size of one tensor. Sparse tensors compare by their coalesced
indices and values, quantized ones by scheme, scale, zero point and integer values.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# PyTorch and the checkpoint core are imported inside the commands, after argparse: ``--help`` and
# usage errors answer at once instead of after torch's import (seconds)
if TYPE_CHECKING:
    from lightning_freeze.core.state_diff import StateDictDiff, TensorDiff

__all__ = ["main"]

PROG = "lightning-freeze"
EXIT_SAME, EXIT_DIFFERENT, EXIT_BAD_INPUT = 0, 1, 2


class _UsageError(ValueError):
    """Bad input found after argument parsing: reported in one line, exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Checkpoint tools for staged, frozen-backbone training.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{diff,merge,select}", required=True)

    diff = sub.add_parser(
        "diff",
        help="list the tensors that differ between two checkpoints",
        description=(
            "Compare two checkpoints tensor by tensor, bitwise (dense, sparse and quantized tensors), "
            "in bounded memory (files memory-mapped, tensors compared in chunks). Exit 0 when no "
            "tensor (under --only) differs, 1 when some do, 2 on bad input."
        ),
    )
    diff.add_argument("a", metavar="A", help="first checkpoint (.ckpt or state_dict file)")
    diff.add_argument("b", metavar="B", help="second checkpoint")
    diff.add_argument(
        "--only",
        metavar="PATTERN",
        action="append",
        help=(
            "compare only these state_dict keys: an fnmatch pattern ('branches.*.weight') or a module "
            "prefix ('backbone'); repeatable"
        ),
    )
    add_shared_arguments(diff, writes=False)

    merge = sub.add_parser(
        "merge",
        help="merge branch checkpoints trained on one frozen backbone",
        description=(
            "Write one multi-branch checkpoint from checkpoints whose branches were trained on the same "
            "frozen backbone. Refuses (exit 2, OUT not written) when the backbones are not bitwise "
            "identical or a branch name collides. OUT is written atomically."
        ),
    )
    add_shared_arguments(merge, writes=True)

    from lightning_freeze.cli import select  # argparse only at import: no torch

    select.add_parser(sub)
    return parser


def add_shared_arguments(parser: argparse.ArgumentParser, *, writes: bool) -> None:
    """``--ema`` and ``--unsafe-load``; with ``writes`` also ``OUT``, ``IN ...`` and ``--force``."""
    if writes:
        parser.add_argument("out", metavar="OUT", help="checkpoint to write")
        parser.add_argument("inputs", metavar="IN", nargs="+", help="input checkpoints (at least two)")
        parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    parser.add_argument(
        "--ema",
        action="store_true",
        help="use the weights averaged by FrozenSafeEMA (stored in each checkpoint's callback state) "
        "where it shadowed them, the raw weights elsewhere",
    )
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load with torch.load(weights_only=False), which runs code pickled in the file: only for "
        "checkpoints you trust",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-freeze`` console script.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        the exit status (0, 1 or 2, see the module docstring).
    """
    args = _parser().parse_args(argv)
    try:
        if args.command == "diff":
            return _diff(args.a, args.b, args.only, args.ema, args.unsafe_load)
        if args.command == "select":
            from lightning_freeze.cli import select

            return select.run(args)
        return _merge(args.out, args.inputs, args.force, args.ema, args.unsafe_load)
    except ValueError as err:  # _UsageError, CheckpointError, MergeError, SelectError
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


# ------------------------------------------------------------------------------------------------
# diff
# ------------------------------------------------------------------------------------------------
def _diff(path_a: str, path_b: str, only: list[str] | None, ema: bool, unsafe_load: bool) -> int:
    import torch

    from lightning_freeze.core.checkpoint_io import checkpoint_state_dict, ema_state_dict, load_checkpoint
    from lightning_freeze.core.state_diff import diff_state_dicts

    # the comparison walks each tensor in small chunks (bounded memory): memory-bound work that
    # extra intra-op threads only slow down (measured: 8x the CPU time on a busy 2-core machine)
    torch.set_num_threads(1)
    read = ema_state_dict if ema else checkpoint_state_dict
    # mapped, not read: peak memory about the two files, not a copy of each on top
    state_a = read(load_checkpoint(path_a, unsafe_load=unsafe_load, mmap=True), repr(path_a))
    state_b = read(load_checkpoint(path_b, unsafe_load=unsafe_load, mmap=True), repr(path_b))
    result = diff_state_dicts(state_a, state_b, only)
    print(f"A: {path_a}\nB: {path_b}")
    if result:
        print(_table(result.differences))
        for d in result.differences:
            if d.detail:
                print(f"  {d.key}: {d.detail}")
    print(_summary(result, only))
    return EXIT_DIFFERENT if result else EXIT_SAME


_STATUS_WORDS = {
    "changed": "changed",
    "dtype": "dtype changed",
    "shape": "shape changed",
    "layout": "layout changed",
    "only_a": "only in A",
    "only_b": "only in B",
}
_HEADER = ("key", "status", "shape", "dtype", "differing", "max_abs_diff", "max_ulps")


def _row(diff: TensorDiff) -> tuple[str, ...]:
    shape = _pair(diff.shape_a, diff.shape_b)
    dtype = _pair(diff.dtype_a, diff.dtype_b)
    total = math.prod(diff.shape_a) if diff.shape_a is not None else None
    differing = f"{diff.elements}/{total}" if diff.elements is not None else "-"
    max_abs = "-" if diff.max_abs is None else f"{diff.max_abs:.3g}"
    ulps = "-" if diff.max_ulps is None else str(diff.max_ulps)
    return (diff.key, _STATUS_WORDS.get(diff.status, diff.status), shape, dtype, differing, max_abs, ulps)


def _pair(a: object, b: object) -> str:
    if a is None or b is None or a == b:
        return "-" if a is None and b is None else str(a if a is not None else b)
    return f"{a} -> {b}"


def _table(differences: list[TensorDiff]) -> str:
    rows = [_HEADER, *(_row(d) for d in differences)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def _summary(result: StateDictDiff, only: list[str] | None) -> str:
    scope = f" under {', '.join(repr(p) for p in only)}" if only else ""
    if not result:
        return f"no differences: all {result.compared} tensors{scope} are bitwise identical"
    counts = Counter(d.status for d in result.differences)
    detail = ", ".join(f"{n} {_STATUS_WORDS.get(s, s)}" for s, n in counts.items())
    return (
        f"{len(result.differences)} of {result.compared} tensors{scope} differ ({detail}); "
        f"{result.identical} bitwise identical"
    )


# ------------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------------
def check_output(out: str, inputs: Sequence[str], force: bool) -> None:
    """Refuse an OUT that ``merge``/``select`` may not write, before any input is read.

    Raises:
        ValueError: OUT is an input, a directory, exists without ``force``, or its folder is missing.
    """
    target = Path(out)
    for path in inputs:
        if target.exists() and Path(path).exists() and os.path.samefile(target, path):
            raise _UsageError(f"OUT {out!r} is also an input; write the merged checkpoint to a new file")
    if target.is_dir():
        raise _UsageError(f"OUT {out!r} is a directory; give a file name")
    if target.exists() and not force:
        raise _UsageError(f"OUT {out!r} exists; pass --force to overwrite it")
    if not target.parent.is_dir():
        raise _UsageError(f"OUT {out!r}: directory {str(target.parent)!r} does not exist")


def write_output(checkpoint: Mapping[str, object], out: str) -> None:
    """Write ``checkpoint`` to OUT atomically (nothing is left behind when the write fails).

    Raises:
        ValueError: the file cannot be written (the message names it and why).
    """
    from lightning_freeze.core.checkpoint_io import save_checkpoint_atomic

    try:
        save_checkpoint_atomic(checkpoint, Path(out))
    except OSError as err:
        raise _UsageError(f"cannot write {out!r}: {err.strerror or err}") from None


def _merge(out: str, inputs: list[str], force: bool, ema: bool, unsafe_load: bool) -> int:
    if len(inputs) < 2:
        raise _UsageError(
            f"merge needs at least two input checkpoints after OUT, got {len(inputs)}: {inputs}"
        )
    check_output(out, inputs, force)
    from lightning_freeze.core.checkpoint_io import load_checkpoint
    from lightning_freeze.core.merge import merge_checkpoints

    # OUT is never an input and is written by rename, so the mapped inputs stay intact
    checkpoints = [load_checkpoint(path, unsafe_load=unsafe_load, mmap=True) for path in inputs]
    result = merge_checkpoints(checkpoints, names=[repr(p) for p in inputs], ema=ema)
    write_output(result.checkpoint, out)
    branches = ", ".join(f"{name} (from {inputs[i]})" for name, i in result.branches.items())
    print(
        f"merged {len(result.branches)} branch(es) on one shared backbone ({len(result.shared_keys)} shared "
        f"tensors, bitwise identical in all {len(inputs)} inputs): {branches}\nwrote {out}"
    )
    return EXIT_SAME


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
