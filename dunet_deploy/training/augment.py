"""Batch augmentation on tensors: the authors' random affine transform and flip.

The authors trained with Keras' ``ImageDataGenerator`` (shift 0.1, zoom 0.2,
rotation 20°, horizontal flip), applying the same transform to a slab and its
label. Here the transform is one 2×3 affine matrix per sample, applied to a
whole batch with :func:`torch.nn.functional.affine_grid` /
:func:`~torch.nn.functional.grid_sample` on the batch's device: bilinear for
the image, nearest for the label, border fill for both (Keras' default
``fill_mode="nearest"``).

Random parameters are drawn from an explicit CPU :class:`torch.Generator`, so a
run is reproducible and independent of the device and of the global RNG.
Per sample (``U`` = uniform):

* rotation ``U(-rotation, rotation)`` degrees,
* zoom ``U(1 - zoom, 1 + zoom)`` independently along x and y,
* shift ``U(-shift, shift)`` × image size independently along x and y,
* horizontal flip (columns reversed) with probability 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PAPER_AUGMENT", "AugmentParams", "apply_affine", "augment_batch", "random_affine"]


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random affine transform.

    Attributes:
        shift: Maximal translation as a fraction of the image width/height.
        zoom: Scale factors are drawn from ``[1 - zoom, 1 + zoom]``.
        rotation: Maximal rotation in degrees.
        hflip: Flip columns with probability 0.5.
    """

    shift: float = 0.1
    zoom: float = 0.2
    rotation: float = 20.0
    hflip: bool = True


#: The authors' settings.
PAPER_AUGMENT = AugmentParams()


def random_affine(
    n: int,
    generator: torch.Generator,
    params: AugmentParams = PAPER_AUGMENT,
    size: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """Draw ``n`` random affine matrices for :func:`torch.nn.functional.affine_grid`.

    The matrices map output coordinates to input coordinates in the normalised
    ``[-1, 1]`` frame; rotation is corrected for the aspect ratio so it is a
    true rotation in pixel space for non-square images.

    Args:
        n: Batch size.
        generator: CPU generator all parameters are drawn from (exactly
            ``6 * n`` uniform numbers per call, whatever ``params`` says).
        params: Parameter ranges.
        size: ``(H, W)`` of the images.

    Returns:
        float32 ``[n, 2, 3]`` on the CPU.
    """
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64)
    angle = (2.0 * u[:, 0] - 1.0) * math.radians(params.rotation)
    zx = 1.0 + (2.0 * u[:, 1] - 1.0) * params.zoom
    zy = 1.0 + (2.0 * u[:, 2] - 1.0) * params.zoom
    # A shift of a fraction f of the width is 2f in normalised units.
    tx = (2.0 * u[:, 3] - 1.0) * params.shift * 2.0
    ty = (2.0 * u[:, 4] - 1.0) * params.shift * 2.0
    flip = torch.where(
        (u[:, 5] < 0.5) & torch.tensor(params.hflip), -torch.ones(n, dtype=torch.float64), 1.0
    )
    h, w = size
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Pixel-space A = R(angle) @ diag(zx * flip, zy); normalised A_n = D^-1 A D
    # with D = diag(W/2, H/2), which only rescales the off-diagonal terms.
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos * zx * flip
    theta[:, 0, 1] = -sin * zy * (h / w)
    theta[:, 1, 0] = sin * zx * flip * (w / h)
    theta[:, 1, 1] = cos * zy
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    return theta.float()


def apply_affine(
    images: torch.Tensor, labels: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp images (bilinear) and labels (nearest) with the same affine matrices.

    Args:
        images: float ``[N, C, H, W]``.
        labels: ``[N, L, H, W]`` (any dtype; values are kept, e.g. {0, 1}).
        theta: ``[N, 2, 3]`` (any device; moved to the images' device).

    Returns:
        ``(images [N, C, H, W], labels [N, L, H, W])`` in the input dtypes.
    """
    if images.dim() != 4 or labels.dim() != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected images [N, C, H, W] and labels [N, L, H, W], got "
            f"{list(images.shape)} and {list(labels.shape)}"
        )
    if images.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"image {list(images.shape)} and label {list(labels.shape)} sizes differ")
    theta = theta.to(device=images.device, dtype=torch.float32)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out_img = F.grid_sample(
        images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    ).to(images.dtype)
    out_lab = F.grid_sample(
        labels.float(), grid, mode="nearest", padding_mode="border", align_corners=False
    ).to(labels.dtype)
    return out_img, out_lab


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    params: AugmentParams = PAPER_AUGMENT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one random affine transform per sample to images and labels alike.

    Args:
        images: float ``[N, C, H, W]`` slabs.
        labels: ``[N, 1, H, W]`` binary labels.
        generator: CPU generator (the only source of randomness).
        params: Parameter ranges (default: the paper's).

    Returns:
        ``(images [N, C, H, W], labels [N, 1, H, W])``; labels stay binary.
    """
    size = (int(images.shape[-2]), int(images.shape[-1]))
    theta = random_affine(int(images.shape[0]), generator, params, size=size)
    return apply_affine(images, labels, theta)
