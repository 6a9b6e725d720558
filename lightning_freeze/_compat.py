"""The one module that reaches private names of Lightning and torch: one small function per use.

Each function names what it wraps; ``tests/test_compat_*.py`` fail loudly, naming the installed
version, when an internal changes. ``lightning_freeze.core`` imports this module: keep Lightning
imports inside the functions that need them (core stays free of Lightning).
"""

from __future__ import annotations

import torch

__all__ = ["tensor_version"]


# --- cache-core ---
def tensor_version(tensor: torch.Tensor) -> int | None:
    """torch's version counter of ``tensor`` (``Tensor._version``): bumped by every in-place write.

    ``None`` for an inference tensor (made under ``torch.inference_mode``), which has none.
    In-place writes through ``tensor.data`` do not bump it. No public API exposes it.
    """
    if tensor.is_inference():
        return None
    return tensor._version
