"""Shared base of the bundled data modules: train/val/test splits and their dataloaders."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

__all__ = ["SplitDataModule", "split_sizes"]


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """``(n_train, n_val, n_test)`` for ``n`` samples, the fractions rounded to whole samples."""
    n_val = round(n * val_fraction)
    n_test = round(n * test_fraction)
    return n - n_val - n_test, n_val, n_test


class SplitDataModule(L.LightningDataModule):
    """A data module whose ``setup`` fills ``train_set``/``val_set``/``test_set``.

    Subclasses set ``batch_size`` and ``num_workers`` and implement ``setup``.
    """

    batch_size: int
    num_workers: int

    def __init__(self) -> None:
        super().__init__()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run yet.")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
