"""Private random streams: code run inside one draws from it and leaves the global generators untouched.

:class:`~lightning_freeze.MultiBranchModule` runs each trained branch inside its own stream, so a
branch with dropout neither changes nor depends on what the data loader, the backbone or a sibling
branch draws. Pure PyTorch; no Lightning import.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["RandomStream", "derive_seed"]


def derive_seed(base_seed: int, name: str) -> int:
    """A 63-bit seed from ``base_seed`` (e.g. ``torch.initial_seed()``) and a stream ``name``.

    Equal arguments give equal seeds in every process and version; different names give unrelated
    seeds (BLAKE2b of both).
    """
    digest = hashlib.blake2b(f"{int(base_seed)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RandomStream:
    """One random stream for the CPU and, when code runs on a CUDA device, that device.

    Inside :meth:`active`, ``torch.rand``, dropout and every other draw from torch's default
    generators use this stream's state; on exit the stream keeps where it got to and the global
    generators are exactly as they were before. Draws on other accelerators (MPS, XPU) are not
    covered: they use the global generator.

    Args:
        seed: where the stream starts (see :func:`derive_seed`).

    Example::

        >>> stream = RandomStream(7)
        >>> before = torch.get_rng_state()
        >>> with stream.active(torch.device("cpu")):
        ...     a = torch.rand(2)
        >>> torch.equal(before, torch.get_rng_state())
        True
        >>> with RandomStream(7).active(torch.device("cpu")):
        ...     torch.equal(a, torch.rand(2))
        True
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._cpu: torch.Tensor | None = None
        self._cuda: dict[int, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"

    @contextmanager
    def active(self, device: torch.device | str) -> Iterator[None]:
        """Run the body on this stream (CPU, and ``device`` when it is a CUDA device)."""
        device = torch.device(device)
        index = None
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[] if index is None else [index], device_type="cuda"):
            if self._cpu is None:
                self._cpu = torch.Generator().manual_seed(self.seed).get_state()
            torch.set_rng_state(self._cpu)
            if index is not None:
                if index not in self._cuda:
                    self._cuda[index] = torch.Generator(f"cuda:{index}").manual_seed(self.seed).get_state()
                torch.cuda.set_rng_state(self._cuda[index], index)
            try:
                yield
            finally:
                self._cpu = torch.get_rng_state()
                if index is not None:
                    self._cuda[index] = torch.cuda.get_rng_state(index)

    def state_dict(self) -> dict[str, Any]:
        """Seed and current position (CPU and per CUDA device), for checkpoints (plain types, tensors)."""
        state: dict[str, Any] = {"seed": self.seed}
        if self._cpu is not None:
            state["cpu"] = self._cpu.clone()
        if self._cuda:
            state["cuda"] = {index: s.clone() for index, s in self._cuda.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where :meth:`state_dict` was taken."""
        self.seed = int(state["seed"])
        cpu = state.get("cpu")
        self._cpu = None if cpu is None else cpu.clone()
        self._cuda = {int(index): s.clone() for index, s in (state.get("cuda") or {}).items()}
