"""Files written whole or not at all: the one atomic-write helper of the package."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["current_umask", "write_atomic"]


def write_atomic(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], None],
    *,
    mode: int | None = None,
    fsync: bool = True,
) -> None:
    """Write a file through ``write(handle)`` into a temporary file next to ``path``, then rename it.

    A reader sees the complete old file, the complete new file, or no file; a crash or an error
    while writing leaves no partial file at ``path`` (the temporary file is removed and the error
    raised). With ``fsync`` the data reach the disk before the rename, so a power loss cannot leave
    a renamed but empty file.

    Args:
        path: the file to create or replace (its folder must exist).
        write: writes the content into the binary handle it is given.
        mode: permission bits of the new file; default: those of the file it replaces, else what a
            plain ``open(path, "wb")`` would give (``0o666`` minus the umask).
        fsync: flush the data to the disk before the rename.

    Raises:
        OSError: the folder is missing or not writable, the disk is full, ...
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if mode is None:
        try:  # an overwritten file keeps its mode, as with open(path, "wb")
            mode = stat.S_IMODE(target.stat().st_mode)
        except OSError:
            mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, mode)  # mkstemp creates 0600; a plain file create respects the umask
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(mask)
    return mask
