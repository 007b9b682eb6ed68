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
from typing import NamedTuple

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
    "probs_to_mask",
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
    out = np.empty(vol.shape, dtype=np.float32)
    _normalize_into(out, vol, _intensity_map(vol, spec))
    return out


class IntensityMap(NamedTuple):
    """What :func:`_normalize_into` does to each voxel.

    ``robust`` (``robust_zscore``): nonzero ``x -> (clip(x, lo, hi) - center) /
    scale``, zero -> ``background``. Otherwise (``dataset_minmax_zscore``):
    every ``x -> x * scale + center``.
    """

    robust: bool
    lo: np.float32
    hi: np.float32
    center: np.float32
    scale: np.float32
    background: np.float32


def _percentiles(values: np.ndarray, q: tuple[float, float]) -> tuple[float, float]:
    """``np.percentile(values, q)`` (linear method) by partitioning ``values`` in place.

    Only the four order statistics needed are placed (``np.partition``, no sort).
    """
    n = values.size
    pos = [p / 100.0 * (n - 1) for p in q]
    ranks = sorted({k for v in pos for k in (int(np.floor(v)), min(int(np.floor(v)) + 1, n - 1))})
    values.partition(ranks)
    out = []
    for v in pos:
        k = int(np.floor(v))
        a, b = float(values[k]), float(values[min(k + 1, n - 1)])
        t = v - k
        # numpy's _lerp: from the nearer end, so t = 1 gives b exactly.
        out.append(b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t)
    return out[0], out[1]


def _intensity_map(vol: np.ndarray, spec: PreprocessSpec) -> IntensityMap | None:
    """The per-voxel map the spec's normalisation applies to ``vol`` (float32 work only).

    ``robust_zscore`` statistics are over the nonzero voxels of the whole
    volume; the only float64 values are the two scalar sums (mean, variance).
    """
    if spec.intensity == "dataset_minmax_zscore":
        assert spec.dataset_min is not None and spec.dataset_max is not None
        assert spec.dataset_mean is not None and spec.dataset_std is not None
        # Fold both affine steps into one multiply-add (constants worked out in Python floats).
        scale = 1.0 / ((spec.dataset_max - spec.dataset_min) * spec.dataset_std)
        offset = -(spec.dataset_min / (spec.dataset_max - spec.dataset_min) + spec.dataset_mean)
        offset /= spec.dataset_std
        return IntensityMap(False, np.float32(0), np.float32(0), np.float32(offset),
                            np.float32(scale), np.float32(offset))
    # Gather in memory order (a view for C or Fortran order): boolean indexing of a
    # Fortran-order volume (what nibabel returns) would walk it in C order, 6x slower.
    flat = vol.ravel(order="K")
    values = flat[flat != 0]
    if values.size == 0:
        return None
    lo, hi = _percentiles(values, spec.clip_percentiles)
    np.clip(values, np.float32(lo), np.float32(hi), out=values)
    n = values.size
    # float32 work arrays, float64 accumulators (numpy casts in small buffers): the
    # sums then hardly depend on voxel order, so a mirrored scan gets the same map.
    mean = float(values.sum(dtype=np.float64)) / n
    values -= np.float32(mean)
    np.square(values, out=values)
    std = float(np.sqrt(float(values.sum(dtype=np.float64)) / n))
    if not std > 0:
        std = 1.0
    return IntensityMap(True, np.float32(lo), np.float32(hi), np.float32(mean),
                        np.float32(std), np.float32(-mean / std))


def _normalize_into(out: np.ndarray, vol: np.ndarray, imap: IntensityMap | None) -> None:
    """``out[...] = normalised vol`` for any (strided) view ``vol`` of ``out``'s shape.

    ``imap`` is ``None`` for a volume without nonzero voxels: all zeros.
    """
    if imap is None:
        out[...] = 0.0
    elif not imap.robust:  # dataset_minmax_zscore: every voxel, one multiply-add
        np.multiply(vol, imap.scale, out=out)
        out += imap.center
    else:
        np.clip(vol, imap.lo, imap.hi, out=out)
        out -= imap.center
        out /= imap.scale
        np.copyto(out, imap.background, where=vol == 0)  # background is not clipped


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
def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                         np.ndarray]:
    # Mirror torch's arithmetic exactly (UpSample.h): the scale is a float32
    # ratio, the source coordinate ``scale * (dst + 0.5) - 0.5`` is evaluated in
    # double (int + 0.5 promotes) and stored as float32, and the weight is
    # taken in float32. This makes the weights bit-identical to torch's, not
    # merely ~1e-5 close. (Per size pair, cached: not per volume.)
    scale = float(np.float32(in_size) / np.float32(out_size))
    dst = np.arange(out_size, dtype=np.float64)
    # Half-pixel centres; torch clamps negative source coordinates to 0.
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0).astype(np.float32)
    i0 = np.minimum(src.astype(np.int64), in_size - 1)  # src >= 0: trunc == floor
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    w0 = np.float32(1.0) - w1
    # At the last pixel both taps are one: fold them (as the matrix sums them).
    same = i0 == i1
    w0 = np.where(same, w0 + w1, w0).astype(np.float32)
    w1 = np.where(same, np.float32(0), w1).astype(np.float32)
    for a in (i0, i1, w0, w1):
        a.flags.writeable = False  # shared by the cache: must never be modified
    return i0, i1, w0, w1


@functools.lru_cache(maxsize=64)
def _bilinear_matrix_cached(in_size: int, out_size: int) -> np.ndarray:
    i0, i1, w0, w1 = _bilinear_taps(in_size, out_size)
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
    return _resize_axis(_resize_axis(arr, out_w, -1), out_h, -2)


def _resize_axis(arr: np.ndarray, size: int, axis: int,
                 keep: slice = slice(None)) -> np.ndarray:
    """Linear resize of one axis as two gathers and a weighted sum (2 taps per output).

    Each output is ``w0 * x[i0] + w1 * x[i1]`` in float32, whatever the array
    around it, so resizing a sub-range (``keep``: which outputs) gives the same
    bits as resizing everything and cutting. (A dense interpolation matrix
    would spend ``in_size`` multiply-adds per output instead of 2.)

    Args:
        arr: float32 array.
        size: Output length of ``axis``.
        axis: ``-1`` or ``-2``.
        keep: The outputs wanted (a slice of ``range(size)``).

    Returns:
        float32, ``arr`` with ``axis`` resized (to the ``keep`` outputs).
    """
    if arr.shape[axis] < 1 or size < 1:
        raise ValueError(f"sizes must be >= 1, got {arr.shape[axis]} -> {size}")
    i0, i1, w0, w1 = (t[keep] for t in _bilinear_taps(int(arr.shape[axis]), int(size)))
    bcast = w0 if axis == -1 else w0[:, None]
    out = np.take(arr, i0, axis=axis)
    out *= bcast
    other = np.take(arr, i1, axis=axis)
    other *= w1 if axis == -1 else w1[:, None]
    out += other
    return out


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
    if vol.dtype != np.float32:
        vol = vol.astype(np.float32)
    spec.check_volume_shape(vol.shape)
    # The statistics are the whole volume's (as the paper does); the per-voxel
    # map is then applied to the oriented crop box only, straight into one
    # contiguous buffer (voxels outside the box never reach the network).
    imap = _intensity_map(vol, spec)
    cropped = _crop(orient_volume(vol, spec), spec)
    norm = np.empty(cropped.shape, dtype=np.float32)
    _normalize_into(norm, cropped, imap)
    s = spec.image_size
    return resize_bilinear(norm, (s, s))


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
    # One gather into the batch (neighbours past either end read a clamped
    # slice, then are zeroed: only at the volume's first and last slabs).
    out = np.take(slices, np.clip(src, 0, max(z - 1, 0)), axis=0)
    if not valid.all():
        out[~valid] = 0
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
    return np.asarray(cropped.any(axis=(1, 2)))  # on the view: no copy of the crop box


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
def _network_probs(
    probs: npt.ArrayLike, spec: PreprocessSpec, volume_shape: tuple[int, ...]
) -> tuple[np.ndarray, int]:
    """Check and unpack the network's ``[Z, 1, S, S]`` / ``[Z, S, S]`` output into ``(p, Z)``."""
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
    return p, z


def probs_to_volume(
    probs: npt.ArrayLike,
    spec: PreprocessSpec,
    volume_shape: tuple[int, ...],
) -> np.ndarray:
    """Map per-slice network outputs back into the input volume's voxel grid.

    The exact inverse of the forward geometry: each ``S×S`` map is resized
    bilinearly to the crop size, pasted into a zero slice of the oriented
    in-plane shape, un-oriented, and the slices are stacked along the axial
    axis. Voxels outside the crop box are 0. All-zero maps (slabs that were
    not run) are not resized: they stay exactly 0.

    Args:
        probs: float ``[Z, 1, S, S]`` or ``[Z, S, S]``.
        spec: The preprocessing spec.
        volume_shape: Shape of the original volume (``Z`` slices on the axial
            axis).

    Returns:
        float32 array of ``volume_shape``: a view of the oriented stack, not
        copied into C order (for the default spec it is Fortran-contiguous,
        NIfTI's own order, so writing it needs no transpose either).

    Raises:
        DunetError: when ``volume_shape`` does not fit the spec.
        ValueError: when ``probs`` does not fit ``volume_shape``.
    """
    p, z = _network_probs(probs, spec, volume_shape)
    rows, cols = spec.inplane_shape
    stack = np.zeros((z, rows, cols), dtype=np.float32)
    (r0, r1), (c0, c1) = spec.crop_rows, spec.crop_cols
    live = np.flatnonzero(p.any(axis=(1, 2)))
    if live.size == z:
        stack[:, r0:r1, c0:c1] = resize_bilinear(p, spec.crop_shape)
    elif live.size:
        stack[live, r0:r1, c0:c1] = resize_bilinear(p[live], spec.crop_shape)
    return unorient_volume(stack, spec)


#: Relative margin below the threshold inside which a network pixel may still
#: produce a lesion voxel: a bilinear output is a convex combination of its
#: taps, and float32 rounding of two 2-tap stages moves it by < 4e-7 relative.
MASK_MARGIN = 1e-5


def _tap_range(hot: np.ndarray, in_size: int, out_size: int) -> slice:
    """The outputs of a 1-D resize whose taps reach an index in ``hot`` (bool ``[in]``)."""
    i0, i1, _, _ = _bilinear_taps(in_size, out_size)
    reach = np.flatnonzero(hot[i0] | hot[i1])
    return slice(int(reach[0]), int(reach[-1]) + 1) if reach.size else slice(0, 0)


def probs_to_mask(
    probs: npt.ArrayLike,
    spec: PreprocessSpec,
    volume_shape: tuple[int, ...],
) -> np.ndarray:
    """``binarize(probs_to_volume(probs, spec, shape), spec)``, resizing only where it can be 1.

    An output voxel is a convex combination of network pixels, so it can
    reach the threshold only when one of them is within :data:`MASK_MARGIN`
    of it or above. Only the box (slices × rows × columns) that such pixels
    reach is resized, with the same 2-tap arithmetic as
    :func:`probs_to_volume`, so the mask is bit-identical.

    Args:
        probs: float ``[Z, 1, S, S]`` or ``[Z, S, S]``.
        spec: The preprocessing spec.
        volume_shape: Shape of the original volume.

    Returns:
        uint8 ``{0, 1}`` of ``volume_shape`` (a view, like :func:`probs_to_volume`).
    """
    p, z = _network_probs(probs, spec, volume_shape)
    rows, cols = spec.inplane_shape
    stack = np.zeros((z, rows, cols), dtype=np.uint8)
    hot = p >= np.float32(spec.threshold * (1.0 - MASK_MARGIN))
    zs = np.flatnonzero(hot.any(axis=(1, 2)))
    if zs.size:
        s = spec.image_size
        (r0, _), (c0, _) = spec.crop_rows, spec.crop_cols
        ch, cw = spec.crop_shape
        rsl = _tap_range(hot.any(axis=(0, 2)), s, ch)
        csl = _tap_range(hot.any(axis=(0, 1)), s, cw)
        zsl = slice(int(zs[0]), int(zs[-1]) + 1)
        box = _resize_axis(_resize_axis(p[zsl], cw, -1, csl), ch, -2, rsl)
        stack[zsl, r0 + rsl.start:r0 + rsl.stop, c0 + csl.start:c0 + csl.stop] = binarize(
            box, spec)
    return unorient_volume(stack, spec)


def binarize(probs: npt.ArrayLike, spec: PreprocessSpec) -> np.ndarray:
    """Threshold probabilities: ``>= spec.threshold`` is lesion (paper: below 0.5 -> 0).

    Returns:
        uint8 array of the same shape with values in {0, 1}.
    """
    return (np.asarray(probs) >= spec.threshold).astype(np.uint8)
