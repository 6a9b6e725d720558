"""Kept for the test files and scripts that still import it: the helpers live in :mod:`helpers.freeze`."""

from helpers.freeze import (
    WIDTH,
    TinyNet,
    changed_keys,
    loaders,
    make_backbone,
    make_data,
    snapshot,
    trainer,
)

__all__ = ["WIDTH", "TinyNet", "changed_keys", "loaders", "make_backbone", "make_data", "snapshot", "trainer"]
