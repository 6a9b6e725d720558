"""Shared base of the bundled data modules: train/val/test splits and their dataloaders."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_freeze.core.errors import InvalidArgumentError
from lightning_freeze.core.validation import check_int

__all__ = ["SplitDataModule", "split_sizes"]


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """``(n_train, n_val, n_test)`` for ``n`` samples, the fractions rounded to whole samples."""
    n_val = round(n * val_fraction)
    n_test = round(n * test_fraction)
    return n - n_val - n_test, n_val, n_test


class SplitDataModule(L.LightningDataModule):
    """A data module whose ``setup`` fills ``train_set``/``val_set``/``test_set``.

    Validates and stores the split, image and loader settings shared by the bundled data modules;
    subclasses implement ``setup``.

    Raises:
        InvalidArgumentError: a bad setting (a ``ValueError`` naming the value and the valid choices).
    """

    def __init__(
        self,
        *,
        batch_size: int,
        val_fraction: float,
        test_fraction: float,
        channels: int,
        image_size: int,
        num_workers: int,
        split_seed: int,
    ) -> None:
        super().__init__()
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"Invalid val_fraction={val_fraction!r}, test_fraction={test_fraction!r}; valid choices: "
                "fractions >= 0 whose sum is < 1."
            )
        if isinstance(channels, bool) or channels not in (1, 3):
            raise InvalidArgumentError("channels", channels, "1, 3")
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.channels = channels
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.split_seed = check_int("split_seed", split_seed)
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
