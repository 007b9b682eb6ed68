"""Data handling: NIfTI and DICOM I/O, dataset layouts, preprocessing, slice cache, synthetic data.

Everything here is numpy + nibabel only (never torch), because the lean
runtime imports it; pydicom is imported only when a DICOM series is read.
"""

from dunet_deploy.data.cache import SliceCache, build_cache
from dunet_deploy.data.dicom import (
    DicomSeries,
    DicomVolume,
    is_dicom_input,
    list_series,
    load_dicom,
    load_series,
)
from dunet_deploy.data.layouts import (
    LAYOUTS,
    Case,
    check_case,
    discover_cases,
    load_case,
    split_cases,
)
from dunet_deploy.data.nifti import NiftiVolume, load_mask, load_nifti, save_nifti_like
from dunet_deploy.data.preprocess import (
    bilinear_matrix,
    binarize,
    mask_to_labels,
    nonempty_slab_indices,
    nonempty_slice_flags,
    normalize_intensity,
    probs_to_volume,
    resize_bilinear,
    slices_to_slabs,
    volume_to_slabs,
    volume_to_slices,
)
from dunet_deploy.data.synth import preview_png, synthesize_case, write_dataset
from dunet_deploy.spec import PreprocessSpec, fit_dataset_intensity

__all__ = [
    "LAYOUTS",
    "Case",
    "DicomSeries",
    "DicomVolume",
    "NiftiVolume",
    "PreprocessSpec",
    "SliceCache",
    "bilinear_matrix",
    "binarize",
    "build_cache",
    "check_case",
    "discover_cases",
    "fit_dataset_intensity",
    "is_dicom_input",
    "list_series",
    "load_case",
    "load_dicom",
    "load_mask",
    "load_nifti",
    "load_series",
    "mask_to_labels",
    "nonempty_slab_indices",
    "nonempty_slice_flags",
    "normalize_intensity",
    "preview_png",
    "probs_to_volume",
    "resize_bilinear",
    "save_nifti_like",
    "slices_to_slabs",
    "split_cases",
    "synthesize_case",
    "volume_to_slabs",
    "volume_to_slices",
    "write_dataset",
]
