"""Stores of the feature cache: entries in memory, or one checksummed file per sample on disk."""

from __future__ import annotations

import json
import os
import struct
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import xxhash

from lightning_freeze.core.bits import raw_bytes
from lightning_freeze.core.cache_keys import FORMAT_VERSION, KEY_BYTES
from lightning_freeze.core.files import write_atomic
from lightning_freeze.core.validation import check_choice, check_int, choices_of

__all__ = [
    "MEMORY_DEVICES",
    "STORES",
    "DiskStore",
    "Entry",
    "MemoryStore",
    "check_max_bytes",
    "check_writable_directory",
    "make_store",
]

StoreKind = Literal["memory", "disk"]
MemoryDevice = Literal["cpu", "output"]
STORES: tuple[str, ...] = choices_of(StoreKind)
MEMORY_DEVICES: tuple[str, ...] = choices_of(MemoryDevice)
# the file format version is the key format version: a file of another version is never decoded
_MAGIC = b"LFFCACHE%d\n" % FORMAT_VERSION
# magic | module key | sample key | header length | payload length | checksum of header+payload
_PREAMBLE = struct.Struct(f"<{len(_MAGIC)}s{KEY_BYTES}s{KEY_BYTES}sIQ{KEY_BYTES}s")
_FILE_SUFFIX = ".feat"

Structure = Any  # JSON-able description of an output (see lightning_freeze.core.structure)
Entry = tuple[Structure, list[torch.Tensor]]


def entry_bytes(leaves: Sequence[torch.Tensor]) -> int:
    """Tensor bytes of one entry's leaves."""
    return sum(t.numel() * t.element_size() for t in leaves)


class MemoryStore:
    """Entries in a dict, on the CPU (``device="cpu"``) or where the module produced them (``"output"``).

    Attributes:
        bytes: tensor bytes held (the dict itself adds about 200 bytes per entry).
    """

    kind = "memory"
    failed: str | None = None  # a memory store does not fail (see DiskStore.failed)

    def __init__(self, device: str = "cpu") -> None:
        self.device = check_choice("device", device, MEMORY_DEVICES)
        self._entries: dict[bytes, dict[bytes, Entry]] = {}
        self.bytes = 0
        # bumped by clear(): tensors gathered from earlier entries no longer stand for the store
        self.generation = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def get(self, state: bytes, key: bytes) -> Entry | None:
        """The entry stored under ``(state, key)``, or ``None``."""
        return self._entries.get(state, {}).get(key)

    def put(self, state: bytes, key: bytes, structure: Structure, leaves: list[torch.Tensor]) -> int:
        """Store an entry (the leaves are kept as given); returns the bytes added (0 if present)."""
        bucket = self._entries.setdefault(state, {})
        if key in bucket:
            return 0
        bucket[key] = (structure, leaves)
        size = entry_bytes(leaves)
        self.bytes += size
        return size

    def held_bytes(self, state: bytes) -> int:
        """Bytes held for ``state`` (the budget counts all states)."""
        return self.bytes

    def gather(self, state: bytes, keys: Sequence[bytes]) -> Entry | None:
        """The entries of ``keys`` as one contiguous tensor per leaf (row ``i``: ``keys[i]``), or ``None``.

        The entries are re-pointed at the rows of those tensors (the same bits; no second copy is
        kept), so a batch of them is one ``index_select`` instead of a stack of rows. ``None`` when a
        key is missing or the entries differ in structure or leaf shapes.
        """
        bucket = self._entries.get(state)
        entries = [bucket.get(k) for k in keys] if bucket is not None else []
        if not entries or any(e is None for e in entries):
            return None
        structure = entries[0][0]  # type: ignore[index]
        if any(e[0] is not structure and e[0] != structure for e in entries):  # type: ignore[index]
            return None
        try:
            leaves = [torch.stack([e[1][j] for e in entries]) for j in range(len(entries[0][1]))]  # type: ignore[index]
        except RuntimeError:  # rows of different shapes
            return None
        for row, key in enumerate(keys):
            bucket[key] = (structure, [leaf[row] for leaf in leaves])  # type: ignore[index]
        return structure, leaves

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()
        self.bytes = 0
        self.generation += 1


class DiskStore:
    """One file per sample under ``directory/<module key>/<2 hex>/<sample key>.feat``.

    Safe to share between later runs and concurrent processes: a file is written to a temporary
    name in the same folder, flushed to the disk (``fsync``) and moved into place with
    ``os.replace`` (atomic), so a reader sees a complete file or none. Every file starts with a
    magic string naming the format version, the module key, the sample key, the lengths and an
    XXH3-128 checksum of its content; a truncated, corrupt, foreign or older-format file is never
    served: it counts as a miss, is deleted and rewritten by the next store.

    **A failing disk never stops training.** The first ``OSError`` of any store operation (a full
    disk, a folder that became read-only, an I/O error) turns the store off for good with one
    ``RuntimeWarning`` (``failed`` says why): from then on it holds nothing and stores nothing, so
    every sample is computed, exactly as without the cache.

    Args:
        directory: cache folder (created if missing; must be writable).

    Attributes:
        failed: ``None``, or the error that turned the store off.
        corrupt: invalid files found (and removed).
    """

    kind = "disk"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser()
        check_writable_directory(self.directory)
        self.corrupt = 0
        self.failed: str | None = None
        self._held: dict[bytes, int] = {}

    def _path(self, state: bytes, key: bytes) -> Path:
        hexkey = key.hex()
        return self.directory / state.hex() / hexkey[:2] / (hexkey[2:] + _FILE_SUFFIX)

    def _fail(self, operation: str, err: OSError) -> None:
        if self.failed is None:
            self.failed = f"{operation} failed: {err}"
            warnings.warn(
                f"FeatureCache: the disk store in {str(self.directory)!r} is off from now on "
                f"({self.failed}); "
                "training goes on and computes every sample, with the results it would have without the "
                "cache. Free space or fix the folder to cache again in a later run.",
                RuntimeWarning,
                stacklevel=3,
            )

    def held_bytes(self, state: bytes) -> int:
        """Bytes of the files stored for ``state`` (scanned once, then counted as written)."""
        if state not in self._held:
            total = 0
            root = self.directory / state.hex()
            if self.failed is None:
                try:
                    if root.is_dir():
                        for sub in os.scandir(root):
                            if sub.is_dir():
                                total += sum(
                                    f.stat().st_size
                                    for f in os.scandir(sub.path)
                                    if f.name.endswith(_FILE_SUFFIX)
                                )
                except FileNotFoundError:  # removed by a concurrent process while scanning
                    pass
                except OSError as err:
                    self._fail("scanning the cache folder", err)
            self._held[state] = total
        return self._held[state]

    @property
    def bytes(self) -> int:
        """Bytes of the files of every module state this store has used."""
        return sum(self._held.values())

    def get(self, state: bytes, key: bytes) -> Entry | None:
        """Read and verify the file of ``(state, key)``; ``None``: absent, invalid or the store is off."""
        if self.failed is not None:
            return None
        path = self._path(state, key)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            self._fail("reading a cache file", err)
            return None
        entry = _decode(data, state, key)
        if entry is None:
            self.corrupt += 1
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                self._fail("removing an invalid cache file", err)
        return entry

    def put(self, state: bytes, key: bytes, structure: Structure, leaves: list[torch.Tensor]) -> int:
        """Write the entry atomically; returns the file size (0: a valid file exists or the store is off)."""
        if self.failed is not None:
            return 0
        path = self._path(state, key)
        held = self.held_bytes(state)
        data = _encode(state, key, structure, leaves)
        try:
            if path.exists():
                return 0
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda handle: handle.write(data))
        except OSError as err:
            self._fail("writing a cache file", err)
            return 0
        self._held[state] = held + len(data)
        return len(data)


def _encode(state: bytes, key: bytes, structure: Structure, leaves: Sequence[torch.Tensor]) -> bytes:
    raws = [bytes(raw_bytes(t)) for t in leaves]
    header = json.dumps(
        {"structure": structure, "leaves": [[str(t.dtype), list(t.shape)] for t in leaves]},
        separators=(",", ":"),
    ).encode()
    payload = b"".join(raws)
    checksum = xxhash.xxh3_128_digest(header + payload)
    return _PREAMBLE.pack(_MAGIC, state, key, len(header), len(payload), checksum) + header + payload


def _decode(data: bytes, state: bytes, key: bytes) -> Entry | None:
    if len(data) < _PREAMBLE.size:
        return None
    magic, file_state, file_key, header_len, payload_len, checksum = _PREAMBLE.unpack_from(data)
    body = data[_PREAMBLE.size :]
    if (
        magic != _MAGIC
        or file_state != state
        or file_key != key
        or len(body) != header_len + payload_len
        or xxhash.xxh3_128_digest(body) != checksum
    ):
        return None
    try:
        header = json.loads(body[:header_len])
        leaves = []
        offset = _PREAMBLE.size + header_len
        buffer = bytearray(data)  # torch.frombuffer needs a writable buffer
        for dtype_name, shape in header["leaves"]:
            leaf = torch.empty(shape, dtype=getattr(torch, dtype_name.removeprefix("torch.")))
            size = leaf.numel() * leaf.element_size()
            if size:  # copied byte-wise into a fresh, aligned tensor
                raw = torch.frombuffer(buffer, dtype=torch.uint8, count=size, offset=offset)
                leaf.reshape(-1).view(torch.uint8).copy_(raw)
            leaves.append(leaf)
            offset += size
        if offset != len(data):
            return None
        return header["structure"], leaves
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None


def check_writable_directory(directory: Path) -> None:
    """Create ``directory`` if needed and check that files can be written there.

    Raises:
        ValueError: naming the directory and the OS error.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ValueError(
            f"Invalid directory={str(directory)!r} for store='disk': cannot write there ({err}); "
            "valid choices: a writable folder (created if missing)."
        ) from err


def check_max_bytes(max_bytes: Any) -> int | None:
    """Validate a byte budget: ``None`` (no limit) or an integer > 0."""
    return check_int(
        "max_bytes", max_bytes, minimum=1, allow_none=True, valid="None (no limit) or an integer > 0"
    )


def make_store(
    store: str, directory: str | os.PathLike[str] | None, device: str = "cpu"
) -> MemoryStore | DiskStore:
    """Build the store named by ``store`` (``"memory"`` or ``"disk"``), validating its arguments."""
    check_choice("store", store, STORES)
    if store == "disk":
        if directory is None:
            raise ValueError(
                "store='disk' needs directory=<a writable folder> (shared by later runs and parallel jobs); "
                "got directory=None."
            )
        return DiskStore(directory)
    return MemoryStore(device)
