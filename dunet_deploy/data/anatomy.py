"""Test heads with real anatomy: the MNI152 2009a template, warped, biased, with lesions.

The ellipsoid heads of :mod:`dunet_deploy.data.synth` are nearly symmetric:
a rotation about their axes changes little, which makes a registration test
ill-posed. This module builds heads from the MNI152 2009a symmetric template
(T1, grey matter, white matter) that ships inside the nilearn wheel — read from
the installed package, never downloaded:

* :func:`synthesize_anatomy_case` — one registered case on the MNI box: the
  template made another head by a random smooth non-linear warp, a
  multiplicative bias field, Rician noise and implanted hypointense lesions;
* :func:`native_scan` — that head as a scanner would store it: moved by a
  KNOWN affine motion (:func:`random_motion`: rotation, shift, per-axis
  scale), sampled on a sagittal (PIR) or coronal grid, int16.

World coordinates are RAS mm (nibabel's convention) throughout.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from dunet_deploy.errors import DunetError

__all__ = [
    "ANATOMIES",
    "MNI152_SHAPE",
    "NATIVE_LAYOUTS",
    "Motion",
    "NativeScan",
    "load_mni152",
    "mni152_grid",
    "native_scan",
    "random_motion",
    "synthesize_anatomy_case",
]

#: Head models ``dunet-synth --anatomy`` knows.
ANATOMIES = ("ellipsoid", "mni152")
#: The MNI152 2009a grid nilearn ships (1 mm, the ATLAS shape).
MNI152_SHAPE: tuple[int, int, int] = (197, 233, 189)
#: Voxel orders of native scans: sagittal MPRAGE (PIR) and a coronal grid (LIP).
NATIVE_LAYOUTS: dict[str, tuple[str, str, str]] = {
    "sagittal": ("P", "I", "R"),
    "coronal": ("L", "I", "P"),
}
_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# T1 of a lesion relative to white matter (chronic stroke: close to CSF).
_LESION_T1 = (0.25, 0.45)


def _data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise DunetError("the MNI152 anatomy needs nilearn (its wheel ships the template): "
                         "pip install 'dunet-deploy[anatomy]'")
    return Path(spec.origin).parent / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def _mni152_1mm() -> tuple[dict[str, np.ndarray], np.ndarray]:
    folder = _data_dir()
    vols: dict[str, np.ndarray] = {}
    affine = np.eye(4)
    for key, name in _FILES.items():
        path = folder / name
        if not path.is_file():
            raise DunetError(f"{path}: missing from the installed nilearn; reinstall it")
        img: Any = nib.load(str(path))
        vols[key] = np.asarray(img.dataobj, dtype=np.float32) / np.float32(255.0)
        affine = np.asarray(img.affine, dtype=np.float64)
    return vols, affine


def mni152_grid(shape: Sequence[int] = MNI152_SHAPE) -> np.ndarray:
    """Affine of a grid of ``shape`` spanning the MNI152 box (1 mm for the native shape).

    Returns:
        float64 ``[4, 4]`` voxel-to-world (RAS mm); voxel size box / shape per axis.
    """
    _, aff = _mni152_1mm()
    n = np.asarray(MNI152_SHAPE, dtype=np.float64)
    m = np.asarray([int(s) for s in shape], dtype=np.float64)
    zoom = n / m
    out = aff.copy()
    out[:3, :3] = aff[:3, :3] * zoom
    # Same box: the first voxel's edge stays where the 1 mm grid's edge is.
    out[:3, 3] = aff[:3, 3] + aff[:3, :3] @ (0.5 * zoom - 0.5)
    return out


def load_mni152(shape: Sequence[int] = MNI152_SHAPE) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The MNI152 2009a T1, grey- and white-matter maps on a grid of ``shape``.

    Args:
        shape: Grid shape over the MNI box; the template's own 197×233×189
            (1 mm) by default, smaller for fast tests.

    Returns:
        ``({"t1", "gm", "wm"}, affine)``: float32 volumes in [0, 1] and the
        grid's ``[4, 4]`` affine.

    Raises:
        DunetError: when nilearn (the ``anatomy`` extra) is not installed.
    """
    vols, aff = _mni152_1mm()
    shp = tuple(int(s) for s in shape)
    if shp == MNI152_SHAPE:
        return {k: v.copy() for k, v in vols.items()}, aff.copy()
    dst = mni152_grid(shp)
    return {k: _sample(v, aff, dst, shp) for k, v in vols.items()}, dst


def _sample(data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
            dst_shape: Sequence[int], world: np.ndarray | None = None) -> np.ndarray:
    """Linear interpolation of ``data`` at the voxels of a grid, 0 outside.

    ``world`` (``[4, 4]``) maps the destination's world to the source's world
    (identity when ``None``).
    """
    from scipy import ndimage

    m = np.linalg.inv(src_affine) @ (np.eye(4) if world is None else world) @ dst_affine
    return ndimage.affine_transform(data, m[:3, :3], offset=m[:3, 3],
                                    output_shape=tuple(int(n) for n in dst_shape), order=1,
                                    mode="grid-constant", cval=0.0,
                                    prefilter=False).astype(np.float32, copy=False)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], knots: int,
                  amplitude: float) -> np.ndarray:
    """Random smooth field: Gaussian bumps on a ``knots``³ lattice, peak ``amplitude``.

    Separable (one small matrix per axis), so it costs a few products of the
    volume's size whatever the resolution.
    """
    coeffs = rng.standard_normal((knots, knots, knots))
    field = coeffs
    for axis, n in enumerate(shape):
        u = np.linspace(0.0, 1.0, int(n))[:, None]
        centres = np.linspace(0.0, 1.0, knots)[None, :]
        basis = np.exp(-0.5 * ((u - centres) * (knots - 1) / 0.8) ** 2)  # [n, knots]
        field = np.moveaxis(np.tensordot(basis, field, axes=([1], [axis])), 0, axis)
    field = field.astype(np.float32)
    return field * np.float32(amplitude / max(float(np.abs(field).max()), 1e-6))


def _warp(vols: dict[str, np.ndarray], affine: np.ndarray, rng: np.random.Generator,
          max_mm: float) -> dict[str, np.ndarray]:
    """Every volume pulled through one random smooth displacement (≤ ``max_mm``), affine-free.

    The displacement's best affine fit over the head is removed, so the head
    stays registered: its best affine map to the template is the identity, and
    a known motion applied afterwards is exactly what an affine registration
    must find (a warp with an affine part would move the answer by that part).
    """
    from scipy import ndimage

    shape = next(iter(vols.values())).shape
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    fields = [_smooth_field(rng, shape, 5, max_mm / float(zooms[a])) for a in range(3)]
    head = np.argwhere(vols["t1"][::3, ::3, ::3] > 0.05) * 3
    design = np.hstack([head.astype(np.float64), np.ones((len(head), 1))])
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    grid = np.indices(shape, dtype=np.float32)
    coords = []
    for a in range(3):
        beta = np.linalg.lstsq(design, fields[a][tuple(head.T)].astype(np.float64),
                               rcond=None)[0]
        trend = sum(np.float32(beta[k]) * axes[k].astype(np.float32) for k in range(3))
        coords.append(grid[a] + fields[a] - trend - np.float32(beta[3]))
    coords = np.stack(coords)
    return {k: ndimage.map_coordinates(v, coords, order=1, mode="constant", cval=0.0,
                                       prefilter=False).astype(np.float32)
            for k, v in vols.items()}


def _lesions(rng: np.random.Generator, t1: np.ndarray, brain: np.ndarray,
             affine: np.ndarray, count: int) -> np.ndarray:
    """Paint ``count`` hypointense ellipsoids into ``t1`` (in place); their mask, in the brain."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    mask = np.zeros(t1.shape, dtype=bool)
    inside = np.argwhere(brain > 0.9)
    if count == 0 or inside.size == 0:
        return mask
    wm_level = float(np.percentile(t1[brain > 0.9], 90))
    for _ in range(count):
        centre = inside[rng.integers(len(inside))]
        radii_mm = rng.uniform(4.0, 14.0) * rng.uniform(0.7, 1.3, 3)
        reach = np.ceil(radii_mm / zooms).astype(int) + 1
        lo = np.maximum(centre - reach, 0)
        hi = np.minimum(centre + reach + 1, t1.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        axes = np.ogrid[box]
        r = np.sqrt(sum(((axes[a] - centre[a]) * zooms[a] / radii_mm[a]) ** 2
                        for a in range(3))).astype(np.float32)
        frac = np.clip((1.0 - r) * 3.0, 0.0, 1.0) * brain[box]  # soft edge, in the brain only
        value = np.float32(rng.uniform(*_LESION_T1) * wm_level)
        t1[box] += (value - t1[box]) * frac.astype(np.float32)
        mask[box] |= (r <= 1.0) & (brain[box] >= 0.5)
    return mask


def synthesize_anatomy_case(
    seed: int = 0, shape: Sequence[int] = MNI152_SHAPE, *, warp_mm: float = 4.0,
    bias: float = 0.25, lesions: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One registered T1 on the MNI box: warped MNI152 anatomy with lesions.

    Args:
        seed: Seed; the same seed always gives the same case.
        shape: Grid over the MNI box (197×233×189 is 1 mm).
        warp_mm: Largest displacement of the random smooth non-linear warp (mm).
        bias: Peak log-amplitude of the multiplicative bias field (0.25: ±28 %).
        lesions: Number of lesions; ``None`` draws 1–3.

    Returns:
        ``(image, mask, affine)``: float32 T1 ``shape`` (0 outside the head),
        uint8 lesion mask in {0, 1}, float64 ``[4, 4]`` affine.
    """
    rng = np.random.default_rng(seed)
    vols, affine = load_mni152(shape)
    vols = _warp(vols, affine, rng, warp_mm)
    t1 = vols["t1"]
    brain = np.clip(vols["gm"] + vols["wm"], 0.0, 1.0)
    n = int(rng.integers(1, 4)) if lesions is None else int(lesions)
    mask = _lesions(rng, t1, brain, affine, n)
    t1 *= np.exp(_smooth_field(rng, t1.shape, 3, bias))
    head = t1 > 0
    sigma = np.float32(0.02)
    noisy = np.hypot(t1 + rng.standard_normal(t1.shape, dtype=np.float32) * sigma,
                     rng.standard_normal(t1.shape, dtype=np.float32) * sigma)
    image = np.where(head, noisy, 0.0).astype(np.float32) * np.float32(rng.uniform(600, 1200))
    return image, mask.astype(np.uint8), affine


# ----------------------------------------------------------------- native scans
@dataclass(frozen=True)
class Motion:
    """A known head motion: template world → scanner world, ``x' = R·S·(x − c) + c + t``.

    Attributes:
        rotation_deg: Angles about x, y, z (degrees, applied x then y then z).
        shift_mm: Translation ``t`` (mm).
        scale: Per-axis scale ``S`` (head size relative to the template).
        centre: Centre ``c`` of rotation and scaling (mm), the brain's centre.
    """

    rotation_deg: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    scale: tuple[float, float, float]
    centre: tuple[float, float, float] = (0.0, -18.0, 18.0)

    def matrix(self) -> np.ndarray:
        """``[4, 4]`` template world (RAS mm) → scanner world (RAS mm)."""
        ax, ay, az = np.radians(self.rotation_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        lin = rz @ ry @ rx @ np.diag(self.scale)
        c = np.asarray(self.centre, dtype=np.float64)
        out = np.eye(4)
        out[:3, :3] = lin
        out[:3, 3] = c - lin @ c + np.asarray(self.shift_mm, dtype=np.float64)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with the matrix and its inverse (scanner world → template world)."""
        m = self.matrix()
        return {"rotation_deg": list(self.rotation_deg), "shift_mm": list(self.shift_mm),
                "scale": list(self.scale), "centre": list(self.centre),
                "template_to_world": m.tolist(),
                "world_to_template": np.linalg.inv(m).tolist()}


def random_motion(rng: np.random.Generator, max_deg: float = 20.0, max_mm: float = 30.0,
                  scale: tuple[float, float] = (0.9, 1.1)) -> Motion:
    """A random :class:`Motion` within the given limits (each angle, each shift, each scale)."""
    return Motion(
        rotation_deg=tuple(float(a) for a in rng.uniform(-max_deg, max_deg, 3)),  # type: ignore[arg-type]
        shift_mm=tuple(float(s) for s in rng.uniform(-max_mm, max_mm, 3)),  # type: ignore[arg-type]
        scale=tuple(float(s) for s in rng.uniform(*scale, 3)),  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class NativeScan:
    """A head as the scanner stored it.

    Attributes:
        data: int16 ``[X, Y, Z]`` in the layout's voxel order.
        affine: float64 ``[4, 4]`` voxel → scanner world (RAS mm).
        mask: uint8 lesion mask on the same grid (nearest of the linear map ≥ 0.5).
        motion: The motion applied (template world → scanner world).
        layout: ``"sagittal"`` or ``"coronal"``.
    """

    data: np.ndarray
    affine: np.ndarray
    mask: np.ndarray
    motion: Motion
    layout: str


def _native_grid(layout: str, voxel_mm: float, box_lo: np.ndarray,
                 box_hi: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
    """A grid in ``layout``'s voxel order covering the world box ``[box_lo, box_hi]``."""
    from nibabel import orientations as nio

    codes = NATIVE_LAYOUTS[layout]
    ornt = nio.axcodes2ornt(codes)
    shape = []
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for vox_axis, (world_axis, sign) in enumerate(ornt.astype(int)):
        n = int(np.ceil((box_hi[world_axis] - box_lo[world_axis]) / voxel_mm)) + 1
        shape.append(n)
        affine[world_axis, vox_axis] = sign * voxel_mm
        affine[world_axis, 3] = box_lo[world_axis] if sign > 0 else box_hi[world_axis]
    return (shape[0], shape[1], shape[2]), affine


def native_scan(
    image: npt.ArrayLike, affine: npt.ArrayLike, motion: Motion, *,
    mask: npt.ArrayLike | None = None, layout: str = "sagittal", voxel_mm: float = 1.0,
    margin_mm: float = 10.0,
) -> NativeScan:
    """Move a registered head by ``motion`` and sample it on a scanner grid.

    The scanner grid is aligned with the world axes in ``layout``'s voxel
    order and covers the moved head's bounding box plus ``margin_mm``.

    Args:
        image: float ``[X, Y, Z]`` registered T1 (e.g. from :func:`synthesize_anatomy_case`).
        affine: Its ``[4, 4]`` voxel → template world affine.
        motion: Template world → scanner world.
        mask: Optional lesion mask on ``image``'s grid, carried along.
        layout: ``"sagittal"`` (PIR) or ``"coronal"`` (LIP).
        voxel_mm: Isotropic voxel size of the scanner grid.
        margin_mm: Margin around the moved head.

    Returns:
        The :class:`NativeScan`; ``motion.to_dict()["world_to_template"]`` is
        the exact answer a registration must find.

    Raises:
        DunetError: on an unknown layout or a non-positive voxel size.
    """
    if layout not in NATIVE_LAYOUTS:
        raise DunetError(f"layout {layout!r}: choose one of {', '.join(NATIVE_LAYOUTS)}")
    if not voxel_mm > 0:
        raise DunetError(f"voxel_mm {voxel_mm}: must be > 0")
    img = np.asarray(image, dtype=np.float32)
    aff = np.asarray(affine, dtype=np.float64)
    m = motion.matrix()
    head = np.argwhere(img > 0)
    lo_v, hi_v = head.min(axis=0), head.max(axis=0)
    corners = np.array([[x, y, z, 1.0] for x in (lo_v[0], hi_v[0]) for y in (lo_v[1], hi_v[1])
                        for z in (lo_v[2], hi_v[2])])
    world = (m @ aff @ corners.T).T[:, :3]
    shape, native_aff = _native_grid(layout, voxel_mm, world.min(axis=0) - margin_mm,
                                     world.max(axis=0) + margin_mm)
    inv = np.linalg.inv(m)  # scanner world -> template world
    moved = _sample(img, aff, native_aff, shape, world=inv)
    top = float(moved.max()) if moved.size else 0.0
    data = np.round(moved * np.float32(3000.0 / max(top, 1e-6))).astype(np.int16)
    lesion = np.zeros(shape, dtype=np.uint8)
    if mask is not None:
        lesion = (_sample((np.asarray(mask) > 0).astype(np.float32), aff, native_aff, shape,
                          world=inv) >= 0.5).astype(np.uint8)
    return NativeScan(data, native_aff, lesion, motion, layout)
