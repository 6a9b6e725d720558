"""The one module that reaches private names of Lightning and torch: one small function per use.

Each function names what it wraps; ``tests/test_compat_*.py`` fails loudly, naming the Lightning/torch
version, when an internal changes.
"""

from __future__ import annotations

from typing import Any

# --- skip ---


def fit_loop_combined_loader(trainer: Any) -> Any:
    """``trainer.fit_loop._combined_loader``: the ``CombinedLoader`` the fit loop iterates this epoch.

    Lightning has no public route to replace what the training epoch iterates; ``skip_pipeline``
    sets the (public) ``CombinedLoader.flattened`` of this object in ``on_train_epoch_start``.
    ``None`` before the fit loop set up its data.
    """
    return getattr(trainer.fit_loop, "_combined_loader", None)
