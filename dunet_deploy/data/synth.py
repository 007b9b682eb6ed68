"""Synthetic T1 "stroke" volumes for tests, demos and smoke training.

The phantom is a head in normalised coordinates ``u in [-1, 1]^3``: scalp
(bright, fat), skull (dark), a CSF layer, a brain with a folded cortical grey
matter band around bright white matter, deep grey nuclei and two lateral
ventricles. Chronic stroke lesions are T1-hypointense (CSF-like) blobs of
log-uniformly distributed size placed inside the brain. A smooth
multiplicative bias field and Rician noise complete the picture. Everything
outside the head is exactly 0, like a registered, zero-filled scan, so the
top and bottom slices are empty (this exercises empty-slab skipping).

Everything is vectorised numpy on open grids; a 64×80×48 case takes a few
tens of milliseconds and a 197×233×189 case well under a few seconds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from dunet_deploy.data.layouts import LAYOUTS, Case
from dunet_deploy.errors import DunetError

__all__ = [
    "DEFAULT_SHAPE",
    "MARKER_FILE",
    "preview_png",
    "synth_affine",
    "synthesize_case",
    "write_dataset",
]

DEFAULT_SHAPE: tuple[int, int, int] = (64, 80, 48)
#: Written into every dataset folder created by :func:`write_dataset`.
MARKER_FILE = "dunet_synth.json"

# T1 contrast, relative to white matter = 1.
_SCALP, _SKULL, _CSF, _GM, _DEEP_GM, _WM = 0.75, 0.08, 0.18, 0.62, 0.7, 1.0
_NOISE_SIGMA = 0.03
_INT16_MAX = 32000.0


def _ramp(signed_dist: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume fraction: 1 inside (dist > 0), 0 outside, linear across ``width``."""
    return np.clip(signed_dist / width + 0.5, 0.0, 1.0, dtype=np.float32)


def _lerp(a: np.ndarray, b: float, t: np.ndarray) -> np.ndarray:
    return a + (np.float32(b) - a) * t


def _waves(
    rng: np.random.Generator, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray, n: int, freq: float
) -> np.ndarray:
    """Sum of ``n`` random plane waves (wave numbers ~ N(0, freq)), roughly in [-1, 1]."""
    out: np.ndarray = np.zeros(np.broadcast_shapes(ux.shape, uy.shape, uz.shape), np.float32)
    for _ in range(n):
        k = rng.normal(0.0, freq, 3).astype(np.float32)
        phase = np.float32(rng.uniform(0, 2 * np.pi))
        out += np.cos(k[0] * ux + k[1] * uy + k[2] * uz + phase)
    out *= np.float32(1.0 / np.sqrt(n))
    return out


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def synthesize_case(
    shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic T1 volume with 0–3 hypointense lesions.

    The image is already quantised the way :func:`write_dataset` stores it
    (int16 × ``scl_slope``), so it equals what :func:`load_nifti` reads back
    up to float rounding.

    Args:
        shape: ``(X, Y, Z)``, each >= 8.
        seed: Seed; the same seed always gives the same case.

    Returns:
        ``(image, mask)``: float32 ``[X, Y, Z]`` (0 outside the head) and
        uint8 ``[X, Y, Z]`` lesion mask in {0, 1}, lesions inside the brain.

    Raises:
        DunetError: for a shape that is not three sizes >= 8.
    """
    shp = tuple(int(n) for n in shape)
    if len(shp) != 3 or min(shp) < 8:
        raise DunetError(f"synthetic shape must be three sizes >= 8, got {tuple(shape)}")
    rng = np.random.default_rng(seed)
    nx, ny, nz = shp
    # Normalised open-grid coordinates (broadcast, never materialised 3 times).
    ux = np.linspace(-1, 1, nx, dtype=np.float32)[:, None, None]
    uy = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    uz = np.linspace(-1, 1, nz, dtype=np.float32)[None, None, :]
    width = 2.0 / min(shp)  # one voxel of the coarsest axis, in normalised units

    v, r_head, r_brain, brain_frac = _anatomy(rng, shp, (ux, uy, uz), width)
    # Lesions: log-uniform radius from under a voxel to ~12% of the smallest
    # extent (a few voxels up to tens of thousands at the ATLAS shape).
    mask = np.zeros(shp, dtype=bool)
    n_lesions = int(rng.choice(4, p=[0.1, 0.4, 0.3, 0.2]))
    for _ in range(n_lesions):
        _add_lesion(rng, v, mask, r_brain, brain_frac)
    v = _bias_and_noise(rng, v, (ux, uy, uz))
    # Zero-filled outside the head (partial volume across the edge).
    v *= _ramp(1.0 - r_head, width)
    v *= np.float32(rng.uniform(400.0, 900.0))  # arbitrary scanner units

    slope = _int16_slope(v)
    image = (np.round(v / slope).astype(np.int16).astype(np.float32) * slope).astype(np.float32)
    return image, mask.astype(np.uint8)


Grid = tuple[np.ndarray, np.ndarray, np.ndarray]


def _anatomy(
    rng: np.random.Generator, shp: tuple[int, ...], grid: Grid, width: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Head, skull, CSF, grey/white matter, deep nuclei and ventricles.

    Returns:
        ``(v, r_head, r_brain, brain_frac)``: float32 intensities of ``shp``, the
        normalised head and brain radii (< 1 inside) and the brain's partial volume.
    """
    ux, uy, uz = grid
    # Head: ellipsoid that leaves empty slices at the top and bottom.
    ax, ay, az = 0.86 + 0.04 * rng.random(), 0.9 + 0.04 * rng.random(), 0.78 + 0.04 * rng.random()
    r_head = np.sqrt((ux / ax) ** 2 + (uy / ay) ** 2 + ((uz + 0.04) / az) ** 2)
    # Cortical folding: a few random plane waves perturb the brain surface and
    # the grey/white boundary.
    fold = _waves(rng, ux, uy, uz, n=4, freq=7.0)  # gentle surface undulation
    gyri = _waves(rng, ux, uy, uz, n=6, freq=16.0)  # finer grey/white interdigitation
    r_brain = r_head / np.float32(0.84) * (1 + np.float32(0.025) * fold)

    v = np.full(shp, _SCALP, dtype=np.float32)
    v = _lerp(v, _SKULL, _ramp(0.94 - r_head, width))
    v = _lerp(v, _CSF, _ramp(0.88 - r_head, width))
    brain_frac = _ramp(1.0 - r_brain, width)
    v = _lerp(v, _GM, brain_frac)
    v = _lerp(v, _WM, _ramp(0.8 + 0.03 * fold + 0.05 * gyri - r_brain, width))
    # Deep grey nuclei and lateral ventricles, mirrored left/right.
    for side in (-1.0, 1.0):
        deep = np.sqrt(((ux - side * 0.18) / 0.1) ** 2 + (uy / 0.16) ** 2
                       + ((uz + 0.05) / 0.12) ** 2)
        v = _lerp(v, _DEEP_GM, _ramp(1.0 - deep, width / 0.12))
        vent = np.sqrt(((ux - side * 0.07) / 0.05) ** 2 + ((uy - 0.05) / 0.3) ** 2
                       + ((uz - 0.12) / 0.1) ** 2)
        v = _lerp(v, _CSF, _ramp(1.0 - vent, width / 0.06))
    return v, r_head, r_brain, brain_frac


def _add_lesion(rng: np.random.Generator, v: np.ndarray, mask: np.ndarray,
                r_brain: np.ndarray, brain_frac: np.ndarray) -> None:
    """Paint one hypointense ellipsoid into ``v`` and ``mask`` (in place), inside the brain."""
    shp = v.shape
    radius = float(np.exp(rng.uniform(np.log(0.8), np.log(max(1.0, 0.14 * min(shp))))))
    axes = radius * rng.uniform(0.6, 1.4, 3)
    rot = _random_rotation(rng)
    value = float(rng.uniform(0.22, 0.4))
    for _attempt in range(1000):  # integer centre in the deep brain: blob never empty
        c = rng.uniform(-0.65, 0.65, 3)
        centre = np.round((c + 1) / 2 * (np.array(shp) - 1)).astype(int)
        if r_brain[tuple(centre)] < 0.8:
            break
    else:  # pragma: no cover - the brain centre always qualifies
        centre = np.array(shp) // 2
    reach = int(np.ceil(axes.max())) + 2
    lo = np.maximum(centre - reach, 0)
    hi = np.minimum(centre + reach + 1, shp)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grids = np.meshgrid(*(np.arange(a, b) - c0 for a, b, c0 in zip(lo, hi, centre, strict=True)),
                        indexing="ij")
    rel = np.stack(grids, axis=-1).astype(np.float32) @ rot.astype(np.float32)
    r_les = np.sqrt(((rel / axes.astype(np.float32)) ** 2).sum(axis=-1))
    # Partial volume over about one voxel at the lesion edge.
    frac = np.clip((1.0 - r_les) * np.float32(radius) + 0.5, 0, 1).astype(np.float32)
    frac *= brain_frac[box]
    v[box] = _lerp(v[box], value, frac)
    mask[box] |= (r_les <= 1.0) & (r_brain[box] < 1.0)


def _bias_and_noise(rng: np.random.Generator, v: np.ndarray, grid: Grid) -> np.ndarray:
    """A smooth multiplicative bias field, then Rician noise."""
    ux, uy, uz = grid
    # Low-order polynomial in exp.
    cx, cy, cz, cxy, czz = (np.float32(c) for c in rng.uniform(-0.12, 0.12, 5))
    v = v * np.exp(cx * ux + cy * uy + cz * uz + cxy * ux * uy + czz * uz * uz)
    # Rician noise: magnitude of a complex signal with Gaussian noise.
    sigma = np.float32(_NOISE_SIGMA)
    n1 = rng.standard_normal(v.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(v.shape, dtype=np.float32) * sigma
    return np.sqrt((v + n1) ** 2 + n2**2)


def _int16_slope(v: np.ndarray) -> np.float32:
    vmax = float(v.max()) if v.size else 0.0
    # Round to float32 because that is what the NIfTI header stores.
    return np.float32(max(vmax, 1e-6) / _INT16_MAX)


def synth_affine(shape: Sequence[int]) -> np.ndarray:
    """1 mm MNI-like affine (x axis flipped, volume centre near the origin)."""
    nx, ny, nz = (int(n) for n in shape)
    aff = np.diag([-1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [(nx - 1) / 2.0, -(ny - 1) / 2.0, -(nz - 1) / 2.0]
    return aff


def _save_image(path: Path, image: np.ndarray, affine: np.ndarray) -> None:
    slope = _int16_slope(image)
    raw = np.round(image / slope).astype(np.int16)
    img = nib.Nifti1Image(raw, affine)
    # Kept by nibabel because raw already has the on-disk dtype; readers must
    # apply it (this is what exercises scl_slope handling).
    img.header.set_slope_inter(float(slope), 0.0)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=4)  # 4 = MNI
    nib.save(img, str(path))


def _save_mask(path: Path, mask: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=4)
    nib.save(img, str(path))


def _split_mask(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a lesion mask into two parts along x (two LesionSmooth files)."""
    xs = np.nonzero(mask)[0]
    cut = int(np.median(xs)) if xs.size else 0
    first = mask.copy()
    first[cut:] = 0
    return first, mask & ~first


def write_dataset(
    out_dir: str | os.PathLike[str],
    cases: int = 8,
    layout: str = "atlas-r1.1",
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    anatomy: str = "ellipsoid",
) -> list[Case]:
    """Write a synthetic dataset in one of the supported layouts.

    Case ``i`` is ``synthesize_case(shape, seed + i)``. Images are int16 with
    ``scl_slope``, masks uint8, both ``.nii.gz`` with a 1 mm MNI-like affine.
    In ``atlas-r1.1`` every third case (i % 3 == 1) has its lesion split over
    two ``LesionSmooth`` masks. A ``dunet_synth.json`` marker records the
    parameters.

    Args:
        out_dir: Target folder (created if needed).
        cases: Number of cases, >= 1.
        layout: One of ``"atlas-r1.1"``, ``"atlas-v2"``, ``"pairs"``.
        shape: Volume shape ``(X, Y, Z)``.
        seed: Seed of case 0.
        anatomy: ``"ellipsoid"`` (:func:`synthesize_case`) or ``"mni152"``
            (:func:`~dunet_deploy.data.anatomy.synthesize_anatomy_case`: the MNI152
            2009a template warped, on a ``shape`` grid over the MNI box).

    Returns:
        The written cases, sorted by ``case_id`` (as
        :func:`~dunet_deploy.data.layouts.discover_cases` finds them).

    Raises:
        DunetError: on a bad layout, case count or shape.
    """
    if layout not in LAYOUTS:
        raise DunetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if cases < 1:
        raise DunetError(f"number of cases must be >= 1, got {cases}")
    shp = tuple(int(n) for n in shape)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    from dunet_deploy.data import anatomy as anat

    if anatomy not in anat.ANATOMIES:
        raise DunetError(f"anatomy {anatomy!r}: choose one of {', '.join(anat.ANATOMIES)}")
    affine = anat.mni152_grid(shp) if anatomy == "mni152" else synth_affine(shp)
    written: list[Case] = []
    for i in range(cases):
        if anatomy == "mni152":
            image, mask, _ = anat.synthesize_anatomy_case(seed + i, shp)
        else:
            image, mask = synthesize_case(shp, seed + i)
        if layout == "atlas-r1.1":
            subject = f"{i + 1:06d}"
            folder = root / f"Site{i % 2 + 1}" / subject / "t01"
            folder.mkdir(parents=True, exist_ok=True)
            img_path = folder / f"{subject}_t1w_deface_stx.nii.gz"
            if i % 3 == 1:
                parts = _split_mask(mask.astype(bool))
                mask_paths = tuple(
                    folder / f"{subject}_LesionSmooth_{k + 1}_stx.nii.gz" for k in range(2)
                )
                for part, mpath in zip(parts, mask_paths, strict=True):
                    _save_mask(mpath, part, affine)
            else:
                mask_paths = (folder / f"{subject}_LesionSmooth_stx.nii.gz",)
                _save_mask(mask_paths[0], mask, affine)
            case_id = subject
        elif layout == "atlas-v2":
            sub = f"sub-r001s{i + 1:03d}"
            folder = root / "Training" / "R001" / sub / "ses-1" / "anat"
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"{sub}_ses-1_space-MNI152NLin2009aSym"
            img_path = folder / f"{stem}_T1w.nii.gz"
            mask_paths = (folder / f"{stem}_label-L_desc-T1lesion_mask.nii.gz",)
            _save_mask(mask_paths[0], mask, affine)
            case_id = f"{sub}_ses-1"
        else:
            case_id = f"case_{i:03d}"
            (root / "imagesTr").mkdir(exist_ok=True)
            (root / "labelsTr").mkdir(exist_ok=True)
            img_path = root / "imagesTr" / f"{case_id}.nii.gz"
            mask_paths = (root / "labelsTr" / f"{case_id}.nii.gz",)
            _save_mask(mask_paths[0], mask, affine)
        _save_image(img_path, image, affine)
        written.append(Case(case_id, img_path, mask_paths))
    marker = {"generator": "dunet_deploy.data.synth", "layout": layout, "cases": cases,
              "shape": list(shp), "seed": seed, "anatomy": anatomy}
    (root / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return sorted(written, key=lambda c: c.case_id)


def preview_png(
    image: np.ndarray,
    mask: np.ndarray | None,
    path: str | os.PathLike[str],
    n_slices: int = 4,
    axial_axis: int = 2,
) -> Path:
    """Save a PNG with a few axial slices, lesion outlined in red.

    Slices are shown transposed (rows = y, anterior up), matching the
    network's orientation. The slice with the most lesion voxels is always
    included. matplotlib is imported lazily (and never via pyplot, so no
    global backend state is touched).

    Args:
        image: ``[X, Y, Z]`` volume.
        mask: Optional lesion mask of the same shape.
        path: Output ``.png``.
        n_slices: How many slices to show.
        axial_axis: Axis of axial slices.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = np.moveaxis(np.asarray(image, dtype=np.float32), axial_axis, -1)
    msk = None if mask is None else np.moveaxis(np.asarray(mask) > 0, axial_axis, -1)
    nz = img.shape[-1]
    picks = set(np.linspace(nz * 0.3, nz * 0.7, n_slices).astype(int).tolist())
    if msk is not None and msk.any():
        per_slice = msk.reshape(-1, nz).sum(axis=0)
        picks.discard(min(picks, key=lambda z: abs(z - int(per_slice.argmax()))))
        picks.add(int(per_slice.argmax()))
    zs = sorted(picks)[:n_slices]
    vmax = float(np.percentile(img[img > 0], 99.5)) if (img > 0).any() else 1.0
    fig = Figure(figsize=(3 * len(zs), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for k, z in enumerate(zs):
        ax = fig.add_subplot(1, len(zs), k + 1)
        ax.imshow(img[:, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=vmax)
        title = f"z={z}"
        if msk is not None and msk[:, :, z].any():
            ax.contour(msk[:, :, z].T.astype(np.float32), levels=[0.5], colors="red",
                       linewidths=0.8)
            title += f"  lesion {int(msk[:, :, z].sum())} vx"
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(str(out))
    return out
