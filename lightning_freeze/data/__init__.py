"""Data modules for the training app: bundled handwritten digits (no download) and ``ImageFolder``."""

from lightning_freeze.data.digits import DIGIT_TASKS, DigitsDataModule, load_digits
from lightning_freeze.data.image_folder import ImageFolderDataModule

__all__ = ["DIGIT_TASKS", "DigitsDataModule", "ImageFolderDataModule", "load_digits"]
