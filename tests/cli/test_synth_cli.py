"""Tests for ``dunet-synth`` and the shared CLI error handling in cli/_common.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dunet_deploy.cli._common import DunetCommand, handle_errors
from dunet_deploy.cli.synth import main
from dunet_deploy.data.layouts import discover_cases
from dunet_deploy.errors import DunetError

REPO = Path(__file__).resolve().parents[2]
SMALL = "24,28,16"


def run(args: list[str]):
    return CliRunner().invoke(main, args)


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_writes_dataset_and_prints_one_line_per_case(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    result = run([str(out), "--cases", "3", "--layout", "atlas-v2", "--shape", SMALL,
                  "--seed", "4"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 + 3 + 1  # header, cases, summary
    assert lines[-1].startswith("wrote 3 case(s), layout atlas-v2, shape 24x28x16")
    layout, cases = discover_cases(out)
    assert layout == "atlas-v2" and len(cases) == 3
    for case, line in zip(cases, lines[1:4], strict=True):
        assert line.split()[0] == case.case_id
    assert not (out / "previews").exists()


def test_preview_pngs(tmp_path: Path) -> None:
    result = run([str(tmp_path), "-n", "2", "--layout", "pairs", "--shape", SMALL, "--preview"])
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "previews").glob("*.png"))
    assert [p.name for p in pngs] == ["case_000.png", "case_001.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_an_earlier_dataset_is_kept_unless_overwrite(tmp_path: Path) -> None:
    """Issue 19.6: a trained run records the split of the old dataset; never delete it silently."""
    data = tmp_path / "my data é"
    assert run([str(data), "-n", "3", "--layout", "pairs", "--shape", SMALL,
                "--preview"]).exit_code == 0
    before = _tree(data)
    result = run([str(data), "-n", "1", "--layout", "atlas-r1.1", "--shape", SMALL])
    assert_user_error(result, str(data), "already holds a dunet-synth dataset",
                      "3 cases, layout pairs, shape 24x28x16", "--overwrite")
    assert _tree(data) == before  # every case, the previews and the marker are intact
    assert discover_cases(data)[0] == "pairs"

    result = run([str(data), "-n", "1", "--layout", "atlas-r1.1", "--shape", SMALL,
                  "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (data / "imagesTr").exists() and not (data / "previews").exists()
    layout, cases = discover_cases(data)
    assert layout == "atlas-r1.1" and len(cases) == 1


def test_overwrite_still_refuses_foreign_files(tmp_path: Path) -> None:
    assert run([str(tmp_path), "-n", "1", "--shape", SMALL]).exit_code == 0
    (tmp_path / "notes.txt").write_text("mine")
    assert_user_error(run([str(tmp_path), "-n", "1", "--shape", SMALL, "--overwrite"]),
                      "notes.txt")
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "Site1").exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--shape", "64,80"], ["--shape", "three integers"]),
        (["--shape", "a,b,c"], ["three integers"]),
        (["--shape", "4,80,48"], [">= 8"]),
        (["--shape", "1000,1000,1000"], ["too large"]),
        (["--cases", "0"], ["--cases 0", ">= 1"]),
        (["--cases", "-3"], ["--cases -3"]),
        (["--cases", "many"], ["--cases", "not a valid integer"]),
        (["--seed", "-1"], ["--seed"]),
        (["--layout", "bids"], ["--layout", "bids"]),
        (["--bogus"], ["--bogus"]),
    ],
)
def test_bad_arguments_are_one_line(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    result = run([str(tmp_path / "new"), *args])
    assert_user_error(result, *needles)
    assert not (tmp_path / "new").exists()


def test_missing_out_dir_argument() -> None:
    assert_user_error(run([]), "OUT_DIR")


def test_refuses_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    assert_user_error(run([str(tmp_path), "-n", "1", "--shape", SMALL]), "not empty",
                      str(tmp_path))
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_refuses_our_folder_with_foreign_files(tmp_path: Path) -> None:
    assert run([str(tmp_path), "-n", "1", "--shape", SMALL]).exit_code == 0
    (tmp_path / "notes.txt").write_text("mine")
    assert_user_error(run([str(tmp_path), "-n", "1", "--shape", SMALL]), "notes.txt")
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "Site1").exists()


def test_out_dir_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    assert_user_error(run([str(f)]), "not a folder")


def test_help_still_works() -> None:
    result = run(["--help"])
    assert result.exit_code == 0 and "--layout" in result.output


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("DUNET_DEBUG", None)
    return env


def test_real_subprocess_success_and_error(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "dunet_deploy.cli.synth", str(tmp_path / "d"), "--cases", "2",
         "--layout", "pairs", "--shape", SMALL],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "wrote 2 case(s)" in ok.stdout
    assert (tmp_path / "d" / "imagesTr" / "case_000.nii.gz").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "dunet_deploy.cli.synth", str(tmp_path / "e"), "--shape", "1,2"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr and bad.stdout == ""


# ------------------------------------------------------- cli/_common.py
def _toy(exc: BaseException | None):
    @click.command(cls=DunetCommand)
    @click.option("--n", type=int, default=1)
    @handle_errors
    def toy(n: int) -> None:
        """Toy command."""
        if exc is not None:
            raise exc
        click.echo(f"ok {n}")

    return toy


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (DunetError("case 7: broken\nsecond line"), "error: case 7: broken second line"),
        (FileNotFoundError(2, "No such file or directory", "/x/y.nii"),
         "error: /x/y.nii: No such file or directory"),
        (PermissionError("denied"), "error: denied (PermissionError)"),
    ],
)
def test_handle_errors_one_line_exit_2(exc: BaseException, expected: str) -> None:
    result = CliRunner().invoke(_toy(exc), [])
    assert result.exit_code == 2
    assert result.stderr == expected + "\n"


@pytest.mark.parametrize("bug", [KeyError("bug"), ValueError("bad value"), TypeError("t")])
def test_handle_errors_lets_bugs_through_and_success_alone(bug: Exception) -> None:
    # Only our own errors and file-system errors are user errors: a bug keeps its traceback.
    result = CliRunner().invoke(_toy(bug), [])
    assert result.exit_code == 1 and result.exception is bug
    ok = CliRunner().invoke(_toy(None), ["--n", "5"])
    assert ok.exit_code == 0 and ok.stdout == "ok 5\n"
    usage = CliRunner().invoke(_toy(None), ["--n", "x"])
    assert usage.exit_code == 2 and usage.stderr.count("\n") == 1
    assert usage.stderr.startswith("error: ") and "--n" in usage.stderr


def test_debug_env_reraises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUNET_DEBUG", "1")
    result = CliRunner().invoke(_toy(DunetError("boom")), [])
    assert isinstance(result.exception, DunetError)


def test_mni152_anatomy_dataset(tmp_path: Path) -> None:
    """--anatomy mni152: warped MNI152 heads (not ellipsoids) with lesions, on the MNI box."""
    pytest.importorskip("nilearn")
    import nibabel as nib
    import numpy as np

    from dunet_deploy.cli.synth import main as synth_main

    out = tmp_path / "mni"
    result = CliRunner().invoke(synth_main, [str(out), "--cases", "2", "--anatomy", "mni152",
                                             "--shape", "50,59,48", "--layout", "pairs"])
    assert result.exit_code == 0, result.output
    img = nib.load(str(out / "imagesTr" / "case_000.nii.gz"))
    mask = np.asarray(nib.load(str(out / "labelsTr" / "case_000.nii.gz")).dataobj)
    assert img.shape == (50, 59, 48) and mask.any()
    data = np.asarray(img.dataobj, dtype=np.float32)
    # A brain is not left-right symmetric to the voxel, unlike an ellipsoid, but nearly so.
    assert 0.5 < np.corrcoef(data.ravel(), data[::-1].ravel())[0, 1] < 0.99
    lo = img.affine @ [0, 0, 0, 1]
    assert np.allclose(lo[:3], [-98.0 + 1.47, -134.0 + 1.47, -72.0 + 1.47], atol=0.1)
