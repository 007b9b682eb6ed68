"""Segmentation losses on probabilities (needs torch).

Every loss takes ``probs`` and ``target`` of the same shape (typically
``[N, 1, H, W]``; any shape works because, like the authors' Keras code, the
losses flatten the whole batch) and returns a scalar tensor.
"""

from .losses import (
    LOSSES,
    EnhancedMixingLoss,
    bce_loss,
    dice_coefficient,
    dice_loss,
    enhanced_mixing_loss,
    focal_loss,
    get_loss,
)

__all__ = [
    "LOSSES",
    "EnhancedMixingLoss",
    "bce_loss",
    "dice_coefficient",
    "dice_loss",
    "enhanced_mixing_loss",
    "focal_loss",
    "get_loss",
]
