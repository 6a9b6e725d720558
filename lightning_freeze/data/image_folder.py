"""``ImageFolder`` data module: train a branch on your own images (``root/<class>/<image>``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from typing_extensions import override

from lightning_freeze.data.splits import SplitDataModule, split_sizes

__all__ = ["ImageFolderDataModule"]


class ImageFolderDataModule(SplitDataModule):
    """Images in class folders, as :class:`torchvision.datasets.ImageFolder` reads them.

    Two layouts are accepted:

    * ``root/<class>/<image>``: split into train/val/test by a fixed permutation;
    * ``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (and optionally
      ``root/test/...``): used as they are.

    Images are resized to ``image_size`` (shorter side), centre-cropped to a square and scaled to
    ``[0, 1]``; ``channels=1`` converts them to grey.

    Args:
        root: the folder. A missing folder, or one without class folders, raises
            ``FileNotFoundError`` naming it.
        batch_size: samples per batch. Default 32.
        image_size: side in pixels after resizing. Default 64.
        channels: 3 (default) or 1.
        val_fraction: fraction held out for validation (first layout only). Default 0.2.
        test_fraction: fraction held out for testing (first layout only). Default 0.0.
        num_workers: ``DataLoader`` workers. Default 0.
        split_seed: seed of the split permutation. Default 0.

    Attributes:
        num_classes: number of class folders (known from construction on).
        classes: the class folder names, in label order.

    Example::

        dm = ImageFolderDataModule("~/data/flowers", image_size=96)
        print(dm.classes)  # ['daisy', 'rose', ...]
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 32,
        image_size: int = 64,
        channels: int = 3,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        num_workers: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            channels=channels,
            image_size=image_size,
            num_workers=num_workers,
            split_seed=split_seed,
        )
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data.root={str(root)!r} is not a folder: expected root/<class>/<image> "
                "(or root/train/<class>/<image> and root/val/<class>/<image>)"
            )
        self.split_layout = (self.root / "train").is_dir() and (self.root / "val").is_dir()
        class_root = self.root / "train" if self.split_layout else self.root
        self.classes = sorted(
            p.name for p in class_root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not self.classes:
            raise FileNotFoundError(
                f"data.root={str(root)!r} has no class folders: expected root/<class>/<image> "
                "(or root/train/<class>/<image> and root/val/<class>/<image>)"
            )
        self.num_classes = len(self.classes)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        grey = [transforms.Grayscale(1)] if self.channels == 1 else []
        size = self.image_size
        transform = transforms.Compose(
            [transforms.Resize(size), transforms.CenterCrop(size), *grey, transforms.ToTensor()]
        )
        if self.split_layout:
            self.train_set = ImageFolder(str(self.root / "train"), transform=transform)
            self.val_set = ImageFolder(str(self.root / "val"), transform=transform)
            test_dir = self.root / "test"
            self.test_set = (
                ImageFolder(str(test_dir), transform=transform) if test_dir.is_dir() else self.val_set
            )
            return
        full = ImageFolder(str(self.root), transform=transform)
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.split_seed))
        sizes = split_sizes(len(full), self.val_fraction, self.test_fraction)
        self.train_set, self.val_set, test = (Subset(full, part.tolist()) for part in order.split(sizes))
        self.test_set = test if sizes[2] else self.val_set
