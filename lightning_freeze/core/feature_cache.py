"""Cache the outputs of a frozen module, keyed by each sample's input bits and the module's bits.

A frozen backbone computes the same features for the same sample every epoch. :class:`OutputCache`
attaches to such a module (no trainer needed) and serves its output from a store instead of
recomputing it, **exactly**:

* **Sample key**: BLAKE2b-128 of each sample's raw input bytes plus its dtype and shape (the
  sample is row ``i`` of every tensor argument of the forward call; other arguments go into the
  call key). Hashed on the CPU; inputs on an accelerator are copied to the host for hashing.
  Two different inputs share a key with probability at most ``n**2 / 2**129`` for ``n`` cached
  samples (about ``1.5e-21`` for a billion samples), and the module key must match as well.
* **Module key**: BLAKE2b-128 over the fingerprint of every parameter and buffer (bits, dtype,
  shape), the type, ``extra_repr`` and train/eval mode of every submodule, the input's device
  type, the autocast state and dtype, the float32-matmul/TF32/cuDNN/deterministic flags and the
  torch version. Another checkpoint, a changed buffer, another mode or precision never hits.
  The full fingerprint is recomputed whenever a cheap token (identity, data pointer, version
  counter and ``requires_grad`` of every tensor, mode of every submodule, autocast state)
  changes, so in-place updates and ``load_state_dict`` are seen at the next call. Writes through
  ``tensor.data`` (which bypasses version counters) are only seen by :meth:`OutputCache.refresh`
  (the Lightning callback refreshes at every epoch start).
* **Exact**: an entry holds the bits the module produced for that sample. Batches whose samples
  all miss run the module on the batch as given, so a run in a fixed order computes every batch
  exactly as without the cache. With shuffling a sample may be served from another batch than
  the one it would be computed in now; batched kernels can differ in the last bits between batch
  compositions, so shuffled runs match an uncached run closely, not bitwise.

Only a module that cannot change its output or itself is cached: no parameter requires grad, and
no running-statistics norm layer, dropout, ``DropPath``/``StochasticDepth`` or attention with
dropout is in train mode (:class:`UncacheableModuleError` otherwise). Random augmentation before
the module makes every input new: such calls only miss (the Lightning callback detects it and
stops caching training batches).

Example::

    >>> backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval().requires_grad_(False)
    >>> cache = OutputCache(backbone)              # store="memory" by default
    >>> x = torch.randn(3, 4)
    >>> with cache:                                # attached: backbone(x) goes through the cache
    ...     first, second = backbone(x), backbone(x)
    >>> torch.equal(first, second), cache.stats["hits"], cache.stats["misses"]
    (True, 3, 3)
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_freeze.core.fingerprint import fingerprint
from lightning_freeze.core.purity import purity_reasons
from lightning_freeze.core.validation import check_choice, check_int, choices_of

__all__ = [
    "MEMORY_DEVICES",
    "STORES",
    "DiskStore",
    "MemoryStore",
    "OutputCache",
    "UncacheableModuleError",
    "bypass_output_caches",
    "module_state_key",
    "sample_keys",
    "tensor_digest",
    "uncacheable_reasons",
]

StoreKind = Literal["memory", "disk"]
MemoryDevice = Literal["cpu", "output"]
STORES: tuple[str, ...] = choices_of(StoreKind)
MEMORY_DEVICES: tuple[str, ...] = choices_of(MemoryDevice)
KEY_BYTES = 16  # BLAKE2b-128
_FORMAT = b"lightning_freeze.feature_cache.v1"
_MAGIC = b"LFFCACHE1\n"
# magic | module key | sample key | header length | payload length | checksum of header+payload
_PREAMBLE = struct.Struct(f"<{len(_MAGIC)}s{KEY_BYTES}s{KEY_BYTES}sIQ{KEY_BYTES}s")
_FILE_SUFFIX = ".feat"
Structure = Any  # JSON-able description of an output: "T", ["tuple", [...]], ["list", [...]], ["dict", {...}]


class UncacheableModuleError(ValueError):
    """A module whose output is not a pure function of its input: it must not be cached."""


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------
def _host_bytes(tensor: torch.Tensor) -> memoryview:
    data = tensor.detach()
    if data.is_complex():
        data = torch.view_as_real(data)
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous()
    return memoryview(data.reshape(-1).view(torch.uint8).numpy())


def sample_keys(tensors: Sequence[torch.Tensor], context: bytes = b"") -> list[bytes]:
    """One 16-byte key per sample (row along dim 0) of ``tensors``.

    The key is BLAKE2b-128 over ``context`` and, for every tensor, its dtype, its per-sample shape
    and the raw bytes of row ``i`` (bits, not values: ``-0.0`` and ``0.0`` differ).

    Args:
        tensors: tensors with the same size along dim 0 (the batch).
        context: bytes mixed into every key (e.g. the non-tensor arguments of the call).

    Returns:
        ``len(tensors[0])`` keys.

    Raises:
        ValueError: no tensor, a 0-dim tensor, or tensors with different batch sizes.

    Example::

        >>> x = torch.zeros(2, 3)
        >>> a, b = sample_keys([x])
        >>> a == b, a == sample_keys([torch.zeros(1, 3, dtype=torch.float64)])[0]
        (True, False)
    """
    if not tensors or any(t.dim() == 0 for t in tensors):
        raise ValueError("sample_keys needs tensors with a batch dimension (dim 0).")
    batch = tensors[0].shape[0]
    if any(t.shape[0] != batch for t in tensors):
        raise ValueError(f"Tensors with different batch sizes: {[t.shape[0] for t in tensors]}.")
    prefix = hashlib.blake2b(context, digest_size=KEY_BYTES)
    views = []
    for t in tensors:
        prefix.update(f"{t.dtype}|{tuple(t.shape[1:])}|".encode())
        raw = _host_bytes(t)
        views.append((raw, len(raw) // batch if batch else 0))

    def key(i: int) -> bytes:
        h = prefix.copy()
        for raw, row in views:
            h.update(raw[i * row : (i + 1) * row])
        return h.digest()

    workers = min(torch.get_num_threads(), batch)
    if workers > 1 and sum(len(raw) for raw, _ in views) >= _PARALLEL_HASH_BYTES:
        # hashlib releases the GIL on large buffers: hash the samples on torch's intra-op threads
        return list(_hash_pool(workers).map(key, range(batch)))
    return [key(i) for i in range(batch)]


_PARALLEL_HASH_BYTES = 1 << 20
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _hash_pool(workers: int) -> ThreadPoolExecutor:
    # keyed by process id too: a forked child (DataLoader worker, multiprocessing) has no threads
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="lightning_freeze_hash")
    return _POOLS[key]


def _modes(module: nn.Module) -> tuple[bool, ...]:
    return tuple(m.training for m in module.modules())


def _context_flags(device_type: str) -> tuple[Any, ...]:
    """Global settings that change a module's output bits on ``device_type``."""
    try:
        autocast = (torch.is_autocast_enabled(device_type), str(torch.get_autocast_dtype(device_type)))
    except (RuntimeError, TypeError):  # a device type without autocast support
        autocast = (False, "")
    return (
        device_type,
        autocast,
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.__version__,
    )


def tensor_digest(module: nn.Module) -> bytes:
    """BLAKE2b-128 over the fingerprint (bits, dtype, shape) of every parameter and buffer of ``module``.

    Non-persistent buffers count too (they change the output as much as the others).
    """
    h = hashlib.blake2b(_FORMAT, digest_size=KEY_BYTES)
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    for key, fp in fingerprint(tensors).items():
        h.update(f"{key}|{fp.digest}|{fp.dtype}|{fp.shape}\n".encode())
    return h.digest()


def module_state_key(module: nn.Module, device_type: str = "cpu", tensors: bytes | None = None) -> bytes:
    """16-byte key of everything about ``module`` that determines its output bits.

    Covers every parameter and buffer (bits, dtype, shape: :func:`tensor_digest`), the type,
    ``extra_repr`` and mode of every submodule, and the global state that changes results on
    ``device_type`` (autocast enabled/dtype, float32 matmul precision, TF32 and cuDNN flags,
    deterministic algorithms, the torch version).

    Args:
        module: the module.
        device_type: where it computes (``"cpu"``, ``"cuda"``, ...).
        tensors: a :func:`tensor_digest` of ``module`` computed earlier (saves hashing the weights).

    Example::

        >>> net = nn.Linear(2, 2)
        >>> before = module_state_key(net)
        >>> with torch.no_grad():
        ...     _ = net.bias.add_(1)
        >>> before == module_state_key(net), before == module_state_key(net.eval())
        (False, False)
    """
    h = hashlib.blake2b(tensors if tensors is not None else tensor_digest(module), digest_size=KEY_BYTES)
    for name, sub in module.named_modules():
        cls = type(sub)
        h.update(f"{name}|{cls.__module__}.{cls.__qualname__}|{sub.extra_repr()}|{sub.training}\n".encode())
    h.update(repr(_context_flags(device_type)).encode())
    return h.digest()


def uncacheable_reasons(module: nn.Module, prefix: str = "", check_grad: bool = True) -> list[str]:
    """Why ``module``'s output may change between two calls on the same input (empty: cacheable).

    Checks that no parameter requires grad (it would be trained, and its output would need a
    gradient) and that no layer that is random or updates state in train mode would run in train
    mode: the one rule of :mod:`lightning_freeze.core.purity` (running-statistics norm layers,
    dropout, ``DropPath``/``StochasticDepth``/``DropBlock``, ``nn.MultiheadAttention`` with
    dropout; pinned layers and layers a freeze guard forces to eval count as eval). A custom layer
    that branches on ``self.training`` is not detected: put the module in eval mode (or freeze it
    with ``FreezeBackbone``) to be safe.

    Args:
        module: the module.
        prefix: its name, used in the messages.
        check_grad: also refuse parameters that require grad (``False`` under ``torch.no_grad()``,
            where a trainable module is as constant as a frozen one).
    """
    return purity_reasons(module, prefix, check_grad=check_grad)


# ---------------------------------------------------------------------------------------------
# output structures
# ---------------------------------------------------------------------------------------------
def _flatten(output: Any) -> tuple[list[torch.Tensor], Structure] | None:
    """Leaves and structure of a tensor / tuple / list / dict-of-str output; None if unsupported."""
    if isinstance(output, torch.Tensor):
        return [output], "T"
    if isinstance(output, (tuple, list)) and type(output) in (tuple, list):
        leaves: list[torch.Tensor] = []
        specs = []
        for item in output:
            flat = _flatten(item)
            if flat is None:
                return None
            leaves += flat[0]
            specs.append(flat[1])
        return leaves, [type(output).__name__, specs]
    if isinstance(output, Mapping) and all(isinstance(k, str) for k in output):
        leaves, specs = [], {}
        for key, item in output.items():
            flat = _flatten(item)
            if flat is None:
                return None
            leaves += flat[0]
            specs[key] = flat[1]
        return leaves, ["dict", specs]
    return None


def _stack_entries(entries: Sequence[tuple[Structure, list[torch.Tensor]]], device: torch.device) -> Any:
    """The batched output of per-sample entries (same structure), on ``device``."""
    leaves = [torch.stack([e[1][j] for e in entries]).to(device) for j in range(len(entries[0][1]))]
    return _unflatten(leaves, entries[0][0])


def _unflatten(leaves: Iterable[torch.Tensor], structure: Structure) -> Any:
    it = iter(leaves)

    def build(spec: Structure) -> Any:
        if spec == "T":
            return next(it)
        kind, items = spec
        if kind == "dict":
            return {k: build(s) for k, s in items.items()}
        built = [build(s) for s in items]
        return tuple(built) if kind == "tuple" else built

    return build(structure)


# ---------------------------------------------------------------------------------------------
# stores
# ---------------------------------------------------------------------------------------------
Entry = tuple[Structure, list[torch.Tensor]]


def _entry_bytes(leaves: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in leaves)


class MemoryStore:
    """Entries in a dict, on the CPU (``device="cpu"``) or where the module produced them (``"output"``).

    Attributes:
        bytes: tensor bytes held (the dict itself adds about 200 bytes per entry).
    """

    kind = "memory"

    def __init__(self, device: str = "cpu") -> None:
        self.device = check_choice("device", device, MEMORY_DEVICES)
        self._entries: dict[bytes, dict[bytes, Entry]] = {}
        self.bytes = 0

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
        size = _entry_bytes(leaves)
        self.bytes += size
        return size

    def held_bytes(self, state: bytes) -> int:
        """Bytes held for ``state`` (the budget counts all states)."""
        return self.bytes

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()
        self.bytes = 0


class DiskStore:
    """One file per sample under ``directory/<module key>/<2 hex>/<sample key>.feat``.

    Safe to share between later runs and concurrent processes: a file is written to a temporary
    name in the same folder and moved into place with ``os.replace`` (atomic), so a reader sees a
    complete file or none. Every file starts with a magic string, the module key, the sample key,
    the lengths and a BLAKE2b checksum of its content; a truncated, corrupt or foreign file is
    never served: it counts as a miss, is deleted and rewritten by the next store.

    Args:
        directory: cache folder (created if missing; must be writable).
    """

    kind = "disk"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser()
        check_writable_directory(self.directory)
        self.corrupt = 0
        self._held: dict[bytes, int] = {}

    def _path(self, state: bytes, key: bytes) -> Path:
        hexkey = key.hex()
        return self.directory / state.hex() / hexkey[:2] / (hexkey[2:] + _FILE_SUFFIX)

    def held_bytes(self, state: bytes) -> int:
        """Bytes of the files stored for ``state`` (scanned once, then counted as written)."""
        if state not in self._held:
            total = 0
            root = self.directory / state.hex()
            if root.is_dir():
                for sub in os.scandir(root):
                    if sub.is_dir():
                        total += sum(
                            f.stat().st_size for f in os.scandir(sub.path) if f.name.endswith(_FILE_SUFFIX)
                        )
            self._held[state] = total
        return self._held[state]

    @property
    def bytes(self) -> int:
        """Bytes of the files of every module state this store has used."""
        return sum(self._held.values())

    def get(self, state: bytes, key: bytes) -> Entry | None:
        """Read and verify the file of ``(state, key)``; ``None`` if absent or invalid."""
        path = self._path(state, key)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        entry = _decode(data, state, key)
        if entry is None:
            self.corrupt += 1
            try:
                os.remove(path)
            except OSError:
                pass
        return entry

    def put(self, state: bytes, key: bytes, structure: Structure, leaves: list[torch.Tensor]) -> int:
        """Write the entry atomically; returns the file size (0 if a valid file already exists)."""
        path = self._path(state, key)
        if path.exists():
            return 0
        held = self.held_bytes(state)
        data = _encode(state, key, structure, leaves)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=_FILE_SUFFIX + ".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
        self._held[state] = held + len(data)
        return len(data)


def _encode(state: bytes, key: bytes, structure: Structure, leaves: Sequence[torch.Tensor]) -> bytes:
    raws = [bytes(_host_bytes(t)) for t in leaves]
    header = json.dumps(
        {"structure": structure, "leaves": [[str(t.dtype), list(t.shape)] for t in leaves]},
        separators=(",", ":"),
    ).encode()
    payload = b"".join(raws)
    checksum = hashlib.blake2b(header + payload, digest_size=KEY_BYTES).digest()
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
        or hashlib.blake2b(body, digest_size=KEY_BYTES).digest() != checksum
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


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------
_BYPASS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "lightning_freeze_bypass_caches", default=False
)


@contextlib.contextmanager
def bypass_output_caches() -> Iterator[None]:
    """Inside this block every attached :class:`OutputCache` computes (and neither reads nor stores).

    For calls that must see the module's real function, such as ``FreezeBackbone``'s output probe:
    a cached output would only prove that the cache is consistent with itself.
    """
    token = _BYPASS.set(True)
    try:
        yield
    finally:
        _BYPASS.reset(token)


class _CachedForward:
    """What :meth:`OutputCache.attach` puts in ``module.forward``.

    Pickling or deep-copying the module gives a copy with its own, uncached forward.
    """

    def __init__(self, cache: OutputCache) -> None:
        self.cache = cache

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.cache._forward(*args, **kwargs)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return _plain_forward, (self.cache.module,)


def _plain_forward(module: nn.Module) -> Callable[..., Any]:
    return type(module).forward.__get__(module)


class OutputCache:
    """Serve a frozen module's output from a store; compute it only for samples not seen before.

    Attach it (``attach()``, or ``with cache:``) and call the module as usual: the forward is
    replaced on the instance only, so ``state_dict``, hooks and the module's class are unchanged,
    and :meth:`detach` restores the plain forward. A call is cached when its tensor arguments
    share a batch dimension and its output is a tensor, or a tuple/list/dict of tensors, with that
    batch dimension (e.g. a feature pyramid); any other call runs the module as usual
    (``stats["bypassed"]``).

    Args:
        module: the frozen module (no parameter requiring grad, stochastic layers in eval mode).
        store: ``"memory"`` (default) or ``"disk"``, or a store object.
        directory: cache folder, required for ``store="disk"``.
        max_bytes: optional budget in bytes. When an entry would exceed it, the cache stops
            admitting new entries (what is stored stays and keeps hitting; other samples are
            computed every time) and ``stats["full"]`` becomes True. For the disk store the budget
            counts the files of the current module key already in the folder.
        device: memory store only: ``"cpu"`` (default, host RAM) or ``"output"`` (keep entries on
            the device that produced them, e.g. GPU memory).
        on_uncacheable: ``"raise"`` (default) raises :class:`UncacheableModuleError` when the
            module becomes uncacheable (e.g. unfrozen); ``"disable"`` switches the cache off for
            good and calls ``on_disable`` with the reason.
        on_disable: called once with a message when the cache switches itself off.
        name: the module's name in messages and parameter names (default: its class name).

    Attributes:
        stats: ``hits``, ``misses`` (samples), ``bypassed`` (calls not cacheable), ``stored``,
            ``bytes`` (held by the store), ``rejected`` (samples not admitted: budget full),
            ``corrupt`` (invalid disk files found), ``compute_s`` (seconds spent computing misses),
            ``time_saved_s`` (hits x mean compute time per missed sample, an estimate).
        enabled: False once the cache switched itself off (calls run the plain module).
        lookup: when False, calls run the plain module without hashing (e.g. random inputs).
        storing: when False, misses are computed but not stored.

    Raises:
        ValueError: unknown ``store``/``device``/``on_uncacheable``, ``max_bytes <= 0``, or a
            missing/unwritable ``directory``.
    """

    def __init__(
        self,
        module: nn.Module,
        store: Literal["memory", "disk"] | MemoryStore | DiskStore = "memory",
        directory: str | os.PathLike[str] | None = None,
        max_bytes: int | None = None,
        device: Literal["cpu", "output"] = "cpu",
        on_uncacheable: Literal["raise", "disable"] = "raise",
        on_disable: Callable[[str], None] | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"OutputCache caches an nn.Module, got {type(module).__name__}.")
        self.module = module
        self.max_bytes = check_max_bytes(max_bytes)
        self.store = (
            store if isinstance(store, (MemoryStore, DiskStore)) else make_store(store, directory, device)
        )
        self.on_uncacheable = check_choice("on_uncacheable", on_uncacheable, ("raise", "disable"))
        self.on_disable = on_disable
        self.name = name or type(module).__name__
        self._prefix = name or ""
        self.enabled = True
        self.lookup = True
        self.storing = True
        self.disabled_reason: str | None = None
        # calls of the attached forward (outside bypass_output_caches); (module key, sample keys, misses)
        # of the latest call that looked the samples up
        self.calls = 0
        self.last_call: tuple[bytes, list[bytes], int] | None = None
        # when set, every call of the attached forward goes to it instead (see FeatureCache skip_pipeline)
        self.redirect: Callable[..., Any] | None = None
        self._token: tuple[Any, ...] | None = None
        self._tensor_token: tuple[Any, ...] | None = None
        self._tensors: bytes | None = None
        self._state: bytes | None = None
        self._compute_samples = 0
        self.stats: dict[str, Any] = {}
        self.reset_stats()

    # -- public -----------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the counters (``bytes`` keeps reporting what the store holds)."""
        self.stats.update(
            hits=0,
            misses=0,
            bypassed=0,
            stored=0,
            rejected=0,
            corrupt=0,
            full=False,
            compute_s=0.0,
            time_saved_s=0.0,
            bytes=self.store.bytes,
        )
        self._compute_samples = 0
        self._corrupt_base = getattr(self.store, "corrupt", 0)

    @property
    def attached(self) -> bool:
        """Whether the module's forward currently goes through this cache."""
        fwd = self.module.__dict__.get("forward")
        return isinstance(fwd, _CachedForward) and fwd.cache is self

    def attach(self, check: bool = True) -> OutputCache:
        """Route ``module(...)`` through the cache.

        Args:
            check: first check that the module is cacheable now (:meth:`check`). Every call
                checks again whenever the module changed.

        Raises:
            UncacheableModuleError: the module is trainable or has stochastic layers in train mode.
            RuntimeError: another cache is attached to the module.
        """
        fwd = self.module.__dict__.get("forward")
        if fwd is not None and not self.attached:
            raise RuntimeError(
                f"{self.name} already has an instance-level forward (another OutputCache?): detach it first."
            )
        if check:
            self.check()
        self.module.forward = _CachedForward(self)  # type: ignore[method-assign]
        return self

    def detach(self) -> None:
        """Restore the module's own forward (the store keeps its entries)."""
        if self.attached:
            del self.module.forward

    def __enter__(self) -> OutputCache:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def check(self, name: str | None = None, check_grad: bool = True) -> None:
        """Raise :class:`UncacheableModuleError` if the module cannot be cached now.

        Args:
            name: the module's name for the message (default: its class name).
            check_grad: also refuse parameters that require grad (see :func:`uncacheable_reasons`).
        """
        reasons = uncacheable_reasons(self.module, prefix=name or "", check_grad=check_grad)
        if reasons:
            raise UncacheableModuleError(
                f"Cannot cache {name or self.name}: " + "; ".join(reasons) + ". Freeze it first "
                "(lightning_freeze.core.freeze or the FreezeBackbone callback with norm='eval'/'frozen' "
                "and dropout='eval'), or do not cache it."
            )

    def refresh(self) -> None:
        """Recompute the module key at the next call (sees even writes through ``tensor.data``)."""
        self._token = None
        self._tensor_token = None

    def disable(self, reason: str) -> None:
        """Switch the cache off for good: calls run the plain module; ``on_disable(reason)`` once."""
        if self.enabled:
            self.enabled = False
            self.disabled_reason = reason
            if self.on_disable is not None:
                self.on_disable(reason)

    @property
    def state_key(self) -> bytes | None:
        """Module key of the latest cached call (``None`` before the first)."""
        return self._state

    # -- internals -------------------------------------------------------------------------------
    def _plain(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)

    def current_tensor_digest(self) -> bytes:
        """:func:`tensor_digest` of the module; hashed again only when a tensor changed or after refresh()."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        return self._tensor_digest(
            tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        )

    def _tensor_digest(self, tensor_token: tuple[Any, ...]) -> bytes:
        if self._tensors is None or self._tensor_token != tensor_token:  # hash only when a tensor changed
            self._tensors = tensor_digest(self.module)
            self._tensor_token = tensor_token
        return self._tensors

    def _current_state(self, device_type: str) -> bytes | None:
        module = self.module
        tensors = [*module.parameters(), *module.buffers()]
        tensor_token = tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        grad = torch.is_grad_enabled()
        token = (
            tensor_token,
            tuple(t.requires_grad for t in tensors),
            grad,
            _modes(module),
            _context_flags(device_type),
        )
        if token != self._token:
            reasons = uncacheable_reasons(module, prefix=self._prefix, check_grad=grad)
            if reasons:
                message = f"{self.name} is no longer cacheable: " + "; ".join(reasons)
                if self.on_uncacheable == "raise":
                    raise UncacheableModuleError(message)
                self.disable(message + "; the cache is off from now on")
                return None
            self._tensor_digest(tensor_token)
            self._state = module_state_key(module, device_type, tensors=self._tensors)
            self._token = token
            self.store.held_bytes(self._state)  # the disk store scans what other runs stored
            self.stats["bytes"] = self.store.bytes
        return self._state

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if _BYPASS.get():  # e.g. FreezeBackbone's output probe: not counted as a call
            return self._plain(*args, **kwargs)
        self.calls += 1
        self.last_call = None
        if self.redirect is not None:
            return self.redirect(*args, **kwargs)
        if not (self.enabled and self.lookup):
            return self._plain(*args, **kwargs)
        batched = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        batch = batched[0].shape[0] if batched and batched[0].dim() > 0 else None
        others = [(i, a) for i, a in enumerate(args) if not isinstance(a, torch.Tensor)]
        others += [(k, v) for k, v in sorted(kwargs.items()) if not isinstance(v, torch.Tensor)]
        if batch is None or batch == 0 or any(t.dim() == 0 or t.shape[0] != batch for t in batched):
            self.stats["bypassed"] += 1
            return self._plain(*args, **kwargs)
        context = repr(others).encode() if others else b""
        if b" at 0x" in context:  # an object without a stable repr: cannot be part of a key
            self.stats["bypassed"] += 1
            return self._plain(*args, **kwargs)
        device = batched[0].device
        state = self._current_state(device.type)
        if state is None:
            return self._plain(*args, **kwargs)
        context += b"|" + "|".join(f"{k}" for k in kwargs if isinstance(kwargs[k], torch.Tensor)).encode()
        keys = sample_keys(batched, context)
        entries = [self.store.get(state, k) for k in keys]
        self.stats["corrupt"] = getattr(self.store, "corrupt", 0) - self._corrupt_base
        missing = [i for i, e in enumerate(entries) if e is None]
        self.last_call = (state, keys, len(missing))
        self.stats["hits"] += batch - len(missing)
        self.stats["misses"] += len(missing)
        if not missing:
            self._account_saved()
            return _stack_entries(entries, device)  # type: ignore[arg-type]

        if len(missing) == batch:
            output = self._timed(args, kwargs, batch)
            flat = _flatten(output)
            if flat is None or any(t.dim() == 0 or t.shape[0] != batch for t in flat[0]):
                self._unsupported(output)
                return output
            self._store(state, keys, flat[1], flat[0])
            self._account_saved()
            return output

        # mixed batch: compute the missing samples only, assemble in the batch's order
        index = torch.tensor(missing, device=device)
        sub_args = [a.index_select(0, index) if isinstance(a, torch.Tensor) else a for a in args]
        sub_kwargs = {
            k: v.index_select(0, index) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
        }
        output = self._timed(sub_args, sub_kwargs, len(missing))
        flat = _flatten(output)
        hit = next(e for e in entries if e is not None)
        if (
            flat is None
            or flat[1] != hit[0]
            or any(t.dim() == 0 or t.shape[0] != len(missing) for t in flat[0])
        ):
            # cannot assemble: recompute the whole batch plainly (correct, just not cached)
            self._unsupported(output)
            return self._plain(*args, **kwargs)
        computed, structure = flat
        self._store(state, [keys[i] for i in missing], structure, computed)
        position = {i: n for n, i in enumerate(missing)}
        leaves = []
        for j, leaf in enumerate(computed):
            rows = [
                leaf[position[i]] if e is None else e[1][j].to(device)  # type: ignore[index]
                for i, e in enumerate(entries)
            ]
            leaves.append(torch.stack(rows))
        self._account_saved()
        return _unflatten(leaves, structure)

    def stored_output(self, state: bytes, keys: Sequence[bytes], device: torch.device) -> Any | None:
        """The batched output stored under ``state`` for ``keys`` (on ``device``); ``None`` if one is missing.

        Counts the samples as hits. Used to serve a batch without calling the module.
        """
        entries = [self.store.get(state, k) for k in keys]
        if not entries or any(e is None for e in entries):
            return None
        self.stats["hits"] += len(keys)
        self._account_saved()
        return _stack_entries(entries, device)  # type: ignore[arg-type]

    def _timed(self, args: Sequence[Any], kwargs: Mapping[str, Any], samples: int) -> Any:
        start = time.perf_counter()
        output = self._plain(*args, **kwargs)
        self.stats["compute_s"] += time.perf_counter() - start
        self._compute_samples += samples
        return output

    def _account_saved(self) -> None:
        if self._compute_samples:
            self.stats["time_saved_s"] = self.stats["hits"] * self.stats["compute_s"] / self._compute_samples

    def _unsupported(self, output: Any) -> None:
        self.stats["bypassed"] += 1
        self.disable(
            f"{self.name} returned {type(output).__name__}, not a tensor or a tuple/list/dict of tensors "
            "with the batch dimension first; the cache is off from now on"
        )

    def _store(
        self,
        state: bytes,
        keys: Sequence[bytes],
        structure: Structure,
        leaves: Sequence[torch.Tensor],
    ) -> None:
        if not self.storing:
            return
        if self.stats["full"] and self.max_bytes is not None:
            self.stats["rejected"] += len(keys)
            return
        target = None if isinstance(self.store, MemoryStore) and self.store.device == "output" else "cpu"
        copies = [t.detach().to(target, copy=True) if target else t.detach().clone() for t in leaves]
        for row, key in enumerate(keys):
            sample = [c[row] for c in copies]
            if self.max_bytes is not None:
                if self.store.held_bytes(state) + _entry_bytes(sample) > self.max_bytes:
                    self.stats["full"] = True
                    self.stats["rejected"] += 1
                    continue
                sample = [s.clone() for s in sample]  # own storage: the budget counts what is kept
            added = self.store.put(state, key, structure, sample)
            self.stats["stored"] += bool(added)
        self.stats["bytes"] = self.store.bytes
