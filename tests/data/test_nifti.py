"""Tests for dunet_deploy.data.nifti using real files written with nibabel."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dunet_deploy.data import nifti as nifti_mod
from dunet_deploy.data.nifti import NiftiVolume, load_mask, load_nifti, save_nifti_like
from dunet_deploy.errors import DunetError

SHAPE = (40, 48, 24)
AFFINE = np.array([[-0.9, 0, 0, 90.0], [0, 0.9, 0, -126.0], [0, 0, 3.0, -72.0], [0, 0, 0, 1]])


def write(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE, slope: float | None = None,
          qcode: int = 1, scode: int = 2) -> Path:
    img = nib.Nifti1Image(data, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, 3.0)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return path


def assert_one_line_naming(exc: pytest.ExceptionInfo[BaseException], path: Path,
                           *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, msg


# --------------------------------------------------------------------- load
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_load_float32(tmp_path: Path, suffix: str) -> None:
    data = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    vol = load_nifti(write(tmp_path / f"a{suffix}", data))
    assert isinstance(vol, NiftiVolume)
    assert vol.data.dtype == np.float32 and vol.data.shape == SHAPE
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, AFFINE)
    assert vol.zooms == pytest.approx((0.9, 0.9, 3.0))
    assert vol.path == tmp_path / f"a{suffix}"


def test_load_int16_honours_slope_and_intercept(tmp_path: Path) -> None:
    raw = np.arange(np.prod(SHAPE), dtype=np.int64).reshape(SHAPE) % 3000
    path = write(tmp_path / "s.nii.gz", raw.astype(np.int16), slope=0.25)
    vol = load_nifti(path)
    assert vol.data.dtype == np.float32
    np.testing.assert_allclose(vol.data, raw * 0.25 + 3.0)


def test_load_uint8_and_squeezes_trailing_singletons(tmp_path: Path) -> None:
    data = (np.random.default_rng(1).random((*SHAPE, 1)) > 0.5).astype(np.uint8)
    vol = load_nifti(write(tmp_path / "m.nii.gz", data))
    assert vol.data.shape == SHAPE
    np.testing.assert_array_equal(vol.data, data[..., 0])


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(DunetError) as exc:
        load_nifti(path)
    assert_one_line_naming(exc, path, "no such file")


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DunetError) as exc:
        load_nifti(tmp_path)
    assert_one_line_naming(exc, tmp_path, "directory")


@pytest.mark.parametrize("name", ["text.nii.gz", "text.nii", "notes.txt"])
def test_not_a_nifti(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    content = b"hello, I am not an image\n" * 40
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    with pytest.raises(DunetError) as exc:
        load_nifti(path)
    assert_one_line_naming(exc, path)


def test_other_image_format_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "a.mgz"
    nib.save(nib.MGHImage(np.zeros(SHAPE, np.float32), np.eye(4)), str(path))
    with pytest.raises(DunetError) as exc:
        load_nifti(path)
    assert_one_line_naming(exc, path, "not a NIfTI")


def test_truncated_gzip(tmp_path: Path) -> None:
    data = np.random.default_rng(2).random(SHAPE).astype(np.float32)
    path = write(tmp_path / "t.nii.gz", data)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DunetError) as exc:
        load_nifti(path)
    assert_one_line_naming(exc, path, "truncated")


def test_truncated_uncompressed(tmp_path: Path) -> None:
    path = write(tmp_path / "t.nii", np.ones(SHAPE, np.float32))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 1000])
    with pytest.raises(DunetError) as exc:
        load_nifti(path)
    assert_one_line_naming(exc, path)


@pytest.mark.parametrize("shape", [(40, 48), (40, 48, 24, 2), (40, 48, 1, 3)])
def test_wrong_dimensionality(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = write(tmp_path / "d.nii.gz", np.zeros(shape, np.float32))
    with pytest.raises(DunetError) as exc:
        load_nifti(path)
    assert_one_line_naming(exc, path, "3D")


def test_nan_and_inf_voxels(tmp_path: Path) -> None:
    data = np.zeros(SHAPE, np.float32)
    data[1, 2, 3] = np.nan
    data[4, 5, 6] = np.inf
    path = write(tmp_path / "n.nii.gz", data)
    with pytest.raises(DunetError) as exc:
        load_nifti(path)
    assert_one_line_naming(exc, path, "2 voxel(s)", "NaN")


# --------------------------------------------------------------------- masks
def test_load_mask_merges_with_or(tmp_path: Path) -> None:
    a = np.zeros(SHAPE, np.uint8)
    b = np.zeros(SHAPE, np.float32)
    a[1:4, 1:4, 1] = 1
    b[3:6, 3:6, 1] = 0.7  # any positive value is lesion
    b[0, 0, 0] = -1.0  # negative is not
    pa, pb = write(tmp_path / "a.nii.gz", a), write(tmp_path / "b.nii.gz", b)
    merged = load_mask([pa, pb])
    assert merged.dtype == np.uint8 and merged.shape == SHAPE
    np.testing.assert_array_equal(merged, ((a > 0) | (b > 0)).astype(np.uint8))
    np.testing.assert_array_equal(load_mask(pa), a)  # a single path works too
    np.testing.assert_array_equal(load_mask([str(pa)]), a)


def test_load_mask_errors(tmp_path: Path) -> None:
    pa = write(tmp_path / "a.nii.gz", np.zeros(SHAPE, np.uint8))
    pb = write(tmp_path / "b.nii.gz", np.zeros((40, 48, 23), np.uint8))
    with pytest.raises(DunetError) as exc:
        load_mask([pa, pb])
    assert_one_line_naming(exc, pb, "differs", str(pa))
    with pytest.raises(DunetError, match="no mask files"):
        load_mask([])
    with pytest.raises(DunetError) as exc:
        load_mask([pa, tmp_path / "gone.nii.gz"])
    assert_one_line_naming(exc, tmp_path / "gone.nii.gz")


# ---------------------------------------------------------------------- save
@pytest.fixture
def ref(tmp_path: Path) -> NiftiVolume:
    raw = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 1000).astype(np.int16)
    return load_nifti(write(tmp_path / "ref.nii.gz", raw, slope=0.5, qcode=1, scode=4))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_save_uint8_like_reference(tmp_path: Path, ref: NiftiVolume, suffix: str) -> None:
    data = (np.random.default_rng(3).random(SHAPE) > 0.7).astype(np.float32)
    out = save_nifti_like(tmp_path / f"pred{suffix}", data, ref, np.uint8)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    assert img.shape == SHAPE
    # Stored as-is: raw on-disk values are the data, no scaling.
    np.testing.assert_array_equal(np.asarray(img.dataobj.get_unscaled()), data)
    assert img.dataobj.slope == 1.0 and img.dataobj.inter == 0.0
    np.testing.assert_allclose(img.affine, ref.affine)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 4
    np.testing.assert_allclose(img.header.get_qform(), ref.header.get_qform(), atol=1e-5)
    np.testing.assert_allclose(img.header.get_sform(), ref.header.get_sform(), atol=1e-5)
    assert img.header.get_zooms() == pytest.approx((0.9, 0.9, 3.0))
    if suffix == ".nii.gz":
        assert out.read_bytes()[:2] == b"\x1f\x8b"
    else:
        assert out.read_bytes()[:2] != b"\x1f\x8b"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ref.nii.gz", out.name])


def test_save_float32_probabilities(tmp_path: Path, ref: NiftiVolume) -> None:
    probs = np.random.default_rng(4).random(SHAPE).astype(np.float32)
    out = save_nifti_like(tmp_path / "p.nii.gz", probs, ref, np.float32)
    back = load_nifti(out)
    np.testing.assert_array_equal(back.data, probs)
    assert nib.load(str(out)).get_data_dtype() == np.float32


def test_save_overwrites_atomically(tmp_path: Path, ref: NiftiVolume) -> None:
    target = tmp_path / "o.nii.gz"
    save_nifti_like(target, np.zeros(SHAPE), ref, np.uint8)
    save_nifti_like(target, np.ones(SHAPE), ref, np.uint8)
    np.testing.assert_array_equal(load_nifti(target).data, 1)


def test_save_in_memory_reference_without_header(tmp_path: Path) -> None:
    ref = NiftiVolume(data=np.zeros(SHAPE, np.float32), affine=AFFINE, header=None)
    out = save_nifti_like(tmp_path / "m.nii.gz", np.ones(SHAPE), ref, np.uint8)
    vol = load_nifti(out)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)
    assert vol.zooms == pytest.approx((0.9, 0.9, 3.0))


@pytest.mark.parametrize(
    ("name", "data", "dtype", "needle"),
    [
        ("bad.txt", np.zeros(SHAPE), np.uint8, ".nii"),
        ("s.nii.gz", np.zeros((40, 48, 23)), np.uint8, "shape"),
        ("r.nii.gz", np.full(SHAPE, 300.0), np.uint8, "do not fit uint8"),
        ("f.nii.gz", np.full(SHAPE, 0.5), np.uint8, "non-integer"),
        ("n.nii.gz", np.full(SHAPE, np.nan), np.float32, "NaN"),
        ("nodir/x.nii.gz", np.zeros(SHAPE), np.uint8, "does not exist"),
    ],
)
def test_save_errors_leave_no_file(tmp_path: Path, ref: NiftiVolume, name, data, dtype,
                                   needle) -> None:
    before = set(tmp_path.rglob("*"))
    with pytest.raises(DunetError) as exc:
        save_nifti_like(tmp_path / name, data, ref, dtype)
    assert_one_line_naming(exc, tmp_path / name, needle)
    assert set(tmp_path.rglob("*")) == before


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path, ref: NiftiVolume,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "o.nii.gz"
    save_nifti_like(target, np.zeros(SHAPE), ref, np.uint8)
    old = target.read_bytes()

    def broken_save(img, filename):
        Path(filename).write_bytes(b"partial")  # a half-written temp file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nifti_mod.nib, "save", broken_save)
    with pytest.raises(DunetError) as exc:
        save_nifti_like(target, np.ones(SHAPE), ref, np.uint8)
    assert_one_line_naming(exc, target, "No space left")
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.nii.gz", "ref.nii.gz"]


def test_save_like_a_squeezed_4d_reference(tmp_path: Path) -> None:
    ref = load_nifti(write(tmp_path / "r4.nii.gz", np.zeros((*SHAPE, 1), np.float32)))
    out = save_nifti_like(tmp_path / "o.nii.gz", np.ones(SHAPE), ref, np.uint8)
    img = nib.load(str(out))
    assert img.shape == SHAPE
    assert img.header.get_zooms() == pytest.approx((0.9, 0.9, 3.0))
