"""Hydra launcher plugin ``launcher=packed`` of lightning_freeze (see :mod:`lightning_freeze.packing`)."""
