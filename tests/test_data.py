"""The bundled digits data module and the ImageFolder data module."""

from __future__ import annotations

import typing

import pytest
import torch
from PIL import Image

from lightning_freeze.core.validation import choices_of
from lightning_freeze.data import DIGIT_TASKS, DigitsDataModule, ImageFolderDataModule, load_digits
from lightning_freeze.data.digits import HALVES, DigitTask, Half


def test_load_digits_is_the_uci_digits_set() -> None:
    images, digits = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    # class counts of the UCI / scikit-learn digits
    assert digits.bincount().tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # pixel values 0..16 scaled by 1/16
    assert torch.equal(torch.unique(images * 16), torch.arange(17, dtype=torch.float32))


def test_load_digits_matches_scikit_learn_when_installed() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    reference = sklearn_datasets.load_digits()
    images, digits = load_digits()
    assert torch.equal(images.reshape(1797, 64) * 16, torch.from_numpy(reference.data).float())
    assert torch.equal(digits, torch.from_numpy(reference.target).long())


def test_halves_are_disjoint_fixed_and_independent_of_the_training_seed() -> None:
    torch.manual_seed(123)
    a = DigitsDataModule(half="A").half_indices()
    torch.manual_seed(456)
    b = DigitsDataModule(half="B").half_indices()
    assert len(a) == 899 and len(b) == 898
    assert not set(a.tolist()) & set(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(1797))
    assert torch.equal(a, DigitsDataModule(half="A").half_indices())


@pytest.mark.parametrize("task", list(DIGIT_TASKS))
def test_task_labels_are_derived_from_the_digit(task: str) -> None:
    dm = DigitsDataModule(task=task, half="B", val_fraction=0.2, test_fraction=0.2)
    dm.setup("fit")
    _, digits = load_digits()
    index = dm.half_indices()
    expected = DIGIT_TASKS[task][1](digits[index]).long()
    labels = torch.cat([dm.train_set.tensors[1], dm.val_set.tensors[1], dm.test_set.tensors[1]])
    assert torch.equal(labels, expected)
    assert int(labels.max()) + 1 == dm.num_classes
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (538, 180, 180)


def test_parity_is_even_odd() -> None:
    dm = DigitsDataModule(task="parity", half="A")
    dm.setup("fit")
    _, digits = load_digits()
    n = len(dm.train_set)
    assert torch.equal(dm.train_set.tensors[1], digits[dm.half_indices()[:n]] % 2)


def test_channels_and_image_size() -> None:
    dm = DigitsDataModule(channels=3, image_size=16, batch_size=5)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 16, 16) and y.shape == (5,)
    assert torch.equal(x[:, 0], x[:, 2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "colour"}, r"Invalid task='colour'; valid choices: 'digit', 'parity', 'mod3', 'high'"),
        ({"half": "C"}, r"Invalid half='C'; valid choices: 'A', 'B', 'all'"),
        ({"channels": 2}, r"Invalid channels=2; valid choices: 1, 3"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, r"valid choices: fractions >= 0 whose sum is < 1"),
        ({"channels": True}, r"Invalid channels=True; valid choices: 1, 3\."),
        ({"batch_size": 0}, r"Invalid batch_size=0; valid choices: an integer >= 1\."),
        ({"batch_size": True}, r"Invalid batch_size=True; valid choices: an integer >= 1\."),
        ({"image_size": 0}, r"Invalid image_size=0; valid choices: an integer >= 1\."),
        ({"num_workers": -1}, r"Invalid num_workers=-1; valid choices: an integer >= 0\."),
    ],
)
def test_bad_arguments_name_the_value_and_the_choices(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_task_and_half_choices_are_the_literal_types() -> None:
    # the Literal types are what IDEs and LightningCLI/jsonargparse show: they list every task
    assert choices_of(DigitTask) == tuple(DIGIT_TASKS)
    assert choices_of(Half) == HALVES == ("A", "B", "all")
    hints = typing.get_type_hints(DigitsDataModule.__init__)
    assert (hints["task"], hints["half"]) == (DigitTask, Half)


def _image_folder(root, classes=("cat", "dog"), per_class=5) -> None:
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20, 24), color=(40 * c, 10 * i, 200)).save(folder / f"{i}.png")


def test_image_folder_splits_and_labels(tmp_path) -> None:
    _image_folder(tmp_path)
    dm = ImageFolderDataModule(tmp_path, batch_size=4, image_size=16, val_fraction=0.2)
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (8, 2)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 16, 16) and set(y.tolist()) <= {0, 1}


def test_image_folder_train_val_layout_and_grey(tmp_path) -> None:
    _image_folder(tmp_path / "train", per_class=3)
    _image_folder(tmp_path / "val", per_class=1)
    dm = ImageFolderDataModule(tmp_path, image_size=8, channels=1)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (6, 2)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 8, 8)


def test_image_folder_missing_or_empty_folder(tmp_path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"data.root='.*nope' is not a folder: expected root/<class>/<image>"
    ):
        ImageFolderDataModule(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"has no class folders"):
        ImageFolderDataModule(tmp_path)


def test_image_folder_bad_arguments_name_the_value_and_the_choices(tmp_path) -> None:
    _image_folder(tmp_path, per_class=1)
    with pytest.raises(ValueError, match=r"Invalid channels=2; valid choices: 1, 3\."):
        ImageFolderDataModule(tmp_path, channels=2)
    with pytest.raises(ValueError, match=r"Invalid image_size=0; valid choices: an integer >= 1\."):
        ImageFolderDataModule(tmp_path, image_size=0)
