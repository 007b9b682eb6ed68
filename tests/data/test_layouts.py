"""Tests for dunet_deploy.data.layouts: discovery, validation and splitting."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dunet_deploy.data.layouts import Case, check_case, discover_cases, split_cases
from dunet_deploy.data.nifti import load_mask
from dunet_deploy.data.synth import write_dataset
from dunet_deploy.errors import DunetError

TINY = (12, 14, 10)


def nii(path: Path, shape=TINY, affine=None, value=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(shape, value, np.uint8), np.eye(4) if affine is None
                             else affine), str(path))
    return path


def assert_one_line(exc: pytest.ExceptionInfo[BaseException], *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


# ---------------------------------------------------------------- discovery
@pytest.mark.parametrize("layout", ["atlas-r1.1", "atlas-v2", "pairs"])
def test_discovers_what_synth_writes(tmp_path: Path, layout: str) -> None:
    written = write_dataset(tmp_path, cases=4, layout=layout, shape=(16, 18, 12), seed=3)
    name, found = discover_cases(tmp_path)
    assert name == layout
    assert found == written
    assert [c.case_id for c in found] == sorted(c.case_id for c in found)
    for case in found:
        check_case(case)


def test_atlas_r11_split_masks_are_one_case(tmp_path: Path) -> None:
    write_dataset(tmp_path, cases=3, layout="atlas-r1.1", shape=(16, 18, 12), seed=0)
    _, cases = discover_cases(tmp_path, layout="atlas-r1.1")
    by_id = {c.case_id: c for c in cases}
    two = by_id["000002"]
    assert len(two.masks) == 2
    assert all("LesionSmooth" in m.name for m in two.masks)
    assert two.image.name == "000002_t1w_deface_stx.nii.gz"
    assert len(by_id["000001"].masks) == 1


def test_atlas_r11_by_hand(tmp_path: Path) -> None:
    t01 = tmp_path / "Site4" / "031768" / "t01"
    img = nii(t01 / "031768_t1w_deface_stx.nii.gz")
    m1 = nii(t01 / "031768_LesionSmooth_stx.nii.gz")
    m2 = nii(t01 / "031768_LesionSmooth_1_stx.nii.gz")
    nii(t01 / "notes_other.nii.gz")  # unrelated files are ignored
    assert discover_cases(tmp_path) == ("atlas-r1.1", [Case("031768", img, (m2, m1))])  # sorted


def test_atlas_r11_missing_mask(tmp_path: Path) -> None:
    nii(tmp_path / "Site1" / "000123" / "t01" / "000123_t1w_deface_stx.nii.gz")
    with pytest.raises(DunetError) as exc:
        discover_cases(tmp_path)
    assert_one_line(exc, "000123", "LesionSmooth")


def test_atlas_v2_by_hand_and_missing_mask(tmp_path: Path) -> None:
    anat = tmp_path / "ATLAS_2" / "Training" / "R009" / "sub-r009s002" / "ses-1" / "anat"
    stem = "sub-r009s002_ses-1_space-MNI152NLin2009aSym"
    img = nii(anat / f"{stem}_T1w.nii.gz")
    mask = nii(anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz")
    assert discover_cases(tmp_path) == ("atlas-v2", [Case("sub-r009s002_ses-1", img, (mask,))])
    mask.unlink()
    with pytest.raises(DunetError) as exc:
        discover_cases(tmp_path)
    assert_one_line(exc, "sub-r009s002_ses-1", "missing lesion mask")


def test_pairs_plain_and_nnunet_names(tmp_path: Path) -> None:
    a = nii(tmp_path / "imagesTr" / "brain_7_0000.nii.gz")
    b = nii(tmp_path / "imagesTr" / "caseB.nii")
    la = nii(tmp_path / "labelsTr" / "brain_7.nii.gz")
    lb = nii(tmp_path / "labelsTr" / "caseB.nii.gz")
    (tmp_path / "imagesTr" / "README.txt").write_text("ignored")
    name, cases = discover_cases(tmp_path)
    assert name == "pairs"
    assert cases == [Case("brain_7", a, (la,)), Case("caseB", b, (lb,))]


def test_pairs_errors(tmp_path: Path) -> None:
    nii(tmp_path / "imagesTr" / "c1.nii.gz")
    with pytest.raises(DunetError) as exc:
        discover_cases(tmp_path)
    assert_one_line(exc, "labelsTr")
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(DunetError) as exc:
        discover_cases(tmp_path)
    assert_one_line(exc, "case c1", "no mask")
    nii(tmp_path / "labelsTr" / "c1.nii.gz")
    nii(tmp_path / "imagesTr" / "c1_0001.nii.gz")
    with pytest.raises(DunetError) as exc:
        discover_cases(tmp_path)
    assert_one_line(exc, "c1_0001", "channel")


def test_discovery_errors(tmp_path: Path) -> None:
    with pytest.raises(DunetError) as exc:
        discover_cases(tmp_path / "missing")
    assert_one_line(exc, "missing", "does not exist")
    with pytest.raises(DunetError) as exc:
        discover_cases(tmp_path)
    assert_one_line(exc, "no cases found")
    f = nii(tmp_path / "x.nii.gz")
    with pytest.raises(DunetError) as exc:
        discover_cases(f)
    assert_one_line(exc, "not a folder")
    with pytest.raises(DunetError) as exc:
        discover_cases(tmp_path, layout="bids")
    assert_one_line(exc, "unknown layout", "bids")


def test_forced_layout_only_looks_there(tmp_path: Path) -> None:
    write_dataset(tmp_path, cases=1, layout="pairs", shape=(16, 18, 12))
    with pytest.raises(DunetError) as exc:
        discover_cases(tmp_path, layout="atlas-v2")
    assert_one_line(exc, "no cases found for layout atlas-v2")
    assert discover_cases(tmp_path, layout="pairs")[0] == "pairs"


# --------------------------------------------------------------- check_case
def test_check_case_mismatches(tmp_path: Path) -> None:
    img = nii(tmp_path / "i.nii.gz")
    good = nii(tmp_path / "good.nii.gz")
    check_case(Case("ok", img, (good,)))
    bad_shape = nii(tmp_path / "bs.nii.gz", shape=(12, 14, 9))
    with pytest.raises(DunetError) as exc:
        check_case(Case("c7", img, (good, bad_shape)))
    assert_one_line(exc, "case c7", "bs.nii.gz", "shape")
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    bad_aff = nii(tmp_path / "ba.nii.gz", affine=shifted)
    with pytest.raises(DunetError) as exc:
        check_case(Case("c8", img, (bad_aff,)))
    assert_one_line(exc, "case c8", "affine")
    with pytest.raises(DunetError) as exc:
        check_case(Case("c9", img, (tmp_path / "gone.nii.gz",)))
    assert_one_line(exc, "case c9", "gone.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"junk")
    with pytest.raises(DunetError) as exc:
        check_case(Case("c10", junk, (good,)))
    assert_one_line(exc, "case c10", "junk.nii.gz")


def test_synth_split_masks_merge_to_the_lesion(tmp_path: Path) -> None:
    from dunet_deploy.data.synth import synthesize_case

    cases = write_dataset(tmp_path, cases=2, layout="atlas-r1.1", shape=(24, 28, 16), seed=10)
    split = cases[1]
    assert len(split.masks) == 2
    _, mask = synthesize_case((24, 28, 16), seed=11)
    np.testing.assert_array_equal(load_mask(list(split.masks)), mask)


# -------------------------------------------------------------------- split
def make_cases(n: int) -> list[Case]:
    return [Case(f"c{i:02d}", Path(f"/d/c{i:02d}.nii.gz"), (Path(f"/d/m{i:02d}.nii.gz"),))
            for i in range(n)]


def test_split_is_deterministic_disjoint_and_complete() -> None:
    cases = make_cases(10)
    train, val = split_cases(cases, 0.2, seed=0)
    assert len(train) == 8 and len(val) == 2
    assert {c.case_id for c in train} | {c.case_id for c in val} == {c.case_id for c in cases}
    assert not {c.case_id for c in train} & {c.case_id for c in val}
    assert split_cases(list(reversed(cases)), 0.2, seed=0) == (train, val)  # order-free
    assert split_cases(cases, 0.2, seed=0) == (train, val)
    others = {tuple(c.case_id for c in split_cases(cases, 0.2, seed=s)[1]) for s in range(6)}
    assert len(others) > 1  # the seed matters
    assert train == sorted(train, key=lambda c: c.case_id)


def test_split_small_sets() -> None:
    train, val = split_cases(make_cases(2), 0.2)
    assert len(train) == 1 and len(val) == 1
    train, val = split_cases(make_cases(3), 0.9)
    assert len(train) == 1 and len(val) == 2
    assert split_cases(make_cases(1)) == (make_cases(1), [])
    assert split_cases([]) == ([], [])


def test_split_errors() -> None:
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(DunetError, match="val_fraction"):
            split_cases(make_cases(4), bad)
    with pytest.raises(DunetError, match="duplicate"):
        split_cases(make_cases(3) + make_cases(1))
