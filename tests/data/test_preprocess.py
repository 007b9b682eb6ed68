"""Tests for dunet_deploy.data.preprocess: resize, intensity, geometry and its inverse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dunet_deploy.data.preprocess import (
    bilinear_matrix,
    binarize,
    mask_to_labels,
    nonempty_slab_indices,
    nonempty_slice_flags,
    normalize_intensity,
    probs_to_volume,
    resize_bilinear,
    slab_flags_from_slice_flags,
    slices_to_slabs,
    volume_to_slabs,
    volume_to_slices,
)
from dunet_deploy.errors import DunetError
from dunet_deploy.spec import PreprocessSpec

SMALL = (40, 48, 24)  # x, y, z -> oriented slices are 48 rows x 40 cols


def identity_spec(**kw) -> PreprocessSpec:
    """Crop 32x32 and keep it 32x32: the resize is the identity, geometry is exact."""
    return PreprocessSpec.for_geometry(SMALL, crop=((6, 38), (3, 35)), image_size=32, **kw)


def blob(shape, points) -> np.ndarray:
    vol = np.zeros(shape, dtype=np.uint8)
    for p in points:
        vol[p] = 1
    return vol


# ------------------------------------------------------------------- resize
def test_bilinear_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 180, 180)).astype(np.float32) * 10
    for out_hw in [(192, 192), (97, 250), (180, 180), (7, 5), (1, 1), (360, 90)]:
        ours = resize_bilinear(x, out_hw)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x)[None], size=out_hw, mode="bilinear", align_corners=False,
            antialias=False,
        )[0].numpy()
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * 10)
    # The inverse path of the runtime: 192 -> 180.
    y = rng.random((2, 192, 192)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(y)[None], size=(180, 180),
                                          mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(resize_bilinear(y, (180, 180)), ref, rtol=0, atol=1e-5)


def test_bilinear_matrix_properties() -> None:
    m = bilinear_matrix(180, 192)
    assert m.shape == (192, 180) and m.dtype == np.float32
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
    assert (m >= 0).all() and ((m > 0).sum(axis=1) <= 2).all()
    np.testing.assert_array_equal(bilinear_matrix(5, 5), np.eye(5, dtype=np.float32))
    assert bilinear_matrix(180, 192) is m  # cached
    with pytest.raises(ValueError):
        m[0, 0] = 2.0  # read-only: the cache is shared
    with pytest.raises(ValueError):
        bilinear_matrix(0, 4)
    # A linear ramp stays a linear ramp away from the borders (half-pixel centres).
    ramp = np.arange(10, dtype=np.float32)
    up = bilinear_matrix(10, 20) @ ramp
    np.testing.assert_allclose(up[1:-1], (np.arange(1, 19) + 0.5) / 2 - 0.5, atol=1e-6)


# ---------------------------------------------------------------- intensity
def test_robust_zscore_statistics_and_background() -> None:
    rng = np.random.default_rng(1)
    vol = np.zeros(SMALL, dtype=np.float32)
    vol[5:35, 5:40, 3:20] = rng.normal(100, 20, (30, 35, 17)).clip(1, None)
    vol[20, 20, 10] = 1e6  # a hot voxel must be clipped, not dominate the scale
    spec = identity_spec()
    out = normalize_intensity(vol, spec)
    assert out.dtype == np.float32 and out.shape == vol.shape
    fg = vol != 0
    assert abs(out[fg].mean()) < 1e-3 and abs(out[fg].std() - 1) < 1e-3
    lo, hi = np.percentile(vol[fg], spec.clip_percentiles)
    assert out[20, 20, 10] == pytest.approx(out[fg].max())
    assert out[fg].max() < 5  # the spike did not blow up the scale
    # Background: one constant, the value an (unclipped) zero maps to.
    bg = np.unique(out[~fg])
    assert bg.size == 1
    clipped = np.clip(vol[fg], lo, hi)
    assert bg[0] == pytest.approx(-clipped.mean() / clipped.std(), rel=1e-4)
    assert bg[0] < out[fg].min()


def test_robust_zscore_degenerate_volumes() -> None:
    spec = identity_spec()
    np.testing.assert_array_equal(normalize_intensity(np.zeros(SMALL), spec), 0)
    const = np.zeros(SMALL)
    const[:10] = 7.0
    out = normalize_intensity(const, spec)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:10], 0.0)
    np.testing.assert_allclose(out[10:], -7.0)  # std taken as 1


def test_dataset_minmax_zscore_is_the_paper_formula() -> None:
    spec = identity_spec(intensity="dataset_minmax_zscore", dataset_min=-10.0, dataset_max=290.0,
                         dataset_mean=0.25, dataset_std=0.2)
    vol = np.random.default_rng(2).uniform(-10, 290, SMALL).astype(np.float32)
    expected = ((vol.astype(np.float64) + 10) / 300 - 0.25) / 0.2
    np.testing.assert_allclose(normalize_intensity(vol, spec), expected, atol=1e-5)


# ----------------------------------------------------------------- geometry
def test_volume_to_slices_exact_geometry_with_identity_resize() -> None:
    spec = identity_spec(clip_percentiles=(0.0, 100.0))  # keep the marker unclipped
    vol = np.ones(SMALL, dtype=np.float32)
    x, y, z = 10, 20, 5
    vol[x, y, z] = 50.0  # unique maximum marks the voxel
    slices = volume_to_slices(vol, spec)
    assert slices.shape == (24, 32, 32) and slices.dtype == np.float32
    zz, r, c = np.unravel_index(np.argmax(slices), slices.shape)
    # Oriented: row = y - crop_row0, col = x - crop_col0.
    assert (zz, r, c) == (z, y - 6, x - 3)


def test_volume_to_slices_paper_geometry_marker() -> None:
    spec = PreprocessSpec(clip_percentiles=(0.0, 100.0))
    vol = np.zeros((197, 233, 12), dtype=np.float32)
    vol[40:160, 60:200, :] = 10.0
    x, y, z = 150, 70, 4  # asymmetric position inside the crop box
    vol[x - 1 : x + 2, y - 1 : y + 2, z] = 100.0
    slices = volume_to_slices(vol, spec)
    assert slices.shape == (12, 192, 192)
    zz = int(np.argmax(slices.max(axis=(1, 2))))
    assert zz == z
    peak = slices[z] > 0.9 * slices[z].max()
    r, c = np.argwhere(peak).mean(axis=0)
    scale = 192 / 180
    # Output pixel i sits at input coordinate (i + 0.5) / scale - 0.5.
    assert r == pytest.approx((y - 40 + 0.5) * scale - 0.5, abs=0.5)
    assert c == pytest.approx((x - 10 + 0.5) * scale - 0.5, abs=0.5)


def test_round_trip_of_smooth_content_and_zero_outside_crop() -> None:
    spec = PreprocessSpec.for_geometry(SMALL, crop=((4, 44), (0, 40)), image_size=64,
                                       clip_percentiles=(0.0, 100.0))
    xs, ys, zs = np.meshgrid(*(np.linspace(0, 1, n) for n in SMALL), indexing="ij")
    vol = (2 + np.sin(3 * xs) + np.cos(2 * ys) + zs).astype(np.float32)
    slices = volume_to_slices(vol, spec)
    back = probs_to_volume(slices, spec, vol.shape)
    norm = normalize_intensity(vol, spec)
    inside = np.zeros(SMALL, dtype=bool)
    inside[0:40, 4:44, :] = True  # crop rows are y, crop cols are x
    err = np.abs(back - norm)[inside]
    # Interior is recovered closely; the border row/column only approximately.
    assert np.median(err) < 0.01 and err.max() < 0.2
    assert (back[~inside] == 0).all()


def test_probs_to_volume_geometry_with_asymmetric_blob() -> None:
    spec = identity_spec()
    pts = [(10, 20, 5), (11, 20, 5), (12, 20, 5), (10, 21, 5), (10, 22, 5), (10, 20, 6)]
    mask = blob(SMALL, pts)
    labels = mask_to_labels(mask, spec)
    assert labels.shape == (24, 1, 32, 32) and labels.dtype == np.uint8
    back = binarize(probs_to_volume(labels.astype(np.float32), spec, SMALL), spec)
    np.testing.assert_array_equal(back, mask)


def test_paper_geometry_blob_round_trip() -> None:
    spec = PreprocessSpec()
    mask = np.zeros((197, 233, 10), dtype=np.uint8)
    mask[120:140, 60:70, 3:6] = 1  # long in x, short in y: transposition would show
    mask[120:124, 70:90, 4] = 1
    labels = mask_to_labels(mask, spec)
    back = binarize(probs_to_volume(labels.astype(np.float32), spec, mask.shape), spec)
    inter = np.logical_and(back, mask).sum()
    dice = 2 * inter / (back.sum() + mask.sum())
    assert dice > 0.97
    np.testing.assert_allclose(np.argwhere(back).mean(0), np.argwhere(mask).mean(0), atol=0.5)


def test_probs_to_volume_constant_fills_exactly_the_crop_box() -> None:
    spec = PreprocessSpec()
    z = 6
    vol = probs_to_volume(np.ones((z, 1, 192, 192), np.float32), spec, (197, 233, z))
    assert vol.shape == (197, 233, z) and vol.dtype == np.float32
    expected = np.zeros_like(vol)
    expected[10:190, 40:220, :] = 1.0  # x = cols 10:190, y = rows 40:220
    np.testing.assert_allclose(vol, expected, atol=1e-6)


def test_probs_to_volume_accepts_both_layouts_and_rejects_bad_shapes() -> None:
    spec = identity_spec()
    p = np.random.default_rng(3).random((24, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(probs_to_volume(p, spec, SMALL),
                                  probs_to_volume(p[:, None], spec, SMALL))
    with pytest.raises(ValueError, match="does not match"):
        probs_to_volume(p[:10], spec, SMALL)
    with pytest.raises(ValueError, match="one channel"):
        probs_to_volume(np.stack([p, p], axis=1), spec, SMALL)
    with pytest.raises(DunetError, match="in-plane"):
        probs_to_volume(p, spec, (48, 40, 24))


def test_other_axial_axis_without_transpose_round_trips() -> None:
    shape = (24, 40, 48)  # axial axis 0; slices are (40, 48) untransposed
    spec = PreprocessSpec.for_geometry(shape, axial_axis=0, transpose_slice=False,
                                       crop=((4, 36), (8, 40)), image_size=32)
    mask = blob(shape, [(5, 10, 20), (5, 11, 20), (5, 10, 21), (6, 10, 20)])
    labels = mask_to_labels(mask, spec)
    assert labels[5, 0, 10 - 4, 20 - 8] == 1 and labels[5, 0].sum() == 3
    back = binarize(probs_to_volume(labels.astype(np.float32), spec, shape), spec)
    np.testing.assert_array_equal(back, mask)


def test_fewer_slices_than_spec_is_fine_but_inplane_mismatch_is_not() -> None:
    spec = identity_spec()
    assert volume_to_slices(np.ones((40, 48, 3)), spec).shape == (3, 32, 32)
    with pytest.raises(DunetError, match="in-plane"):
        volume_to_slices(np.ones((48, 40, 24)), spec)
    with pytest.raises(DunetError, match="3D"):
        mask_to_labels(np.ones((40, 48)), spec)


# -------------------------------------------------------------------- slabs
def test_slices_to_slabs_channels_and_zero_padding() -> None:
    spec = identity_spec()  # offsets (-2, -1, 0, 1)
    z = 5
    slices = np.stack([np.full((4, 4), i + 1, np.float32) for i in range(z)])
    slabs = slices_to_slabs(slices, spec)
    assert slabs.shape == (z, 4, 4, 4) and slabs.dtype == np.float32
    firsts = slabs[:, :, 0, 0]
    expected = np.array([[0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 0]])
    np.testing.assert_array_equal(firsts, expected)
    # The label channel is slice z itself.
    np.testing.assert_array_equal(slabs[:, spec.label_index], slices)
    sub = slices_to_slabs(slices, spec, indices=[4, 0])
    np.testing.assert_array_equal(sub, slabs[[4, 0]])
    assert slices_to_slabs(slices.astype(np.float16), spec).dtype == np.float16
    assert slices_to_slabs(slices, spec, indices=[]).shape == (0, 4, 4, 4)
    with pytest.raises(IndexError):
        slices_to_slabs(slices, spec, indices=[5])
    with pytest.raises(IndexError):
        slices_to_slabs(slices, spec, indices=[-1])
    with pytest.raises(ValueError):
        slices_to_slabs(slices[0], spec)


def test_volume_to_slabs_is_slices_then_slabs() -> None:
    spec = identity_spec()
    vol = np.random.default_rng(4).random(SMALL).astype(np.float32)
    slabs = volume_to_slabs(vol, spec)
    assert slabs.shape == (24, 4, 32, 32)
    np.testing.assert_array_equal(slabs, slices_to_slabs(volume_to_slices(vol, spec), spec))


def test_mask_to_labels_binary_and_thresholded() -> None:
    spec = PreprocessSpec.for_geometry(SMALL, crop=((6, 38), (3, 35)), image_size=64)
    mask = np.zeros(SMALL, dtype=np.float32)
    mask[10:20, 20:30, 4] = 255  # any positive value counts as lesion
    labels = mask_to_labels(mask, spec)
    assert set(np.unique(labels)) == {0, 1}
    assert labels.shape == (24, 1, 64, 64)
    assert labels[4].sum() == pytest.approx(mask[..., 4].astype(bool).sum() * 4, rel=0.05)
    assert labels[[3, 5]].sum() == 0


# ---------------------------------------------------------------- emptiness
def test_nonempty_slab_indices_use_raw_voxels_inside_the_crop() -> None:
    spec = identity_spec()  # crop rows (y) 6:38, cols (x) 3:35
    vol = np.zeros(SMALL, dtype=np.float32)
    vol[10, 10, 10:13] = 1.0
    vol[0, 0, 20] = 5.0  # outside the crop box: ignored
    vol[39, 47, 22] = 5.0  # outside too
    flags = nonempty_slice_flags(vol, spec)
    np.testing.assert_array_equal(np.flatnonzero(flags), [10, 11, 12])
    idx = nonempty_slab_indices(vol, spec)
    assert idx.dtype == np.int64
    # Slab z holds z-2..z+1, so z in 9..14 touches slices 10..12.
    np.testing.assert_array_equal(idx, np.arange(9, 15))
    assert nonempty_slab_indices(np.zeros(SMALL), spec).size == 0
    # Negative intensities are content too (only exact zeros are background).
    vol2 = np.zeros(SMALL)
    vol2[10, 10, 0] = -3.0
    np.testing.assert_array_equal(nonempty_slab_indices(vol2, spec), [0, 1, 2])


def test_slab_flags_edges() -> None:
    spec = identity_spec()
    flags = np.zeros(5, dtype=bool)
    flags[4] = True
    np.testing.assert_array_equal(slab_flags_from_slice_flags(flags, spec),
                                  [False, False, False, True, True])


def test_binarize_uses_greater_equal() -> None:
    spec = identity_spec(threshold=0.5)
    p = np.array([0.0, 0.49999, 0.5, 0.7, 1.0], np.float32)
    out = binarize(p, spec)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 0, 1, 1, 1])


@pytest.mark.slow
def test_full_size_volume_round_trip() -> None:
    spec = PreprocessSpec()
    rng = np.random.default_rng(5)
    vol = np.zeros((197, 233, 189), dtype=np.float32)
    vol[20:180, 30:210, 15:175] = rng.random((160, 180, 160), dtype=np.float32) * 100 + 1
    slices = volume_to_slices(vol, spec)
    back = probs_to_volume(slices, spec, vol.shape)
    assert slices.shape == (189, 192, 192) and back.shape == vol.shape
    assert np.isfinite(slices).all()
    # Outside the crop box (rows 40:220 / cols 10:190 of the transposed slice) nothing is pasted.
    assert not back[:10].any() and not back[:, :40].any()


def test_data_modules_never_import_torch_or_matplotlib() -> None:
    # scipy is a runtime dependency now (connected components, resampling): nibabel
    # imports it when it is installed, so it is not on this list.
    code = (
        "import sys, dunet_deploy.spec, dunet_deploy.data, dunet_deploy.cli.synth;"
        "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules];"
        "assert not bad, bad"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------ host-work cuts
def _reference_slices(vol: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The unfused path: normalise everything, orient, crop, copy, resize (float64 stats)."""
    from dunet_deploy.data.preprocess import orient_volume

    v = vol.astype(np.float64)
    fg = v != 0
    lo, hi = np.percentile(v[fg], spec.clip_percentiles)
    c = np.clip(v[fg], lo, hi)
    norm = np.full(v.shape, -c.mean() / c.std())
    norm[fg] = (c - c.mean()) / c.std()
    (r0, r1), (c0, c1) = spec.crop_rows, spec.crop_cols
    crop = orient_volume(norm, spec)[:, r0:r1, c0:c1]
    s = spec.image_size
    m_r, m_c = bilinear_matrix(r1 - r0, s).astype(np.float64), bilinear_matrix(c1 - c0, s)
    return m_r @ crop @ m_c.T.astype(np.float64)


def test_percentiles_by_partition_equal_numpy() -> None:
    from dunet_deploy.data.preprocess import _percentiles

    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 10, 1001, 54321):
        values = (rng.gamma(2.0, 100.0, n)).astype(np.float32)
        for q in ((0.5, 99.5), (0.0, 100.0), (25.0, 75.0), (1.0, 99.0)):
            ref = np.percentile(values, q)
            ours = _percentiles(values.copy(), q)
            np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


def test_fused_slices_match_float64_reference_and_normalize_path() -> None:
    rng = np.random.default_rng(8)
    spec = PreprocessSpec.for_geometry(SMALL, image_size=32)  # 40x40 crop -> 32: a real resize
    vol = np.zeros(SMALL, dtype=np.float32)
    vol[4:36, 6:44, 2:22] = rng.gamma(3.0, 50.0, (32, 38, 20)) + 1
    vol[10, 10, 10] = 1e5  # clipped
    ours = volume_to_slices(vol, spec)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    np.testing.assert_allclose(ours, _reference_slices(vol, spec), rtol=0, atol=2e-5)
    # int16 input (what nibabel hands over before scaling) gives the same slices.
    as_int = np.round(vol).astype(np.int16)
    np.testing.assert_array_equal(volume_to_slices(as_int, spec),
                                  volume_to_slices(as_int.astype(np.float32), spec))
    # Applying the map to the crop box only is exactly normalising everything, then cropping.
    (r0, r1), (c0, c1) = spec.crop_rows, spec.crop_cols
    from dunet_deploy.data.preprocess import orient_volume

    full = orient_volume(normalize_intensity(vol, spec), spec)[:, r0:r1, c0:c1]
    np.testing.assert_array_equal(ours, resize_bilinear(np.ascontiguousarray(full), (32, 32)))
    paper = identity_spec(intensity="dataset_minmax_zscore", dataset_min=0.0, dataset_max=300.0,
                          dataset_mean=0.3, dataset_std=0.2)
    full = orient_volume(normalize_intensity(vol, paper), paper)[:, 6:38, 3:35]
    np.testing.assert_array_equal(volume_to_slices(vol, paper), full)


def test_resize_by_taps_matches_the_interpolation_matrices() -> None:
    rng = np.random.default_rng(9)
    for (h, w), out in [((180, 180), (192, 192)), ((192, 192), (180, 180)), ((7, 5), (1, 13))]:
        x = rng.standard_normal((3, h, w)).astype(np.float32)
        ref = bilinear_matrix(h, out[0]).astype(np.float64) @ x @ bilinear_matrix(w, out[1]).T
        np.testing.assert_allclose(resize_bilinear(x, out), ref, rtol=0, atol=1e-6)


def test_one_gather_slabs_equal_slab_by_slab() -> None:
    spec = identity_spec()
    slices = np.random.default_rng(10).random((6, 4, 5)).astype(np.float32)
    idx = np.array([0, 1, 3, 5])
    got = slices_to_slabs(slices, spec, idx)
    for n, z in enumerate(idx):
        for c, off in enumerate(spec.slab_offsets):
            src = z + off
            want = slices[src] if 0 <= src < 6 else np.zeros((4, 5), np.float32)
            np.testing.assert_array_equal(got[n, c], want)
    assert slices_to_slabs(slices, spec, np.array([], dtype=np.int64)).shape == (0, 4, 4, 5)


def test_probs_to_volume_is_fortran_ordered_and_zero_maps_stay_zero() -> None:
    spec = PreprocessSpec.for_geometry(SMALL, image_size=32)
    rng = np.random.default_rng(11)
    probs = np.zeros((24, 1, 32, 32), np.float32)
    probs[5:19] = rng.random((14, 1, 32, 32))
    out = probs_to_volume(probs, spec, SMALL)
    assert out.shape == SMALL and out.flags.f_contiguous  # NIfTI order: written without a copy
    assert not out[:, :, :5].any() and not out[:, :, 19:].any()
    (r0, r1), (c0, c1) = spec.crop_rows, spec.crop_cols
    ref = bilinear_matrix(32, r1 - r0).astype(np.float64) @ probs[:, 0] @ bilinear_matrix(
        32, c1 - c0).T
    np.testing.assert_allclose(out.transpose(2, 1, 0)[:, r0:r1, c0:c1], ref, atol=1e-6)


@pytest.mark.parametrize("shape", [SMALL, (197, 233, 9)])
def test_probs_to_mask_is_bit_identical_to_thresholding(shape: tuple[int, int, int]) -> None:
    from dunet_deploy.data.preprocess import probs_to_mask

    spec = PreprocessSpec.for_geometry(shape, image_size=32 if shape == SMALL else None)
    s, z = spec.image_size, shape[2]
    rng = np.random.default_rng(12)
    t = np.float32(spec.threshold)
    below = np.nextafter(t, np.float32(0))
    for trial in range(6):
        probs = (rng.random((z, 1, s, s)) * 0.3).astype(np.float32)
        probs[:2] = 0  # slabs that were not run
        # A lesion, pixels a hair below / at the threshold, and a lone hot pixel.
        r, c = rng.integers(4, s - 12, 2)
        probs[3:6, 0, r:r + 6, c:c + 5] = rng.uniform(0.3, 0.9, (3, 6, 5)).astype(np.float32)
        probs[z - 2, 0, rng.integers(0, s), rng.integers(0, s)] = [below, t, 1.0][trial % 3]
        probs[4, 0, s - 1, s - 1] = below
        want = binarize(probs_to_volume(probs, spec, shape), spec)
        got = probs_to_mask(probs, spec, shape)
        assert got.dtype == np.uint8 and got.shape == shape
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(probs_to_mask(np.zeros((z, 1, s, s), np.float32), spec, shape),
                                  0)


def test_bilinear_of_values_below_the_margin_stays_below_the_threshold() -> None:
    """Why probs_to_mask may skip pixels under threshold * (1 - MASK_MARGIN): the resize
    output is a convex combination of its taps, and float32 rounding cannot lift it back."""
    from dunet_deploy.data.preprocess import MASK_MARGIN

    rng = np.random.default_rng(13)
    for threshold in (0.5, 0.1, 0.9):
        cut = np.float32(threshold * (1.0 - MASK_MARGIN))
        top = np.nextafter(cut, np.float32(0))  # the largest value that is skipped
        for out_hw in ((180, 180), (192, 192), (37, 250)):
            x = np.where(rng.random((4, 192, 192)) < 0.7, top,
                         rng.uniform(0, top, (4, 192, 192))).astype(np.float32)
            x[0] = top  # every tap at the limit
            out = resize_bilinear(x, out_hw)
            assert out.max() < np.float32(threshold), (threshold, out_hw, out.max())
