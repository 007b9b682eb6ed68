"""Scan geometry: bring any input onto the model's voxel grid and back.

A model is trained on volumes in one voxel orientation and spacing, often on
one shared grid (ATLAS: MNI, 197×233×189 at 1 mm). The spec records them
(:func:`measure_geometry`, at training time); :func:`plan_model_space` then
plans, per input, the way onto that grid:

* **same grid** (or an old spec that knows no geometry): the voxels pass
  through unchanged;
* **another voxel order** (LAS, PIR, sagittal-first, ... of the same grid):
  exact flips and transposes (:mod:`nibabel.orientations`), no interpolation,
  and the exact inverse for the probabilities;
* **another spacing or grid**: one linear interpolation through the two
  affines (:func:`scipy.ndimage.affine_transform`, ``order=1``) onto the
  training grid, and one back onto the input grid for the probabilities
  (before thresholding). Without a shared training grid the target is the
  training spacing on the spec's in-plane size, centred on the scan.

Oblique affines are reoriented by their closest axes and their obliquity is
reported (a warning above ``oblique_warn_deg``). Only numpy, nibabel and scipy
are used (the torch-free runtime imports this module).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
from nibabel import orientations as nio

from dunet_deploy.choices import RESAMPLE_MODES
from dunet_deploy.errors import DunetError
from dunet_deploy.spec import ATLAS_SHAPE, PreprocessSpec

__all__ = [
    "MIN_OVERLAP",
    "OBLIQUE_WARN_DEG",
    "ModelSpace",
    "axcodes",
    "describe_box",
    "describe_grid",
    "measure_geometry",
    "obliquity_deg",
    "plan_model_space",
    "reoriented_shape",
]

#: Obliquity (degrees) above which a warning is reported.
OBLIQUE_WARN_DEG = 5.0
#: Least fraction of the smaller of the two world boxes (scan, training grid)
#: that must overlap; below it the scan is not in the training space.
MIN_OVERLAP = 0.5
# Two affines denote the same grid when every entry agrees to this (mm).
_AFFINE_ATOL = 1e-3
# Voxel sizes agree when within this relative tolerance.
_ZOOM_RTOL = 1e-3


# ------------------------------------------------------------------ helpers
def axcodes(affine: npt.ArrayLike) -> tuple[str, str, str]:
    """Axis codes of an affine's voxel axes by their closest world axes (``("R","A","S")``)."""
    codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    return (str(codes[0]), str(codes[1]), str(codes[2]))


def obliquity_deg(affine: npt.ArrayLike) -> float:
    """Largest angle (degrees) between a voxel axis and its closest world axis."""
    angles = nib.affines.obliquity(np.asarray(affine, dtype=np.float64))
    return float(np.degrees(np.max(np.abs(angles))))


def _zooms(affine: np.ndarray) -> tuple[float, float, float]:
    z = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return (float(z[0]), float(z[1]), float(z[2]))


def _fmt_mm(values: Sequence[float]) -> str:
    parts = [f"{v:.4g}" for v in values]
    return parts[0] if len(set(parts)) == 1 else "x".join(parts)


def describe_grid(shape: Sequence[int], affine: npt.ArrayLike) -> str:
    """Human name of a grid: ``"MNI 197x233x189 at 1 mm"``, ``"64x80x48 at 1.25 mm, LAS"``.

    The ATLAS shape at 1 mm is named MNI (the space ATLAS is registered to).
    """
    aff = np.asarray(affine, dtype=np.float64)
    dims = "x".join(str(int(n)) for n in shape)
    zooms = _zooms(aff)
    text = f"{dims} at {_fmt_mm(zooms)} mm"
    if tuple(int(n) for n in shape) == ATLAS_SHAPE and np.allclose(zooms, 1.0, rtol=_ZOOM_RTOL):
        return f"MNI {text}"
    return f"{text}, {''.join(axcodes(aff))}"


def describe_box(shape: Sequence[int], affine: npt.ArrayLike) -> str:
    """Where a grid lies: its world box to the mm, ``"x -98..98 y -134..98 z -72..116 mm"``.

    Two grids of the same shape and spacing differ here when they lie at
    different places (messages name both).
    """
    lo, hi = _world_box(shape, np.asarray(affine, dtype=np.float64))
    return " ".join(f"{axis} {round(float(a))}..{round(float(b))}"
                    for axis, a, b in zip("xyz", lo, hi, strict=True)) + " mm"


def _reorientation(affine: np.ndarray, codes: Sequence[str]) -> np.ndarray:
    """nibabel ornt taking the voxel axes of ``affine`` to axis codes ``codes``."""
    return nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(codes)))


def _reoriented(
    shape: Sequence[int], affine: np.ndarray, codes: Sequence[str]
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """``(shape, affine, ornt)`` of a grid after exact reorientation to ``codes``."""
    ornt = _reorientation(affine, codes)
    shp = tuple(int(n) for n in shape)
    new_shape = tuple(shp[int(ax)] for ax in np.argsort(ornt[:, 0]))
    new_affine = affine @ nio.inv_ornt_aff(ornt, shp)
    return (new_shape[0], new_shape[1], new_shape[2]), new_affine, ornt


def reoriented_shape(
    shape: Sequence[int], affine: npt.ArrayLike, codes: Sequence[str] | None
) -> tuple[int, ...]:
    """Array shape of a volume once reoriented to ``codes`` (unchanged for ``None``)."""
    if codes is None:
        return tuple(int(n) for n in shape)
    return _reoriented(shape, np.asarray(affine, dtype=np.float64), codes)[0]


def _header_geometry(item: Any) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape, affine)`` of a Case (header only), a NiftiVolume, an image or a pair."""
    if isinstance(item, tuple) and len(item) == 2:
        shape, affine = item
    elif hasattr(item, "image") and hasattr(item, "case_id"):  # a layouts.Case
        try:
            img: Any = nib.load(str(item.image))
        except Exception as exc:  # nibabel raises many types on corrupt input
            raise DunetError(f"case {item.case_id}: {item.image}: cannot read NIfTI header "
                             f"({exc})") from None
        shape, affine = img.shape, img.affine
    elif hasattr(item, "affine") and hasattr(item, "shape"):
        shape, affine = item.shape, item.affine
    else:
        raise TypeError(f"cannot measure the geometry of {type(item).__name__}")
    dims = tuple(int(n) for n in shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    return dims[:3], np.asarray(affine, dtype=np.float64)


def measure_geometry(cases_or_images: Iterable[Any]) -> dict[str, Any]:
    """The training data's geometry, for :meth:`PreprocessSpec.for_geometry`.

    Args:
        cases_or_images: :class:`~dunet_deploy.data.layouts.Case` objects (only
            headers are read), :class:`~dunet_deploy.data.nifti.NiftiVolume`\\ s,
            nibabel images or ``(shape, affine)`` pairs.

    Returns:
        ``{"orientation": ("R","A","S"), "voxel_size": (x, y, z) mm,
        "grid_affine": float64 [4, 4] or None}``: the most common orientation
        (every volume is brought to it), the median voxel size along its axes,
        and the affine all volumes share once reoriented (``None`` when their
        shapes or affines differ).

    Raises:
        DunetError: when nothing is given or a header cannot be read.
    """
    geoms = [_header_geometry(item) for item in cases_or_images]
    if not geoms:
        raise DunetError("measure_geometry: no volumes given")
    # Counter keeps first-seen order among equal counts: ties go to the first volume.
    orientation = Counter(axcodes(aff) for _, aff in geoms).most_common(1)[0][0]
    grids = [_reoriented(shape, aff, orientation)[:2] for shape, aff in geoms]
    zooms = np.median(np.array([_zooms(aff) for _, aff in grids]), axis=0)
    shape0, aff0 = grids[0]
    shared = all(s == shape0 and np.allclose(a, aff0, atol=_AFFINE_ATOL) for s, a in grids)
    return {
        "orientation": orientation,
        "voxel_size": tuple(round(float(z), 6) for z in zooms),
        "grid_affine": aff0.copy() if shared else None,
    }


def _world_box(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (min, max corners) of a grid's voxels."""
    n = np.asarray(shape, dtype=np.float64)
    corners = np.array([[x, y, z] for x in (-0.5, n[0] - 0.5) for y in (-0.5, n[1] - 0.5)
                        for z in (-0.5, n[2] - 0.5)])
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def _overlap(shape_a: Sequence[int], aff_a: np.ndarray, shape_b: Sequence[int],
             aff_b: np.ndarray) -> float:
    """Volume of the intersection of two world boxes over the smaller box's volume."""
    lo_a, hi_a = _world_box(shape_a, aff_a)
    lo_b, hi_b = _world_box(shape_b, aff_b)
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None).prod()
    smaller = min((hi_a - lo_a).prod(), (hi_b - lo_b).prod())
    return float(inter / smaller) if smaller > 0 else 0.0


def _resample(data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
              dst_shape: Sequence[int]) -> np.ndarray:
    """Linear interpolation of ``data`` (on ``src_affine``) onto another grid; 0 outside."""
    from scipy import ndimage  # imported here: only resampling needs it

    m = np.linalg.solve(src_affine, dst_affine)  # dst voxel -> src voxel
    lin = m[:3, :3]
    # A diagonal matrix takes scipy's faster separable path.
    matrix = np.diag(lin) if np.allclose(lin, np.diag(np.diag(lin)), atol=1e-12) else lin
    return ndimage.affine_transform(
        np.asarray(data, dtype=np.float32), matrix, offset=m[:3, 3],
        output_shape=tuple(int(n) for n in dst_shape), order=1, mode="grid-constant",
        cval=0.0, prefilter=False,
    ).astype(np.float32, copy=False)


# ------------------------------------------------------------------ the plan
@dataclass(frozen=True, eq=False)
class ModelSpace:
    """How one input grid maps onto the model's grid and back.

    Attributes:
        input_shape: ``(X, Y, Z)`` of the input volume.
        input_affine: float64 ``[4, 4]`` voxel-to-world of the input.
        model_shape: Shape of the volume the network pipeline gets.
        model_affine: float64 ``[4, 4]`` voxel-to-world of that volume.
        method: ``"none"`` (voxels unchanged), ``"reorient"`` (exact flips and
            transposes) or ``"linear"`` (resampled through the affines).
        model_orientation: Axis codes of the model grid (``None``: unknown).
        grid: Name of the training grid when the spec has one.
        overlap: World-box overlap with the training grid (``None`` without one).
        warnings: One-line warnings (e.g. an oblique input).
    """

    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray
    method: str
    model_orientation: tuple[str, str, str] | None = None
    grid: str | None = None
    overlap: float | None = None
    warnings: tuple[str, ...] = field(default=())

    def _map(self, data: npt.ArrayLike, *, forward: bool) -> np.ndarray:
        """Move voxels input -> model grid (``forward``) or model -> input grid."""
        src = (self.input_shape, self.input_affine)
        dst = (self.model_shape, self.model_affine)
        if not forward:
            src, dst = dst, src
        arr = np.asarray(data)
        if arr.shape != src[0]:
            raise ValueError(f"array has shape {arr.shape}, this plan maps {src[0]} -> {dst[0]}")
        if self.method == "linear":
            return _resample(arr, src[1], dst[1], dst[0])
        if self.method == "reorient":
            arr = nio.apply_orientation(arr, _reorientation(src[1], axcodes(dst[1])))
        return np.ascontiguousarray(arr, dtype=np.float32)

    def to_model(self, data: npt.ArrayLike) -> np.ndarray:
        """Input voxels -> the model's grid.

        Args:
            data: ``input_shape`` array (image intensities, or a 0/1 mask).

        Returns:
            float32 ``model_shape`` (exact for ``"none"``/``"reorient"``;
            linear interpolation, 0 outside the input, for ``"linear"``).
        """
        return self._map(data, forward=True)

    def mask_to_model(self, mask: npt.ArrayLike) -> np.ndarray:
        """A lesion mask (``> 0``) on the model grid: exact, or linear then ``>= 0.5``.

        Returns:
            uint8 ``model_shape`` in {0, 1}.
        """
        binary = (np.asarray(mask) > 0).astype(np.float32)
        return (self.to_model(binary) >= np.float32(0.5)).astype(np.uint8)

    def to_input(self, prob: npt.ArrayLike) -> np.ndarray:
        """Model-grid probabilities -> the input's own grid (before thresholding).

        Args:
            prob: float ``model_shape`` array.

        Returns:
            float32 ``input_shape``: the exact inverse of :meth:`to_model` for
            ``"none"``/``"reorient"``, linear interpolation for ``"linear"``.
        """
        return self._map(prob, forward=False)

    @property
    def model_zooms(self) -> tuple[float, float, float]:
        """Voxel size (mm) of the model grid."""
        return _zooms(self.model_affine)

    def describe(self) -> dict[str, Any]:
        """What was done, JSON-able (for ``summary.json``)."""
        return {
            "input_orientation": "".join(axcodes(self.input_affine)),
            "model_orientation": (None if self.model_orientation is None
                                  else "".join(self.model_orientation)),
            "obliquity_deg": round(obliquity_deg(self.input_affine), 3),
            "input_shape": list(self.input_shape),
            "model_shape": list(self.model_shape),
            "spacing_before_mm": [round(z, 6) for z in _zooms(self.input_affine)],
            "spacing_after_mm": [round(z, 6) for z in self.model_zooms],
            "reoriented": self.method == "reorient",
            "resampled": self.method == "linear",
            "method": self.method,
            "grid": self.grid,
            "overlap": None if self.overlap is None else round(self.overlap, 4),
            "warnings": list(self.warnings),
        }


def _oblique_warnings(affine: np.ndarray, limit: float, method: str) -> tuple[str, ...]:
    deg = obliquity_deg(affine)
    if deg <= limit:
        return ()
    how = ("resampled through its affine" if method == "linear"
           else f"handled by its closest axes ({''.join(axcodes(affine))})")
    return (f"oblique affine: {deg:.1f} degrees off the world axes (> {limit:g}), {how}",)


def _spacing_target(shape_r: Sequence[int], aff_r: np.ndarray,
                    spec: PreprocessSpec) -> tuple[tuple[int, int, int], np.ndarray]:
    """Grid at the training spacing, the spec's in-plane size, centred on the scan."""
    assert spec.voxel_size is not None
    vs = np.asarray(spec.voxel_size, dtype=np.float64)
    zooms = np.asarray(_zooms(aff_r))
    ax = spec.axial_axis
    dims = list(spec.volume_shape)
    dims[ax] = max(1, int(np.rint(shape_r[ax] * zooms[ax] / vs[ax])))
    lin = aff_r[:3, :3] / zooms * vs
    centre = aff_r[:3, :3] @ ((np.asarray(shape_r) - 1) / 2.0) + aff_r[:3, 3]
    target = np.eye(4)
    target[:3, :3] = lin
    target[:3, 3] = centre - lin @ ((np.asarray(dims) - 1) / 2.0)
    return (dims[0], dims[1], dims[2]), target


def plan_model_space(
    shape: Sequence[int],
    affine: npt.ArrayLike,
    spec: PreprocessSpec,
    *,
    resample: str = "auto",
    oblique_warn_deg: float = OBLIQUE_WARN_DEG,
    min_overlap: float = MIN_OVERLAP,
) -> ModelSpace:
    """Plan the way of one input volume onto the model's grid.

    Args:
        shape: ``(X, Y, Z)`` of the input.
        affine: Its ``[4, 4]`` voxel-to-world affine.
        spec: The model's spec (a version-1 spec, without geometry, passes the
            volume through unchanged, as before).
        resample: ``"auto"`` resamples an input whose spacing or grid differs
            from the training data's; ``"never"`` refuses it.
        oblique_warn_deg: Obliquity above which a warning is added.
        min_overlap: Least world-box overlap with the training grid (fraction
            of the smaller box); below it the scan is refused as not being in
            the training space.

    Returns:
        The plan.

    Raises:
        DunetError: a one-line refusal: not a 3D shape; not registered to the
            training space; ``resample="never"`` with another grid or spacing;
            a shape the spec's crop cannot take.
    """
    if resample not in RESAMPLE_MODES:
        raise DunetError(f"--resample {resample!r}: choose one of {', '.join(RESAMPLE_MODES)}")
    shp = tuple(int(n) for n in shape)
    if len(shp) != 3:
        raise DunetError(f"volume has shape {shp}; a 3D volume is required")
    aff = np.asarray(affine, dtype=np.float64)
    if spec.orientation is None:  # version-1 spec: today's behaviour
        spec.check_volume_shape(shp)
        return ModelSpace(shp, aff, shp, aff, "none",
                          warnings=_oblique_warnings(aff, oblique_warn_deg, "none"))
    codes = spec.orientation
    shape_r, aff_r, _ = _reoriented(shp, aff, codes)
    method = "none" if shape_r == shp and np.allclose(aff_r, aff) else "reorient"
    grid = spec.grid_matrix
    target: tuple[tuple[int, int, int], np.ndarray] | None = None
    overlap = name = None
    if grid is not None:
        name = describe_grid(spec.volume_shape, grid)
        same = shape_r == spec.volume_shape and np.allclose(aff_r, grid, atol=_AFFINE_ATOL)
        if not same:
            overlap = _overlap(shp, aff, spec.volume_shape, grid)
            if overlap < min_overlap:
                raise DunetError(
                    f"scan grid {describe_grid(shp, aff)} at {describe_box(shp, aff)} covers "
                    f"only {100 * overlap:.0f}% of the training grid {name} at "
                    f"{describe_box(spec.volume_shape, grid)}: scans must be registered to "
                    "that space (--register)"
                )
            target = (spec.volume_shape, grid)
        else:
            overlap = 1.0
    elif spec.voxel_size is not None and not np.allclose(_zooms(aff_r), spec.voxel_size,
                                                         rtol=_ZOOM_RTOL):
        target = _spacing_target(shape_r, aff_r, spec)
        name = f"training voxel size {_fmt_mm(spec.voxel_size)} mm"
    if target is not None:
        if resample == "never":
            raise DunetError(
                f"--resample never forbids resampling scan grid {describe_grid(shp, aff)} "
                f"at {describe_box(shp, aff)} onto the model's "
                f"{'training grid ' if grid is not None else ''}{name}"
                f"{f' at {describe_box(spec.volume_shape, grid)}' if grid is not None else ''}"
            )
        model_shape, model_aff = target
        return ModelSpace(shp, aff, model_shape, model_aff, "linear",
                          model_orientation=codes, grid=name if grid is not None else None,
                          overlap=overlap,
                          warnings=_oblique_warnings(aff, oblique_warn_deg, "linear"))
    try:
        spec.check_volume_shape(shape_r)
    except DunetError as exc:
        raise DunetError(f"{exc} (after reorienting {''.join(axcodes(aff))} to "
                         f"{''.join(codes)})") from None
    return ModelSpace(shp, aff, shape_r, aff_r, method, model_orientation=codes,
                      grid=name, overlap=overlap,
                      warnings=_oblique_warnings(aff, oblique_warn_deg, method))
