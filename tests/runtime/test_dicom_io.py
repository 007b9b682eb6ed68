"""runtime.dicom_io: DICOM series as pipeline inputs (no model needed), on real pydicom files."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dunet_deploy.data.dicom import DicomVolume, list_series, load_series, source_record
from dunet_deploy.data.synth_dicom import SeriesInfo, write_dicom_series
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.dicom_io import (
    SEG_SUFFIX,
    ScanReader,
    is_series_input,
    refuse_non_dicom,
    series_names,
)
from dunet_deploy.runtime.pipeline import InputItem, expand_inputs, output_stem

pytest.importorskip("pydicom")

SHAPE = (10, 12, 6)
AXIAL = np.diag([1.0, 1.0, 2.0, 1.0])
SAGITTAL = np.array([[0, 0, 1.5, -4], [-1, 0, 0, 6], [0, -1, 0, 5], [0, 0, 0, 1]], float)


def _values(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=SHAPE).astype(np.float32)


def _study(folder: Path) -> dict[str, str]:
    """A localiser, an axial 'T1 MPRAGE' (series 3) and a sagittal 'FLAIR' (series 5)."""
    uids = {}
    for number, name, affine, kind in [(1, "loc", AXIAL, "LOCALIZER"),
                                       (3, "T1 MPRAGE", AXIAL, "M"),
                                       (5, "FLAIR", SAGITTAL, "M")]:
        uid = f"1.2.826.0.1.3680043.8.498.{number}"
        write_dicom_series(_values(number), affine, folder, prefix=f"s{number}",
                           info=SeriesInfo(series_uid=uid, series_number=number, description=name,
                                           image_type=("ORIGINAL", "PRIMARY", kind)))
        uids[name] = uid
    return uids


def test_a_folder_of_several_series_expands_to_one_named_input_each(tmp_path: Path) -> None:
    uids = _study(tmp_path / "study")
    (tmp_path / "scan.nii.gz").write_bytes(b"")  # a NIfTI beside it is an input too
    reader = ScanReader()
    items = expand_inputs([tmp_path], reader=reader)
    names = [p.path.name for p in items]
    assert names == ["scan.nii.gz", "study_s3_T1_MPRAGE", "study_s5_FLAIR"]
    assert expand_inputs([tmp_path / "study"], reader=reader) == items[1:]
    t1 = reader.read(items[1].path)
    assert isinstance(t1, DicomVolume)
    np.testing.assert_array_equal(t1.data, _values(3))
    flair = reader.read(items[2].path)
    np.testing.assert_allclose(flair.affine, SAGITTAL, atol=1e-5)
    record = source_record(flair)
    assert record is not None and record["series_uid"] == uids["FLAIR"]
    assert record["slices"] == SHAPE[2] and record["series_number"] == 5
    # The names depend on the headers only: a second listing names them the same.
    assert list(series_names(list_series(tmp_path / "study"))) == names[1:]


def test_series_uid_picks_one_series_and_the_folder_is_one_input(tmp_path: Path) -> None:
    uids = _study(tmp_path / "study")
    reader = ScanReader(uids["FLAIR"])
    items = expand_inputs([tmp_path / "study"], reader=reader)
    assert [i.path for i in items] == [tmp_path / "study"]
    np.testing.assert_array_equal(reader.read(items[0].path).data, _values(5))
    with pytest.raises(DunetError, match="no series with UID 1.2.3"):
        ScanReader("1.2.3").read(tmp_path / "study")


def test_a_series_name_that_is_not_there_lists_the_names(tmp_path: Path) -> None:
    _study(tmp_path / "study")
    with pytest.raises(DunetError) as exc:
        ScanReader().read(tmp_path / "study" / "study_s4_T2")
    assert "study_s3_T1_MPRAGE, study_s5_FLAIR" in str(exc.value) and "\n" not in str(exc.value)


def test_same_number_and_description_are_told_apart_by_uid(tmp_path: Path) -> None:
    for uid in ("1.2.3.41", "1.2.3.42"):
        write_dicom_series(_values(1), AXIAL, tmp_path, prefix=uid,
                           info=SeriesInfo(series_uid=uid, series_number=2, description="T1"))
    assert sorted(series_names(list_series(tmp_path))) == [
        f"{tmp_path.name}_s2_T1_12341", f"{tmp_path.name}_s2_T1_12342"]


def test_zip_is_one_input_named_without_zip(tmp_path: Path) -> None:
    files = write_dicom_series(_values(2), AXIAL, tmp_path / "t1")
    with zipfile.ZipFile(tmp_path / "t1.zip", "w") as zf:
        for f in files:
            zf.write(f, f.name)
    items = expand_inputs([tmp_path / "t1.zip"], reader=ScanReader())
    assert output_stem(items[0].path) == "t1"
    np.testing.assert_array_equal(ScanReader().read(items[0].path).data, _values(2))


def test_own_seg_outputs_are_not_inputs(tmp_path: Path) -> None:
    files = write_dicom_series(_values(2), AXIAL, tmp_path / "out")
    for f in files:  # what our DICOM SEG outputs look like to a folder scan
        f.rename(f.with_name(f.stem + SEG_SUFFIX))
    assert not is_series_input(tmp_path / "out")
    assert is_series_input(tmp_path) is False
    item = expand_inputs([tmp_path], reader=ScanReader(), recursive=True)[0]
    assert item.matched_nothing


def test_refuse_non_dicom_names_the_nifti_input(tmp_path: Path) -> None:
    _study(tmp_path / "study")
    nifti = tmp_path / "scan.nii.gz"
    items = expand_inputs([tmp_path / "study"], reader=ScanReader())
    refuse_non_dicom(items)  # series, virtual paths included
    with pytest.raises(DunetError) as exc:
        refuse_non_dicom([*items, InputItem(nifti)])
    assert str(exc.value).startswith(f"dicom_seg: {nifti} is not a DICOM series")
    assert exc.value.option == "dicom_seg"


def test_reader_pickles_for_worker_processes() -> None:
    reader = ScanReader("1.2.3")
    assert pickle.loads(pickle.dumps(reader)) == reader


# ------------------------------------------------------------- the writer
class _FailingWriter:
    """A NIfTI writer whose disk is full: the SEG written before it must not stay."""

    def targets(self, item, out):
        from dunet_deploy.runtime.pipeline import NIFTI_WRITER

        return NIFTI_WRITER.targets(item, out)

    def write(self, pred, prep, out):
        raise DunetError(f"{out.out_dir}: cannot write (No space left on device)")

    def discard_partial(self, item, out):
        pass


def _prepared(tmp_path: Path):
    from dunet_deploy.runtime.core import Prediction, geometry_of
    from dunet_deploy.runtime.pipeline import CaseResult, PreparedVolume

    write_dicom_series(_values(3), AXIAL, tmp_path / "t1")
    vol = ScanReader().read(tmp_path / "t1")
    item = InputItem(tmp_path / "t1")
    prep = PreparedVolume(item, CaseResult(input=str(item.path), source=source_record(vol)),
                          ref=geometry_of(vol))
    mask = (vol.data > 500).astype(np.uint8)
    pred = Prediction(mask=mask, prob=None, affine=vol.affine, header=None,
                      zooms=(1.0, 1.0, 2.0), slabs_run=0, slabs_skipped=0)
    return item, prep, pred


def test_seg_and_mask_are_written_together_or_not_at_all(tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    from dunet_deploy.runtime.dicom_io import DicomSegWriter
    from dunet_deploy.runtime.dicom_seg import load_dicom_seg
    from dunet_deploy.runtime.options import InferenceOptions
    from dunet_deploy.runtime.pipeline import NIFTI_WRITER, OutputOptions

    _item, prep, pred = _prepared(tmp_path)
    (tmp_path / "out").mkdir()
    out = OutputOptions(tmp_path / "out", InferenceOptions(min_lesion_mm3=0.0))
    failing = DicomSegWriter(_FailingWriter(), "dunet", "0.1 fp32", "ab" * 32)
    with pytest.raises(DunetError, match="No space left"):
        failing.write(pred, prep, out)
    assert list((tmp_path / "out").iterdir()) == []

    writer = DicomSegWriter(NIFTI_WRITER, "dunet", "0.1 fp32", "ab" * 32)
    copy = pickle.loads(pickle.dumps(writer))  # worker processes write with a copy
    assert (copy.model_name, copy.model_digest) == (writer.model_name, writer.model_digest)
    files = writer.write(pred, prep, out)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t1_mask.nii.gz", "t1_seg.dcm"]
    datasets = load_series(list_series(tmp_path / "t1")[0]).datasets
    np.testing.assert_array_equal(load_dicom_seg(files["dicom_seg"], datasets), pred.mask)

    # A series that changed on disk since it was segmented is refused, not mislabelled.
    for f in sorted((tmp_path / "t1").iterdir())[-1:]:
        f.unlink()
    with pytest.raises(DunetError, match="changed since it was read"):
        writer.write(pred, prep, out)


def test_recursive_search_takes_a_dicom_export_once(tmp_path: Path) -> None:
    # An export: a DICOM file at the top (a one-image screenshot series stands in for a DICOMDIR)
    # and the series in sub-folders, which list_series reads: they are no inputs of their own.
    uids = _study(tmp_path / "export" / "DICOM")
    write_dicom_series(_values(9)[:, :, :1], AXIAL, tmp_path / "export", prefix="shot",
                       info=SeriesInfo(series_number=99, description="screenshot"))
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    write_dicom_series(_values(7), AXIAL, tmp_path / "sub" / "deeper" / "t2")
    items = expand_inputs([tmp_path], reader=ScanReader(), recursive=True)
    assert [i.path.relative_to(tmp_path) for i in items] == [
        Path("export/export_s3_T1_MPRAGE"), Path("export/export_s5_FLAIR"),
        Path("sub/deeper/t2")]
    np.testing.assert_array_equal(ScanReader(uids["T1 MPRAGE"]).read(tmp_path / "export").data,
                                  _values(3))
