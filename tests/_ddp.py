"""Kept for the test files that still import it: the runner lives in :mod:`helpers.ddp`."""

from helpers.ddp import run_ddp_script

__all__ = ["run_ddp_script"]
