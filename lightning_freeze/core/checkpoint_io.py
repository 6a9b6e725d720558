"""Read and write checkpoint files: integrity-checked safe loading, atomic saving.

A "checkpoint" is either a Lightning checkpoint (a dict with a ``"state_dict"``) or a plain
``state_dict`` file (``{name: tensor}``). Loading is safe by default (``weights_only=True``: a file
that pickles code is refused, with a message that names ``unsafe_load``), checks the CRC-32 of every
zip entry (``torch.load`` alone loads flipped bits silently), and memory-maps the tensor data.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_freeze.core.errors import CheckpointError, CheckpointMismatchError
from lightning_freeze.core.files import write_atomic
from lightning_freeze.core.keys import EMA_STATE_PREFIX

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "checkpoint_state_dict",
    "ema_state_dict",
    "load_checkpoint",
    "save_checkpoint_atomic",
]


def load_checkpoint(
    path: str | os.PathLike[str], *, unsafe_load: bool = False, mmap: bool = False
) -> dict[str, Any]:
    """Load a checkpoint file onto the CPU.

    Args:
        path: a Lightning ``.ckpt`` or a file written by ``torch.save(state_dict)``.
        unsafe_load: load with ``torch.load(weights_only=False)``, which runs pickled code: only for
            files you trust (needed when a checkpoint pickles objects such as a ``functools.partial``
            or an OmegaConf ``DictConfig`` in its hyper-parameters).
        mmap: map the tensor data from the file instead of reading it into memory (zip-format files,
            ``torch.save``'s default; legacy files are read as usual): memory then costs what is
            touched, and the page cache can drop it again. The tensors stay backed by the file:
            do not truncate or rewrite the file in place while they are in use.

    Returns:
        the loaded dict.

    Raises:
        CheckpointError: the file is missing, unreadable, not a ``torch.save`` file, corrupt (the
            CRC-32 of every zip entry is checked: ``torch.load`` alone would load flipped bits
            silently) or truncated, needs ``unsafe_load``, or does not hold a dict. One line.
    """
    file = Path(path)
    name = repr(str(file))
    if not file.exists():
        raise CheckpointError(f"{name}: no such file")
    if file.is_dir():
        raise CheckpointError(f"{name}: is a directory, not a checkpoint file")
    try:
        with open(file, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise CheckpointError(f"{name}: cannot read ({err.strerror or err})") from None
    if not head:
        raise CheckpointError(f"{name}: empty file, not a checkpoint")
    if head == _ZIP_MAGIC:
        _check_zip_integrity(file, name)
    try:
        obj = torch.load(
            file, map_location="cpu", weights_only=not unsafe_load, mmap=mmap and head == _ZIP_MAGIC
        )
    except Exception as err:  # torch.load raises many types for bad files; all mean "cannot use it"
        text = " ".join(str(err).split())
        refused = _refused_global(text)
        if refused is not None:
            raise CheckpointError(
                f"{name}: it pickles Python objects that weights_only loading refuses "
                f"({refused}): loading them would import and run code named in the file; only if you "
                "trust this file, load it with unsafe_load=True (CLI: --unsafe-load)"
            ) from None
        if head == _ZIP_MAGIC:
            raise CheckpointError(f"{name}: corrupt or truncated checkpoint ({_reason(err, text)})") from None
        if head[:1] == _PICKLE_PROTOCOL:
            raise CheckpointError(
                f"{name}: corrupt or truncated checkpoint (legacy torch.save format: {_reason(err, text)})"
            ) from None
        raise CheckpointError(f"{name}: not a checkpoint (not a file written by torch.save)") from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{str(file)!r}: not a checkpoint: holds a {type(obj).__name__}, expected a dict "
            "(a Lightning checkpoint or a state_dict)"
        )
    return obj


def checkpoint_state_dict(
    checkpoint: Mapping[str, Any], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: its ``"state_dict"``, or the dict itself when it is a state_dict.

    Raises:
        CheckpointError: neither a ``"state_dict"`` entry nor a mapping of tensors.
    """
    if "state_dict" in checkpoint:
        state = checkpoint["state_dict"]
        if not isinstance(state, Mapping):
            raise CheckpointError(
                f"{source}: its 'state_dict' is a {type(state).__name__}, expected a mapping of tensors"
            )
    else:
        state = checkpoint
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors and state is not checkpoint:
        raise CheckpointError(f"{source}: its 'state_dict' holds no tensors")
    if not tensors:
        keys = ", ".join(repr(k) for k in list(checkpoint)[:8]) or "(none)"
        raise CheckpointError(
            f"{source}: not a checkpoint: no 'state_dict' entry and no tensors (top-level keys: {keys})"
        )
    return dict(state) if state is not checkpoint else tensors


def ema_state_dict(
    checkpoint: Mapping[str, Any], source: str = "checkpoint", state_key: str | None = None
) -> dict[str, Any]:
    """The checkpoint's ``state_dict`` with the weights averaged by ``FrozenSafeEMA`` swapped in.

    Every tensor the EMA shadowed (the tensors that were trainable) is replaced by its average,
    cast to the raw tensor's dtype; every other tensor (frozen ones) keeps its raw value, which the
    EMA never touched.

    Args:
        checkpoint: a loaded Lightning checkpoint written with a ``FrozenSafeEMA`` callback.
        source: how to call the checkpoint in error messages.
        state_key: which ``FrozenSafeEMA`` state when it holds several; default: the only one.

    Raises:
        CheckpointError: no (or several, without ``state_key``) ``FrozenSafeEMA`` state, or a shadow
            that does not fit the ``state_dict``.
    """
    state = checkpoint_state_dict(checkpoint, source)
    callbacks = checkpoint.get("callbacks") or {}
    found = {k: v for k, v in callbacks.items() if isinstance(k, str) and k.startswith(EMA_STATE_PREFIX)}
    if state_key is not None and state_key not in found:
        raise CheckpointError(
            f"{source}: no EMA state {state_key!r}; valid choices: {sorted(found) or 'none'}"
        )
    if state_key is None and len(found) != 1:
        hint = (
            "pass the state key of one of them" if found else "was it trained with a FrozenSafeEMA callback?"
        )
        raise CheckpointError(f"{source}: holds {len(found)} FrozenSafeEMA states {sorted(found)}; {hint}")
    entry = found[state_key] if state_key is not None else next(iter(found.values()))
    ema = entry.get("ema") if isinstance(entry, Mapping) else None
    if not isinstance(ema, Mapping) or not isinstance(ema.get("shadow"), Mapping):
        raise CheckpointError(
            f"{source}: its FrozenSafeEMA state holds no averaged weights (saved before fit?)"
        )
    out = dict(state)
    averaged_by_view: dict[tuple[Any, ...], torch.Tensor] = {}
    for key, value in ema["shadow"].items():
        raw = out.get(key)
        if not isinstance(raw, torch.Tensor) or raw.shape != value.shape:
            raise CheckpointError(f"{source}: EMA tensor {key!r} does not fit its state_dict")
        out[key] = averaged_by_view[_view_id(raw)] = value.to(raw.dtype)
    # a tied weight appears under several keys (views of one storage) but is shadowed under one only
    for key, raw in state.items():
        if isinstance(raw, torch.Tensor) and _view_id(raw) in averaged_by_view:
            out[key] = averaged_by_view[_view_id(raw)]
    return out


def _view_id(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
    )


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTOCOL = b"\x80"  # legacy torch.save format starts with a pickle protocol opcode


def _check_zip_integrity(file: Path, name: str) -> None:
    """Check the CRC-32 of every entry: ``torch.load`` does not, so flipped bits would load silently."""
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{name}: corrupt or truncated checkpoint ({type(err).__name__}: {err})"
        ) from None
    if bad is not None:
        raise CheckpointError(f"{name}: corrupt checkpoint (CRC-32 mismatch in entry {bad!r})")


def _reason(err: BaseException, text: str) -> str:
    """A short reason for a load failure, without torch's multi-paragraph advice."""
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation", 1)[0].strip()
    else:
        text = text.split(". ", 1)[0]
    text = text[:120] + ("..." if len(text) > 120 else "")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _refused_global(text: str) -> str | None:
    """What the safe unpickler refused, from ``torch.load``'s message; ``None`` for other errors.

    torch < 2.14 says ``Unsupported global: GLOBAL functools.partial was not an allowed global``;
    torch 2.14 says ``unsupported GLOBAL posix.system whose module posix is blocked`` for modules
    it never allows (``os``, ``subprocess``, ...).
    """
    allowed = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if allowed:
        return f"global {allowed.group(1)} is not on the allow-list"
    blocked = re.search(r"unsupported GLOBAL (\S+) whose module (\S+) is blocked", text)
    if blocked:
        return f"global {blocked.group(1)} from module {blocked.group(2)}, which is blocked"
    return None


def save_checkpoint_atomic(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it onto ``path``.

    A crash or an error while writing leaves no partial file at ``path`` (and removes the
    temporary file). The file gets the mode a plain ``open(path, "wb")`` would give it: the mode
    of the file it replaces, else ``0o666`` minus the umask
    (:func:`~lightning_freeze.core.files.write_atomic`).
    """
    write_atomic(path, lambda handle: torch.save(dict(checkpoint), handle))
