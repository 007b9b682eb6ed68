"""dunet_deploy.runtime.dicom_seg: DICOM SEG files written and read back with highdicom."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from dunet_deploy.data.dicom import LPS_FROM_RAS, DicomVolume, load_dicom
from dunet_deploy.data.synth_dicom import SeriesInfo, write_dicom_series
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.dicom_seg import SEGMENT_LABEL, load_dicom_seg, write_dicom_seg

hd = pytest.importorskip("highdicom")

SHAPE = (12, 14, 9)
#: An oblique grid: rotated about all three axes, anisotropic voxels.
_C, _S = np.cos(np.radians(15.0)), np.sin(np.radians(15.0))
OBLIQUE = np.array([[0.9 * _C, -1.1 * _S, 0.0, -10.5],
                    [0.9 * _S * 0.96, 1.1 * _C * 0.96, 1.3 * 0.28, 20.25],
                    [-0.9 * _S * 0.28, -1.1 * _C * 0.28, 1.3 * 0.96, 5.0],
                    [0, 0, 0, 1]])
MODEL = {"model_name": "dunet-atlas", "model_version": "2026.12",
         "model_digest": "sha256:" + "ab12" * 14}


def series(folder: Path) -> DicomVolume:
    data = np.random.default_rng(1).integers(0, 1000, size=SHAPE).astype(np.float32)
    write_dicom_series(data, OBLIQUE, folder, info=SeriesInfo(series_number=7))
    return load_dicom(folder)


def lesion() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:8, 4:11, 2:6] = 1
    mask[0, 0, 7] = 1  # one corner voxel on another slice: an isolated frame
    return mask


def test_round_trip_equals_the_mask_on_the_series_grid(tmp_path: Path) -> None:
    vol = series(tmp_path / "s")
    mask = lesion()
    out = write_dicom_seg(mask, vol.datasets, tmp_path / "lesion.seg.dcm", **MODEL)
    assert out == tmp_path / "lesion.seg.dcm"
    np.testing.assert_array_equal(load_dicom_seg(out, vol.datasets), mask)

    # highdicom's own geometry of the frames puts every voxel where the series has it
    volume = hd.seg.segread(out).get_volume(combine_segments=True)
    to_ours = np.linalg.inv(LPS_FROM_RAS @ vol.affine) @ volume.affine  # its index -> ours
    np.testing.assert_allclose(to_ours, np.round(to_ours), atol=1e-4)
    theirs = np.stack(np.meshgrid(*(np.arange(n) for n in volume.spatial_shape), indexing="ij"),
                      axis=-1).reshape(-1, 3)
    ours = np.round(theirs @ to_ours[:3, :3].T + to_ours[:3, 3]).astype(int)
    assert ((ours >= 0) & (ours < SHAPE)).all()
    np.testing.assert_array_equal(volume.array.reshape(-1), mask[tuple(ours.T)])
    assert int(volume.array.sum()) == int(mask.sum())  # every lesion voxel is in its volume


def test_segment_codes_algorithm_and_references(tmp_path: Path) -> None:
    vol = series(tmp_path / "s")
    seg = hd.seg.segread(write_dicom_seg(lesion(), vol.datasets, tmp_path / "l.dcm", **MODEL))
    assert seg.SegmentationType == "BINARY"
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == SEGMENT_LABEL
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    region = segment.AnatomicRegionSequence[0]
    assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "49755003")
    assert (kind.CodingSchemeDesignator, kind.CodeValue) == ("SCT", "52988006")
    assert (region.CodingSchemeDesignator, region.CodeValue) == ("SCT", "12738006")
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == MODEL["model_name"]
    assert algorithm.AlgorithmVersion == MODEL["model_version"]
    assert MODEL["model_digest"] in algorithm.AlgorithmParameters
    assert seg.DeviceSerialNumber == MODEL["model_digest"]
    assert seg.ManufacturerModelName == MODEL["model_name"]
    source = vol.datasets[0]
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.SeriesNumber == 1007
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in vol.datasets}


def test_empty_mask_keeps_every_frame(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    vol = series(tmp_path / "s")
    empty = np.zeros(SHAPE, np.uint8)
    out = write_dicom_seg(empty, vol.datasets, tmp_path / "none.dcm", **MODEL)
    assert int(hd.seg.segread(out).NumberOfFrames) == SHAPE[2]
    np.testing.assert_array_equal(load_dicom_seg(out, vol.datasets), empty)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_atomic_write_leaves_only_the_file(tmp_path: Path) -> None:
    vol = series(tmp_path / "s")
    (tmp_path / "out").mkdir()
    write_dicom_seg(lesion(), vol.datasets, tmp_path / "out" / "l.dcm", **MODEL)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["l.dcm"]


@pytest.mark.parametrize("case", ["shape", "values", "name", "digest", "no_dir", "no_datasets",
                                  "unwritable"])
def test_bad_arguments_are_one_line_errors_and_write_nothing(tmp_path: Path, case: str) -> None:
    vol = series(tmp_path / "s")
    (tmp_path / "out").mkdir()
    mask, datasets, out, model = lesion(), list(vol.datasets), tmp_path / "out" / "l.dcm", MODEL
    expected = {"shape": "differs from the series grid (12, 14, 9)",
                "values": "0 and 1 only", "name": "model_name", "digest": "model_digest",
                "no_dir": "does not exist", "no_datasets": "datasets is empty",
                "unwritable": "cannot write"}[case]
    if case == "shape":
        mask = mask[:, :, :-1]
    elif case == "values":
        mask = mask * 3
    elif case == "name":
        model = {**MODEL, "model_name": "x" * 65}
    elif case == "digest":
        model = {**MODEL, "model_digest": ""}
    elif case == "no_dir":
        out = tmp_path / "missing" / "l.dcm"
    elif case == "no_datasets":
        datasets = []
    elif case == "unwritable":
        out = tmp_path / "out" / "a_directory"
        out.mkdir()
    with pytest.raises(DunetError) as exc:
        write_dicom_seg(mask, datasets, out, **model)
    assert "\n" not in str(exc.value) and expected in str(exc.value), str(exc.value)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == (["a_directory"] if case == "unwritable" else [])


def test_source_highdicom_cannot_reference_is_a_one_line_error(tmp_path: Path) -> None:
    vol = series(tmp_path / "s")
    datasets = [ds.copy() for ds in vol.datasets]
    del datasets[0].FrameOfReferenceUID
    with pytest.raises(DunetError) as exc:
        write_dicom_seg(lesion(), datasets, tmp_path / "l.dcm", **MODEL)
    assert "cannot build a DICOM SEG" in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "l.dcm").exists()


def test_seg_of_another_series_is_refused_when_read(tmp_path: Path) -> None:
    vol = series(tmp_path / "s")
    other = series(tmp_path / "t")
    out = write_dicom_seg(lesion(), vol.datasets, tmp_path / "l.dcm", **MODEL)
    with pytest.raises(DunetError) as exc:
        load_dicom_seg(out, other.datasets)
    assert str(out) in str(exc.value) and "cannot read as a DICOM SEG" in str(exc.value)


def test_missing_highdicom_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = series(tmp_path / "s")
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(DunetError) as exc:
        write_dicom_seg(lesion(), vol.datasets, tmp_path / "l.dcm", **MODEL)
    assert "pip install 'dunet-deploy[dicom]'" in str(exc.value)


@pytest.mark.parametrize("axes", ["sagittal_pir", "tilted", "left_handed"])
def test_round_trip_on_other_grids(tmp_path: Path, axes: str) -> None:
    affine = {"sagittal_pir": np.array([[0, 0, 1.2, -70], [-1.0, 0, 0, 120], [0, -1.05, 0, 95],
                                        [0, 0, 0, 1]]),
              "tilted": np.array([[0.9, 0, 0, -90], [0, 0.95, 0.6, -110], [0, 0, 3.0, -40],
                                  [0, 0, 0, 1]]),
              "left_handed": np.diag([-1.0, 1.0, 2.0, 1.0])}[axes]
    write_dicom_series(np.random.default_rng(2).integers(0, 1000, size=SHAPE), affine, tmp_path)
    vol = load_dicom(tmp_path)
    mask = (vol.data > 800).astype(np.uint8)
    out = write_dicom_seg(mask, vol.datasets, tmp_path / "seg.dcm", **MODEL)
    np.testing.assert_array_equal(load_dicom_seg(out, vol.datasets), mask)
    # the SEG written beside the series is no series of its own when the folder is read again
    np.testing.assert_array_equal(load_dicom(tmp_path).data, vol.data)
