"""Branch (head) factories: they take the backbone's feature size as ``in_features``."""

from __future__ import annotations

from torch import nn

__all__ = ["linear_head", "mlp_head"]


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}={value!r}; valid choices: an integer >= 1.")
    return value


def linear_head(in_features: int, num_classes: int) -> nn.Linear:
    """A linear classifier over the backbone features.

    Args:
        in_features: size of the backbone's feature vector (the app passes it).
        num_classes: number of classes of the branch's task.

    Returns:
        ``nn.Linear(in_features, num_classes)``.
    """
    return nn.Linear(_check_positive("in_features", in_features), _check_positive("num_classes", num_classes))


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
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"Invalid dropout={dropout!r}; valid choices: a probability in [0, 1).")
    return nn.Sequential(
        nn.Linear(_check_positive("in_features", in_features), _check_positive("hidden", hidden)),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, _check_positive("num_classes", num_classes)),
    )
