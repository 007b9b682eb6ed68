"""Issue 19 items 1 and 11: a run never reads its own outputs back as scans; re-runs, failed runs.

Driven as a user would: ``dunet-infer`` on real files (and the Segmenter on the
same folders), in folders whose names have spaces and ``é``.
"""

from __future__ import annotations

import gzip
import json
import shutil
import socket
from pathlib import Path

import nibabel as nib
import pytest
from click.testing import CliRunner

from dunet_deploy.cli.infer import main
from dunet_deploy.data.nifti import output_kind
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.pipeline import expand_inputs, output_file_reason


def infer(tiny_run, *args: object):
    return CliRunner().invoke(main, ["--engine", str(tiny_run.onnx), "--backend", "onnxruntime",
                                     "--threads", "1", "-q", *[str(a) for a in args]])


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _nest(tiny_run, root: Path) -> Path:
    """``root/scans é/`` with two scans (one in a sub-folder) and files that are not scans."""
    nest = root / "scans é"
    (nest / "sub dir").mkdir(parents=True)
    shutil.copy(tiny_run.scan, nest / "case 000.nii.gz")
    shutil.copy(tiny_run.scan, nest / "sub dir" / "case_001.nii.gz")
    shutil.copy(tiny_run.scan, nest / ".hidden.nii.gz")          # hidden (e.g. macOS ._ files)
    shutil.copy(tiny_run.scan, nest / "sub dir" / "stray_prob.nii.gz")  # named like an output
    return nest


def test_the_issues_loop_segments_the_same_two_volumes_each_time(tiny_run, tmp_path):
    nest = _nest(tiny_run, tmp_path)
    out = nest / "masks é"
    for i in range(3):
        res = infer(tiny_run, "--recursive", nest, "-o", out, "--save-prob")
        assert res.exit_code == 0, (i, res.output)
        summary = _summary(out)
        assert (summary["total"], summary["ok"]) == (2, 2), i
        assert sorted(Path(c["input"]).name for c in summary["cases"]) == [
            "case 000.nii.gz", "case_001.nii.gz"]
        skipped = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
        assert "hidden" in skipped[".hidden.nii.gz"]
        assert "named like an output" in skipped["stray_prob.nii.gz"]
        assert ("masks é" in skipped) == (i > 0)  # from the second run on, it holds files
        notes = [line for line in res.stderr.splitlines() if line.startswith("note: ")]
        assert len(notes) == len(skipped), res.stderr
        assert not any(line.startswith("error") for line in res.stderr.splitlines())
    names = sorted(p.name for p in out.iterdir())
    assert names == ["case 000_mask.nii.gz", "case 000_prob.nii.gz", "case_001_mask.nii.gz",
                     "case_001_prob.nii.gz", "summary.json"]
    assert output_kind(out / "case 000_mask.nii.gz") == "mask"
    assert output_kind(out / "case 000_prob.nii.gz") == "prob"
    assert output_kind(nest / "case 000.nii.gz") is None


def test_out_equal_to_in_skips_outputs_by_name_and_by_header(tiny_run, tmp_path):
    folder = tmp_path / "in and out é"
    folder.mkdir()
    shutil.copy(tiny_run.scan, folder / "scan.nii.gz")
    for i in range(3):
        res = infer(tiny_run, folder, "-o", folder, "--save-prob")
        assert res.exit_code == 0, (i, res.output)
        summary = _summary(folder)
        assert [Path(c["input"]).name for c in summary["cases"]] == ["scan.nii.gz"], i
    # A mask renamed like a scan is still recognised, by the marker in its header.
    (folder / "scan_mask.nii.gz").rename(folder / "renamed.nii.gz")
    (folder / "scan_prob.nii.gz").rename(folder / "renamed2.nii")  # also uncompressed
    with gzip.open(folder / "renamed.nii.gz") as f:  # the marker is in the header's descrip
        assert nib.Nifti1Header.from_fileobj(f)["descrip"].item() == b"dunet-deploy mask"
    res = infer(tiny_run, folder, "-o", folder)
    assert res.exit_code == 0, res.output
    summary = _summary(folder)
    assert [Path(c["input"]).name for c in summary["cases"]] == ["scan.nii.gz"]
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert "header description 'dunet-deploy mask'" in reasons["renamed.nii.gz"]
    assert "header description 'dunet-deploy prob'" in reasons["renamed2.nii"]


def _uncompressed(src: Path, dst: Path) -> None:
    dst.write_bytes(gzip.decompress(src.read_bytes()))


def test_a_pattern_and_the_python_api_leave_the_output_folder_out(tiny_run, tmp_path):
    from dunet_deploy import Segmenter

    nest = _nest(tiny_run, tmp_path)
    out = nest / "sub dir" / "out"
    pattern = str(nest / "**" / "*.nii*")
    for _ in range(2):
        res = infer(tiny_run, pattern, "-o", out)
        assert res.exit_code == 0, res.output
        assert _summary(out)["total"] == 2
    with Segmenter(tiny_run.onnx, backend="onnxruntime", threads=1) as seg:
        for _ in range(2):
            summary = seg.predict_files(nest, nest / "py out", recursive=True)
            assert (summary["total"], summary["ok"]) == (2, 2)
        # A folder with nothing but outputs and hidden files fails loudly, creating nothing.
        with pytest.raises(DunetError, match="no scans"):
            seg.predict_files(out, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_an_output_named_explicitly_is_refused_not_segmented(tiny_run, tmp_path):
    out = tmp_path / "out é"
    assert infer(tiny_run, tiny_run.scan, "-o", out).exit_code == 0
    mask = next(out.glob("*_mask.nii.gz"))
    renamed = tmp_path / "looks like a scan.nii.gz"
    shutil.copy(mask, renamed)
    assert "header description" in str(output_file_reason(renamed))
    res = infer(tiny_run, renamed, "-o", tmp_path / "again")
    assert res.exit_code == 1, res.output
    assert res.stderr.strip().splitlines() == [
        f"error: {renamed}: a mask written by dunet-deploy (header description "
        "'dunet-deploy mask'), not a scan"]
    # A scan named like an output, given by name, is taken (only searches go by name).
    named = tmp_path / "t1_mask.nii.gz"
    shutil.copy(tiny_run.scan, named)
    assert [i.error for i in expand_inputs([named])] == [None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_failed_run_leaves_no_output_folder_it_created(tiny_run, tmp_path):
    from dunet_deploy import Segmenter

    # Nothing listens there: the model cannot be loaded after the folder was made.
    out = tmp_path / "new é" / "masks"
    res = infer(tiny_run, tiny_run.scan, "-o", out,
                "--triton-url", f"http://127.0.0.1:{_free_port()}")
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and not (tmp_path / "new é").exists()

    def refuse(path, info):
        raise DunetError("server not reachable")

    existing = tmp_path / "existing"
    existing.mkdir()
    with Segmenter(tiny_run.onnx, runner_factory=refuse, lazy=True) as seg:
        for folder in (out, existing):
            with pytest.raises(DunetError, match="server not reachable"):
                seg.predict_files(tiny_run.scan, folder)
    assert not (tmp_path / "new é").exists() and existing.is_dir()  # never one it did not make


def test_rerunning_into_a_folder_keeps_the_earlier_cases_in_the_summary(tiny_run, tmp_path):
    scans = tmp_path / "scans é"
    scans.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(tiny_run.scan, scans / name)
    out = tmp_path / "out"
    assert infer(tiny_run, scans, "-o", out).exit_code == 0
    first = _summary(out)

    res = infer(tiny_run, scans / "a.nii.gz", "-o", out, "--min-lesion-mm3", "5")
    assert res.exit_code == 0, res.output
    summary = _summary(out)
    assert [Path(c["input"]).name for c in summary["cases"]] == ["a.nii.gz"]
    [earlier] = summary["earlier_cases"]
    assert earlier["input"] == str(scans / "b.nii.gz") and earlier["status"] == "ok"
    assert earlier["run"]["options_fingerprint"] == first["options_fingerprint"]
    assert earlier["run"]["options_fingerprint"] != summary["options_fingerprint"]
    assert res.stderr.strip() == (f"note: {out}: 1 case(s) of earlier runs are kept (not "
                                  "segmented again); summary.json lists them under earlier_cases")
    # Kept over several runs, and dropped once its mask is gone.
    infer(tiny_run, scans / "a.nii.gz", "-o", out)
    assert [c["input"] for c in _summary(out)["earlier_cases"]] == [str(scans / "b.nii.gz")]
    (out / "b_mask.nii.gz").unlink()
    infer(tiny_run, scans / "a.nii.gz", "-o", out)
    assert _summary(out)["earlier_cases"] == []


@pytest.mark.parametrize("bad", ["missing", "truncated"])
def test_a_single_bad_input_exits_1_as_the_readme_says(tiny_run, tmp_path, bad):
    path = tmp_path / f"{bad} é.nii.gz"
    if bad == "truncated":
        path.write_bytes(tiny_run.scan.read_bytes()[:400])
    res = infer(tiny_run, path, "-o", tmp_path / "out")
    assert res.exit_code == 1, res.output
    [line] = res.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: ")
    summary = _summary(tmp_path / "out")
    assert (summary["total"], summary["failed"]) == (1, 1)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "a missing or truncated volume fails only its own case" in " ".join(readme.split())
