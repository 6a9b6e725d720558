"""Parts of the training app ``lightning-freeze-train`` (the recipe is :func:`lightning_freeze.train.train`).

* :mod:`~lightning_freeze.app.settings`: the stage's settings, inherited from ``init_from`` (no torch);
* :mod:`~lightning_freeze.app.build`: data, model, callbacks, loggers and trainer from the config;
* :mod:`~lightning_freeze.app.report`: what the fit did, per-branch metrics, the summary;
* :mod:`~lightning_freeze.app.runtime`: logs, one-line errors, resume after a SLURM requeue (no torch).

Importing this package imports neither torch nor Lightning.
"""

from __future__ import annotations

__all__ = ["AppInputError"]


class AppInputError(ValueError):
    """Bad input to the app (config value, missing file, name collision): reported as one line."""
