"""dunet-infer and the Segmenter on DICOM series in, DICOM SEG out, as a user runs them.

Real DICOM series written with pydicom into temporary folders (one of them
oblique), the tiny exported model, the CLI in a subprocess; the SEG is read
back with highdicom and compared with the NIfTI mask of the same run and with
the mask the NIfTI path gives for the same volume saved as NIfTI (the same
voxels and affine, so the masks must be identical, not close).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dunet_deploy.data.dicom import list_series, load_series
from dunet_deploy.data.nifti import load_nifti, save_nifti_like
from dunet_deploy.data.synth_dicom import SeriesInfo, write_dicom_series

pytest.importorskip("torch")
pytest.importorskip("highdicom")

#: Oblique: the in-plane axes turned 36.87 degrees about z (cos 0.8, sin 0.6) at 1.25 mm
#: spacing, so that every affine entry (1.0, 0.75) is exact in binary, in DICOM's decimal
#: strings and in NIfTI's float32 sform: the NIfTI copy of the series has exactly its grid.
TURN = np.array([[1.0, -0.75, 0, 0], [0.75, 1.0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


def oblique(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``affine`` turned by :data:`TURN` about the volume's centre."""
    centre = affine @ np.array([*((np.asarray(shape) - 1) / 2.0), 1.0])
    move = np.eye(4)
    move[:3, 3] = centre[:3]
    back = np.eye(4)
    back[:3, 3] = -centre[:3]
    return move @ TURN @ back @ affine


def _infer(model: Path, out: Path, *inputs: object, extra: tuple[str, ...] = ()
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dunet_deploy.cli.infer", "--engine",
                           str(model), *map(str, inputs), "-o", str(out), "--backend",
                           "onnxruntime", "-q", *extra],
                          capture_output=True, text=True, timeout=300)


def _study(scan: Path, folder: Path) -> dict[str, str]:
    """The scan as an axial 'T1 MPRAGE' (series 2) and an oblique copy (series 4), a localiser."""
    vol = load_nifti(scan)
    slope = float(np.abs(vol.data).max()) / 30000.0 or 1.0
    uids = {}
    for number, name, affine, kind in [
            (1, "loc", vol.affine, "LOCALIZER"), (2, "T1 MPRAGE", vol.affine, "M"),
            (4, "T1 oblique", oblique(vol.affine, vol.shape), "M")]:
        uid = f"1.2.826.0.1.3680043.8.498.10{number}"
        data = vol.data[:, :, :3] if kind == "LOCALIZER" else vol.data
        write_dicom_series(data, affine, folder, rescale=(slope, 0.0), prefix=f"s{number}",
                           info=SeriesInfo(series_uid=uid, series_number=number, description=name,
                                           image_type=("ORIGINAL", "PRIMARY", kind)))
        uids[name] = uid
    return uids


def _as_nifti(folder: Path, out: Path) -> list[Path]:
    """Each 3D series of ``folder`` as read by our reader, saved as NIfTI (same voxels, affine)."""
    out.mkdir()
    paths = []
    for series in list_series(folder):
        if series.volume:
            vol = load_series(series)
            path = out / f"s{series.number}.nii.gz"
            save_nifti_like(path, vol.data, vol)
            saved = load_nifti(path)  # the same grid and voxels, to the bit (see TURN)
            assert np.array_equal(saved.affine, vol.affine)
            assert np.array_equal(saved.data, vol.data)
            paths.append(path)
    return paths


def _mask(path: str | Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.mark.slow
def test_dicom_study_in_dicom_seg_out_equals_the_nifti_path(tiny_run, tmp_path: Path) -> None:
    from dunet_deploy.runtime.dicom_seg import load_dicom_seg

    uids = _study(tiny_run.scan, tmp_path / "study")
    proc = _infer(tiny_run.onnx, tmp_path / "out", tmp_path / "study",
                  extra=("--dicom-seg", "--save-prob", "--workers", "0"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["options"]["dicom_seg"] is True
    cases = summary["cases"]
    stems = ["study_s2_T1_MPRAGE", "study_s4_T1_oblique"]
    assert [Path(c["input"]).name for c in cases] == stems
    nifti = _as_nifti(tmp_path / "study", tmp_path / "nifti")
    ref = _infer(tiny_run.onnx, tmp_path / "ref", *nifti, extra=("--save-prob",))
    assert ref.returncode == 0, ref.stderr
    ref_cases = json.loads((tmp_path / "ref" / "summary.json").read_text())["cases"]
    for case, ref_case, stem, name in zip(cases, ref_cases, stems, ["T1 MPRAGE", "T1 oblique"],
                                          strict=True):
        assert case["source"]["series_uid"] == uids[name]
        assert case["source"]["slices"] == load_nifti(tiny_run.scan).shape[2]
        seg_path = tmp_path / "out" / f"{stem}_seg.dcm"
        assert case["dicom_seg"] == str(seg_path) and case["mask"].endswith(f"{stem}_mask.nii.gz")
        series = next(s for s in list_series(tmp_path / "study") if s.uid == uids[name])
        datasets = load_series(series).datasets
        seg = load_dicom_seg(seg_path, datasets)
        mask = _mask(case["mask"])
        np.testing.assert_array_equal(seg, mask)
        np.testing.assert_array_equal(mask, _mask(ref_case["mask"]))
        np.testing.assert_array_equal(np.asarray(nib.load(case["prob"]).dataobj),
                                      np.asarray(nib.load(ref_case["prob"]).dataobj))
        assert case["lesion_voxels"] == ref_case["lesion_voxels"]
    # The oblique series went through the resampling path, the axial one did not.
    assert cases[1]["geometry"] != cases[0]["geometry"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []

    import highdicom as hd

    written = hd.seg.segread(tmp_path / "out" / f"{stems[1]}_seg.dcm")
    assert written.SegmentationType == "BINARY"
    segment = written.SegmentSequence[0]
    assert segment.SegmentLabel == "stroke lesion"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "dunet"
    import hashlib

    digest = hashlib.sha256(tiny_run.onnx.read_bytes()).hexdigest()
    assert digest in str(algorithm.AlgorithmParameters)
    assert written.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["T1 oblique"]


@pytest.mark.slow
def test_workers_series_uid_and_zip(tiny_run, tmp_path: Path) -> None:
    uids = _study(tiny_run.scan, tmp_path / "study")
    picked = tmp_path / "picked"
    picked.mkdir()
    for f in (tmp_path / "study").glob("s4_*"):
        (picked / f.name).write_bytes(f.read_bytes())
    with zipfile.ZipFile(tmp_path / "oblique.zip", "w") as zf:
        for f in sorted(picked.iterdir()):
            zf.write(f, f.name)
    proc = _infer(tiny_run.onnx, tmp_path / "out", tmp_path / "study", tmp_path / "oblique.zip",
                  extra=("--dicom-seg", "--workers", "1", "--series", uids["T1 oblique"],
                         "--preview"))
    assert proc.returncode == 0, proc.stderr
    cases = json.loads((tmp_path / "out" / "summary.json").read_text())["cases"]
    assert [Path(c["input"]).name for c in cases] == ["study", "oblique.zip"]
    assert [c["source"]["series_uid"] for c in cases] == [uids["T1 oblique"]] * 2
    np.testing.assert_array_equal(_mask(cases[0]["mask"]), _mask(cases[1]["mask"]))
    assert (tmp_path / "out" / "study_seg.dcm").is_file()
    assert (tmp_path / "out" / "oblique_seg.dcm").is_file()
    assert (tmp_path / "out" / "study_preview.png").is_file()
    assert (tmp_path / "out" / "oblique_preview.png").is_file()


@pytest.mark.slow
def test_bad_series_fail_their_own_case_and_nifti_with_dicom_seg_is_refused(
        tiny_run, tmp_path: Path) -> None:
    scan = load_nifti(tiny_run.scan)
    slope = float(np.abs(scan.data).max()) / 30000.0 or 1.0
    nz = scan.shape[2]
    write_dicom_series(scan.data, scan.affine, tmp_path / "gap", rescale=(slope, 0.0),
                       slices=[k for k in range(nz) if k != nz // 2])
    write_dicom_series(scan.data[:, :, :1], scan.affine, tmp_path / "flat", rescale=(slope, 0.0))
    write_dicom_series(scan.data, scan.affine, tmp_path / "loc", rescale=(slope, 0.0),
                       info=SeriesInfo(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    uneven = tmp_path / "uneven"
    write_dicom_series(scan.data, scan.affine, uneven, rescale=(slope, 0.0))
    last = sorted(uneven.iterdir())[-1]
    import pydicom

    ds = pydicom.dcmread(last)
    ds.ImagePositionPatient = [float(v) + (0.4 if i == 2 else 0.0)
                               for i, v in enumerate(ds.ImagePositionPatient)]
    ds.save_as(last)
    good = tmp_path / "good"
    write_dicom_series(scan.data, scan.affine, good, rescale=(slope, 0.0))
    inputs = [tmp_path / n for n in ("flat", "gap", "good", "loc", "uneven")]
    proc = _infer(tiny_run.onnx, tmp_path / "out", *inputs, extra=("--dicom-seg",))
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 4, proc.stderr
    for needle, line in zip(["single 2D image", "missing slice", "localizer",
                             "uneven slice spacing"], errors, strict=True):
        assert needle in line, line
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "good_mask.nii.gz", "good_seg.dcm", "summary.json"]

    refused = _infer(tiny_run.onnx, tmp_path / "out2", good, tiny_run.scan,
                     extra=("--dicom-seg",))
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"error: --dicom-seg: {tiny_run.scan} is not a DICOM "
                                      "series (a DICOM SEG needs a source series to reference); "
                                      "give DICOM series only")
    assert not (tmp_path / "out2").exists()
    bad_uid = _infer(tiny_run.onnx, tmp_path / "out3", good, extra=("--series", "T1"))
    assert bad_uid.returncode == 2
    assert bad_uid.stderr.strip() == ("error: --series 'T1': not a DICOM UID (digits and dots, "
                                      "at most 64 characters)")


def test_segmenter_takes_a_dicom_folder(tiny_run, tmp_path: Path) -> None:
    from dunet_deploy.runtime.segmenter import Segmenter

    uids = _study(tiny_run.scan, tmp_path / "study")
    with Segmenter(tiny_run.onnx, backend="onnxruntime", series=uids["T1 oblique"]) as seg:
        pred = seg.predict(tmp_path / "study")
        summary = seg.predict_files(tmp_path / "study", tmp_path / "out", dicom_seg=True)
    (case,) = summary["cases"]
    np.testing.assert_array_equal(pred.mask, _mask(case["mask"]))
    np.testing.assert_allclose(pred.affine, nib.load(case["mask"]).affine, atol=1e-5)
    assert case["source"]["series_uid"] == uids["T1 oblique"]
    assert Path(case["dicom_seg"]).is_file()


def test_a_localiser_beside_3d_series_is_listed_as_skipped(tiny_run, tmp_path: Path) -> None:
    """Not read, and not silently: a ``skipped`` entry with its reason and a note on stderr."""
    uids = _study(tiny_run.scan, tmp_path / "study")  # localiser, T1 MPRAGE, T1 oblique
    single = tmp_path / "single"  # the localiser and one 3D series: the folder is one case
    single.mkdir()
    for f in sorted((tmp_path / "study").glob("s[12]_*")):
        (single / f.name).write_bytes(f.read_bytes())
    with zipfile.ZipFile(tmp_path / "zipped.zip", "w") as zf:
        for f in sorted(single.iterdir()):
            zf.write(f, f.name)
    proc = _infer(tiny_run.onnx, tmp_path / "out", tmp_path / "study", single,
                  tmp_path / "zipped.zip", extra=("--workers", "0"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [Path(c["input"]).name for c in summary["cases"]] == [
        "study_s2_T1_MPRAGE", "study_s4_T1_oblique", "single", "zipped.zip"]
    where = [tmp_path / "study" / "study_s1_loc", single / "single_s1_loc",
             tmp_path / "zipped.zip" / "zipped_s1_loc"]
    assert [Path(s["path"]) for s in summary["skipped"]] == where
    for entry, path in zip(summary["skipped"], where, strict=True):
        reason = entry["reason"]
        assert "series 1 'loc'" in reason and "a localizer" in reason, reason
        assert uids["loc"] in reason
        note = f"note: {path}: skipped, {reason}"
        assert note in proc.stderr.splitlines(), proc.stderr
    # The series asked for is the one read: nothing else is noted.
    picked = _infer(tiny_run.onnx, tmp_path / "picked", single,
                    extra=("--workers", "0", "--series", uids["T1 MPRAGE"]))
    assert picked.returncode == 0, picked.stderr
    assert json.loads((tmp_path / "picked" / "summary.json").read_text())["skipped"] == []
    assert "skipped" not in picked.stderr
