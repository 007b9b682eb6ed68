"""Reading and writing NIfTI volumes with one-line, file-naming errors.

Only numpy and nibabel are used. Every failure a user can cause (missing
file, not NIfTI, truncated gzip, wrong dimensionality, NaN voxels, unwritable
output) is raised as :class:`~dunet_deploy.errors.DunetError` whose message
starts with the file name.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from dunet_deploy.errors import DunetError
from dunet_deploy.filetypes import VOLUME, check_kind

__all__ = ["NiftiVolume", "load_mask", "load_nifti", "nifti_suffix", "save_nifti_like"]

PathLike = str | os.PathLike[str]


@dataclass
class NiftiVolume:
    """A loaded 3D NIfTI image.

    Attributes:
        data: float32 ``[X, Y, Z]`` voxel values with ``scl_slope``/``scl_inter``
            applied.
        affine: float64 ``[4, 4]`` voxel-to-world matrix (sform if set, else
            qform).
        header: The nibabel header, kept so outputs can copy geometry
            (``None`` for an in-memory volume; the affine is then used).
        path: Where it was read from (``None`` for in-memory volumes).
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any = None
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``data``."""
        return tuple(self.data.shape)

    @property
    def zooms(self) -> tuple[float, ...]:
        """Voxel sizes (mm) of the three spatial axes."""
        if self.header is None:
            return tuple(float(z) for z in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))
        return tuple(float(z) for z in self.header.get_zooms()[:3])


def nifti_suffix(path: PathLike) -> str:
    """Return ``".nii.gz"`` or ``".nii"`` for a NIfTI file name, else ``""``."""
    name = os.fspath(path).lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    if name.endswith(".nii"):
        return ".nii"
    return ""


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _open_image(path: Path) -> Any:
    """nib.load with file checks; returns a NIfTI-1/2 image (data not read)."""
    if not path.exists():
        raise DunetError(f"{path}: no such file")
    if path.is_dir():
        raise DunetError(f"{path}: is a directory, not a NIfTI file")
    check_kind(path, VOLUME)  # a checkpoint or model given as a scan: say what it is
    try:
        img = nib.load(str(path))
    except nib.filebasedimages.ImageFileError:
        raise DunetError(f"{path}: not a NIfTI file") from None
    except Exception as exc:  # nibabel raises many types on corrupt input
        raise DunetError(f"{path}: cannot read NIfTI header ({_reason(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DunetError(f"{path}: not a NIfTI file (nibabel reads it as {type(img).__name__})")
    return img


def _spatial_shape(path: Path, shape: Sequence[int]) -> tuple[int, ...]:
    """Squeeze trailing singleton dims beyond 3; reject anything not 3D."""
    dims = tuple(int(n) for n in shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    if len(dims) != 3:
        raise DunetError(f"{path}: expected a 3D volume, got shape {tuple(shape)}")
    if min(dims) < 1:
        raise DunetError(f"{path}: empty volume of shape {dims}")
    return dims


def load_nifti(path: PathLike) -> NiftiVolume:
    """Load a 3D NIfTI volume (.nii or .nii.gz, any numeric on-disk type).

    A 4D (or 5D) image whose extra dimensions are all 1 is squeezed to 3D.

    Args:
        path: File to read.

    Returns:
        The volume with float32 data (scaling applied).

    Raises:
        DunetError: ``"<path>: <reason>"`` for a missing file, non-NIfTI or
            corrupt/truncated file, non-3D image, or NaN/Inf voxels.
    """
    p = Path(path)
    img = _open_image(p)
    shape = _spatial_shape(p, img.shape)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except MemoryError:
        raise
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError on truncation
        raise DunetError(f"{p}: cannot read voxel data, file truncated or corrupt "
                         f"({_reason(exc)})") from None
    data = data.reshape(shape)
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - np.count_nonzero(finite))
        raise DunetError(f"{p}: {bad} voxel(s) are NaN or Inf")
    return NiftiVolume(data=data, affine=np.asarray(img.affine, dtype=np.float64),
                       header=img.header, path=p)


def load_mask(paths: PathLike | Sequence[PathLike]) -> np.ndarray:
    """Load one or several lesion masks and merge them (logical OR).

    A voxel is lesion when its value is ``> 0`` in any mask (ATLAS R1.1 splits
    some lesions over several ``LesionSmooth`` files).

    Args:
        paths: One path or a non-empty list of paths.

    Returns:
        uint8 ``[X, Y, Z]`` with values in {0, 1}.

    Raises:
        DunetError: when a file cannot be loaded, the list is empty, or the
            masks' shapes differ.
    """
    path_list = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not path_list:
        raise DunetError("no mask files given")
    merged: np.ndarray | None = None
    first: Path | None = None
    for path in path_list:
        vol = load_nifti(path)
        if merged is None:
            merged, first = vol.data > 0, vol.path
        elif vol.data.shape != merged.shape:
            raise DunetError(
                f"{vol.path}: mask shape {vol.data.shape} differs from {merged.shape} of {first}"
            )
        else:
            merged |= vol.data > 0
    assert merged is not None
    return merged.astype(np.uint8)


def _check_representable(path: Path, data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if not np.isfinite(data).all():
        raise DunetError(f"{path}: refusing to write NaN or Inf voxels")
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise DunetError(
                f"{path}: values {data.min()}..{data.max()} do not fit {dtype.name}"
            )
        if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
            raise DunetError(f"{path}: non-integer values cannot be stored as {dtype.name}")
    return data.astype(dtype)


def _header_for(affine: np.ndarray, shape: tuple[int, ...]) -> Any:
    """A fresh header for an in-memory reference volume (``header=None``)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_sform(affine, code=2)
    hdr.set_qform(affine, code=2)
    hdr.set_zooms(tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))
    return hdr


def save_nifti_like(
    path: PathLike,
    data: npt.ArrayLike,
    ref: NiftiVolume,
    dtype: npt.DTypeLike = np.float32,
) -> Path:
    """Write ``data`` with the geometry of ``ref``, atomically.

    The output has the reference's shape, affine, qform/sform (and codes) and
    voxel sizes; ``scl_slope``/``scl_inter`` are reset so the values are stored
    as-is in ``dtype`` (e.g. uint8 masks, float32 probabilities). The file is
    first written to a temporary file in the same directory and then renamed
    over ``path``, so readers never see a partial file and on any error no
    file (temporary or final) is left behind.

    Args:
        path: Output file, ``.nii`` or ``.nii.gz``. Its directory must exist.
        data: Array of ``ref.data.shape``.
        ref: The volume whose geometry to copy.
        dtype: On-disk dtype. Integer dtypes require integral, in-range data.

    Returns:
        The written path.

    Raises:
        DunetError: on a bad suffix, shape mismatch, unrepresentable values,
            missing directory or any write failure.
    """
    out = Path(path)
    suffix = nifti_suffix(out)
    if not suffix:
        raise DunetError(f"{out}: output file name must end in .nii or .nii.gz")
    arr = np.asarray(data)
    if arr.shape != ref.data.shape:
        raise DunetError(f"{out}: data shape {arr.shape} differs from reference {ref.data.shape}")
    np_dtype = np.dtype(dtype)
    arr = _check_representable(out, arr, np_dtype)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise DunetError(f"{out}: directory {parent} does not exist")

    ref_hdr = ref.header if ref.header is not None else _header_for(ref.affine, ref.data.shape)
    hdr = ref_hdr.copy()
    hdr.set_data_dtype(np_dtype)
    image_class = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
    img = image_class(arr, ref.affine, header=hdr)
    img.set_sform(ref_hdr.get_sform(), code=int(ref_hdr["sform_code"]))
    img.set_qform(ref_hdr.get_qform(), code=int(ref_hdr["qform_code"]))
    img.header.set_zooms(tuple(float(z) for z in ref_hdr.get_zooms()[:3]))
    # Store values as-is; the reference's scaling/display range mean nothing here.
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = 0.0
    img.header["cal_max"] = 0.0

    # Same directory so os.replace is an atomic rename; the suffix tells
    # nibabel whether to gzip. (Not mkstemp: its 0600 mode would stick.)
    tmp = parent / f".{out.name}.{secrets.token_hex(6)}.tmp{suffix}"
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            raise DunetError(f"{out}: cannot write ({_reason(exc)})") from None
        raise
    return out
