"""The app's process: logs into Hydra's ``train.log``, one-line errors, resume after a SLURM requeue.

No torch or Lightning import here: ``lightning-freeze-train --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "REQUEUE_ENV",
    "describe",
    "hydra_reports_errors_again",
    "log_to_files",
    "one_line",
    "quiet_console",
    "remove_if_unused",
    "report_errors_in_one_line",
    "requeued_checkpoint",
    "route_library_logs",
    "start_app",
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
    for handler in root.handlers:
        handler.addFilter(_no_product_tips)  # once: a filter already there is not added again
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


def start_app(cfg: Any) -> None:
    """Set up the process for a run Hydra has composed (the app's task, and the packed launcher).

    Hydra reports errors again (:func:`hydra_reports_errors_again`), Lightning's and the package's log
    lines reach Hydra's files once (:func:`route_library_logs`), ``quiet=true`` quiets the console,
    and known noise is filtered: Lightning's tips about its cloud products, its torch deprecation
    warning, and its notice about the intended per-branch validation. Imports Lightning.
    """
    import warnings

    import lightning  # noqa: F401 - before routing its log handlers

    hydra_reports_errors_again()
    route_library_logs()
    if cfg.get("quiet"):
        quiet_console()
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders")


def _no_product_tips(record: logging.LogRecord) -> bool:
    """Drops Lightning's advertising lines (``💡 Tip: ... try installing [litlogger] ...``)."""
    return not str(record.msg).lstrip().startswith("💡 Tip:")


def quiet_console() -> None:
    """``quiet=true``: the console shows warnings, the summary and the packed launcher's one line on
    how it runs the sweep; the log files keep every line."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_quiet)


def _quiet(record: logging.LogRecord) -> bool:
    """Passes warnings and errors, and the packed launcher's notices (packed, or why not)."""
    return record.levelno >= logging.WARNING or record.name.startswith(
        "hydra_plugins.lightning_freeze_packed_launcher"
    )


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
    root = logging.getLogger()
    for handler in list(root.handlers):  # the job's .log file is about to go, and its handler with it
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == output_dir:
            handler.close()
            root.removeHandler(handler)
    shutil.rmtree(output_dir)  # only Hydra's files and .log files, as checked above


def one_line(err: BaseException) -> str:
    """An error as the one line the app prints: the message's lines joined, Hydra's hints dropped."""
    hints = ("full_key:", "object_type=", "reference_type=", "Set the environment variable")
    lines = [line for line in map(str.strip, str(err).splitlines()) if line and not line.startswith(hints)]
    return "; ".join([*(line.rstrip(".;") for line in lines[:-1]), *lines[-1:]]) or type(err).__name__


#: optional plugins, as their absence shows in Hydra's errors, and the extra that installs each
_PLUGIN_EXTRAS = {
    "hydra_submitit_launcher": "slurm",
    "submitit_slurm": "slurm",
    "hydra_optuna_sweeper": "optuna",
    "hydra/sweeper/optuna": "optuna",
}


def describe(err: BaseException) -> str:
    """The one line (without ``Error: ``) for an error raised while Hydra composes or launches the run.

    Hydra's own errors keep their OmegaConf cause (``Key 'foo' is not in struct``); a missing optional
    plugin names the extra that installs it; an ``OSError`` (an output directory that cannot be
    created) names the path and says what to change.
    """
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    message = one_line(err)
    cause = err.__cause__
    if isinstance(err, CompactHydraException) and isinstance(cause, OmegaConfBaseException):
        message = f"{message.rstrip('.;')}; {one_line(cause)}"
    if isinstance(err, OSError) and err.filename is not None:
        message = (
            f"cannot write the output directory {str(err.filename)!r}: {err.strerror}; choose a writable "
            "one: hydra.run.dir=DIR (hydra.sweep.dir=DIR with -m) or paths.log_dir=DIR"
        )
    for plugin, extra in _PLUGIN_EXTRAS.items():
        if plugin in message:  # the first clause (not Hydra's list of options and search path)
            install = f'pip install "lightning-freeze[{extra}]"'
            return f"{message.split('; ')[0].rstrip('.;:')}; the plugin is not installed: {install}"
    return message


#: set (with HYDRA_FULL_ERROR=1) while Hydra composes the run for :func:`report_errors_in_one_line`
_OURS = "LIGHTNING_FREEZE_ONE_LINE_ERRORS"


def report_errors_in_one_line() -> bool:
    """Make Hydra raise what goes wrong before the app starts (the caller prints it in one line).

    Hydra prints its errors itself, as several lines or a traceback, unless ``HYDRA_FULL_ERROR=1``,
    when it raises them; this sets that variable for the composition, marked as the app's own.

    Returns:
        ``False`` when the user set ``HYDRA_FULL_ERROR=1`` (tracebacks wanted: nothing is changed).
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(_OURS) != "1":
        return False
    os.environ["HYDRA_FULL_ERROR"] = "1"
    os.environ[_OURS] = "1"
    return True


def hydra_reports_errors_again() -> None:
    """Undo :func:`report_errors_in_one_line` (the app has started: it reports its own errors, and
    the processes it starts, DDP ranks included, see the user's environment)."""
    if os.environ.pop(_OURS, None) is not None:
        os.environ.pop("HYDRA_FULL_ERROR", None)
