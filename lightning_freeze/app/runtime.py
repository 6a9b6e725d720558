"""The app's process: logs into Hydra's ``train.log``, one-line errors, resume after a SLURM requeue.

No torch or Lightning import here: ``lightning-freeze-train --help`` stays fast.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "REQUEUE_ENV",
    "HydraErrorFilter",
    "log_to_files",
    "one_line",
    "quiet_console",
    "remove_if_unused",
    "requeued_checkpoint",
    "route_library_logs",
]

#: set by SLURM in a job that was requeued (preempted, or timed out with submitit's max_num_timeout)
REQUEUE_ENV = "SLURM_RESTART_COUNT"
_LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_freeze")


def route_library_logs() -> None:
    """Let Lightning's and the package's log records reach the root logger's handlers (Hydra's files).

    Lightning gives its loggers console handlers of their own (and stops propagation when it is
    imported before logging is configured); under Hydra the root logger writes to the console and to
    ``<output_dir>/<job name>.log``, so the records go there instead, once. Call it after importing
    Lightning.
    """
    root = logging.getLogger()
    if not root.handlers:
        return
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)


def quiet_console() -> None:
    """``quiet=true``: the console shows warnings and the summary; the log files keep every line."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))


def log_to_files(logger: logging.Logger, text: str) -> None:
    """Write ``text`` (already printed) to the log files of the root logger only, not the console again."""
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def requeued_checkpoint(output_dir: str | Path | None, checkpoint_dir: str | Path | None) -> str | None:
    """The checkpoint a requeued SLURM job resumes from: its own, in its own run directory.

    A requeued job (``SLURM_RESTART_COUNT`` > 0) runs again with the same config and output
    directory (hydra-submitit-launcher resubmits the same job). When Lightning saved an HPC
    checkpoint there (``hpc_ckpt_N.ckpt``: Lightning's own SLURM auto-requeue on ``SIGUSR1``),
    Lightning resumes from it itself and this returns ``None``; else the run's
    ``<checkpoints>/last.ckpt``, when there is one.

    Args:
        output_dir: the run's output directory (``trainer.default_root_dir``).
        checkpoint_dir: the ModelCheckpoint's ``dirpath``.

    Returns:
        the path to pass as ``ckpt_path``, or ``None`` (not requeued, or nothing to resume from).
    """
    try:
        restarts = int(os.environ.get(REQUEUE_ENV, "0"))
    except ValueError:
        restarts = 0
    if restarts <= 0 or checkpoint_dir is None:
        return None
    if output_dir is not None and any(Path(output_dir).glob("hpc_ckpt_*.ckpt")):
        return None
    last = Path(checkpoint_dir) / "last.ckpt"
    return str(last) if last.is_file() else None


# what Hydra writes into a run directory before the app starts
_HYDRA_FILES = frozenset({"config.yaml", "hydra.yaml", "overrides.yaml"})


def remove_if_unused(output_dir: Path) -> None:
    """Remove a failed run's output directory when it holds only what Hydra put there.

    Hydra creates the directory (its ``.hydra/`` record and the job's ``.log`` file) before the app
    runs; a run that fails before writing anything of its own leaves no directory behind. A
    directory with anything else in it (a checkpoint, logs, the user's files) is kept as it is.
    """
    if not output_dir.is_dir():
        return
    entries = list(output_dir.iterdir())
    hydra_dir = output_dir / ".hydra"
    for entry in entries:
        if entry == hydra_dir and entry.is_dir() and not entry.is_symlink():
            if not all(f.is_file() and f.name in _HYDRA_FILES for f in entry.iterdir()):
                return
        elif not (entry.is_file() and not entry.is_symlink() and entry.suffix == ".log"):
            return
    for handler in logging.getLogger().handlers:  # the job's .log file is about to go
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == output_dir:
            handler.close()
    for entry in entries:
        if entry == hydra_dir:
            for item in entry.iterdir():
                item.unlink()
            entry.rmdir()
        else:
            entry.unlink()
    output_dir.rmdir()


def one_line(err: BaseException) -> str:
    """An error as the one line the app prints: the message's lines joined, Hydra's hints dropped."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return _join(lines) or type(err).__name__


def _join(lines: list[str]) -> str:
    keep = [
        line
        for line in lines
        if not line.startswith(
            ("full_key:", "object_type=", "reference_type=", "Set the environment variable")
        )
    ]
    return "; ".join(line.rstrip(".;") if i < len(keep) - 1 else line for i, line in enumerate(keep))


class HydraErrorFilter(io.TextIOBase):
    """``sys.stderr`` while Hydra composes the config: holds what Hydra writes until the app starts.

    When composing fails (an unknown key, a missing config option) Hydra prints a multi-line error
    and exits with status 1; :meth:`flush_error` prints it as the app's one line ``Error: ...``.
    When the app starts, :meth:`release` writes what was held to the real stderr and steps aside.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.held = io.StringIO()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return self.held.write(text)

    def release(self) -> None:
        """Put the real stderr back and write what was held to it."""
        if sys.stderr is self:
            sys.stderr = self.stream
        self.stream.write(self.held.getvalue())
        self.held = io.StringIO()
        self.stream.flush()

    def flush_error(self) -> None:
        """Put the real stderr back and write what was held as one ``Error:`` line."""
        if sys.stderr is self:
            sys.stderr = self.stream
        lines = [line.strip() for line in self.held.getvalue().splitlines() if line.strip()]
        if lines:
            message = _join(lines)
            self.stream.write(message if message.startswith("Error") else f"Error: {message}")
            self.stream.write("\n")
        self.held = io.StringIO()
        self.stream.flush()
