"""Tests for dunet_deploy.data.synth: the phantom, the files it writes, previews."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dunet_deploy.data.layouts import discover_cases
from dunet_deploy.data.nifti import load_mask, load_nifti
from dunet_deploy.data.synth import (
    MARKER_FILE,
    preview_png,
    synth_affine,
    synthesize_case,
    write_dataset,
)
from dunet_deploy.errors import DunetError

SHAPE = (40, 48, 24)


def test_deterministic_per_seed_and_seeds_differ() -> None:
    a_img, a_mask = synthesize_case(SHAPE, seed=7)
    b_img, b_mask = synthesize_case(SHAPE, seed=7)
    c_img, _ = synthesize_case(SHAPE, seed=8)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)
    assert a_img.dtype == np.float32 and a_mask.dtype == np.uint8
    assert a_img.shape == a_mask.shape == SHAPE
    assert set(np.unique(a_mask)) <= {0, 1}


def test_head_in_zero_background_with_empty_end_slices() -> None:
    img, _ = synthesize_case((64, 80, 48), seed=0)
    assert img.min() >= 0
    assert (img[:, :, :2] == 0).all() and (img[:, :, -2:] == 0).all()  # outside the head
    assert img[0, 0, 24] == 0 and img[-1, -1, 24] == 0  # corners
    assert (img[:, :, 24] > 0).mean() > 0.5  # but a mid slice is mostly head


def test_t1_contrast_and_hypointense_lesions() -> None:
    # Across several cases: lesion voxels are darker than the brain around them,
    # and the brightest tissue (white matter) is central, not the skull ring.
    darker = 0
    n_with_lesion = 0
    for seed in range(6):
        img, mask = synthesize_case((64, 80, 48), seed=seed)
        mid = img[:, :, 24]
        centre = mid[24:40, 45:60]  # off the ventricles, inside white matter
        assert np.median(centre) > np.percentile(mid[mid > 0], 70)
        if mask.sum() >= 20:
            n_with_lesion += 1
            zs = np.flatnonzero(mask.sum(axis=(0, 1)))
            z = zs[len(zs) // 2]
            near = img[:, :, z][(mask[:, :, z] == 0) & (img[:, :, z] > 0)]
            if img[:, :, z][mask[:, :, z] > 0].mean() < np.median(near):
                darker += 1
    assert n_with_lesion >= 3 and darker == n_with_lesion


def test_lesions_inside_head_and_sizes_vary_widely() -> None:
    sizes = []
    for seed in range(20):
        img, mask = synthesize_case((64, 80, 48), seed=seed)
        assert (img[mask > 0] > 0).all()  # lesions only where there is tissue
        sizes.append(int(mask.sum()))
    nonzero = [s for s in sizes if s]
    assert 0 in sizes  # some cases have no lesion
    assert min(nonzero) <= 10 and max(nonzero) >= 1000


@pytest.mark.slow
def test_full_atlas_shape_can_have_big_lesions() -> None:
    img, mask = synthesize_case((197, 233, 189), seed=3)
    assert img.shape == (197, 233, 189)
    assert mask.sum() > 10_000  # seed 3 draws a large lesion (tens of thousands of voxels)


def test_bad_shape() -> None:
    for shape in [(4, 80, 48), (64, 80), (64, 80, 48, 2)]:
        with pytest.raises(DunetError, match="shape"):
            synthesize_case(shape)


@pytest.mark.parametrize("layout", ["atlas-r1.1", "atlas-v2", "pairs"])
def test_write_dataset_files(tmp_path: Path, layout: str) -> None:
    cases = write_dataset(tmp_path, cases=3, layout=layout, shape=SHAPE, seed=5)
    assert len(cases) == 3
    marker = json.loads((tmp_path / MARKER_FILE).read_text())
    assert marker["layout"] == layout and marker["shape"] == list(SHAPE) and marker["seed"] == 5
    for i, case in enumerate(sorted(cases, key=lambda c: c.case_id)):
        expected_img, expected_mask = synthesize_case(SHAPE, seed=5 + i)
        raw = nib.load(str(case.image))
        assert raw.get_data_dtype() == np.int16
        assert raw.dataobj.slope != 1.0 and raw.dataobj.inter == 0.0  # real scaling on disk
        assert case.image.name.endswith(".nii.gz")
        vol = load_nifti(case.image)
        np.testing.assert_allclose(vol.data, expected_img, rtol=1e-6, atol=1e-4)
        assert vol.affine[0, 0] < 0  # MNI-like, x flipped
        np.testing.assert_allclose(vol.affine, synth_affine(SHAPE))
        for m in case.masks:
            assert nib.load(str(m)).get_data_dtype() == np.uint8
        np.testing.assert_array_equal(load_mask(list(case.masks)), expected_mask)
    assert discover_cases(tmp_path) == (layout, cases)


def test_atlas_r11_split_masks_are_disjoint_parts(tmp_path: Path) -> None:
    cases = write_dataset(tmp_path, cases=2, layout="atlas-r1.1", shape=(64, 80, 48), seed=0)
    split = cases[1]  # i % 3 == 1
    parts = [load_mask([m]) for m in split.masks]
    assert len(parts) == 2
    assert all(p.sum() > 0 for p in parts)  # seed 1 has a lesion: both parts hold some of it
    assert not (parts[0] & parts[1]).any()


def test_write_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DunetError, match="unknown layout"):
        write_dataset(tmp_path, cases=1, layout="bids")
    with pytest.raises(DunetError, match=">= 1"):
        write_dataset(tmp_path, cases=0)
    assert not any(tmp_path.iterdir())


def test_eight_small_cases_are_deterministic(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", cases=8, layout="pairs", shape=(64, 80, 48), seed=0)
    b = write_dataset(tmp_path / "b", cases=8, layout="pairs", shape=(64, 80, 48), seed=0)
    assert len(a) == len(b) == 8
    for ca, cb in zip(a, b):
        assert ca.image.read_bytes() == cb.image.read_bytes()


def test_preview_png(tmp_path: Path) -> None:
    img, mask = synthesize_case((64, 80, 48), seed=1)
    out = preview_png(img, mask, tmp_path / "p.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # real image content, not an empty canvas
    out2 = preview_png(img, None, tmp_path / "q.png", n_slices=2)
    assert out2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
