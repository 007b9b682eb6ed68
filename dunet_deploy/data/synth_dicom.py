"""Write a 3D volume as a DICOM MR series (one file per slice), for tests and demos.

What a scanner's export looks like to :mod:`dunet_deploy.data.dicom`: classic
single-frame MR Image Storage files, int16 pixels, the geometry in Image
Position / Orientation (Patient) and Pixel Spacing, the voxel values through
Rescale Slope / Intercept. Any orientation a NIfTI affine can describe with
orthogonal in-plane axes can be written (axial, sagittal, coronal, oblique);
the slice axis may be sheared, as a CT gantry tilt is.

pydicom is imported lazily: the ``dicom`` extra (``pip install
'dunet-deploy[dicom]'``) provides it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.data.dicom import LPS_FROM_RAS, require_pydicom
from dunet_deploy.errors import DunetError

__all__ = ["SeriesInfo", "write_dicom_series"]

_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class SeriesInfo:
    """The identifying attributes of a written series (``None`` UIDs are generated).

    Attributes:
        series_uid: Series Instance UID.
        study_uid: Study Instance UID.
        frame_of_reference_uid: Frame of Reference UID (shared by series of one
            acquisition geometry).
        series_number: Series Number.
        description: Series Description.
        image_type: Image Type values (``("ORIGINAL", "PRIMARY", "LOCALIZER")``
            marks a localiser).
        patient_id: Patient ID.
        patient_name: Patient's Name.
    """

    series_uid: str | None = None
    study_uid: str | None = None
    frame_of_reference_uid: str | None = None
    series_number: int = 1
    description: str = "synthetic T1"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND")
    patient_id: str = "SYNTH001"
    patient_name: str = "Synthetic^Head"
    extra: dict[str, Any] = field(default_factory=dict)


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters keeping as many digits as fit."""
    from pydicom.valuerep import format_number_as_ds

    return str(format_number_as_ds(float(value)))


def write_dicom_series(
    data: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike[str],
    *,
    info: SeriesInfo = SeriesInfo(),
    rescale: tuple[float, float] = (1.0, 0.0),
    slices: Sequence[int] | None = None,
    prefix: str = "slice",
) -> list[Path]:
    """Write ``data`` on the grid ``affine`` as one DICOM file per slice of its third axis.

    Voxel ``data[i, j, k]`` becomes pixel (row ``j``, column ``i``) of slice
    ``k``: the in-plane axes are the affine's first two columns, which must be
    orthogonal (DICOM cannot describe a sheared slice plane); the third column
    is the step from slice to slice.

    Args:
        data: ``[X, Y, Z]`` values. Stored as int16 ``round((value - intercept) / slope)``.
        affine: float ``[4, 4]`` voxel-to-world matrix, RAS+ (NIfTI convention).
        folder: Created if missing; see ``prefix``.
        info: Series identity (UIDs, number, description, image type).
        rescale: ``(slope, intercept)`` written as Rescale Slope / Intercept.
        slices: Write only these slice indices (to make a series with a
            missing slice); default all.
        prefix: File names are ``<prefix>_0000.dcm``, ...

    Returns:
        The written files, in slice order.

    Raises:
        DunetError: the in-plane axes are not orthogonal, or the values do not
            fit int16 at this ``rescale``.
    """
    pydicom = require_pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, generate_uid

    arr = np.asarray(data, dtype=np.float64)
    if arr.ndim != 3:
        raise DunetError(f"data must be 3D [X, Y, Z], got shape {arr.shape}")
    lps = LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step, slice_step, origin = lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3]
    dx, dy = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    if abs(float(col_step @ row_step)) > 1e-6 * dx * dy:
        raise DunetError("affine: the first two axes (the slice plane) must be orthogonal")
    slope, intercept = (float(v) for v in rescale)
    stored = np.round((arr - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise DunetError(f"data {arr.min()}..{arr.max()} does not fit int16 with rescale {rescale}")
    stored16 = stored.astype(np.int16)

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    series_uid = info.series_uid or generate_uid()
    study_uid = info.study_uid or generate_uid()
    frame_uid = info.frame_of_reference_uid or generate_uid()
    orientation = [_ds(v) for v in (*(col_step / dx), *(row_step / dy))]
    nx, ny, nz = stored16.shape
    written = []
    for k in range(nz) if slices is None else slices:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(_MR_IMAGE_STORAGE)
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = UID(_EXPLICIT_VR_LITTLE_ENDIAN)
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = _MR_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID, ds.PatientName = info.patient_id, info.patient_name
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.Manufacturer = "MR", "dunet-deploy synthetic"
        ds.SeriesNumber, ds.InstanceNumber = info.series_number, k + 1
        ds.SeriesDescription = info.description
        ds.ImageType = list(info.image_type)
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "SP", ""
        ds.MRAcquisitionType = "3D"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds(v) for v in origin + k * slice_step]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [_ds(dy), _ds(dx)]  # between rows, between columns
        ds.SliceThickness = _ds(float(np.linalg.norm(slice_step)))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), _ds(intercept), "US"
        for keyword, value in info.extra.items():
            setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(stored16[:, :, k].T).tobytes()
        path = out / f"{prefix}_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
