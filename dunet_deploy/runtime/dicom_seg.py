"""The lesion mask as a DICOM Segmentation of the series it was computed from.

A PACS or a viewer (OHIF, 3D Slicer) shows a DICOM SEG over its source
series, so the mask goes back where the scan came from, as TotalSegmentator's
``--output_type dicom_seg`` and MONAI Deploy's DICOM SEG writer do. The
object is built with highdicom (``Segmentation``, BINARY): one segment,
"stroke lesion", coded as a lesion (SCT 52988006, of the segmentation
property types of DICOM CID 7159) in the category "morphologically abnormal
structure" (SCT 49755003), in the brain (SCT 12738006); the stroke itself
(SCT 230690007, a disorder) is no segmentable property, so the label says it.
Its algorithm identification names the model (name, version, digest). Frames
are the source series' slices (its plane positions, its frame of reference),
so the SEG lies on exactly the grid of
:class:`~dunet_deploy.data.dicom.DicomVolume`.

highdicom is imported lazily: the ``dicom`` extra provides it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.errors import DunetError, one_line

__all__ = ["SEGMENT_LABEL", "load_dicom_seg", "write_dicom_seg"]

SEGMENT_LABEL = "stroke lesion"
#: DICOM's LO (long string) limit, which the model's name, version and digest must fit.
_LO_MAX = 64
#: The SEG's Series Number: the source's plus this (a derived series sorts after its source).
_SERIES_NUMBER_OFFSET = 1000


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError:
        raise DunetError("writing a DICOM SEG needs highdicom: "
                         "pip install 'dunet-deploy[dicom]'") from None
    return highdicom


def _check_text(name: str, value: str) -> str:
    text = str(value).strip()
    if not text or len(text) > _LO_MAX or "\\" in text:
        raise DunetError(f"{name} {value!r} must be 1 to {_LO_MAX} characters without a backslash")
    return text


def _grid(datasets: Sequence[Any]) -> tuple[int, int, int]:
    """``(X, Y, Z)`` = (columns, rows, slices) of the source series."""
    if not datasets:
        raise DunetError("datasets is empty: a DICOM SEG needs the source series' datasets")
    sizes = {(int(ds.Columns), int(ds.Rows)) for ds in datasets}
    if len(sizes) != 1:
        raise DunetError(f"datasets differ in size ({sorted(sizes)}): not one series' slices")
    cols, rows = sizes.pop()
    return cols, rows, len(datasets)


def _segment(hd: Any, model_name: str, model_version: str, model_digest: str) -> Any:
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name, version=model_version, family=codes.cid7162.ArtificialIntelligence,
        source="dunet-deploy", parameters={"model_digest": model_digest})
    return hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, anatomic_regions=[codes.SCT.Brain])


def write_dicom_seg(
    mask: np.ndarray,
    datasets: Sequence[Any],
    out_path: str | os.PathLike[str],
    *,
    model_name: str,
    model_version: str,
    model_digest: str,
    series_number: int | None = None,
) -> Path:
    """Write ``mask`` as a BINARY DICOM Segmentation of the source series, atomically.

    Args:
        mask: uint8 (or bool) ``[X, Y, Z]`` in {0, 1} on the series' grid:
            ``mask[i, j, k]`` is column ``i``, row ``j`` of ``datasets[k]``
            (the layout of :class:`~dunet_deploy.data.dicom.DicomVolume`).
        datasets: The source series' pydicom datasets in slice order
            (``DicomVolume.datasets``; pixel data not needed).
        out_path: The file to write (its directory must exist). Written to a
            temporary file beside it, then renamed: never half-written.
        model_name: The model's name (Algorithm Name, Manufacturer's Model Name).
        model_version: Its version (Algorithm Version).
        model_digest: Its digest (an Algorithm Parameter and the Device
            Serial Number, so the SEG says exactly which weights made it).
        series_number: The SEG's Series Number; default the source's + 1000.

    Returns:
        ``out_path``.

    Raises:
        DunetError: highdicom missing; ``mask`` not binary or not on the grid
            of ``datasets``; a model text DICOM cannot hold; source datasets
            highdicom cannot reference; the file cannot be written.
    """
    hd = _highdicom()
    from dunet_deploy import __version__

    out = Path(out_path)
    grid = _grid(datasets)
    arr = np.asarray(mask)
    if arr.shape != grid:
        raise DunetError(f"mask shape {arr.shape} differs from the series grid {grid} "
                         "(columns, rows, slices)")
    values = np.unique(arr)
    if not np.isin(values, (0, 1)).all():
        raise DunetError(f"mask must hold 0 and 1 only, got values {values[:8].tolist()}")
    name = _check_text("model_name", model_name)
    version = _check_text("model_version", model_version)
    digest = _check_text("model_digest", model_digest)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise DunetError(f"{out}: directory {parent} does not exist")
    if series_number is None:
        source_number = datasets[0].get("SeriesNumber")
        series_number = (int(source_number) if source_number not in (None, "") else 0) \
            + _SERIES_NUMBER_OFFSET

    frames = np.ascontiguousarray(arr.astype(np.uint8).transpose(2, 1, 0))  # [slice, row, col]
    try:
        seg = hd.seg.Segmentation(
            source_images=list(datasets), pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_segment(hd, name, version, digest)],
            series_instance_uid=hd.UID(), series_number=int(series_number),
            sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="dunet-deploy", manufacturer_model_name=name,
            software_versions=f"dunet-deploy {__version__}",
            device_serial_number=digest[:_LO_MAX],
            series_description=f"{SEGMENT_LABEL} ({name})"[:_LO_MAX],
            content_label="LESION", content_description=f"{SEGMENT_LABEL} segmentation",
            # An empty mask (no lesion found) still has all its frames, and no warning.
            omit_empty_frames=bool(frames.any()))
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom checks the source datasets (UIDs, geometry, patient/study attributes).
        raise DunetError(f"{out}: cannot build a DICOM SEG of this series "
                         f"({one_line(exc, 200)})") from None

    tmp = parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    try:
        seg.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc, 160)
            raise DunetError(f"{out}: cannot write ({why})") from None
        raise
    return out


def load_dicom_seg(path: str | os.PathLike[str], datasets: Sequence[Any]) -> np.ndarray:
    """Read a DICOM SEG's segment 1 back onto the grid of its source series.

    Args:
        path: A DICOM Segmentation referencing ``datasets``.
        datasets: The source series in slice order (``DicomVolume.datasets``).

    Returns:
        uint8 ``[X, Y, Z]`` in {0, 1}, the layout :func:`write_dicom_seg` takes.

    Raises:
        DunetError: not a readable DICOM SEG, or one that does not reference
            these datasets.
    """
    hd = _highdicom()
    p = Path(path)
    _grid(datasets)
    try:
        seg = hd.seg.segread(p)
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
            segment_numbers=[1], combine_segments=True, skip_overlap_checks=True)
    except FileNotFoundError:
        raise DunetError(f"{p}: no such file") from None
    except Exception as exc:  # pydicom / highdicom raise many types on a wrong or corrupt file
        raise DunetError(f"{p}: cannot read as a DICOM SEG of this series "
                         f"({one_line(exc, 200)})") from None
    return np.ascontiguousarray(np.asarray(frames, dtype=np.uint8).transpose(2, 1, 0))
