"""Tests for dunet_deploy.data.cache: build, reuse/rebuild, slab access."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dunet_deploy.data import cache as cache_mod
from dunet_deploy.data.cache import MANIFEST, SliceCache, build_cache
from dunet_deploy.data.layouts import Case
from dunet_deploy.data.nifti import load_mask, load_nifti
from dunet_deploy.data.preprocess import (
    mask_to_labels,
    nonempty_slab_indices,
    slices_to_slabs,
    volume_to_slices,
)
from dunet_deploy.data.synth import write_dataset
from dunet_deploy.errors import DunetError
from dunet_deploy.spec import PreprocessSpec

SHAPE = (40, 48, 24)
SPEC = PreprocessSpec.for_geometry(SHAPE)  # crop 40x40 -> 48x48


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    root = tmp_path_factory.mktemp("data")
    return write_dataset(root, cases=3, layout="pairs", shape=SHAPE, seed=1)


@pytest.fixture(scope="module")
def built(dataset: list[Case], tmp_path_factory: pytest.TempPathFactory) -> SliceCache:
    return build_cache(dataset, SPEC, tmp_path_factory.mktemp("cache"))


def expected_case(case: Case) -> tuple[np.ndarray, np.ndarray]:
    vol = load_nifti(case.image).data
    slabs = slices_to_slabs(volume_to_slices(vol, SPEC), SPEC)
    labels = mask_to_labels(load_mask(list(case.masks)), SPEC)
    return slabs, labels


def test_layout_on_disk(built: SliceCache, dataset: list[Case]) -> None:
    manifest = json.loads((built.cache_dir / MANIFEST).read_text())
    assert manifest["spec_digest"] == SPEC.digest() == built.digest
    assert PreprocessSpec.from_dict(manifest["spec"]) == SPEC == built.spec
    assert [c["case_id"] for c in manifest["cases"]] == [c.case_id for c in dataset]
    assert [c["z"] for c in manifest["cases"]] == [24, 24, 24]
    for entry, case in zip(manifest["cases"], dataset, strict=True):
        images = np.load(built.cache_dir / entry["images"], mmap_mode="r")
        labels = np.load(built.cache_dir / entry["labels"], mmap_mode="r")
        assert isinstance(images, np.memmap)
        assert images.dtype == np.float16 and images.shape == (24, 48, 48)
        assert labels.dtype == np.uint8 and labels.shape == (24, 48, 48)
        mask = load_mask(list(case.masks))
        assert entry["lesion_voxels"] == mask.sum(axis=(0, 1)).tolist()
        assert sum(entry["label_pixels"]) == int(labels.sum())


def test_len_and_slabs_match_direct_preprocessing(built: SliceCache,
                                                  dataset: list[Case]) -> None:
    assert len(built) == 72
    start = 0
    for case in dataset:
        slabs, labels = expected_case(case)
        for z in (0, 1, 11, 22, 23):  # include both volume edges
            img, lab = built.slab(start + z)
            assert img.dtype == np.float32 and img.shape == (4, 48, 48)
            assert lab.dtype == np.uint8 and lab.shape == (1, 48, 48)
            np.testing.assert_allclose(img, slabs[z], atol=2e-2, rtol=2e-3)  # float16
            np.testing.assert_array_equal(lab, labels[z])
            assert built.case_of(start + z) == case.case_id
        start += 24


def test_slabs_never_leak_across_cases(built: SliceCache) -> None:
    first_of_second, _ = built.slab(24)
    assert (first_of_second[:2] == 0).all()  # z-2, z-1 lie before the case: zeros
    assert (first_of_second[2] != 0).any()
    last_of_first, _ = built.slab(23)
    assert (last_of_first[3] == 0).all()  # z+1 lies beyond the case
    assert (built.slab(-1)[0] == built.slab(71)[0]).all()
    with pytest.raises(IndexError):
        built.slab(72)


def test_case_slabs_and_indices(built: SliceCache, dataset: list[Case]) -> None:
    case = dataset[1]
    images, labels = built.case_slabs(case.case_id)
    assert images.shape == (24, 4, 48, 48) and labels.shape == (24, 1, 48, 48)
    idx = built.case_indices(case.case_id)
    np.testing.assert_array_equal(idx, np.arange(24, 48))
    for k, i in enumerate(idx[[0, 5, 23]]):
        img, lab = built.slab(int(i))
        np.testing.assert_array_equal(images[[0, 5, 23][k]], img)
        np.testing.assert_array_equal(labels[[0, 5, 23][k]], lab)
    assert built.case_z(case.case_id) == 24
    with pytest.raises(KeyError):
        built.case_slabs("nope")


def test_lesion_and_nonempty_indices(built: SliceCache, dataset: list[Case]) -> None:
    lesion = built.lesion_slab_indices()
    assert lesion.dtype == np.int64
    expected_lesion = []
    expected_nonempty = []
    for k, case in enumerate(dataset):
        _, labels = expected_case(case)
        expected_lesion += (np.flatnonzero(labels.reshape(24, -1).any(axis=1)) + 24 * k).tolist()
        vol = load_nifti(case.image).data
        expected_nonempty += (nonempty_slab_indices(vol, SPEC) + 24 * k).tolist()
    assert lesion.tolist() == expected_lesion
    assert len(expected_lesion) > 0
    nonempty = built.nonempty_indices()
    assert nonempty.tolist() == expected_nonempty
    assert 0 < len(nonempty) < len(built)  # the synthetic head leaves empty end slices


def test_pickles_for_dataloader_workers(built: SliceCache) -> None:
    built.slab(3)  # opens memory maps
    clone = pickle.loads(pickle.dumps(built))
    np.testing.assert_array_equal(clone.slab(3)[0], built.slab(3)[0])


def test_reuse_and_rebuild(dataset: list[Case], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "c"
    calls: list[str] = []
    real = cache_mod.volume_to_slices

    def counting(vol, spec):
        calls.append("x")
        return real(vol, spec)

    monkeypatch.setattr(cache_mod, "volume_to_slices", counting)
    build_cache(dataset[:2], SPEC, out)
    assert len(calls) == 2
    build_cache(dataset[:2], SPEC, out)
    assert len(calls) == 2  # reused, nothing recomputed
    build_cache(dataset[:2], SPEC.replace(threshold=0.4), out)
    assert len(calls) == 4  # spec changed
    cache = build_cache(dataset, SPEC.replace(threshold=0.4), out)
    assert len(calls) == 7 and len(cache) == 72  # case list changed
    # A source file that changed on disk invalidates the cache too.
    st = dataset[0].image.stat()
    os.utime(dataset[0].image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    build_cache(dataset, SPEC.replace(threshold=0.4), out)
    assert len(calls) == 10
    # An interrupted build (no manifest) is rebuilt, and stale arrays go away.
    (out / MANIFEST).unlink()
    cache = build_cache(dataset[:1], SPEC.replace(threshold=0.4), out)
    assert len(calls) == 11 and len(cache) == 24
    assert sorted(p.name for p in out.glob("*.npy")) == ["case_00000_images.npy",
                                                         "case_00000_labels.npy"]


def test_progress_callback(dataset: list[Case], tmp_path: Path) -> None:
    seen: list[tuple[int, int, str]] = []
    build_cache(dataset[:2], SPEC, tmp_path, progress=lambda *a: seen.append(a))
    assert seen == [(1, 2, dataset[0].case_id), (2, 2, dataset[1].case_id)]


def test_build_errors_name_the_case(dataset: list[Case], tmp_path: Path) -> None:
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 48, 23), np.uint8), np.eye(4)), str(other))
    bad = Case("broken", dataset[0].image, (other,))
    with pytest.raises(DunetError) as exc:
        build_cache([bad], SPEC, tmp_path / "c1")
    assert "case broken" in str(exc.value) and "shape" in str(exc.value)
    assert not (tmp_path / "c1" / MANIFEST).exists()

    wrong_spec = PreprocessSpec.for_geometry((48, 40, 24))
    with pytest.raises(DunetError) as exc:
        build_cache(dataset[:1], wrong_spec, tmp_path / "c2")
    assert f"case {dataset[0].case_id}" in str(exc.value) and "in-plane" in str(exc.value)

    gone = Case("gone", tmp_path / "missing.nii.gz", (other,))
    with pytest.raises(DunetError, match="missing.nii.gz"):
        build_cache([gone], SPEC, tmp_path / "c3")
    with pytest.raises(DunetError, match="duplicate"):
        build_cache([dataset[0], dataset[0]], SPEC, tmp_path / "c4")
    with pytest.raises(DunetError, match="no cases"):
        build_cache([], SPEC, tmp_path / "c5")


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(DunetError, match="not a slice cache"):
        SliceCache(tmp_path)
    (tmp_path / MANIFEST).write_text("{broken")
    with pytest.raises(DunetError, match="unreadable"):
        SliceCache(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 99}))
    with pytest.raises(DunetError, match="unsupported"):
        SliceCache(tmp_path)


def _save_reoriented(src: Path, dst: Path, codes: tuple[str, str, str]) -> Path:
    img = nib.load(str(src))
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                           nib.orientations.axcodes2ornt(codes))
    nib.save(img.as_reoriented(ornt), str(dst))
    return dst


def test_mixed_orientations_are_brought_to_the_spec_exactly(dataset: list[Case],
                                                            tmp_path: Path) -> None:
    from dunet_deploy.data.geometry import axcodes, measure_geometry

    # Case 1 stored PIR and case 2 stored RAS (image and mask): same scans, other voxel orders.
    moved = []
    for case, codes in zip(dataset[1:], (("P", "I", "R"), ("R", "A", "S")), strict=True):
        image = _save_reoriented(case.image, tmp_path / f"{case.case_id}.nii.gz", codes)
        masks = tuple(_save_reoriented(m, tmp_path / f"{case.case_id}_m{k}.nii.gz", codes)
                      for k, m in enumerate(case.masks))
        moved.append(Case(case.case_id, image, masks))
    mixed = [dataset[0], *moved]
    assert [axcodes(nib.load(str(c.image)).affine) for c in mixed] == [
        ("L", "A", "S"), ("P", "I", "R"), ("R", "A", "S")]
    geom = measure_geometry([dataset[0], moved[0], dataset[2]])  # LAS is the majority
    spec = PreprocessSpec.for_geometry(SHAPE, **geom)
    assert spec.orientation == ("L", "A", "S") and spec.grid_affine is not None
    cache = build_cache(mixed, spec, tmp_path / "cache")
    for case, original in zip(mixed, dataset, strict=True):
        images, labels = cache.case_slabs(case.case_id)
        vol = load_nifti(original.image).data
        # The voxels are reordered exactly; normalisation and resizing then sum in another
        # order, so values may differ by one float16 step (stored as float16).
        np.testing.assert_allclose(
            images, slices_to_slabs(volume_to_slices(vol, spec), spec), rtol=1e-3, atol=2e-3)
        np.testing.assert_array_equal(labels, mask_to_labels(load_mask(list(original.masks)),
                                                             spec))
    entries = {e["case_id"]: e for e in cache.manifest["cases"]}
    assert entries[moved[0].case_id]["geometry"]["method"] == "reorient"
    assert entries[moved[0].case_id]["geometry"]["input_orientation"] == "PIR"
    assert entries[dataset[0].case_id]["geometry"]["method"] == "none"
    assert entries[moved[0].case_id]["volume_shape"] == list(SHAPE)


def test_cases_off_the_training_grid_are_refused_or_resampled(dataset: list[Case],
                                                              tmp_path: Path) -> None:
    from dunet_deploy.data.geometry import measure_geometry

    spec = PreprocessSpec.for_geometry(SHAPE, **measure_geometry(dataset[:1]))
    img = nib.load(str(dataset[0].image))
    far = img.affine.copy()
    far[:3, 3] += 500.0  # the same voxels far away: not in the training space
    path = tmp_path / "far.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), far), str(path))
    mask = tmp_path / "far_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(str(dataset[0].masks[0])).dataobj), far),
             str(mask))
    with pytest.raises(DunetError) as exc:
        build_cache([Case("far", path, (mask,))], spec, tmp_path / "c")
    assert "case far" in str(exc.value) and "registered" in str(exc.value)
    assert not (tmp_path / "c" / MANIFEST).exists()
