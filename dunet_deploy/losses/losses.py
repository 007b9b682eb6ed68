"""Enhanced Mixing Loss (paper §3.2) and its parts, as the authors' code computes them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: Keras' ``K.epsilon()``; probabilities are clipped to ``[EPS, 1 - EPS]`` before logs.
EPS = 1e-7
FOCAL_ALPHA = 0.48
FOCAL_GAMMA = 1.1
DICE_SMOOTH = 1.0


def _flat(probs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if probs.shape != target.shape:
        raise ValueError(f"probs {list(probs.shape)} and target {list(target.shape)} differ")
    # Losses are computed in fp32 even under autocast: logs of fp16 probabilities underflow.
    return probs.float().reshape(-1), target.float().reshape(-1)


def dice_coefficient(
    probs: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH
) -> torch.Tensor:
    """Smoothed soft Dice ``(2Σpg + δ) / (Σp² + Σg² + δ)`` over the whole batch (Eq. 4)."""
    p, g = _flat(probs, target)
    return (2.0 * (p * g).sum() + smooth) / ((p * p).sum() + (g * g).sum() + smooth)


def dice_loss(
    probs: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH
) -> torch.Tensor:
    """``1 - dice_coefficient`` (the paper's DL)."""
    return 1.0 - dice_coefficient(probs, target, smooth)


def focal_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> torch.Tensor:
    """Voxel-mean binary focal loss (Eq. 3 divided by the voxel count N).

    ``-mean(g·α(1-p)^γ log p + (1-g)·(1-α)p^γ log(1-p))``, probabilities
    clipped to ``[EPS, 1-EPS]``. Targets are binary.
    """
    p, g = _flat(probs, target)
    p = p.clamp(EPS, 1.0 - EPS)
    pos = alpha * (1.0 - p).pow(gamma) * torch.log(p)
    neg = (1.0 - alpha) * p.pow(gamma) * torch.log(1.0 - p)
    return -(g * pos + (1.0 - g) * neg).mean()


def enhanced_mixing_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
    smooth: float = DICE_SMOOTH,
) -> torch.Tensor:
    """EML (Eq. 5): voxel-mean focal loss minus the log of the smoothed Dice coefficient.

    The paper writes ``-log(DL)``; the authors' code (which we follow) takes the
    log of the Dice *coefficient*, which is what keeps the term positive and
    decreasing as the overlap grows.
    """
    return focal_loss(probs, target, alpha, gamma) - torch.log(
        dice_coefficient(probs, target, smooth)
    )


def bce_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on clipped probabilities, voxel mean."""
    p, g = _flat(probs, target)
    p = p.clamp(EPS, 1.0 - EPS)
    return -(g * torch.log(p) + (1.0 - g) * torch.log(1.0 - p)).mean()


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Names accepted by ``dunet-train --loss``.
LOSSES: dict[str, LossFn] = {
    "eml": enhanced_mixing_loss,
    "dice": dice_loss,
    "focal": focal_loss,
    "bce": bce_loss,
}


def get_loss(name: str) -> LossFn:
    """The loss function called ``name`` (one of :data:`LOSSES`)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}") from None


class EnhancedMixingLoss(nn.Module):
    """Module wrapper of :func:`enhanced_mixing_loss` with the paper's α, γ, δ."""

    def __init__(
        self, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA, smooth: float = DICE_SMOOTH
    ) -> None:
        super().__init__()
        self.alpha, self.gamma, self.smooth = alpha, gamma, smooth

    def forward(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return enhanced_mixing_loss(probs, target, self.alpha, self.gamma, self.smooth)
