"""The one implementation of D-UNet pre- and post-processing.

Training (through the slice cache), export checks and the torch-free runtime
all call these functions, so a model always sees exactly the input it was
trained on. Only numpy is used.

Geometry (defaults, see :class:`~dunet_deploy.spec.PreprocessSpec`)::

    volume (X=197, Y=233, Z=189)
      -> axial slices vol[:, :, z]           (Z, 197, 233)
      -> transposed (rows = y, cols = x)     (Z, 233, 197)   "oriented"
      -> crop rows 40:220, cols 10:190       (Z, 180, 180)
      -> bilinear resize                     (Z, 192, 192)   "slices"
      -> slabs of slices z-2, z-1, z, z+1    (Z, 4, 192, 192)

:func:`probs_to_volume` walks the same path backwards.

Bilinear resizing uses half-pixel centres without antialiasing, i.e. exactly
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``.
It is separable, so it is done as ``R_rows @ slice @ R_cols.T`` with small
precomputed interpolation matrices: a whole 189-slice volume is two batched
matmuls.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

from dunet_deploy.spec import PreprocessSpec

__all__ = [
    "bilinear_matrix",
    "binarize",
    "mask_to_labels",
    "nonempty_slab_indices",
    "nonempty_slice_flags",
    "normalize_intensity",
    "orient_volume",
    "probs_to_volume",
    "resize_bilinear",
    "slab_flags_from_slice_flags",
    "slices_to_slabs",
    "unorient_volume",
    "volume_to_slabs",
    "volume_to_slices",
]


# ------------------------------------------------------------------ intensity
def normalize_intensity(volume: npt.ArrayLike, spec: PreprocessSpec) -> np.ndarray:
    """Normalise voxel intensities as the spec says.

    ``robust_zscore`` (per volume): let ``V`` be the nonzero voxels. They are
    clipped to the ``clip_percentiles`` of ``V`` and z-scored with the mean and
    standard deviation of the clipped ``V``. Zero (background) voxels are *not*
    clipped; they get the value zero maps to under the same affine map,
    ``-mean / std``, so background stays one constant distinct from tissue (as
    in the paper's global scheme, where background also maps to a negative
    constant). A volume without nonzero voxels becomes all zeros; a constant
    one uses ``std = 1``.

    ``dataset_minmax_zscore`` (the paper): ``((x - min) / (max - min) - mean) /
    std`` with the dataset statistics stored in the spec, applied to every
    voxel.

    Args:
        volume: Raw volume, any shape and real dtype.
        spec: The preprocessing spec.

    Returns:
        float32 array of the same shape.
    """
    vol = np.asarray(volume, dtype=np.float32)
    if spec.intensity == "dataset_minmax_zscore":
        assert spec.dataset_min is not None and spec.dataset_max is not None
        assert spec.dataset_mean is not None and spec.dataset_std is not None
        # Fold both affine steps into one multiply-add, computed in float64.
        scale = 1.0 / ((spec.dataset_max - spec.dataset_min) * spec.dataset_std)
        offset = -(spec.dataset_min / (spec.dataset_max - spec.dataset_min) + spec.dataset_mean)
        offset /= spec.dataset_std
        return (vol * np.float32(scale) + np.float32(offset)).astype(np.float32, copy=False)

    nonzero = vol != 0
    values = vol[nonzero]
    if values.size == 0:
        return np.zeros_like(vol)
    lo, hi = np.percentile(values, spec.clip_percentiles)
    clipped = np.clip(values, lo, hi)
    mean = float(clipped.mean(dtype=np.float64))
    std = float(clipped.std(dtype=np.float64))
    if not std > 0:
        std = 1.0
    out = np.full(vol.shape, -mean / std, dtype=np.float32)
    out[nonzero] = (clipped - np.float32(mean)) / np.float32(std)
    return out


# ----------------------------------------------------------------- orientation
def orient_volume(volume: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """View a volume as a stack of oriented axial slices.

    Args:
        volume: ``volume_shape``-like array (in-plane shape must match).

    Returns:
        A view of shape ``(Z, rows, cols)`` where ``(rows, cols) ==
        spec.inplane_shape``.
    """
    stack = np.moveaxis(volume, spec.axial_axis, 0)
    return stack.transpose(0, 2, 1) if spec.transpose_slice else stack


def unorient_volume(stack: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Inverse of :func:`orient_volume`: ``(Z, rows, cols)`` -> volume layout."""
    if spec.transpose_slice:
        stack = stack.transpose(0, 2, 1)
    return np.moveaxis(stack, 0, spec.axial_axis)


# ---------------------------------------------------------------------- resize
@functools.lru_cache(maxsize=64)
def _bilinear_matrix_cached(in_size: int, out_size: int) -> np.ndarray:
    # Mirror torch's arithmetic exactly (UpSample.h): the scale is a float32
    # ratio, the source coordinate ``scale * (dst + 0.5) - 0.5`` is evaluated in
    # double (int + 0.5 promotes) and stored as float32, and the weight is
    # taken in float32. This makes the weights bit-identical to torch's, not
    # merely ~1e-5 close.
    scale = float(np.float32(in_size) / np.float32(out_size))
    dst = np.arange(out_size, dtype=np.float64)
    # Half-pixel centres; torch clamps negative source coordinates to 0.
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0).astype(np.float32)
    i0 = np.minimum(src.astype(np.int64), in_size - 1)  # src >= 0: trunc == floor
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    w0 = np.float32(1.0) - w1
    mat = np.zeros((out_size, in_size), dtype=np.float32)
    rows = np.arange(out_size)
    np.add.at(mat, (rows, i0), w0)
    np.add.at(mat, (rows, i1), w1)
    mat.flags.writeable = False  # shared by the cache: must never be modified
    return mat


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Interpolation matrix of 1-D linear resizing with half-pixel centres.

    ``y = M @ x`` resizes a length-``in_size`` signal to ``out_size`` exactly as
    torch's ``interpolate(mode="linear", align_corners=False)`` does (no
    antialiasing, also when shrinking). Cached per size pair; read-only.

    Returns:
        float32 ``[out_size, in_size]``, each row summing to 1.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got {in_size} -> {out_size}")
    return _bilinear_matrix_cached(int(in_size), int(out_size))


def resize_bilinear(images: npt.ArrayLike, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize the last two axes (torch ``align_corners=False``).

    Args:
        images: ``[..., H, W]`` array.
        out_hw: ``(H', W')``.

    Returns:
        float32 ``[..., H', W']``.
    """
    arr = np.asarray(images, dtype=np.float32)
    h, w = arr.shape[-2:]
    out_h, out_w = out_hw
    if (h, w) == (out_h, out_w):
        return arr.copy()
    m_rows = bilinear_matrix(h, out_h)
    m_cols = bilinear_matrix(w, out_w)
    # [..., H, W] @ [W, W'] -> [..., H, W'];  [H', H] @ that -> [..., H', W'].
    return np.matmul(m_rows, np.matmul(arr, m_cols.T))


# ------------------------------------------------------------- forward path
def _crop(stack: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    (r0, r1), (c0, c1) = spec.crop_rows, spec.crop_cols
    return stack[:, r0:r1, c0:c1]


def volume_to_slices(volume: npt.ArrayLike, spec: PreprocessSpec) -> np.ndarray:
    """Normalise, slice, orient, crop and resize a volume.

    Args:
        volume: Raw volume whose in-plane shape matches the spec.
        spec: The preprocessing spec.

    Returns:
        float32 ``[Z, S, S]`` with ``S = spec.image_size``.

    Raises:
        DunetError: when the spec cannot take the volume's shape.
    """
    vol = np.asarray(volume)
    spec.check_volume_shape(vol.shape)
    # Crop before normalising would change the statistics; normalise the
    # whole volume (as the paper does), then crop the oriented view.
    norm = normalize_intensity(vol, spec)
    cropped = _crop(orient_volume(norm, spec), spec)
    s = spec.image_size
    return resize_bilinear(np.ascontiguousarray(cropped), (s, s))


def slices_to_slabs(
    slices: np.ndarray,
    spec: PreprocessSpec,
    indices: npt.ArrayLike | None = None,
) -> np.ndarray:
    """Stack neighbouring slices into multi-channel slabs.

    Channel ``k`` of the slab for slice ``z`` is slice ``z + spec.slab_offsets[k]``,
    or zeros when that falls outside ``[0, Z)``.

    Args:
        slices: ``[Z, H, W]`` (normally the output of :func:`volume_to_slices`).
        spec: The preprocessing spec.
        indices: Which ``z`` to build slabs for (default: all, in order).

    Returns:
        ``[N, C, H, W]`` in the dtype of ``slices`` (float32 for
        :func:`volume_to_slices` output), ``C = spec.in_channels``.

    Raises:
        IndexError: when an index is outside ``[0, Z)``.
    """
    if slices.ndim != 3:
        raise ValueError(f"slices must be [Z, H, W], got shape {slices.shape}")
    z = slices.shape[0]
    idx = np.arange(z) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= z):
        raise IndexError(f"slab indices must be in [0, {z}), got {idx.min()}..{idx.max()}")
    offsets = np.asarray(spec.slab_offsets, dtype=np.int64)
    src = idx[:, None] + offsets[None, :]  # [N, C] source slice per channel
    valid = (src >= 0) & (src < z)
    out = np.zeros((idx.size, offsets.size, *slices.shape[1:]), dtype=slices.dtype)
    out[valid] = slices[src[valid]]
    return out


def volume_to_slabs(volume: npt.ArrayLike, spec: PreprocessSpec) -> np.ndarray:
    """:func:`volume_to_slices` followed by :func:`slices_to_slabs`.

    Returns:
        float32 ``[Z, C, S, S]``.
    """
    return slices_to_slabs(volume_to_slices(volume, spec), spec)


def mask_to_labels(mask: npt.ArrayLike, spec: PreprocessSpec) -> np.ndarray:
    """Bring a lesion mask into the geometry of the network output.

    The binary mask (voxels ``> 0``) is oriented and cropped like the image,
    resized bilinearly and thresholded at 0.5 (``>= 0.5``), so a label pixel
    is lesion when at least half of its bilinear footprint is. Each slab's
    label is its own slice ``z``.

    Args:
        mask: Volume of the same shape as the image.
        spec: The preprocessing spec.

    Returns:
        uint8 ``[Z, 1, S, S]`` with values in {0, 1}.
    """
    m = np.asarray(mask)
    spec.check_volume_shape(m.shape)
    binary = (m > 0).astype(np.float32)
    cropped = _crop(orient_volume(binary, spec), spec)
    s = spec.image_size
    resized = resize_bilinear(np.ascontiguousarray(cropped), (s, s))
    # A tiny epsilon keeps exact halves (0.5 computed as 0.49999997) on the
    # lesion side regardless of float rounding.
    return (resized >= np.float32(0.5 - 1e-6)).astype(np.uint8)[:, None]


# --------------------------------------------------------------- emptiness
def nonempty_slice_flags(volume: npt.ArrayLike, spec: PreprocessSpec) -> np.ndarray:
    """Which axial slices have a nonzero raw voxel inside the crop box.

    Returns:
        bool ``[Z]``.
    """
    vol = np.asarray(volume)
    spec.check_volume_shape(vol.shape)
    cropped = _crop(orient_volume(vol, spec), spec)
    return np.asarray(cropped.reshape(cropped.shape[0], -1).any(axis=1))


def slab_flags_from_slice_flags(flags: npt.ArrayLike, spec: PreprocessSpec) -> np.ndarray:
    """A slab is non-empty when any slice it stacks (inside the volume) is.

    Args:
        flags: bool ``[Z]`` per-slice flags.

    Returns:
        bool ``[Z]`` per-slab flags.
    """
    f = np.asarray(flags, dtype=bool).reshape(-1)
    out = np.zeros_like(f)
    z = f.size
    for off in spec.slab_offsets:
        # out[i] |= f[i + off] where 0 <= i + off < z
        lo, hi = max(0, -off), min(z, z - off)
        if lo < hi:
            out[lo:hi] |= f[lo + off : hi + off]
    return out


def nonempty_slab_indices(volume: npt.ArrayLike, spec: PreprocessSpec) -> np.ndarray:
    """The ``z`` whose slab contains any nonzero raw voxel inside the crop box.

    All-background slabs can be skipped at inference; their probability is 0.

    Returns:
        int64 ``[K]``, ascending.
    """
    flags = slab_flags_from_slice_flags(nonempty_slice_flags(volume, spec), spec)
    return np.flatnonzero(flags).astype(np.int64)


# ----------------------------------------------------------- inverse path
def probs_to_volume(
    probs: npt.ArrayLike,
    spec: PreprocessSpec,
    volume_shape: tuple[int, ...],
) -> np.ndarray:
    """Map per-slice network outputs back into the input volume's voxel grid.

    The exact inverse of the forward geometry: each ``S×S`` map is resized
    bilinearly to the crop size, pasted into a zero slice of the oriented
    in-plane shape, un-oriented, and the slices are stacked along the axial
    axis. Voxels outside the crop box are 0.

    Args:
        probs: float ``[Z, 1, S, S]`` or ``[Z, S, S]``.
        spec: The preprocessing spec.
        volume_shape: Shape of the original volume (``Z`` slices on the axial
            axis).

    Returns:
        float32 array of ``volume_shape``.

    Raises:
        DunetError: when ``volume_shape`` does not fit the spec.
        ValueError: when ``probs`` does not fit ``volume_shape``.
    """
    p = np.asarray(probs, dtype=np.float32)
    shape = tuple(int(n) for n in volume_shape)
    spec.check_volume_shape(shape)
    if p.ndim == 4:
        if p.shape[1] != 1:
            raise ValueError(f"probs must have one channel, got shape {p.shape}")
        p = p[:, 0]
    s = spec.image_size
    z = shape[spec.axial_axis]
    if p.shape != (z, s, s):
        raise ValueError(
            f"probs shape {p.shape} does not match {z} slices of {s}x{s} for volume {shape}"
        )
    crop = resize_bilinear(p, spec.crop_shape)
    rows, cols = spec.inplane_shape
    stack = np.zeros((z, rows, cols), dtype=np.float32)
    (r0, r1), (c0, c1) = spec.crop_rows, spec.crop_cols
    stack[:, r0:r1, c0:c1] = crop
    return np.ascontiguousarray(unorient_volume(stack, spec))


def binarize(probs: npt.ArrayLike, spec: PreprocessSpec) -> np.ndarray:
    """Threshold probabilities: ``>= spec.threshold`` is lesion (paper: below 0.5 -> 0).

    Returns:
        uint8 array of the same shape with values in {0, 1}.
    """
    return (np.asarray(probs) >= spec.threshold).astype(np.uint8)
