"""Registration of a scanner-space T1 to the model's template, and back.

The model is trained on registered scans (ATLAS: MNI152 2009a, 1 mm). A
clinical T1 is not registered. This module gives the three steps the
inference stages need:

* :class:`Template` — the model's template: the mean of the training volumes
  on a ~2 mm grid over the model's box, after the spec's intensity
  normalisation, with the range of the training volumes' similarity to it
  (:func:`build_template`). It travels in the checkpoint and beside every
  exported model (:func:`load_template`).
* :func:`similarity` — how registered a scan looks when placed by its own
  affine (or through a given transform): normalised correlation with the
  template at about 4 mm inside the template's head. A few milliseconds; no
  SimpleITK.
* :func:`register` — a 12-parameter affine registration (SimpleITK's
  registration framework: moments initialisation, two resolutions at 8 and
  4 mm, normalised correlation on a random quarter of the template's head;
  chosen over Mattes mutual information by measurement: same accuracy, all
  of 6 test motions converged against 4, 0.8 against 1.2 core-seconds).
  The :class:`Registration` it returns is plain numpy
  (picklable for worker processes): :meth:`Registration.to_model` resamples
  the scan onto the model's grid, :meth:`Registration.to_input` brings
  probabilities back onto the scan's own grid (both linear).
  :func:`plan_registration` is the ``auto | always | never`` decision.
* :func:`bias_correct` — N4 on a shrunken copy (SimpleITK).

World coordinates are RAS mm (nibabel); SimpleITK's LPS is converted at its
border. SimpleITK (the ``scanner`` extra) is imported only by
:func:`register` and :func:`bias_correct`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from dunet_deploy.choices import REGISTER_MODES
from dunet_deploy.errors import DunetError
from dunet_deploy.spec import PreprocessSpec

__all__ = [
    "REGISTER_MODES",
    "TEMPLATE_FILE",
    "Registration",
    "RegistrationError",
    "Template",
    "bias_correct",
    "build_template",
    "load_template",
    "plan_registration",
    "register",
    "similarity",
]

#: File name of the template beside an exported model.
TEMPLATE_FILE = "template.nii.gz"
#: Voxel size (mm) of a template built from training volumes.
TEMPLATE_MM = 2.0
#: Spacing (mm) of the points :func:`similarity` compares.
SIMILARITY_MM = 4.0
#: A scan counts as registered down to this much below the training range's minimum
#: (:attr:`Template.floor`): the least similarity ``auto`` takes as registered, and the
#: least a registration must reach (below it: a per-case error, never a mask).
#: Measured (benchmarks/registration.py, MNI152 anatomy, template of 8 heads, range
#: 0.941-0.965): 20 new registered heads scored 0.896-0.956, down to min - 0.045 (15 of 20
#: below the range); the 20 native scans *correctly* registered (errors 0.7-1.6 mm, mask
#: DSC >= 0.958) scored 0.913-0.964 after it, 9 of 20 below the range's minimum (down to
#: min - 0.028). A held-out scan naturally falls a little below the training range (the
#: range is of the training heads against their own mean), so an error at the range's
#: minimum would fail half of the good registrations. A head misplaced by 2.3 mm on
#: average scored min - 0.06 to - 0.09, by 4.7 mm min - 0.17. So min - 0.08 takes a scan
#: within about 2 mm of registered (about the registration's own error) as registered;
#: a registration that ends between the floor and the range's minimum keeps its mask
#: with a warning naming both numbers (:func:`register`).
SIMILARITY_MARGIN = 0.08
# Registration pyramid: the scan is averaged down to this voxel size, then
# registered at (shrink factors of the template grid, smoothing sigmas in mm).
_MOVING_MM = 3.0
_LEVELS = ((4, 2.0), (2, 1.0))
_SAMPLING = 0.25
_ITERATIONS = 100
_TEMPLATE_FORMAT = "dunet-template"
# RAS <-> LPS (ITK's world).
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


# ------------------------------------------------------------------ template
@dataclass(frozen=True, eq=False)
class Template:
    """The model's template (see the module docstring).

    Attributes:
        data: float32 ``[X, Y, Z]`` mean normalised T1 on the template grid.
        affine: float64 ``[4, 4]`` voxel → world (RAS mm), the model's world.
        similarity_range: ``(min, max)`` of :func:`similarity` of the training
            volumes to this template; ``None`` for a template supplied without
            training data (then :data:`DEFAULT_RANGE` applies).
    """

    data: np.ndarray
    affine: np.ndarray
    similarity_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        data = np.asarray(self.data, dtype=np.float32)
        aff = np.asarray(self.affine, dtype=np.float64)
        if data.ndim != 3 or min(data.shape) < 4:
            raise DunetError(f"template: data has shape {data.shape}; a 3D volume of at least "
                             "4 voxels per axis is required")
        if aff.shape != (4, 4) or not np.isfinite(aff).all() or abs(np.linalg.det(aff)) < 1e-9:
            raise DunetError("template: affine is not an invertible 4x4 matrix")
        if not np.isfinite(data).all() or not float(data.max()) > float(data.min()):
            raise DunetError("template: data must be finite and not constant")
        rng = self.similarity_range
        if rng is not None:
            lo, hi = (float(v) for v in rng)
            if not (-1.0 <= lo <= hi <= 1.0):
                raise DunetError(f"template: similarity_range {rng} is not -1 <= min <= max <= 1")
            rng = (lo, hi)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "affine", aff)
        object.__setattr__(self, "similarity_range", rng)

    @property
    def range(self) -> tuple[float, float]:
        """``similarity_range``, or :data:`DEFAULT_RANGE` for a template given without one."""
        return DEFAULT_RANGE if self.similarity_range is None else self.similarity_range

    @property
    def floor(self) -> float:
        """Least :func:`similarity` of a registered scan: the range's minimum less a margin."""
        return self.range[0] - SIMILARITY_MARGIN

    @functools.cached_property
    def head(self) -> np.ndarray:
        """bool ``data.shape``: the template's head (Otsu threshold), dilated by 2 voxels."""
        from scipy import ndimage

        d = self.data
        t = _otsu(d)
        return ndimage.binary_dilation(d > t, iterations=2)

    @functools.cached_property
    def _points(self) -> tuple[np.ndarray, np.ndarray]:
        """World points (``[4, N]`` homogeneous) and standardised values of the comparison."""
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        step = [max(1, round(SIMILARITY_MM / float(z))) for z in zooms]
        sub = tuple(slice(s // 2, None, s) for s in step)
        idx = np.argwhere(self.head[sub]) * np.array(step) + np.array([s // 2 for s in step])
        values = self.data[tuple(idx.T)].astype(np.float64)
        values = (values - values.mean()) / max(float(values.std()), 1e-12)
        world = self.affine @ np.vstack([idx.T.astype(np.float64), np.ones(len(idx))])
        return world, values

    def digest(self) -> str:
        """Stable fingerprint of data, affine and range: sha256, 16 hex characters."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.data, dtype="<f4").tobytes())
        # float32: what a NIfTI header stores of the affine.
        h.update(np.ascontiguousarray(self.affine, dtype="<f4").tobytes())
        h.update(json.dumps(self.similarity_range).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What the artefacts record about the template (JSON-able)."""
        return {"file": TEMPLATE_FILE, "digest": self.digest(),
                "similarity_range": None if self.similarity_range is None
                else list(self.similarity_range)}

    # ------------------------------------------------------------- storage
    def to_nifti_bytes(self) -> bytes:
        """A gzipped NIfTI-1 (float32) whose header extension holds the similarity range."""
        img = nib.Nifti1Image(self.data, self.affine)
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(self.affine, code=4)
        img.set_sform(self.affine, code=4)
        meta = {"format": _TEMPLATE_FORMAT, "similarity_range": self.similarity_range}
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, json.dumps(meta).encode()))
        return _gzip_nifti(img)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_nifti_bytes` atomically to ``path``."""
        from dunet_deploy.artifacts import atomic_write_bytes

        out = Path(path)
        atomic_write_bytes(out, self.to_nifti_bytes())
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Template:
        """Read a template: ours (with its range) or any 3D T1 NIfTI (range unknown).

        Raises:
            DunetError: naming ``path`` when it is missing or not a 3D NIfTI.
        """
        p = Path(path)
        if not p.is_file():
            raise DunetError(f"{p}: template not found")
        try:
            img: Any = nib.load(str(p))
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as exc:  # nibabel raises many types on a damaged file
            raise DunetError(f"{p}: not a readable NIfTI template ({exc})") from None
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        rng = None
        for ext in img.header.extensions:
            try:
                meta = json.loads(ext.get_content())
            except (ValueError, TypeError, AttributeError):
                continue
            if isinstance(meta, dict) and meta.get("format") == _TEMPLATE_FORMAT:
                rng = meta.get("similarity_range")
        try:
            return cls(data, np.asarray(img.affine), None if rng is None else tuple(rng))
        except DunetError as e:
            raise DunetError(f"{p}: {e}") from None

    def to_checkpoint(self) -> dict[str, Any]:
        """A dict for a checkpoint; ``data`` is the float32 array (a tensor once saved)."""
        return {"shape": list(self.data.shape), "data": self.data,
                "affine": self.affine.tolist(), "similarity_range":
                None if self.similarity_range is None else list(self.similarity_range)}

    @classmethod
    def from_checkpoint(cls, doc: dict[str, Any]) -> Template:
        """Inverse of :meth:`to_checkpoint`."""
        data = np.asarray(doc["data"], dtype=np.float32).reshape(doc["shape"])  # tensor or array
        rng = doc.get("similarity_range")
        return cls(data, np.asarray(doc["affine"]), None if rng is None else tuple(rng))


#: Similarity range assumed for a template given without training data:
#: measured on registered MNI152 anatomy (benchmarks/registration.py).
DEFAULT_RANGE = (0.80, 0.95)


def _gzip_nifti(img: Any) -> bytes:
    import gzip

    raw = io.BytesIO()
    file_map = img.make_file_map({"image": raw, "header": raw})
    img.to_file_map(file_map)
    return gzip.compress(raw.getvalue(), mtime=0)


def _otsu(data: np.ndarray, bins: int = 128) -> float:
    hist, edges = np.histogram(data, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def template_grid(shape: Sequence[int], affine: npt.ArrayLike,
                  voxel_mm: float = TEMPLATE_MM) -> tuple[tuple[int, int, int], np.ndarray]:
    """A ``voxel_mm`` grid over the same world box as ``(shape, affine)``, same axes."""
    aff = np.asarray(affine, dtype=np.float64)
    zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    n = np.asarray([int(s) for s in shape], dtype=np.float64)
    m = np.maximum(np.round(n * zooms / voxel_mm), 4).astype(int)
    factor = n / m
    out = aff.copy()
    out[:3, :3] = aff[:3, :3] * factor
    out[:3, 3] = aff[:3, 3] + aff[:3, :3] @ (0.5 * factor - 0.5)
    return (int(m[0]), int(m[1]), int(m[2])), out


def _resample(data: np.ndarray, src_affine: np.ndarray, dst_shape: Sequence[int],
              dst_affine: np.ndarray, world: np.ndarray | None = None) -> np.ndarray:
    """Linear interpolation onto a grid, 0 outside; ``world`` maps dst world → src world."""
    from scipy import ndimage

    m = np.linalg.inv(src_affine) @ (np.eye(4) if world is None else world) @ dst_affine
    lin = m[:3, :3]
    matrix = np.diag(lin) if np.allclose(lin, np.diag(np.diag(lin)), atol=1e-12) else lin
    return ndimage.affine_transform(
        np.asarray(data, dtype=np.float32), matrix, offset=m[:3, 3],
        output_shape=tuple(int(n) for n in dst_shape), order=1, mode="grid-constant",
        cval=0.0, prefilter=False).astype(np.float32, copy=False)


def build_template(volumes: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]]
                   | Iterable[tuple[npt.ArrayLike, npt.ArrayLike]],
                   spec: PreprocessSpec, *, grid: tuple[Sequence[int], npt.ArrayLike],
                   voxel_mm: float = TEMPLATE_MM) -> Template:
    """The mean of registered training volumes, and their similarity range to it.

    The range is of leave-one-out similarities (each volume against the mean
    of the others), which is what a new registered scan scores.

    Args:
        volumes: ``(data [X, Y, Z], affine [4, 4])`` of each training volume
            (any grid in the model's world). Read twice: a sequence that
            loads each volume on access keeps one volume in memory at a time.
        spec: The spec whose intensity normalisation is applied first.
        grid: ``(shape, affine)`` of the model's grid; the template covers its box.
        voxel_mm: Template voxel size.

    Returns:
        The :class:`Template`.

    Raises:
        DunetError: when no volume is given.
    """
    from dunet_deploy.data.preprocess import normalize_intensity

    vols = volumes if isinstance(volumes, Sequence) else list(volumes)
    if not len(vols):
        raise DunetError("build_template: no training volumes given")
    shape, aff = template_grid(grid[0], grid[1], voxel_mm)

    def on_grid(data: npt.ArrayLike, affine: npt.ArrayLike) -> np.ndarray:
        norm = normalize_intensity(data, spec)
        norm -= norm.min()  # background 0: outside a scan must read as background
        return _resample(norm, np.asarray(affine, dtype=np.float64), shape, aff)

    total = np.zeros(shape, dtype=np.float64)
    for data, affine in vols:
        total += on_grid(data, affine)
    mean = (total / len(vols)).astype(np.float32)
    if len(vols) == 1:
        scores = [similarity(vols[0][0], vols[0][1], Template(mean, aff))]
    else:
        # Leave one out: a volume inside the mean scores higher than a new scan would.
        scores = [similarity(d, a, Template(((total - on_grid(d, a)) / (len(vols) - 1))
                                            .astype(np.float32), aff))
                  for d, a in vols]
    return Template(mean, aff, (round(min(scores), 4), round(max(scores), 4)))


# ---------------------------------------------------------------- similarity
def similarity(volume: npt.ArrayLike, affine: npt.ArrayLike, template: Template,
               world_to_template: npt.ArrayLike | None = None) -> float:
    """Normalised correlation of a scan with the template, inside the template's head.

    The scan is sampled (linear, 0 outside it) at the template's head voxels on
    a ~:data:`SIMILARITY_MM` grid, placed by its own ``affine`` and, when
    given, moved by ``world_to_template``.

    Args:
        volume: ``[X, Y, Z]`` scan (raw intensities: the measure ignores scale and offset).
        affine: Its ``[4, 4]`` voxel → world (RAS mm).
        template: The model's template.
        world_to_template: ``[4, 4]`` scan world → template world; identity when ``None``.

    Returns:
        Correlation in [-1, 1]; 0 for a scan that is constant over those points.
    """
    from scipy import ndimage

    vol = np.asarray(volume)
    if vol.dtype not in (np.float32, np.float64):
        vol = vol.astype(np.float32)
    world, values = template._points
    to_scan = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    if world_to_template is not None:
        to_scan = to_scan @ np.linalg.inv(np.asarray(world_to_template, dtype=np.float64))
    coords = (to_scan @ world)[:3]
    sampled = ndimage.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0,
                                      prefilter=False).astype(np.float64)
    sd = float(sampled.std())
    if not sd > 0:
        return 0.0
    return float(np.mean((sampled - sampled.mean()) / sd * values))


# -------------------------------------------------------------- registration
@dataclass(frozen=True, eq=False)
class Registration:
    """How a scan maps onto the model's grid through a world transform, and back.

    Plain numpy (picklable): made in one process, used in another.

    Attributes:
        world_to_template: float64 ``[4, 4]``, scan world (RAS mm) → template world.
        input_shape: ``(X, Y, Z)`` of the scan.
        input_affine: Its ``[4, 4]`` voxel → world.
        grid_shape: Shape of the model's grid.
        grid_affine: Its ``[4, 4]`` voxel → (template) world.
        done: Whether a registration ran (``False``: the identity, the scan is
            placed by its own affine).
        method: ``"affine"`` (12 parameters, SimpleITK) or ``"none"``.
        similarity_before: :func:`similarity` placed by the scan's own affine.
        similarity_after: :func:`similarity` through ``world_to_template``.
        seconds: Wall time of the registration (0 when none ran).
        warnings: One-line warnings (``never`` on a scan that does not look registered;
            a registration that ended below the training range, above the floor).
        floor: The template's :attr:`Template.floor` the similarities were judged by.
    """

    world_to_template: np.ndarray
    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    grid_shape: tuple[int, int, int]
    grid_affine: np.ndarray
    done: bool = False
    method: str = "none"
    similarity_before: float = float("nan")
    similarity_after: float = float("nan")
    seconds: float = 0.0
    warnings: tuple[str, ...] = field(default=())
    floor: float = float("nan")

    def to_model(self, volume: npt.ArrayLike) -> np.ndarray:
        """The scan resampled onto the model's grid (linear, 0 outside the scan).

        Args:
            volume: ``input_shape`` array.

        Returns:
            float32 ``grid_shape``.
        """
        arr = np.asarray(volume)
        if arr.shape != self.input_shape:
            raise ValueError(f"volume has shape {arr.shape}, this registration maps "
                             f"{self.input_shape}")
        return _resample(arr, self.input_affine, self.grid_shape, self.grid_affine,
                         world=np.linalg.inv(self.world_to_template))

    def to_input(self, prob: npt.ArrayLike) -> np.ndarray:
        """Model-grid probabilities back onto the scan's own grid (linear, 0 outside).

        Args:
            prob: float ``grid_shape`` array.

        Returns:
            float32 ``input_shape``.
        """
        arr = np.asarray(prob)
        if arr.shape != self.grid_shape:
            raise ValueError(f"prob has shape {arr.shape}, the model grid is {self.grid_shape}")
        return _resample(arr, self.grid_affine, self.input_shape, self.input_affine,
                         world=self.world_to_template)

    def describe(self) -> dict[str, Any]:
        """``summary.json``'s ``registration`` entry (JSON-able)."""
        return {"done": self.done, "method": self.method,
                "world_to_template": np.round(self.world_to_template, 6).tolist(),
                "similarity_before": _rounded(self.similarity_before),
                "similarity_after": _rounded(self.similarity_after),
                "floor": _rounded(self.floor),
                "seconds": round(self.seconds, 3), "warnings": list(self.warnings)}


class RegistrationError(DunetError):
    """A registration that failed (did not converge, or ITK gave up): a per-case error.

    Attributes:
        record: What ``summary.json`` records of it: ``{"done": False, "method",
            "similarity_before", "similarity_after", "floor", "seconds"}`` (a
            similarity is ``None`` where it was not reached).
    """

    def __init__(self, message: object = "", *, record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.record: dict[str, Any] = dict(record or {})


def _failure(message: str, template: Template, before: float, after: float,
             start: float) -> RegistrationError:
    return RegistrationError(message, record={
        "done": False, "method": "affine", "similarity_before": _rounded(before),
        "similarity_after": _rounded(after), "floor": _rounded(template.floor),
        "seconds": round(time.perf_counter() - start, 3)})


def _range_text(template: Template) -> str:
    lo, hi = template.range
    given = "" if template.similarity_range is not None else ", assumed: none recorded"
    return f"{lo:.3f}-{hi:.3f}{given}"


def _rounded(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 4)


def _sitk() -> Any:
    try:
        import SimpleITK as sitk
    except ImportError:
        raise DunetError("registration needs SimpleITK: pip install 'dunet-deploy[scanner]'"
                         ) from None
    return sitk


def _to_sitk(sitk: Any, data: np.ndarray, affine: np.ndarray) -> Any:
    """A SimpleITK image (LPS world) of a ``[X, Y, Z]`` array with a RAS affine."""
    lps = _FLIP @ affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, np.float32).T))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    img.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    return img


def _ras_affine(img: Any) -> np.ndarray:
    """``[4, 4]`` voxel → RAS world of a SimpleITK image."""
    out = np.eye(4)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    out[:3, :3] = direction * np.asarray(img.GetSpacing(), dtype=np.float64)
    out[:3, 3] = img.GetOrigin()
    return _FLIP @ out


def _matrix(transform: Any) -> np.ndarray:
    """``[4, 4]`` of an ITK affine transform (fixed LPS point → moving LPS point)."""
    a = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), dtype=np.float64)
    t = np.asarray(transform.GetTranslation(), dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = t + c - a @ c
    return out


def _threads(threads: int | None) -> int:
    if threads is not None:
        return max(1, int(threads))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def register(volume: npt.ArrayLike, affine: npt.ArrayLike, template: Template, *,
             grid: tuple[Sequence[int], npt.ArrayLike] | None = None,
             threads: int | None = None, seed: int = 1) -> Registration:
    """12-parameter affine registration of a scan to the template (SimpleITK).

    Moments initialisation, then two resolutions (8 and 4 mm on a 2 mm
    template), normalised correlation on a fixed random quarter of the
    template's head voxels, regular-step gradient descent with scales from
    physical shifts. The scan is averaged down to ~3 mm first, so the cost
    hardly depends on its size.

    Args:
        volume: ``[X, Y, Z]`` scan, raw intensities.
        affine: Its ``[4, 4]`` voxel → world (RAS mm).
        template: The model's template.
        grid: ``(shape, affine)`` of the model's grid (what :meth:`Registration.to_model`
            produces); the template's own grid when ``None``.
        threads: Threads SimpleITK may use (default: the CPUs this process may run on).
        seed: Seed of the metric's sampling, >= 1 (the same seed and thread count,
            the same result; SimpleITK takes 0 as "seed from the wall clock").

    Returns:
        The :class:`Registration` (``done=True``, ``method="affine"``).

    A registration that ends below the template's training range but at or
    above its floor (see :data:`SIMILARITY_MARGIN` for why the two differ)
    is kept with a warning that gives both numbers.

    Raises:
        DunetError: when SimpleITK is missing.
        RegistrationError: when ITK gives up, or the registration does not
            converge: the similarity after it is below ``template.floor``
            (the message gives both similarities, the floor and the range;
            ``record`` holds them for the summary).
    """
    sitk = _sitk()
    start = time.perf_counter()
    vol = np.asarray(volume)
    aff = np.asarray(affine, dtype=np.float64)
    before = similarity(vol, aff, template)
    n_threads = _threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n_threads)

    fixed = _to_sitk(sitk, template.data - template.data.min(), template.affine)
    fixed_mask = _to_sitk(sitk, template.head.astype(np.float32), template.affine)
    fixed_mask = sitk.Cast(fixed_mask, sitk.sitkUInt8)
    moving = _to_sitk(sitk, vol, aff)
    shrink = [max(1, round(_MOVING_MM / s)) for s in moving.GetSpacing()]
    if max(shrink) > 1:
        moving = sitk.BinShrink(moving, shrink)

    try:
        init = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.AffineTransform(3),
            sitk.CenteredTransformInitializerFilter.MOMENTS)
    except RuntimeError as exc:  # ITK: e.g. a scan whose voxels are all 0
        raise _failure(f"registration failed: {' '.join(str(exc).split())[-160:]}",
                       template, before, float("nan"), start) from None
    try:
        _optimise(sitk, fixed, fixed_mask, moving, init, seed)
    except DunetError as exc:
        raise _failure(str(exc), template, before, float("nan"), start) from None
    w2t = _world_to_template(init)
    after = similarity(vol, aff, template, w2t)
    if after < template.floor:
        # Large rotations can send 12 free parameters into shear: start again with a
        # similarity transform (rotation, shift, one scale), then free the affine from it.
        start_sim = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Similarity3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS)
        try:
            _optimise(sitk, fixed, fixed_mask, moving, start_sim, seed)
            retry = sitk.AffineTransform(3)
            retry.SetCenter(start_sim.GetCenter())
            retry.SetMatrix(start_sim.GetMatrix())
            retry.SetTranslation(start_sim.GetTranslation())
            _optimise(sitk, fixed, fixed_mask, moving, retry, seed + 1)
        except DunetError as exc:
            raise _failure(f"{exc} (similarity after the first try {after:.3f}, before "
                           f"{before:.3f}, floor {template.floor:.3f})",
                           template, before, after, start) from None
        w2t_retry = _world_to_template(retry)
        after_retry = similarity(vol, aff, template, w2t_retry)
        if after_retry > after:
            w2t, after = w2t_retry, after_retry
    if after < template.floor:
        raise _failure(
            f"registration did not converge: similarity {after:.3f} after it (before "
            f"{before:.3f}) is below the registered floor {template.floor:.3f} (training "
            f"range {_range_text(template)})", template, before, after, start)
    warnings: tuple[str, ...] = ()
    if after < template.range[0]:
        warnings = (f"registration ended below the training range: similarity {after:.3f} "
                    f"after it (before {before:.3f}), training range {_range_text(template)}, "
                    f"failure floor {template.floor:.3f}; the mask may be misplaced: look at "
                    "the registration (--preview), and if the scan has a strong intensity "
                    "bias, correct it (--bias-correct)",)
    shape, gaff = _grid(template, grid)
    return Registration(w2t, _shape3(vol.shape), aff, shape, gaff, done=True, method="affine",
                        similarity_before=before, similarity_after=after,
                        seconds=time.perf_counter() - start, warnings=warnings,
                        floor=template.floor)


def _optimise(sitk: Any, fixed: Any, fixed_mask: Any, moving: Any, transform: Any,
              seed: int) -> None:
    """Run the two-level registration of ``moving`` onto ``fixed`` from ``transform`` (in place).

    Raises:
        DunetError: when ITK gives up (e.g. too few samples inside the moving image).
    """
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    if seed < 1:  # 0 is sitkWallClock: a different sample, and transform, every run
        raise ValueError(f"seed {seed}: must be >= 1")
    reg.SetMetricSamplingPercentage(_SAMPLING, seed)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=_ITERATIONS,
        relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([f for f, _ in _LEVELS])
    reg.SetSmoothingSigmasPerLevel([s for _, s in _LEVELS])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise DunetError(f"registration failed: {' '.join(str(exc).split())[:200]}") from None


def _world_to_template(transform: Any) -> np.ndarray:
    """``[4, 4]`` scan world → template world (RAS) of an ITK transform fitted as above."""
    # ITK maps template (fixed, LPS) points to scan (moving, LPS) points.
    return np.linalg.inv(_FLIP @ _matrix(transform) @ _FLIP)


def _shape3(shape: Sequence[int]) -> tuple[int, int, int]:
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _grid(template: Template, grid: tuple[Sequence[int], npt.ArrayLike] | None
          ) -> tuple[tuple[int, int, int], np.ndarray]:
    if grid is None:
        return _shape3(template.data.shape), template.affine
    return _shape3(grid[0]), np.asarray(grid[1], dtype=np.float64)


def plan_registration(volume: npt.ArrayLike, affine: npt.ArrayLike, template: Template, *,
                      mode: str = "auto", grid: tuple[Sequence[int], npt.ArrayLike] | None = None,
                      threads: int | None = None) -> Registration:
    """The ``--register`` decision for one scan.

    * ``auto``: a scan that looks registered (``similarity >= template.floor``)
      is placed by its own affine; any other is registered;
    * ``always``: registered;
    * ``never``: placed by its own affine, with a warning when it does not look
      registered.

    Returns:
        A :class:`Registration` (``done`` says whether one ran).

    Raises:
        DunetError: on an unknown ``mode`` or a registration that does not converge.
    """
    if mode not in REGISTER_MODES:
        raise DunetError(f"register {mode!r}: choose one of {', '.join(REGISTER_MODES)}")
    vol = np.asarray(volume)
    aff = np.asarray(affine, dtype=np.float64)
    if mode == "always":
        return register(vol, aff, template, grid=grid, threads=threads)  # blank: an error
    start = time.perf_counter()
    score = similarity(vol, aff, template)
    # A blank (constant) scan has nothing to register: it is segmented as it is.
    blank = vol.size == 0 or not float(vol.max()) > float(vol.min())
    if mode == "auto" and score < template.floor and not blank:
        return register(vol, aff, template, grid=grid, threads=threads)
    warnings: tuple[str, ...] = ()
    if score < template.floor and not blank:
        warnings = (f"the scan does not look registered to the model's template (similarity "
                    f"{score:.3f} < {template.floor:.3f}); segmented as placed by its affine",)
    shape, gaff = _grid(template, grid)
    return Registration(np.eye(4), _shape3(vol.shape), aff, shape, gaff,
                        similarity_before=score, similarity_after=score,
                        seconds=time.perf_counter() - start, warnings=warnings,
                        floor=template.floor)


# ---------------------------------------------------------------- bias field
def bias_correct(volume: npt.ArrayLike, affine: npt.ArrayLike, *, shrink_mm: float = 6.0,
                 iterations: Sequence[int] = (50, 50, 30), threads: int | None = None
                 ) -> np.ndarray:
    """N4 bias-field correction fitted on a shrunken copy, applied at full resolution.

    Args:
        volume: ``[X, Y, Z]`` scan (background 0).
        affine: Its ``[4, 4]`` voxel → world.
        shrink_mm: Voxel size of the copy N4 fits the field on.
        iterations: N4 iterations per fitting level.
        threads: Threads SimpleITK may use.

    Returns:
        float32 ``[X, Y, Z]``: the scan divided by the fitted field (background stays 0).

    Raises:
        DunetError: when SimpleITK is missing.
    """
    sitk = _sitk()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_threads(threads))
    vol = np.asarray(volume, dtype=np.float32)
    aff = np.asarray(affine, dtype=np.float64)
    image = _to_sitk(sitk, vol, aff)
    shrink = [max(1, round(shrink_mm / s)) for s in image.GetSpacing()]
    small = sitk.BinShrink(image, shrink) if max(shrink) > 1 else image
    mask = sitk.OtsuThreshold(small, 0, 1, 200)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.Execute(small, mask)
    # The smooth field is evaluated on the small grid and interpolated linearly: ITK's
    # B-spline evaluation at every full-resolution voxel costs far more than the fit.
    log_small = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(small)).T
    field_arr = np.exp(_resample(log_small, _ras_affine(small), vol.shape, aff))
    return np.where(vol != 0, vol / field_arr, np.float32(0)).astype(np.float32)


def load_template(model_path: str | os.PathLike[str]) -> Template:
    """The template an exported model travels with (``template.nii.gz`` beside it).

    Args:
        model_path: An ``.onnx`` model or an engine with its sidecar.

    Returns:
        The :class:`Template`, its digest checked against the model's metadata.

    Raises:
        DunetError: when the model records no template (the message names the
            ``template`` option of the export that provides one), the file is
            missing or its digest differs.
    """
    from dunet_deploy.artifacts import read_artifact_info

    path = Path(model_path)
    info = read_artifact_info(path)
    ref = info.template
    if not ref:
        raise DunetError(f"{path}: the model has no registration template; export it with "
                         "a template (dunet-export --template FILE) or do not register")
    file = path.parent / str(ref.get("file", TEMPLATE_FILE))
    if not file.is_file():
        raise DunetError(f"{path}: its template {file.name} is missing beside it")
    template = Template.load(file)
    if template.digest() != ref.get("digest"):
        raise DunetError(f"{file}: template digest {template.digest()} differs from the "
                         f"model's {ref.get('digest')} (a template of another model?)")
    return template
