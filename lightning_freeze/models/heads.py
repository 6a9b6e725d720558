"""Branch (head) factories: they take the backbone's feature size as ``in_features``."""

from __future__ import annotations

from torch import nn

from lightning_freeze.core.validation import check_int, check_number

__all__ = ["linear_head", "mlp_head"]


def linear_head(in_features: int, num_classes: int) -> nn.Linear:
    """A linear classifier over the backbone features.

    Args:
        in_features: size of the backbone's feature vector (the app passes it).
        num_classes: number of classes of the branch's task.

    Returns:
        ``nn.Linear(in_features, num_classes)``.
    """
    return nn.Linear(
        check_int("in_features", in_features, minimum=1), check_int("num_classes", num_classes, minimum=1)
    )


def mlp_head(in_features: int, num_classes: int, hidden: int = 64, dropout: float = 0.0) -> nn.Sequential:
    """A two-layer perceptron over the backbone features.

    Args:
        in_features: size of the backbone's feature vector (the app passes it).
        num_classes: number of classes of the branch's task.
        hidden: hidden width. Default 64.
        dropout: dropout before the last layer. Default 0.0.

    Returns:
        ``Linear -> ReLU -> Dropout -> Linear``.
    """
    dropout = check_number(
        "dropout", dropout, low=0.0, high=1.0, high_inclusive=False, valid="a probability in [0, 1)"
    )
    return nn.Sequential(
        nn.Linear(check_int("in_features", in_features, minimum=1), check_int("hidden", hidden, minimum=1)),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, check_int("num_classes", num_classes, minimum=1)),
    )
