"""Issue 13 items 8 and 9 for dunet-infer: folders, masks left out, nothing matched, bad -o."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from dunet_deploy.cli.infer import main
from dunet_deploy.runtime.pipeline import label_file_reason


def infer(tiny_run, *args: object):
    return CliRunner().invoke(main, ["--engine", str(tiny_run.onnx), "--backend", "onnxruntime",
                                     "--threads", "1", *[str(a) for a in args]])


def _only_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_known_mask_names_are_recognised():
    assert "R1.1" in label_file_reason("t01/000001_LesionSmooth_stx.nii.gz")
    assert "v2.0" in label_file_reason(
        "anat/sub-r001s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz")
    assert "labelsTr" in label_file_reason("task/labelsTr/case_000.nii.gz")
    for scan in ("t01/000001_t1w_deface_stx.nii.gz", "sub-1_ses-1_T1w.nii.gz",
                 "imagesTr/case_000_0000.nii.gz", "out/case_mask.nii.gz"):
        assert label_file_reason(scan) is None, scan


def test_an_atlas_t01_folder_segments_the_scan_only(tiny_run, tmp_path):
    t01 = tiny_run.scan.parent
    res = infer(tiny_run, t01, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    masks = sorted(p.name for p in t01.iterdir() if "LesionSmooth" in p.name)
    assert masks and res.stderr.count("skipped, an ATLAS R1.1 lesion mask") == len(masks)
    assert "1/1 volume(s) segmented" in res.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [Path(c["input"]).name for c in summary["cases"]] == [tiny_run.scan.name]


def test_recursive_finds_every_scan_of_the_dataset(tiny_run, tmp_path):
    flat = infer(tiny_run, tiny_run.data, "-o", tmp_path / "flat")
    line = _only_error(flat)
    assert line == (f"error: {tiny_run.data}: no scans (.nii or .nii.gz files, DICOM "
                    "series folders or .zip files) in directory "
                    "(--recursive looks in sub-folders)")
    assert not (tmp_path / "flat").exists()

    res = infer(tiny_run, "--recursive", tiny_run.data, "-o", tmp_path / "all")
    assert res.exit_code == 0, res.output
    assert "4/4 volume(s) segmented" in res.stdout
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert all("_t1w_deface_stx" in c["input"] for c in summary["cases"])


def test_a_pattern_that_matches_nothing_creates_nothing(tiny_run, tmp_path):
    out = tmp_path / "out"
    line = _only_error(infer(tiny_run, tiny_run.scan, str(tmp_path / "nope*.nii.gz"), "-o", out))
    assert line == f"error: {tmp_path / 'nope*.nii.gz'}: no file matches"
    assert not out.exists()
    # A pattern that finds only masks matches no scan either.
    only_masks = str(tiny_run.scan.parent / "*LesionSmooth*")
    res = infer(tiny_run, only_masks, "-o", out)
    assert res.exit_code == 2, res.output
    *notes, line = res.stderr.strip().splitlines()
    assert notes and all(n.startswith("note: ") and "skipped" in n for n in notes)
    assert line == f"error: {only_masks}: no file matches" and not out.exists()


def test_output_under_a_file_is_refused_before_any_work(tiny_run, tmp_path):
    (tmp_path / "file").write_text("x")
    line = _only_error(infer(tiny_run, tiny_run.scan, "-o", tmp_path / "file" / "out"))
    assert line == (f"error: -o/--out {tmp_path / 'file' / 'out'}: cannot be created "
                    f"({tmp_path / 'file'} is not a folder)")


def _unwritable_dir() -> Path | None:
    """A folder this process cannot create files in (root ignores modes: use /sys)."""
    for cand in (Path("/sys"),):
        try:
            with tempfile.TemporaryFile(dir=cand):
                continue
        except OSError:
            return cand
    return None


def test_unwritable_output_names_the_users_path(tiny_run, tmp_path):
    ro = _unwritable_dir()
    if ro is None and os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
    if ro is None:
        pytest.skip("no unwritable folder on this machine")
    out = ro / "dunet-out"
    line = _only_error(infer(tiny_run, tiny_run.scan, "-o", out))
    assert line.startswith(f"error: -o/--out {out}: not writable (in {ro}): ")
    assert ".tmp" not in line
    shutil.rmtree(tmp_path / "ro", ignore_errors=True)


def test_blank_volume_gives_an_empty_mask_and_a_preview(tiny_run, tmp_path):
    import nibabel as nib
    import numpy as np

    ref = nib.load(str(tiny_run.scan))
    blank = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.float32), ref.affine), str(blank))
    out = tmp_path / "out"
    res = infer(tiny_run, blank, "-o", out, "--preview")
    assert res.exit_code == 0, res.output
    assert "1/1 volume(s) segmented" in res.stdout and "wrote 1 preview(s)" in res.stdout
    mask = np.asarray(nib.load(str(out / "blank_mask.nii.gz")).dataobj)
    assert mask.shape == ref.shape and not mask.any()
    case = json.loads((out / "summary.json").read_text())["cases"][0]
    assert case["lesion_voxels"] == 0 and case["lesion_volume_mm3"] == 0
    assert (out / "blank_preview.png").read_bytes()[:4] == b"\x89PNG"


def test_preview_per_case_with_the_layouts_reference(tiny_run, tmp_path):
    from dunet_deploy.runtime.preview import preview_slices, truth_for

    masks = truth_for(tiny_run.scan)
    assert masks and all("LesionSmooth" in m.name for m in masks)
    res = infer(tiny_run, "--recursive", tiny_run.data, "-o", tmp_path / "out", "--preview")
    assert res.exit_code == 0, res.output
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*_preview.png"))
    assert len(pngs) == 4 and pngs[0] == "000001_t1w_deface_stx_preview.png"

    import numpy as np

    pred = np.zeros((8, 8, 20), np.uint8)
    pred[2:4, 2:4, 5:12] = 1
    assert preview_slices(pred, n=4) == [5, 7, 9, 11]  # spread over the lesion
    assert preview_slices(np.zeros_like(pred), n=3) == [7, 10, 13]  # none: the middle


def test_preview_without_matplotlib_is_one_line(tiny_run, tmp_path, run_without):
    args = [tiny_run.scan, "--engine", tiny_run.onnx, "-o", "out", "--preview"]
    proc = run_without(("matplotlib",), "infer", args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: --preview needs matplotlib, which is not installed: "
                                   "pip install matplotlib (or 'dunet-deploy[train]')")
    assert not (tmp_path / "out").exists()


def test_reference_masks_are_paired_by_layout(tmp_path):
    from dunet_deploy.runtime.preview import truth_for

    anat = tmp_path / "sub-r1" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    scan = anat / "sub-r1_ses-1_space-MNI_T1w.nii.gz"
    mask = anat / "sub-r1_ses-1_space-MNI_label-L_desc-T1lesion_mask.nii.gz"
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    pair = tmp_path / "imagesTr" / "case_7_0000.nii.gz"
    label = tmp_path / "labelsTr" / "case_7.nii.gz"
    for p in (scan, mask, pair, label):
        p.write_bytes(b"")
    assert truth_for(scan) == [mask] and truth_for(pair) == [label]
    assert truth_for(tmp_path / "elsewhere.nii.gz") == []
