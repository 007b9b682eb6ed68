"""Tests for dunet_deploy.data.nifti using real files written with nibabel."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import malformed_nifti
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


# ----------------------------------------------------- untrusted bytes (limits)
from dunet_deploy.data.nifti import (  # noqa: E402
    NiftiLimits,
    load_nifti_bytes,
    nifti_bytes_like,
)

ZEROS_MEMBER_BYTES = 64 << 20


def header_bytes(shape: tuple[int, ...], dtype: type = np.uint8,
                 affine: np.ndarray = AFFINE) -> bytes:
    """A NIfTI-1 header (+ the 4 extension bytes) declaring ``shape`` voxels of ``dtype``."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_sform(affine, code=2)
    hdr.set_qform(affine, code=1)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0\0\0\0"


def write_gzip_bomb(path: Path, shape: tuple[int, ...], inflated_gib: int) -> Path:
    """A small ``.nii.gz`` whose gzip stream inflates to ``inflated_gib`` GiB of zeros.

    One member holds the header; the rest repeat one compressed 64 MiB block of
    zeros (gzip files may have many members), so ~1 MB on disk per GiB.
    """
    zeros = gzip.compress(bytes(ZEROS_MEMBER_BYTES), compresslevel=9, mtime=0)
    with open(path, "wb") as f:
        f.write(gzip.compress(header_bytes(shape), mtime=0))
        for _ in range((inflated_gib << 30) // ZEROS_MEMBER_BYTES):
            f.write(zeros)
    return path


def peak_rss_mb(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; (its peak RSS in MiB, its stdout)."""
    import subprocess
    import sys

    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across exec, so a child of a
    # big pytest process would report the parent's peak.
    wrapped = (code + "\nimport re\n"
               "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]\n"
               "print('RSS', hwm)\n")
    out = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    rss_kb = int(out.strip().splitlines()[-1].split()[1])
    return rss_kb / 1024, out


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_load_bytes_equals_load_file(tmp_path: Path, suffix: str) -> None:
    raw = (np.arange(np.prod(SHAPE)) % 2000).reshape(SHAPE).astype(np.int16)
    path = write(tmp_path / f"a{suffix}", raw, slope=0.5)
    from_file = load_nifti(path)
    from_bytes = load_nifti_bytes(path.read_bytes(), "sent.nii")
    np.testing.assert_array_equal(from_bytes.data, from_file.data)
    np.testing.assert_allclose(from_bytes.affine, from_file.affine)
    assert from_bytes.zooms == from_file.zooms and from_bytes.path is None


def test_mask_bytes_round_trip_keep_geometry(tmp_path: Path) -> None:
    ref = load_nifti(write(tmp_path / "r.nii.gz", np.ones(SHAPE, np.float32), qcode=1, scode=4))
    mask = (np.random.default_rng(1).random(SHAPE) > 0.7).astype(np.uint8)
    blob = nifti_bytes_like(mask, ref, np.uint8)
    assert blob[:2] == b"\x1f\x8b"
    (tmp_path / "m.nii.gz").write_bytes(blob)
    back = nib.load(str(tmp_path / "m.nii.gz"))
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, ref.affine)
    assert int(back.header["sform_code"]) == 4 and int(back.header["qform_code"]) == 1


def test_absurd_header_is_refused_from_file_and_bytes(tmp_path: Path) -> None:
    blob = header_bytes((10_000, 10_000, 10_000)) + bytes(1024)
    path = tmp_path / "huge.nii"
    path.write_bytes(blob)
    with pytest.raises(DunetError) as exc:
        load_nifti(path)
    assert_one_line_naming(exc, path, "10000x10000x10000", "over the limit")
    with pytest.raises(DunetError, match=r"^huge\.nii: header declares 10000x10000x10000"):
        load_nifti_bytes(blob, "huge.nii")
    with pytest.raises(DunetError, match="over the limit"):
        load_nifti_bytes(gzip.compress(blob), "huge.nii.gz")


def test_issue_case_claiming_2048x2048x1024_uint8_is_refused_cheaply(tmp_path: Path) -> None:
    path = write_gzip_bomb(tmp_path / "bomb.nii.gz", (2048, 2048, 1024), inflated_gib=4)
    assert path.stat().st_size < 8 << 20  # small on disk, 4 GiB inflated
    rss, out = peak_rss_mb(
        "from dunet_deploy.data.nifti import load_nifti\n"
        "from dunet_deploy.errors import DunetError\n"
        f"try:\n    load_nifti({str(path)!r})\nexcept DunetError as e:\n    print('ERR', e)\n"
    )
    assert "ERR" in out and "over the limit" in out
    assert rss < 400, f"peak RSS {rss:.0f} MiB"


def test_gzip_bomb_past_the_declared_data_is_never_inflated(tmp_path: Path) -> None:
    # The header declares 64^3 uint8; the stream goes on for 12 GiB of zeros.
    path = write_gzip_bomb(tmp_path / "tail.nii.gz", (64, 64, 64), inflated_gib=12)
    assert path.stat().st_size < 24 << 20
    rss, out = peak_rss_mb(
        "from pathlib import Path\n"
        "from dunet_deploy.data.nifti import load_nifti, load_nifti_bytes\n"
        f"p = Path({str(path)!r})\n"
        "a = load_nifti(p); b = load_nifti_bytes(p.read_bytes(), p.name)\n"
        "print('SHAPES', a.shape, b.shape, float(a.data.max()), float(b.data.max()))\n"
    )
    assert "SHAPES (64, 64, 64) (64, 64, 64) 0.0 0.0" in out
    assert rss < 400, f"peak RSS {rss:.0f} MiB"


def test_limits_are_configurable(tmp_path: Path) -> None:
    blob = write(tmp_path / "a.nii.gz", np.zeros(SHAPE, np.float32)).read_bytes()
    voxels = int(np.prod(SHAPE))
    load_nifti_bytes(blob, "a", NiftiLimits(max_voxels=voxels, max_voxel_bytes=4 * voxels))
    with pytest.raises(DunetError, match="over the limit of 1000 voxels"):
        load_nifti_bytes(blob, "a", NiftiLimits(max_voxels=1000))
    with pytest.raises(DunetError, match=r"^a: .* sent, over the limit"):
        load_nifti_bytes(blob, "a", NiftiLimits(max_file_bytes=100))
    with pytest.raises(DunetError) as exc:
        load_nifti(tmp_path / "a.nii.gz", NiftiLimits(max_file_bytes=100))
    assert_one_line_naming(exc, tmp_path / "a.nii.gz", "over the limit")
    with pytest.raises(DunetError, match="max_voxels must be >= 1"):
        NiftiLimits(max_voxels=0)


def _header_with(**fields: object) -> bytes:
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(header_bytes((8, 8, 8))))
    for key, value in fields.items():
        hdr[key] = value
    return hdr.binaryblock + b"\0\0\0\0" + bytes(8 * 8 * 8 * 16)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"pixdim": [1, np.nan, 1, 1, 1, 0, 0, 0]}, "voxel sizes"),
        ({"srow_x": [np.inf, 0, 0, 0]}, "affine"),
        ({"datatype": 32, "bitpix": 64}, "unsupported voxel type complex64"),
        ({"datatype": 9999}, "datatype code 9999"),
        ({"dim": [4, 8, 8, 8, 3, 1, 1, 1]}, "3D"),
        ({"dim": [3, 8, -8, 8, 1, 1, 1, 1]}, "corrupt NIfTI header"),
        ({"vox_offset": 1e12}, "vox_offset"),
    ],
)
def test_bad_headers_are_one_line_errors(tmp_path: Path, fields: dict[str, object],
                                         needle: str) -> None:
    blob = _header_with(**fields)
    with pytest.raises(DunetError, match=f"^bad.nii: .*{needle}") as exc:
        load_nifti_bytes(blob, "bad.nii")
    assert "\n" not in str(exc.value)
    path = tmp_path / "bad.nii"
    path.write_bytes(blob)
    with pytest.raises(DunetError) as exc:
        load_nifti(path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


@pytest.mark.parametrize(
    ("blob", "needle"),
    [
        (b"", "not a NIfTI"),
        (b"hello world" * 100, "not a NIfTI"),
        (b"\x1f\x8b" + b"junk" * 100, "corrupt gzip"),
    ],
)
def test_junk_bytes(blob: bytes, needle: str) -> None:
    with pytest.raises(DunetError, match=f"^x: .*{needle}"):
        load_nifti_bytes(blob, "x")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_bytes(tmp_path: Path, gz: bool) -> None:
    path = write(tmp_path / ("t.nii.gz" if gz else "t.nii"),
                 np.random.default_rng(0).random(SHAPE).astype(np.float32))
    blob = path.read_bytes()
    with pytest.raises(DunetError, match="^t: cannot read voxel data, file truncated"):
        load_nifti_bytes(blob[: len(blob) // 2], "t")


def test_a_failed_write_names_the_users_path_not_our_temporary_file(tmp_path, monkeypatch):
    import errno

    import nibabel as nib

    from dunet_deploy.data.nifti import NiftiVolume, save_nifti_like

    def disk_full(img, name):
        raise OSError(errno.ENOSPC, "No space left on device", name)

    monkeypatch.setattr(nib, "save", disk_full)
    ref = NiftiVolume(data=np.zeros((4, 5, 6), np.float32), affine=np.eye(4))
    out = tmp_path / "case_mask.nii.gz"
    with pytest.raises(DunetError) as info:
        save_nifti_like(out, np.zeros((4, 5, 6), np.uint8), ref, dtype=np.uint8)
    assert str(info.value) == f"{out}: cannot write (No space left on device)"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ malformed headers
@pytest.mark.parametrize("gz", [False, True], ids=["nii", "nii.gz"])
@pytest.mark.parametrize("case", sorted(malformed_nifti.battery()))
def test_malformed_header_at_both_readers(tmp_path: Path, case: str, gz: bool) -> None:
    blob, word = malformed_nifti.battery()[case]
    blob = gzip.compress(blob, mtime=0) if gz else blob
    name = f"{case}.nii{'.gz' if gz else ''}"
    with pytest.raises(DunetError) as exc:
        nifti_mod.load_nifti_bytes(blob, name)
    assert str(exc.value).startswith(f"{name}: ") and word in str(exc.value)
    assert "\n" not in str(exc.value)
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(DunetError) as exc:
        load_nifti(path)
    assert str(exc.value).startswith(f"{path}: ") and word in str(exc.value)
    assert_one_line_naming(exc, path)


def test_nan_scl_slope_means_unscaled(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """nibabel writes scl_slope = NaN for "no scaling": that is a valid file, read as stored."""
    blob = malformed_nifti.valid_bytes()
    assert np.isnan(nib.Nifti1Header.from_fileobj(io.BytesIO(blob))["scl_slope"])
    vol = nifti_mod.load_nifti_bytes(blob, "ok.nii")
    (tmp_path / "ok.nii").write_bytes(blob)
    assert np.array_equal(vol.data, np.ones(malformed_nifti.SHAPE, np.float32))
    assert np.array_equal(load_nifti(tmp_path / "ok.nii").data, vol.data)
    assert capfd.readouterr().err == ""  # nibabel's header-fixing log stays quiet


def test_malformed_headers_through_dunet_infer(tmp_path: Path) -> None:
    """Each broken file fails alone with one line naming it; no traceback, no mask."""
    import json
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))
    from runtime_testutils import export_tiny_onnx

    model = tmp_path / "model.onnx"
    export_tiny_onnx(model)
    cases = malformed_nifti.battery()
    inputs = []
    for case, (blob, _) in sorted(cases.items()):
        inputs.append(tmp_path / "in" / f"{case}.nii")
        inputs[-1].parent.mkdir(exist_ok=True)
        inputs[-1].write_bytes(blob)
    res = subprocess.run([sys.executable, "-m", "dunet_deploy.cli.infer", "--engine", str(model),
                          *map(str, inputs), "-o", str(tmp_path / "out"), "--quiet",
                          "--backend", "onnxruntime"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr and len(lines) == len(cases), res.stderr
    for line, path in zip(lines, inputs, strict=True):
        assert line.startswith(f"error: {path}: "), line
        assert cases[path.stem][1] in line, line
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed"] == len(cases) and summary["ok"] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.json"]


def test_outputs_carry_a_header_marker_that_only_they_have(tmp_path):
    """Issue 19 item 1: files this package writes are recognised by their header description."""
    from dunet_deploy.data.nifti import output_descrip, output_kind

    ref = NiftiVolume(data=np.zeros((4, 5, 6), np.float32), affine=np.eye(4))
    scan = tmp_path / "scan é.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), str(scan))
    assert output_kind(scan) is None
    for kind, name in (("mask", "a.nii.gz"), ("prob", "b.nii")):
        path = save_nifti_like(tmp_path / name, ref.data, ref, descrip=output_descrip(kind))
        assert output_kind(path) == kind
        assert load_nifti(path).data.shape == (4, 5, 6)  # still an ordinary NIfTI file
    # The marker replaces the reference's description; without one, the reference's is kept.
    plain = save_nifti_like(tmp_path / "plain.nii.gz", ref.data, load_nifti(tmp_path / "a.nii.gz"))
    assert output_kind(plain) == "mask"
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    for other in (tmp_path / "junk.nii.gz", tmp_path / "missing.nii", tmp_path):
        assert output_kind(other) is None
    with pytest.raises(ValueError, match="output kind"):
        output_descrip("label")
