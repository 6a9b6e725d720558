"""Helpers shared by the tests: one CPU trainer factory, tiny models and data, the DDP runner.

- :mod:`helpers.trainer`: :func:`~helpers.trainer.cpu_trainer`, the one ``L.Trainer`` factory.
- :mod:`helpers.freeze`: a single-head ``TinyNet`` (conv + BatchNorm + dropout) for the
  ``FreezeBackbone`` / ``FrozenSafeEMA`` tests.
- :mod:`helpers.multibranch`: ``MultiBranchModule`` builders, per-branch data and stage runners.
- :mod:`helpers.ddp`: run a 2-process CPU DDP script (``tests/scripts/ddp_all.py``: every DDP
  scenario of the suite in one launch, the session fixture ``ddp_runs``) and load what each rank saved.
- :mod:`helpers.app`: run the training app's console-script function in this process (exit status
  and output; what a run changes in the process is put back) and require exit 0.

``tests/`` is on ``sys.path`` (pytest's rootdir-relative import of test modules; the scripts in
``tests/scripts`` insert it), so they import as ``from helpers.freeze import TinyNet``.
"""
