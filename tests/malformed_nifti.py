"""A battery of malformed NIfTI-1 headers, as file bytes (shared by the reader, CLI and
Triton tests; tests/ is on sys.path).

Each case starts from a valid 8x8x8 float32 ``.nii`` and breaks one thing; the
value is ``(bytes, word)``: a reader must refuse the bytes with a one-line
``DunetError`` "<name>: <reason>" whose reason contains ``word``. (A NaN
``scl_slope`` is not in it: it means "unscaled", and nibabel writes it so.)
"""

from __future__ import annotations

from collections.abc import Callable

import nibabel as nib
import numpy as np

SHAPE = (8, 8, 8)


def _valid() -> tuple[nib.Nifti1Header, bytes]:
    img = nib.Nifti1Image(np.ones(SHAPE, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    hdr = img.header.copy()
    hdr.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    hdr.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    hdr["vox_offset"] = 352
    return hdr, np.ones(SHAPE, np.float32).tobytes(order="F")


def _file(edit: Callable[[nib.Nifti1Header], None], data_bytes: int | None = None) -> bytes:
    hdr, data = _valid()
    edit(hdr)
    body = data if data_bytes is None else data[:data_bytes]
    return hdr.binaryblock + b"\0\0\0\0" + body


def _set(**fields: object) -> Callable[[nib.Nifti1Header], None]:
    def edit(hdr: nib.Nifti1Header) -> None:
        for key, value in fields.items():
            hdr[key] = value
    return edit


def _dim(index: int, value: int) -> Callable[[nib.Nifti1Header], None]:
    def edit(hdr: nib.Nifti1Header) -> None:
        dim = hdr["dim"].copy()
        dim[index] = value
        hdr["dim"] = dim
    return edit


def _pixdim(index: int, value: float) -> Callable[[nib.Nifti1Header], None]:
    def edit(hdr: nib.Nifti1Header) -> None:
        pixdim = hdr["pixdim"].copy()
        pixdim[index] = value
        hdr["pixdim"] = pixdim
    return edit


def _singular_sform(hdr: nib.Nifti1Header) -> None:
    hdr["sform_code"] = 1
    for row in ("srow_x", "srow_y", "srow_z"):
        hdr[row] = np.zeros(4)


def _impossible_quaternion(hdr: nib.Nifti1Header) -> None:
    hdr["sform_code"] = 0  # qform only: nibabel must compute a = sqrt(1 - b² - c² - d²)
    hdr["qform_code"] = 1
    hdr["quatern_b"] = hdr["quatern_c"] = hdr["quatern_d"] = 1.0


def _quaternion_beside_sform(value: float) -> Callable[[nib.Nifti1Header], None]:
    def edit(hdr: nib.Nifti1Header) -> None:
        # The sform stays valid (it is the affine nibabel reads), but the copied qform
        # of every output could not be rebuilt from these numbers.
        hdr["qform_code"] = 1
        hdr["quatern_b"] = hdr["quatern_c"] = hdr["quatern_d"] = value
    return edit


def battery() -> dict[str, tuple[bytes, str]]:
    """case name -> (``.nii`` bytes, a word of the expected reason)."""
    nbytes = int(np.prod(SHAPE)) * 4
    return {
        "dim0_zero": (_file(_dim(0, 0)), "dim"),
        "dim0_eight": (_file(_dim(0, 8)), "dim"),
        "dim0_negative": (_file(_dim(0, -3)), "dim"),
        "negative_dim": (_file(_dim(2, -8)), "dim"),
        "unknown_datatype": (_file(_set(datatype=999)), "datatype"),
        "bitpix_mismatch": (_file(_set(bitpix=8)), "bitpix"),
        "pixdim_zero": (_file(_pixdim(2, 0.0)), "voxel sizes"),
        "pixdim_nan": (_file(_pixdim(1, float("nan"))), "voxel sizes"),
        "slope_inf": (_file(_set(scl_slope=float("inf"))), "scl_slope"),
        "inter_inf": (_file(_set(scl_slope=1.0, scl_inter=float("-inf"))), "scl_slope"),
        "vox_offset_nan": (_file(_set(vox_offset=float("nan"))), "vox_offset"),
        "vox_offset_past_end": (_file(_set(vox_offset=float(1 << 20))), "truncated"),
        "singular_sform": (_file(_singular_sform), "affine"),
        "impossible_quaternion": (_file(_impossible_quaternion), "quaternion"),
        "impossible_quaternion_beside_sform": (_file(_quaternion_beside_sform(1.0)), "quaternion"),
        "nan_quaternion_beside_sform": (_file(_quaternion_beside_sform(float("nan"))),
                                        "quaternion"),
        "header_only": (_file(lambda h: None, data_bytes=0), "truncated"),
        "short_data": (_file(lambda h: None, data_bytes=nbytes // 2), "truncated"),
    }


def valid_bytes() -> bytes:
    """The unbroken file the battery starts from."""
    return _file(lambda h: None)
