"""Lightning callbacks, one per file, thin adapters over :mod:`lightning_freeze.core`."""

from lightning_freeze.callbacks.freeze_backbone import FreezeBackbone

__all__ = ["FreezeBackbone"]
