"""Run the training app in this process (:func:`run_app`, :func:`run_app_ok`), as its console script does.

In-process is what most app tests need: ``lightning_freeze.train.main()``, the console script's
function, with ``sys.argv`` set, without the seconds a fresh interpreter spends importing torch,
Lightning and Hydra. The process state a run is known to change is put back after it (not all of
it: the app seeds the global RNG from its config, and routes Lightning's loggers once per process):
``sys.argv``, the working directory,
``os.environ`` (Lightning's ``PL_GLOBAL_SEED``, ...), the root logger's handlers (Hydra's console and
``train.log`` handlers), warning filters, torch's thread count and deterministic-algorithms flag, and
Hydra's global state. The tests of the entry point as a shell runs it (exit status, ``--help``
without torch, ``HYDRA_FULL_ERROR`` tracebacks, DDP relaunching the command line, the installed
wheel's console script, joblib workers) start a process of their own (``tests/test_train_app.py``,
``tests/test_app_errors.py``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class AppRun:
    """A run's exit status and what it printed (named as in a ``subprocess.CompletedProcess``)."""

    returncode: int
    stdout: str
    stderr: str
    #: ``os.environ`` as the run left it (before :func:`run_app` put the test's back)
    environ: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[int | str]:
        """``code, out, err = run_app(args)``."""
        return iter((self.returncode, self.stdout, self.stderr))


def _clear_hydra() -> None:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


def run_app(args: list[str], cwd: Path | None = None) -> AppRun:
    """``lightning-freeze-train *args`` in this process, in ``cwd``: its exit status and output.

    ``HYDRA_FULL_ERROR`` is unset for the run (a config mistake is then one ``Error:`` line, exit 1).
    An exception the app lets through propagates (a shell would see its traceback and exit 1).
    """
    import lightning_freeze.train as app

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    environ, argv, workdir = dict(os.environ), sys.argv, os.getcwd()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    out, err = io.StringIO(), io.StringIO()
    os.environ.pop("HYDRA_FULL_ERROR", None)
    sys.argv = ["lightning-freeze-train", *args]
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        _clear_hydra()
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                app.main()
            except SystemExit as exit_:  # sys.exit("text") prints the text and exits 1, as Python does
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if exit_.code is not None and not isinstance(exit_.code, int):
                    print(exit_.code, file=sys.stderr)
    finally:
        left = dict(os.environ)
        _clear_hydra()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        os.chdir(workdir)
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return AppRun(code, out.getvalue(), err.getvalue(), left)


def run_app_ok(args: list[str], cwd: Path | None = None) -> AppRun:
    """:func:`run_app`, and require exit 0 (the output's end in the message otherwise)."""
    result = run_app(args, cwd)
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result
