"""Handwritten digits shipped inside the package: real data for staged training, no download.

The file ``digits.csv.gz`` is the copy of the UCI "Optical Recognition of Handwritten Digits" test
set (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0) that scikit-learn distributes as
``sklearn.datasets.load_digits``: 1797 grey-scale 8x8 images, pixel values 0..16, labels 0..9.
Shipping the 57 kB file keeps scikit-learn (and its SciPy stack) out of the dependencies.

:class:`DigitsDataModule` splits the images into two disjoint halves, ``"A"`` and ``"B"`` (a fixed
permutation, independent of the training seed, so every stage sees the same halves), and labels
them for one of several tasks (:data:`DIGIT_TASKS`): stage 1 learns the digit on half A, later
stages learn another label of the other half on the frozen backbone.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from importlib import resources
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from typing_extensions import override

from lightning_freeze.core.validation import check_choice, choices_of
from lightning_freeze.data.splits import SplitDataModule, split_sizes

__all__ = ["DIGIT_TASKS", "HALVES", "DigitTask", "DigitsDataModule", "Half", "load_digits"]

#: the labels :class:`DigitsDataModule` can learn (the keys of :data:`DIGIT_TASKS`)
DigitTask = Literal["digit", "parity", "mod3", "high"]
#: the halves of the digits :class:`DigitsDataModule` can use
Half = Literal["A", "B", "all"]

#: task name -> (number of classes, digit -> label)
DIGIT_TASKS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "digit": (10, lambda d: d),
    "parity": (2, lambda d: d % 2),
    "mod3": (3, lambda d: d % 3),
    "high": (2, lambda d: (d >= 5).long()),
}
HALVES: tuple[str, ...] = choices_of(Half)
NUM_DIGITS = 1797


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Load the bundled digits.

    Returns:
        ``(images, digits)``: ``float32`` images of shape ``(1797, 1, 8, 8)`` scaled to ``[0, 1]``
        (pixel value / 16) and ``int64`` digit labels ``0..9`` of shape ``(1797,)``.

    Example::

        >>> images, digits = load_digits()
        >>> images.shape, digits.bincount().tolist()[:3]
        (torch.Size([1797, 1, 8, 8]), [178, 182, 177])
    """
    raw = resources.files("lightning_freeze.data").joinpath("digits.csv.gz").read_bytes()
    rows = [line.split(",") for line in gzip.decompress(raw).decode("ascii").splitlines() if line]
    table = torch.tensor([[int(v) for v in row] for row in rows], dtype=torch.int64)
    images = table[:, :64].to(torch.float32).div_(16.0).reshape(-1, 1, 8, 8)
    return images, table[:, 64].clone()


class DigitsDataModule(SplitDataModule):
    """The bundled handwritten digits, one half of them, labelled for one task.

    Args:
        task: the label to learn (see :data:`DIGIT_TASKS`): ``"digit"`` (10 classes), ``"parity"``
            (0 even, 1 odd), ``"mod3"`` (digit modulo 3), ``"high"`` (1 for digits 5..9).
        half: ``"A"`` (899 images), ``"B"`` (the other 898) or ``"all"``. The halves are disjoint
            and fixed by ``split_seed``, not by the training seed.
        batch_size: samples per batch. Default 64.
        val_fraction: fraction of the half used for validation. Default 0.2.
        test_fraction: fraction of the half used for testing. Default 0.2.
        channels: 1 (default) or 3 (the grey image repeated, for ImageNet-style backbones).
        image_size: side in pixels; images are resized (bilinear) when it is not 8. Default 8.
        num_workers: ``DataLoader`` workers. Default 0 (the data is in memory).
        split_seed: seed of the fixed permutation that defines halves and splits. Default 0.

    Attributes:
        num_classes: number of classes of ``task``.

    Example::

        dm = DigitsDataModule(task="parity", half="B")
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))  # x: (64, 1, 8, 8) float, y: 0 or 1
    """

    def __init__(
        self,
        task: DigitTask = "digit",
        half: Half = "A",
        batch_size: int = 64,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        channels: int = 1,
        image_size: int = 8,
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
        self.task = check_choice("task", task, choices_of(DigitTask))
        self.half = check_choice("half", half, HALVES)
        self.num_classes = DIGIT_TASKS[task][0]

    def half_indices(self) -> torch.Tensor:
        """Indices (into :func:`load_digits`) of this module's half, in split order."""
        order = torch.randperm(NUM_DIGITS, generator=torch.Generator().manual_seed(self.split_seed))
        cut = (NUM_DIGITS + 1) // 2
        return {"A": order[:cut], "B": order[cut:], "all": order}[self.half]

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, digits = load_digits()
        index = self.half_indices()
        x = images[index]
        if self.image_size != 8:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        if self.channels == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()
        y = DIGIT_TASKS[self.task][1](digits[index]).long()
        sizes = split_sizes(len(index), self.val_fraction, self.test_fraction)
        self.train_set, self.val_set, self.test_set = map(TensorDataset, x.split(sizes), y.split(sizes))
