"""Issue 13 item 4: every file of a train / eval / export / infer run follows the umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")


def _cli(name: str, *args: object, umask: int, cwd: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", f"dunet_deploy.cli.{name}", *[str(a) for a in args]],
        capture_output=True, text=True, cwd=cwd, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, f"dunet-{name}: {proc.stderr}"


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
            for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_modes_the_umask_gives(tmp_path, umask):
    _cli("synth", "data", "--cases", "4", "--shape", "32,40,16", umask=umask, cwd=tmp_path)
    _cli("train", "--data", "data", "--out", "run", "--model", "unet2d", "--base-filters", "4",
         "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
         "--no-progress", umask=umask, cwd=tmp_path)
    _cli("eval", "--checkpoint", "run/best.pt", "--data", "data", "--out", "eval",
         "--device", "cpu", umask=umask, cwd=tmp_path)
    _cli("export", "run/best.pt", "-o", "export", umask=umask, cwd=tmp_path)
    scan = next((tmp_path / "data").rglob("*_t1w_deface_stx.nii.gz"))
    _cli("infer", "--engine", "export/model.onnx", scan, "-o", "masks", "--save-prob",
         "--backend", "onnxruntime", umask=umask, cwd=tmp_path)

    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    wrong = {}
    for out in ("run", "eval", "export", "masks"):
        for rel, mode in _modes(tmp_path / out).items():
            is_dir = (tmp_path / out / rel).is_dir()
            if mode != (want_dir if is_dir else want_file):
                wrong[f"{out}/{rel}"] = oct(mode)
    assert wrong == {}
    names = {p.name for p in tmp_path.rglob("*")}
    assert {"best.pt", "last.pt", "run.json", "summary.json", "cases.csv", "dsc_boxplot.png",
            "model.onnx", "model.json"} <= names
