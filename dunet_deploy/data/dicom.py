"""Reading a DICOM series (a folder or a ``.zip`` of one) as a 3D volume.

A scanner exports a study as one file per slice, possibly several series in
one folder (a localiser, a T1, a FLAIR). :func:`list_series` groups the image
files below a folder (or inside a zip) by Series Instance UID and checks each
series' geometry from the headers alone; :func:`load_series` /
:func:`load_dicom` read one as a :class:`DicomVolume`: a
:class:`~dunet_deploy.data.nifti.NiftiVolume` (float32 ``[X, Y, Z]`` + RAS
affine, what the rest of the pipeline takes) that also carries the source
datasets a DICOM Segmentation must reference.

Geometry, as dcm2niix and nibabel's ``nicom`` read it:

* voxel ``[i, j, k]`` is column ``i``, row ``j`` of slice ``k``;
* the in-plane axes come from Image Orientation (Patient) and Pixel Spacing;
* slices are ordered along the plane's normal, and the slice step is taken
  from the Image Position (Patient) of the first and last slice, never from
  Slice Thickness (which is the excitation thickness, not the spacing);
* DICOM's patient axes are LPS; the affine returned is RAS, as in NIfTI.

Every series that is not one regular 3D grid is refused with a one-line
:class:`~dunet_deploy.errors.DunetError`: a localiser, a single 2D image, a
series of several images per position (4D), mixed orientations, a missing
slice, uneven spacing, slices of different size (a slice missing at either
end cannot be told from a shorter series). Files that are not DICOM
(no ``DICM`` marker at byte 128, as every DICOM Part 10 file has) and DICOM
objects without pixels (DICOMDIR, SR, presentation states) are ignored.

pydicom is imported lazily (the ``dicom`` extra); :func:`is_dicom_input`
only reads file names and a few bytes, so input expansion can call it on a
bare install.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from dunet_deploy.data.nifti import DEFAULT_LIMITS, NiftiLimits, NiftiVolume, nifti_suffix
from dunet_deploy.errors import DunetError, one_line

__all__ = [
    "LPS_FROM_RAS",
    "DicomSeries",
    "DicomVolume",
    "is_dicom_input",
    "list_series",
    "load_dicom",
    "load_series",
    "require_pydicom",
    "series_headers",
    "source_record",
]

PathLike = str | os.PathLike[str]
#: DICOM patient coordinates are LPS, NIfTI's are RAS: flip x and y (its own inverse).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_PREAMBLE = 128
_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: Orientation cosines of two slices that differ by less than this are one orientation.
_ORIENTATION_TOL = 1e-4
#: A slice step may differ from the series' step by this fraction (plus 1 µm) and still be even.
_SPACING_RTOL = 0.01
_SPACING_ATOL = 1e-3


def require_pydicom() -> Any:
    """Import pydicom, or say which extra provides it."""
    try:
        import pydicom
    except ImportError:
        raise DunetError("reading DICOM needs pydicom: pip install 'dunet-deploy[dicom]'") from None
    return pydicom


@dataclass(frozen=True)
class DicomSeries:
    """One image series found by :func:`list_series` (headers only, no pixels read).

    Attributes:
        source: The folder or zip it was found in.
        uid: Series Instance UID.
        number: Series Number (``None`` when absent).
        description: Series Description (``""`` when absent).
        modality: Modality (``"MR"``, ``"CT"``, ...).
        members: Its files: paths relative to ``source`` (folder) or member
            names (zip), in slice order when its geometry is valid.
        shape: ``(X, Y, Z)`` = (columns, rows, slices) when the geometry is
            valid, else ``None``.
        volume: ``False`` for a series that is not meant to be a 3D volume (a
            localiser, one 2D image, mixed orientations, several images per
            position, a multi-frame object): a folder's other series can be
            read without it.
        problem: The one-line error :func:`load_series` raises for it, or
            ``None`` when it is a regular 3D grid.
    """

    source: Path
    uid: str
    number: int | None
    description: str
    modality: str
    members: tuple[str, ...]
    shape: tuple[int, int, int] | None
    volume: bool
    problem: str | None

    @property
    def stem(self) -> str:
        """A name for its outputs: ``<folder or zip name>_s<Series Number>`` (``export_s3``).

        Without a Series Number, the UID's last 8 digits stand in for it.
        """
        name = self.source.name
        if name.lower().endswith(".zip"):
            name = name[:-4]
        tag = str(self.number) if self.number is not None else self.uid.replace(".", "")[-8:]
        return f"{name}_s{tag}"

    @property
    def label(self) -> str:
        """``series 3 'T1 MPRAGE'``: how messages name it."""
        number = "?" if self.number is None else str(self.number)
        return f"series {number} {self.description!r}"


@dataclass
class DicomVolume(NiftiVolume):
    """A DICOM series read as a volume (a :class:`NiftiVolume` with its source attached).

    Attributes:
        datasets: The series' pydicom datasets without their pixel data, in
            the order of ``data``'s third axis (slice ``k`` is ``datasets[k]``);
            what :func:`~dunet_deploy.runtime.dicom_seg.write_dicom_seg` references.
        series: The series as listed.
    """

    datasets: tuple[Any, ...] = ()
    series: DicomSeries | None = None


# ------------------------------------------------------------------ sources
class _Folder:
    """The files below a folder (sub-folders too: exports often split series into them)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def open(self, name: str) -> IO[bytes]:
        return open(self.root / name, "rb")


class _Zip:
    """The members of a zip archive (their declared sizes bound what is inflated)."""

    def __init__(self, archive: zipfile.ZipFile) -> None:
        self.archive = archive
        self.infos = {i.filename: i for i in archive.infolist() if not i.is_dir()}

    def names(self) -> list[str]:
        return sorted(self.infos)

    def size(self, name: str) -> int:
        return int(self.infos[name].file_size)

    def open(self, name: str) -> IO[bytes]:
        return self.archive.open(self.infos[name])


def _bytes_text(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


@contextlib.contextmanager
def _open_source(path: Path, limits: NiftiLimits) -> Iterator[_Folder | _Zip]:
    """The folder, or the zip archive opened for the duration of the block."""
    if not path.exists():
        raise DunetError(f"{path}: no such file or directory")
    if path.is_dir():
        yield _Folder(path)
        return
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DunetError(f"{path}: not a zip archive nor a folder of DICOM files "
                         f"({one_line(exc, 120)})") from None
    with archive:
        source = _Zip(archive)
        if not source.infos:
            raise DunetError(f"{path}: the zip archive is empty")
        total = sum(source.size(n) for n in source.infos)
        if total > limits.max_file_bytes:
            raise DunetError(f"{path}: the archive unpacks to {_bytes_text(total)}, over the "
                             f"limit of {_bytes_text(limits.max_file_bytes)}")
        yield source


def _has_dicom_marker(head: bytes) -> bool:
    return len(head) >= _PREAMBLE + 4 and head[_PREAMBLE : _PREAMBLE + 4] == b"DICM"


def is_dicom_input(path: PathLike) -> bool:
    """Whether ``path`` is an input for :func:`load_dicom` rather than a NIfTI file or folder.

    True for a ``.zip`` file (its content is checked when it is read) and for a
    folder holding a DICOM file directly inside it (a ``DICM`` marker at byte
    128; a DICOMDIR counts, so an export whose slices sit in sub-folders is
    one too). Reads at most 132 bytes per file; needs no pydicom.
    """
    p = Path(path)
    if p.is_file():
        return p.name.lower().endswith(".zip")
    if not p.is_dir():
        return False
    for child in sorted(p.iterdir()):
        if not child.is_file() or nifti_suffix(child):
            continue
        try:
            with open(child, "rb") as f:
                if _has_dicom_marker(f.read(_PREAMBLE + 4)):
                    return True
        except OSError:
            continue
    return False


# ------------------------------------------------------------------ headers
def _parse(pydicom: Any, source: _Folder | _Zip, name: str, where: Path, limits: NiftiLimits,
           *, pixels: bool) -> Any:
    """One file's dataset (without pixel data unless ``pixels``), or ``None`` when not DICOM."""
    try:
        with source.open(name) as f:
            if not _has_dicom_marker(f.read(_PREAMBLE + 4)):
                return None  # not DICOM: a README, a checksum list, .DS_Store
            if source.size(name) > limits.max_file_bytes:
                raise DunetError(f"{where}: file of {_bytes_text(source.size(name))} is over "
                                 f"the limit of {_bytes_text(limits.max_file_bytes)}")
            f.seek(0)
            ds = pydicom.dcmread(f, stop_before_pixels=not pixels)
    except DunetError:
        raise
    except Exception as exc:  # pydicom and zipfile raise many types on corrupt input
        raise DunetError(f"{where}: cannot read DICOM ({one_line(exc, 160)})") from None
    # pydicom stops quietly at the end of a truncated file: an image without its size is one.
    image_class = "Image Storage" in str(pydicom.uid.UID(str(ds.get("SOPClassUID", ""))).name)
    if ("SOPClassUID" not in ds and "DirectoryRecordSequence" not in ds) or (
            image_class and not ("Rows" in ds and "Columns" in ds)):
        raise DunetError(f"{where}: cannot read DICOM (the file is truncated: "
                         "no SOPClassUID, or an image without Rows / Columns)")
    return ds


def _kind(ds: Any) -> str:
    """What a DICOM file without an image is, for a message."""
    if "DirectoryRecordSequence" in ds:
        return "DICOMDIR"
    return str(ds.get("Modality", "")) or "no modality"


def _read_headers(source: _Folder | _Zip, path: Path, limits: NiftiLimits
                  ) -> tuple[list[tuple[str, Any]], list[str]]:
    """``(name, dataset)`` of every DICOM image file, and what the other DICOM files are."""
    pydicom = require_pydicom()
    images: list[tuple[str, Any]] = []
    others: list[str] = []
    for name in source.names():
        ds = _parse(pydicom, source, name, path / name, limits, pixels=False)
        if ds is None:
            continue
        is_image = "Rows" in ds and "Columns" in ds
        if is_image and str(ds.get("SOPClassUID", "")) != _SEGMENTATION_STORAGE:
            images.append((name, ds))
        else:
            others.append("SEG" if is_image else _kind(ds))
    return images, others


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class _Geometry:
    order: list[int]
    affine: np.ndarray
    shape: tuple[int, int, int]


class _NotVolume(DunetError):
    """A series that is not meant to be a 3D volume (a localiser, a 2D image, a 4D series)."""


def _floats(ds: Any, keyword: str, count: int, name: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (count,) or not np.isfinite(arr).all():
        raise DunetError(f"{name} lacks a valid {keyword} (got {value!r})")
    return arr


def _geometry(where: str, named: Sequence[tuple[str, Any]]) -> _Geometry:
    """The voxel grid of one series' slices, or a one-line reason there is none.

    Raises:
        _NotVolume: A localiser, a single 2D image, mixed orientations,
            several images at one position, or a multi-frame object.
        DunetError: A 3D series that is not one regular grid.
    """
    n = len(named)
    first_name, first = named[0]
    raw_type = first.get("ImageType") or []
    image_type = [str(v).upper() for v in ([raw_type] if isinstance(raw_type, str) else raw_type)]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        shown = "\\".join(image_type)
        raise _NotVolume(f"{where}: a localizer (ImageType {shown}), not a 3D volume")
    frames = max(_int_or_none(ds.get("NumberOfFrames")) or 1 for _, ds in named)
    if frames > 1:
        raise _NotVolume(f"{where}: a multi-frame (enhanced) DICOM object of {frames} frames; "
                         "export the series as classic single-frame images")
    if n == 1:
        raise _NotVolume(f"{where}: a single 2D image ({first_name}), not a 3D volume")

    orient = np.stack([_floats(ds, "ImageOrientationPatient", 6, f"{where}: {nm}")
                       for nm, ds in named])
    distinct = {tuple(np.round(o / _ORIENTATION_TOL).astype(int)) for o in orient}
    if np.abs(orient - orient[0]).max() > _ORIENTATION_TOL:  # a 3-plane localiser, usually
        raise _NotVolume(f"{where}: mixed orientations ({len(distinct)} different "
                         "ImageOrientationPatient values among its slices), not one 3D volume")
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in named}
    spacings = {tuple(_floats(ds, "PixelSpacing", 2, f"{where}: {nm}")) for nm, ds in named}
    if len(sizes) > 1 or len(spacings) > 1:
        raise DunetError(f"{where}: slices differ in size or pixel spacing "
                         f"({len(sizes)} sizes, {len(spacings)} spacings), not one 3D volume")
    row_cos, col_cos = orient[0, :3], orient[0, 3:]
    if (abs(np.linalg.norm(row_cos) - 1) > 1e-3 or abs(np.linalg.norm(col_cos) - 1) > 1e-3
            or abs(float(row_cos @ col_cos)) > 1e-3):
        raise DunetError(f"{where}: ImageOrientationPatient {orient[0].tolist()} is not two "
                         "orthogonal unit vectors")
    (rows, cols), (row_spacing, col_spacing) = sizes.pop(), spacings.pop()
    if row_spacing <= 0 or col_spacing <= 0:
        raise DunetError(f"{where}: PixelSpacing {[row_spacing, col_spacing]} must be positive")

    normal = np.cross(row_cos, col_cos)
    pos = np.stack([_floats(ds, "ImagePositionPatient", 3, f"{where}: {nm}") for nm, ds in named])
    along = pos @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    pos, along = pos[order], along[order]
    gaps = np.diff(along)
    same = int(np.count_nonzero(gaps < _SPACING_ATOL))
    if same:
        positions = n - same
        raise _NotVolume(f"{where}: {n} images at {positions} slice positions (several echoes, "
                         "time points or b-values in one series?), not one 3D volume")
    steps = np.diff(pos, axis=0)
    lengths = np.linalg.norm(steps, axis=1)
    # The series' step: the typical one among the shortest (a missing slice makes a longer one).
    step = np.median(steps[lengths <= 1.5 * lengths.min()], axis=0)
    size = float(np.linalg.norm(step))
    tol = _SPACING_RTOL * size + _SPACING_ATOL
    off = np.linalg.norm(steps - step, axis=1) > tol
    if off.any():
        multiple = np.maximum(np.round(lengths / size), 1.0)
        whole = np.linalg.norm(steps - multiple[:, None] * step, axis=1) <= tol * multiple
        if (whole & (multiple >= 2))[off].all():  # every odd step is a whole number of steps
            gap = int(np.flatnonzero(off)[0])
            lost = int((multiple[off] - 1).sum())
            raise DunetError(
                f"{where}: {lost} missing slice(s): a gap of {gaps[gap]:.2f} mm after the slice "
                f"at {along[gap]:.2f} mm along the normal, where the series steps {size:.2f} mm")
        raise DunetError(f"{where}: uneven slice spacing (steps from {lengths.min():.3f} to "
                         f"{lengths.max():.3f} mm), not one regular 3D grid")

    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_spacing  # along a row: the column index i
    lps[:3, 1] = col_cos * row_spacing  # down a column: the row index j
    lps[:3, 2] = (pos[-1] - pos[0]) / (n - 1)  # from the positions, averaging their rounding
    lps[:3, 3] = pos[0]
    return _Geometry(order=order, affine=LPS_FROM_RAS @ lps, shape=(cols, rows, n))


def _series_from(path: Path, uid: str, named: list[tuple[str, Any]]) -> DicomSeries:
    """The listing of one series: its members in slice order, or why it is no 3D grid."""
    named = sorted(named, key=lambda item: item[0])
    first = named[0][1]
    series = DicomSeries(
        source=path, uid=uid, number=_int_or_none(first.get("SeriesNumber")),
        description=str(first.get("SeriesDescription", "")),
        modality=str(first.get("Modality", "")), members=tuple(name for name, _ in named),
        shape=None, volume=True, problem=None)
    where = f"{path}: {series.label}"
    try:
        geometry = _geometry(where, named)
    except _NotVolume as exc:
        return replace(series, volume=False, problem=str(exc))
    except DunetError as exc:
        return replace(series, problem=str(exc))
    members = tuple(named[i][0] for i in geometry.order)
    return replace(series, members=members, shape=geometry.shape)


def _list(path: Path, source: _Folder | _Zip, limits: NiftiLimits) -> list[DicomSeries]:
    images, others = _read_headers(source, path, limits)
    if not images:
        if others:
            kinds = ", ".join(sorted(set(others)))
            raise DunetError(f"{path}: no DICOM images ({len(others)} DICOM file(s) without "
                             f"pixels: {kinds})")
        what = "the zip archive" if isinstance(source, _Zip) else "the folder"
        raise DunetError(f"{path}: no DICOM files in {what}")
    by_uid: dict[str, list[tuple[str, Any]]] = {}
    for name, ds in images:
        uid = str(ds.get("SeriesInstanceUID", "")).strip()
        if not uid:
            raise DunetError(f"{path / name}: no SeriesInstanceUID")
        by_uid.setdefault(uid, []).append((name, ds))
    found = [_series_from(path, uid, named) for uid, named in by_uid.items()]
    return sorted(found, key=lambda s: (s.number is None, s.number or 0, s.uid))


def list_series(path: PathLike, limits: NiftiLimits = DEFAULT_LIMITS) -> list[DicomSeries]:
    """Every image series in a folder (sub-folders included) or a zip, from headers only.

    Args:
        path: A folder of DICOM files or a ``.zip`` of one.
        limits: What the files may cost (``max_file_bytes`` per file and for
            the zip's unpacked total; ``max_voxels`` is checked when read).

    Returns:
        The series sorted by Series Number, each with ``volume`` and
        ``problem`` saying whether and why it cannot be read as a 3D volume.

    Raises:
        DunetError: a missing path, a file that is not a zip, an empty zip, a
            folder or zip without DICOM images, an unreadable DICOM file.
    """
    p = Path(path)
    with _open_source(p, limits) as source:
        return _list(p, source, limits)


def _pixels(ds: Any, where: str) -> np.ndarray:
    """One slice's values, Rescale Slope / Intercept applied: float32 ``[rows, cols]``."""
    if "PixelData" not in ds:
        raise DunetError(f"{where}: no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DunetError(f"{where}: a colour image ({ds.get('PhotometricInterpretation')}); "
                         "only greyscale series are volumes")
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as exc:  # missing decoder for a compressed syntax, truncated data
        raise DunetError(f"{where}: cannot decode pixel data ({one_line(exc, 160)})") from None
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise DunetError(f"{where}: RescaleSlope / RescaleIntercept are not finite")
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def load_series(series: DicomSeries, limits: NiftiLimits = DEFAULT_LIMITS) -> DicomVolume:
    """Read one listed series as a volume (its files are read again, with pixels).

    Args:
        series: From :func:`list_series`.
        limits: ``max_voxels`` bounds the volume before pixels are read.

    Returns:
        float32 ``[X, Y, Z]`` = (columns, rows, slices) values with the
        rescale applied, the RAS affine, the datasets in slice order.

    Raises:
        DunetError: ``series.problem`` when it has one; a volume over
            ``limits``; a file that changed since it was listed; undecodable
            or colour pixel data.
    """
    if series.problem is not None:
        raise DunetError(series.problem)
    pydicom = require_pydicom()
    where = f"{series.source}: {series.label}"
    assert series.shape is not None
    voxels = int(np.prod(series.shape))
    if voxels > limits.max_voxels:
        raise DunetError(f"{where}: {'x'.join(map(str, series.shape))} voxels, over the limit "
                         f"of {limits.max_voxels}")
    with _open_source(series.source, limits) as source:
        named = [(name, _parse(pydicom, source, name, series.source / name, limits, pixels=True))
                 for name in series.members]
    if any(ds is None for _, ds in named):
        raise DunetError(f"{where}: the files changed since the series was listed")
    geometry = _geometry(where, named)  # the files may have changed since they were listed
    if geometry.order != list(range(len(named))) or geometry.shape != series.shape:
        raise DunetError(f"{where}: the files changed since the series was listed")
    data = np.empty(geometry.shape, dtype=np.float32)
    datasets = []
    for k, (name, ds) in enumerate(named):
        if str(ds.get("SeriesInstanceUID", "")) != series.uid:
            raise DunetError(f"{where}: {name} changed since the series was listed")
        data[:, :, k] = _pixels(ds, f"{series.source / name}").T
        del ds.PixelData  # the writer needs the headers only; keeps the volume small to pickle
        datasets.append(ds)
    if not np.isfinite(data).all():
        raise DunetError(f"{where}: NaN or Inf values after the rescale")
    return DicomVolume(data=data, affine=geometry.affine, header=None, path=series.source,
                       datasets=tuple(datasets), series=series)


def series_headers(series: DicomSeries, limits: NiftiLimits = DEFAULT_LIMITS
                   ) -> tuple[tuple[Any, ...], np.ndarray]:
    """The datasets of one listed series without pixel data, in slice order, and its affine.

    What a DICOM SEG references, read again after the volume was segmented
    (a worker process need not ship the headers with the volume).

    Returns:
        ``(datasets, affine)``: the datasets in the order of a
        :class:`DicomVolume`'s third axis and its RAS ``[4, 4]`` affine.

    Raises:
        DunetError: ``series.problem``, or files that changed since listing.
    """
    if series.problem is not None:
        raise DunetError(series.problem)
    pydicom = require_pydicom()
    where = f"{series.source}: {series.label}"
    with _open_source(series.source, limits) as source:
        named = [(name, _parse(pydicom, source, name, series.source / name, limits, pixels=False))
                 for name in series.members]
    if any(ds is None or str(ds.get("SeriesInstanceUID", "")) != series.uid for _, ds in named):
        raise DunetError(f"{where}: the files changed since the series was listed")
    geometry = _geometry(where, named)
    if geometry.order != list(range(len(named))) or geometry.shape != series.shape:
        raise DunetError(f"{where}: the files changed since the series was listed")
    return tuple(ds for _, ds in named), geometry.affine


def load_dicom(path: PathLike, series_uid: str | None = None,
               limits: NiftiLimits = DEFAULT_LIMITS) -> DicomVolume:
    """Read the 3D series of a folder or zip (the one given by ``series_uid`` when several).

    Args:
        path: A folder of DICOM files or a ``.zip`` of one.
        series_uid: The Series Instance UID to read; needed only when the
            folder holds more than one 3D series (localisers and other
            non-volumes do not count).
        limits: See :func:`list_series` and :func:`load_series`.

    Returns:
        The volume.

    Raises:
        DunetError: no such series, none or several 3D series without
            ``series_uid``, or the chosen series' problem.
    """
    p = Path(path)
    found = list_series(p, limits)
    if series_uid is not None:
        chosen = [s for s in found if s.uid == series_uid]
        if not chosen:
            have = ", ".join(f"{s.label} {s.uid}" for s in found)
            raise DunetError(one_line(f"{p}: no series with UID {series_uid} (it holds {have})"))
        return load_series(chosen[0], limits)
    volumes = [s for s in found if s.volume]
    if len(volumes) == 1:
        return load_series(volumes[0], limits)
    if not volumes:
        why = "; ".join(str(s.problem).removeprefix(f"{p}: ") for s in found)
        raise DunetError(one_line(f"{p}: no 3D series ({why})"))
    have = ", ".join(f"{s.label} {s.uid}" for s in volumes)
    raise DunetError(one_line(f"{p}: holds {len(volumes)} 3D series ({have}); choose one "
                              "with series_uid"))


def source_record(volume: NiftiVolume) -> dict[str, Any] | None:
    """What a run's summary records of a DICOM input (``None`` for any other volume).

    Returns:
        ``{"kind": "dicom", "path", "series_uid", "series_number",
        "description", "modality", "slices"}``.
    """
    if not isinstance(volume, DicomVolume) or volume.series is None:
        return None
    series = volume.series
    return {"kind": "dicom", "path": str(series.source), "series_uid": series.uid,
            "series_number": series.number, "description": series.description,
            "modality": series.modality, "slices": len(volume.datasets)}
