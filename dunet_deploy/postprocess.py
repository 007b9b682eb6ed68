"""Test-time augmentation and small-lesion removal (numpy and scipy only).

Both are inference defaults a model can be shipped with
(:class:`~dunet_deploy.spec.InferenceDefaults`):

* :func:`with_tta` wraps a predictor so that it also sees every slab mirrored
  left-right and returns the mean of the two probability maps (the network was
  trained with horizontal flips, so the mirror is an input it knows);
* :func:`remove_small_lesions` drops 3D face-connected components below a
  volume in mm³ (the challenge's lesion definition).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from dunet_deploy.choices import TTA_MODES
from dunet_deploy.errors import DunetError
from dunet_deploy.metrics import label_lesions
from dunet_deploy.spec import PreprocessSpec

__all__ = ["Predictor", "lr_slab_axis", "remove_small_lesions", "with_tta"]

#: ``predict(slabs float32 [N, C, S, S]) -> probabilities float32 [N, 1, S, S]``.
Predictor = Callable[[np.ndarray], np.ndarray]


def lr_slab_axis(spec: PreprocessSpec | None = None) -> int:
    """The slab axis (``-1`` columns or ``-2`` rows) that runs left-right.

    The spec's orientation says which volume axis is L/R (unknown, i.e. a
    version-1 spec: axis 0, the NIfTI x axis, as in RAS/LAS/MNI data).
    :func:`~dunet_deploy.data.preprocess.orient_volume` moves the axial axis
    first and keeps the other two in order ``(a, b)``, transposed to ``(b, a)``
    when ``transpose_slice``; so with the defaults (axial axis 2, transposed)
    x becomes the columns.

    Args:
        spec: The model's spec (``None``: the default spec).

    Returns:
        ``-1`` or ``-2``.

    Raises:
        DunetError: when the left-right axis is the axial (slice) axis, so no
            slab can be mirrored left-right.
    """
    spec = spec if spec is not None else PreprocessSpec()
    codes = spec.orientation
    lr = 0 if codes is None else next(i for i, c in enumerate(codes) if c in ("L", "R"))
    if lr == spec.axial_axis:
        raise DunetError(
            f"--tta flip: the left-right axis is the slice axis {spec.axial_axis} of this model "
            "(sagittal slabs); a slab cannot be mirrored left-right"
        )
    first = min(i for i in range(3) if i != spec.axial_axis)
    # Without a transpose the first in-plane axis is the rows (-2).
    return (-1 if lr == first else -2) if spec.transpose_slice else (-2 if lr == first else -1)


def with_tta(predict: Predictor, mode: str, spec: PreprocessSpec | None = None) -> Predictor:
    """Wrap a predictor with test-time augmentation.

    Args:
        predict: ``float32 [N, C, S, S] -> float32 [N, 1, S, S]``.
        mode: ``"none"`` (returns ``predict`` itself) or ``"flip"``: the mean
            of ``predict(x)`` and the mirrored-back ``predict(mirror(x))``, the
            mirror being left-right in the network's space (see
            :func:`lr_slab_axis`).
        spec: The model's spec, which says which slab axis is left-right
            (``None``: the default spec's columns).

    Returns:
        A predictor with the same contract (two ``predict`` calls per batch).

    Raises:
        DunetError: for an unknown mode, or a model whose slabs cannot be
            mirrored left-right.
    """
    if mode not in TTA_MODES:
        raise DunetError(f"--tta {mode!r}: choose one of {', '.join(TTA_MODES)}")
    if mode == "none":
        return predict
    axis = lr_slab_axis(spec)

    def predict_flip(slabs: np.ndarray) -> np.ndarray:
        x = np.asarray(slabs, dtype=np.float32)
        plain = np.asarray(predict(x), dtype=np.float32)
        mirrored = np.asarray(predict(np.ascontiguousarray(np.flip(x, axis))), dtype=np.float32)
        return ((plain + np.flip(mirrored, axis)) * np.float32(0.5)).astype(np.float32)

    return predict_flip


def remove_small_lesions(
    mask: npt.ArrayLike, zooms: Sequence[float], min_mm3: float
) -> tuple[np.ndarray, int]:
    """Remove 3D face-connected lesions smaller than ``min_mm3``.

    Args:
        mask: ``[X, Y, Z]`` binary mask (``> 0`` is lesion).
        zooms: Voxel size in mm of the three axes.
        min_mm3: Components with volume ``< min_mm3`` are removed; ``<= 0``
            keeps everything.

    Returns:
        ``(uint8 mask of the same shape in {0, 1}, number of components removed)``.
    """
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    if min_mm3 <= 0:
        return binary, 0
    labels, count = label_lesions(binary)
    if count == 0:
        return binary, 0
    voxel_mm3 = float(np.prod([float(z) for z in zooms[:3]]))
    sizes_mm3 = np.bincount(labels.ravel(), minlength=count + 1) * voxel_mm3
    small = sizes_mm3 < min_mm3
    small[0] = False  # background
    binary[small[labels]] = 0
    return binary, int(np.count_nonzero(small))
