"""Backbone and branch factories for the training app's configs (``_target_`` these).

Every backbone factory returns an ``nn.Module`` mapping images to a feature vector and sets its
``out_features`` attribute; the app passes that number to the branch factory as ``in_features``.
"""

from lightning_freeze.models.backbones import TinyCNN, load_backbone_weights, tiny_cnn, torchvision_backbone
from lightning_freeze.models.heads import linear_head, mlp_head

__all__ = ["TinyCNN", "linear_head", "load_backbone_weights", "mlp_head", "tiny_cnn", "torchvision_backbone"]
