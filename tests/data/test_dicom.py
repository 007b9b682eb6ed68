"""dunet_deploy.data.dicom on real DICOM files written with pydicom (data.synth_dicom)."""

from __future__ import annotations

import pickle
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dunet_deploy.data.dicom import (
    LPS_FROM_RAS,
    DicomVolume,
    is_dicom_input,
    list_series,
    load_dicom,
    load_series,
)
from dunet_deploy.data.nifti import NiftiLimits, load_nifti, save_nifti_like
from dunet_deploy.data.synth_dicom import SeriesInfo, write_dicom_series
from dunet_deploy.errors import DunetError

pytest.importorskip("pydicom")

SHAPE = (12, 14, 9)


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    cx, cy, cz = (np.cos(np.radians(a)) for a in (ax, ay, az))
    sx, sy, sz = (np.sin(np.radians(a)) for a in (ax, ay, az))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def grid(axes: np.ndarray, zooms: tuple[float, float, float], origin: tuple[float, ...]
         ) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(axes, dtype=np.float64) @ np.diag(zooms)
    affine[:3, 3] = origin
    return affine


#: RAS affines with det > 0 (slices already along the plane's normal).
AXIAL = grid(np.eye(3), (0.9, 0.95, 3.0), (-90.0, -110.5, -40.25))
#: Sagittal PIR: i -> posterior, j -> inferior, k -> right (a sagittal MPRAGE's voxel order).
SAGITTAL = grid(np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]]), (1.0, 1.05, 1.2),
                (-70.0, 120.0, 95.0))
OBLIQUE = grid(rotation(12.0, -7.0, 21.0), (0.9, 1.1, 1.3), (-10.123456, 20.5, 5.75))
#: A CT gantry tilt: the slice step leaves the plane's normal (a sheared, still regular grid).
TILTED = AXIAL.copy()
TILTED[:3, 2] = [0.0, 0.6, 3.0]


def values(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-200, 3000, size=shape).astype(np.float32)


def world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates of every voxel: ``[X, Y, Z, 3]``."""
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def one_line(exc: pytest.ExceptionInfo[DunetError], *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ------------------------------------------------------------- geometry
@pytest.mark.parametrize("affine", [AXIAL, SAGITTAL, OBLIQUE, TILTED],
                         ids=["axial", "sagittal", "oblique", "tilted"])
def test_series_reads_back_its_array_and_affine(tmp_path: Path, affine: np.ndarray) -> None:
    data = values()
    write_dicom_series(data, affine, tmp_path / "s")
    vol = load_dicom(tmp_path / "s")
    assert isinstance(vol, DicomVolume)
    assert vol.data.dtype == np.float32 and vol.shape == SHAPE
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine, rtol=0, atol=1e-4)
    assert len(vol.datasets) == SHAPE[2]
    assert all("PixelData" not in ds for ds in vol.datasets)  # headers only travel


@pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental")
@pytest.mark.parametrize("affine", [SAGITTAL, OBLIQUE], ids=["sagittal", "oblique"])
def test_each_slice_agrees_with_nibabels_independent_dicom_reader(tmp_path: Path,
                                                                   affine: np.ndarray) -> None:
    """nibabel.nicom reads one slice as voxels [row, column] to LPS: the same pixels, same place."""
    from nibabel.nicom import dicomwrappers

    files = write_dicom_series(values(), affine, tmp_path)
    vol = load_dicom(tmp_path)
    ours_lps = LPS_FROM_RAS @ vol.affine
    for k in (0, 5):
        wrapper = dicomwrappers.wrapper_from_file(str(files[k]))
        np.testing.assert_array_equal(wrapper.get_data().T, vol.data[:, :, k])
        theirs = np.asarray(wrapper.affine)
        np.testing.assert_allclose(theirs[:3, [1, 0]], ours_lps[:3, :2], atol=1e-6)
        np.testing.assert_allclose(theirs[:3, 3], (ours_lps @ [0, 0, k, 1])[:3], atol=1e-4)


def test_left_handed_grid_comes_back_in_normal_order_at_the_same_world_positions(
        tmp_path: Path) -> None:
    """A radiological (LAS) grid's slices run against the plane's normal: the reader sorts them."""
    affine = grid(np.diag([-1.0, 1.0, 1.0]), (1.0, 1.0, 2.0), (60.0, -70.0, -30.0))
    data = values()
    write_dicom_series(data, affine, tmp_path / "s")
    vol = load_dicom(tmp_path / "s")
    assert np.linalg.det(vol.affine[:3, :3]) > 0
    np.testing.assert_array_equal(vol.data, data[:, :, ::-1])
    np.testing.assert_allclose(world(vol.affine, SHAPE), world(affine, SHAPE)[:, :, ::-1],
                               atol=1e-4)


def test_slice_spacing_comes_from_positions_not_slice_thickness(tmp_path: Path) -> None:
    # 3 mm apart, 1 mm thick excitation (a gap between slices, as clinical 2D series have)
    write_dicom_series(values(), AXIAL, tmp_path / "s", info=SeriesInfo(extra={
        "SliceThickness": "1.0", "SpacingBetweenSlices": "7.0"}))
    assert load_dicom(tmp_path / "s").zooms == pytest.approx((0.9, 0.95, 3.0))


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    data = np.round(values() / 4) * 4 + 0.5  # representable as stored * 4 + 0.5
    write_dicom_series(data, OBLIQUE, tmp_path / "s", rescale=(4.0, 0.5))
    stored = load_dicom(tmp_path / "s")
    np.testing.assert_array_equal(stored.data, data.astype(np.float32))


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless"])
def test_compressed_series(tmp_path: Path, syntax: str) -> None:
    """RLE (pydicom's own codec) and JPEG-LS (pyjpegls, the one that installs with numpy < 2)."""
    import pydicom
    import pydicom.uid

    data = values()
    for f in write_dicom_series(data, OBLIQUE, tmp_path):
        ds = pydicom.dcmread(f)
        ds.compress(getattr(pydicom.uid, syntax))
        ds.save_as(f)
    assert pydicom.dcmread(f).file_meta.TransferSyntaxUID == getattr(pydicom.uid, syntax)
    np.testing.assert_array_equal(load_dicom(tmp_path).data, data)


def test_undecodable_pixel_data_is_named(tmp_path: Path) -> None:
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    files = write_dicom_series(values(), AXIAL, tmp_path)
    ds = pydicom.dcmread(files[4])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
    ds["PixelData"].VR = "OB"
    ds.save_as(files[4], enforce_file_format=True)
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, str(files[4]), "cannot decode pixel data")


def test_files_in_any_order_and_sub_folders_and_stray_files(tmp_path: Path) -> None:
    data = values()
    files = write_dicom_series(data, SAGITTAL, tmp_path / "export" / "raw")
    for n, f in enumerate(files):  # shuffle names and nest some in a sub-folder
        target = tmp_path / "export" / ("DICOM/0001" if n % 2 else "") / f"IM{(n * 7) % 13:05d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        f.rename(target)
    (tmp_path / "export" / "raw").rmdir()
    (tmp_path / "export" / "README.txt").write_text("exported by the scanner\n")
    vol = load_dicom(tmp_path / "export")
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, SAGITTAL, atol=1e-4)


def test_zip_of_a_series_reads_like_the_folder(tmp_path: Path) -> None:
    data = values()
    files = write_dicom_series(data, OBLIQUE, tmp_path / "s")
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            z.write(f, f"study/series/{f.name}")
    vol = load_dicom(archive)
    assert vol.series is not None and vol.series.stem == "series_s1"
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, OBLIQUE, atol=1e-4)
    assert vol.path == archive


def test_volume_saves_as_nifti_with_the_series_geometry(tmp_path: Path) -> None:
    data = values()
    write_dicom_series(data, OBLIQUE, tmp_path / "s")
    vol = load_dicom(tmp_path / "s")
    out = save_nifti_like(tmp_path / "m.nii.gz", (vol.data > 1000).astype(np.uint8), vol, np.uint8)
    back = load_nifti(out)
    np.testing.assert_allclose(back.affine, OBLIQUE, atol=1e-4)
    np.testing.assert_array_equal(back.data, (data > 1000).astype(np.float32))


def test_volume_pickles_for_worker_processes(tmp_path: Path) -> None:
    write_dicom_series(values(), AXIAL, tmp_path / "s")
    vol = load_dicom(tmp_path / "s")
    back = pickle.loads(pickle.dumps(vol))
    np.testing.assert_array_equal(back.data, vol.data)
    assert [ds.SOPInstanceUID for ds in back.datasets] == [ds.SOPInstanceUID for ds in vol.datasets]
    assert back.series == vol.series


# --------------------------------------------------------- several series
def study(folder: Path) -> dict[str, str]:
    """A localiser, a T1 and a T2 of one study in one folder; returns their UIDs."""
    uids = {}
    for number, (name, affine, image_type) in enumerate(
            [("localizer", AXIAL, ("ORIGINAL", "PRIMARY", "LOCALIZER")),
             ("T1", SAGITTAL, ("ORIGINAL", "PRIMARY", "M")),
             ("T2", OBLIQUE, ("ORIGINAL", "PRIMARY", "M"))], start=1):
        uid = f"1.2.826.0.1.3680043.8.498.{number}"
        write_dicom_series(values(seed=number), affine, folder,
                           info=SeriesInfo(series_uid=uid, series_number=number, description=name,
                                           image_type=image_type), prefix=name)
        uids[name] = uid
    return uids


def test_list_series_names_each_series_and_what_it_is(tmp_path: Path) -> None:
    uids = study(tmp_path)
    found = list_series(tmp_path)
    assert [s.description for s in found] == ["localizer", "T1", "T2"]
    assert [s.uid for s in found] == [uids["localizer"], uids["T1"], uids["T2"]]
    assert [s.volume for s in found] == [False, True, True]
    assert "localizer" in str(found[0].problem) and found[1].problem is None
    assert found[1].shape == SHAPE and found[1].modality == "MR" and found[1].number == 2
    assert [s.stem for s in found] == [f"{tmp_path.name}_s{n}" for n in (1, 2, 3)]
    vol = load_series(found[2])
    np.testing.assert_array_equal(vol.data, values(seed=3))
    np.testing.assert_allclose(vol.affine, OBLIQUE, atol=1e-4)


def test_several_3d_series_need_a_series_uid(tmp_path: Path) -> None:
    uids = study(tmp_path)
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, "2 3D series", uids["T1"], uids["T2"], "series_uid")
    np.testing.assert_array_equal(load_dicom(tmp_path, uids["T1"]).data, values(seed=2))
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path, "1.2.3.4")
    one_line(exc, "no series with UID 1.2.3.4", uids["T2"])
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path, uids["localizer"])
    one_line(exc, "localizer", "not a 3D volume")


def test_the_one_3d_series_beside_a_localiser_is_read(tmp_path: Path) -> None:
    study(tmp_path)
    for f in tmp_path.glob("T2_*"):
        f.unlink()
    np.testing.assert_array_equal(load_dicom(tmp_path).data, values(seed=2))


# ------------------------------------------------------------ bad series
INFO = SeriesInfo(series_uid="1.2.826.0.1.3680043.8.498.77", study_uid="1.2.3",
                  frame_of_reference_uid="1.2.4")


def test_missing_slice(tmp_path: Path) -> None:
    write_dicom_series(values(), AXIAL, tmp_path, slices=[0, 1, 2, 3, 5, 6, 7, 8])
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, str(tmp_path), "1 missing slice", "gap of 6.00 mm", "steps 3.00 mm")


def test_missing_slices_in_a_three_slice_series(tmp_path: Path) -> None:
    write_dicom_series(values(), OBLIQUE, tmp_path, slices=[0, 1, 4])
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, "2 missing slice")


def test_uneven_spacing(tmp_path: Path) -> None:
    shifted = AXIAL.copy()
    shifted[:3, 3] += [0.0, 0.0, 0.7]  # slices 5.. are 0.7 mm further on
    write_dicom_series(values(), AXIAL, tmp_path, info=INFO, slices=range(5), prefix="a")
    write_dicom_series(values(), shifted, tmp_path, info=INFO, slices=range(5, 9), prefix="b")
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, "uneven slice spacing", "3.000 to 3.700 mm")


def test_mixed_orientations(tmp_path: Path) -> None:
    turned = grid(rotation(0.0, 0.0, 5.0), (0.9, 0.95, 3.0), (-90.0, -110.5, -40.25))
    write_dicom_series(values(), AXIAL, tmp_path, info=INFO, slices=range(5), prefix="a")
    write_dicom_series(values(), turned, tmp_path, info=INFO, slices=range(5, 9), prefix="b")
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, "no 3D series", "mixed orientations", "2 different ImageOrientationPatient")
    # beside a 3D series it is set aside, as a 3-plane localiser should be
    write_dicom_series(values(), OBLIQUE, tmp_path, prefix="t1", info=SeriesInfo(series_number=2))
    assert [s.volume for s in list_series(tmp_path)] == [False, True]
    np.testing.assert_array_equal(load_dicom(tmp_path).data, values())


def test_localiser(tmp_path: Path) -> None:
    write_dicom_series(values(), AXIAL, tmp_path,
                       info=SeriesInfo(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, "no 3D series", "a localizer (ImageType ORIGINAL\\PRIMARY\\LOCALIZER)")


def test_single_2d_image(tmp_path: Path) -> None:
    write_dicom_series(values(), AXIAL, tmp_path, slices=[4])
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, "a single 2D image (slice_0004.dcm), not a 3D volume")


def test_several_images_per_position(tmp_path: Path) -> None:
    write_dicom_series(values(), AXIAL, tmp_path, info=INFO, prefix="echo1")
    write_dicom_series(values(), AXIAL, tmp_path, info=INFO, prefix="echo2")
    found = list_series(tmp_path)
    assert len(found) == 1 and not found[0].volume
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path, INFO.series_uid)
    one_line(exc, "18 images at 9 slice positions")


def test_slices_of_different_size(tmp_path: Path) -> None:
    write_dicom_series(values(), AXIAL, tmp_path, info=INFO, slices=range(5), prefix="a")
    write_dicom_series(values((12, 10, 9)), AXIAL, tmp_path, info=INFO, slices=range(5, 9),
                       prefix="b")
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, "slices differ in size")


def test_dicom_files_without_images(tmp_path: Path) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.22")  # Enhanced SR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.22", generate_uid()
    ds.Modality = "SR"
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, str(tmp_path), "no DICOM images", "1 DICOM file(s) without pixels: SR")


def test_folder_without_dicom_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, str(tmp_path), "no DICOM files in the folder")


@pytest.mark.parametrize("keep", [200, 700, -100], ids=["meta", "header", "pixels"])
def test_truncated_dicom_file_is_named(tmp_path: Path, keep: int) -> None:
    files = write_dicom_series(values(), AXIAL, tmp_path)
    files[3].write_bytes(files[3].read_bytes()[:keep])
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, str(files[3]), "cannot read DICOM" if keep > 0 else "cannot decode pixel data")


@pytest.mark.parametrize("content", ["empty", "text", "not_zip"])
def test_bad_zips(tmp_path: Path, content: str) -> None:
    archive = tmp_path / "series.zip"
    if content == "not_zip":
        archive.write_bytes(b"PK but not really a zip archive")
    else:
        with zipfile.ZipFile(archive, "w") as z:
            if content == "text":
                z.writestr("readme.txt", "nothing here\n")
    expected = {"empty": "the zip archive is empty", "text": "no DICOM files in the zip archive",
                "not_zip": "not a zip archive"}[content]
    with pytest.raises(DunetError) as exc:
        load_dicom(archive)
    one_line(exc, str(archive), expected)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path / "nowhere")
    one_line(exc, "no such file or directory")


def test_limits_refuse_a_large_series_before_reading_pixels(tmp_path: Path) -> None:
    write_dicom_series(values(), AXIAL, tmp_path)
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path, limits=NiftiLimits(max_voxels=1000))
    one_line(exc, "12x14x9 voxels, over the limit of 1000")


def test_zip_that_unpacks_beyond_the_limit(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.dcm", bytes(4 << 20))
    with pytest.raises(DunetError) as exc:
        list_series(archive, NiftiLimits(max_file_bytes=1 << 20))
    one_line(exc, "unpacks to 4.0 MiB, over the limit of 1.0 MiB")


def test_missing_pydicom_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dicom_series(values(), AXIAL, tmp_path)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, "pip install 'dunet-deploy[dicom]'")


# ------------------------------------------------------------ is_dicom_input
def test_is_dicom_input(tmp_path: Path) -> None:
    write_dicom_series(values(), AXIAL, tmp_path / "series")
    (tmp_path / "niftis").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)),
             str(tmp_path / "niftis" / "a.nii.gz"))
    (tmp_path / "niftis" / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "s.zip").write_bytes(b"")
    assert is_dicom_input(tmp_path / "series")
    assert is_dicom_input(tmp_path / "s.zip")
    assert not is_dicom_input(tmp_path / "niftis")
    assert not is_dicom_input(tmp_path / "niftis" / "a.nii.gz")
    assert not is_dicom_input(tmp_path / "empty")
    assert not is_dicom_input(tmp_path / "nowhere")
    assert not is_dicom_input(tmp_path)  # the DICOM files are a level down


def test_slice_without_a_position(tmp_path: Path) -> None:
    import pydicom

    files = write_dicom_series(values(), AXIAL, tmp_path)
    ds = pydicom.dcmread(files[2])
    del ds.ImagePositionPatient
    ds.save_as(files[2])
    with pytest.raises(DunetError) as exc:
        load_dicom(tmp_path)
    one_line(exc, "slice_0002.dcm lacks a valid ImagePositionPatient")


def test_multi_frame_object_is_not_read_as_a_series(tmp_path: Path) -> None:
    write_dicom_series(values(), AXIAL, tmp_path, info=SeriesInfo(extra={"NumberOfFrames": 9}),
                       slices=[0])
    (found,) = list_series(tmp_path)
    assert not found.volume
    with pytest.raises(DunetError) as exc:
        load_series(found)
    one_line(exc, "multi-frame (enhanced) DICOM object of 9 frames")
