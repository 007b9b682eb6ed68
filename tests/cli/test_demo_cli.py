"""``dunet-demo`` end to end on a tiny configuration (the real one is `make demo`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.slow


def test_demo_writes_every_artifact(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "dunet_deploy.cli.demo", "--out", str(out), "--cases", "4",
         "--epochs", "1", "--image-size", "32", "--base-filters", "16", "--threads", "2"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for key, path in report["artifacts"].items():
        assert Path(path).exists(), key
    mask_img = nib.load(report["artifacts"]["mask"])
    held = nib.load(report["artifacts"]["heldout"])
    assert mask_img.shape == held.shape and np.allclose(mask_img.affine, held.affine)
    assert np.asarray(mask_img.dataobj).dtype == np.uint8
    assert (out / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    assert report["export"]["max_abs_error"] <= 1e-4
    # The held-out DSC, recomputed by hand from the files the demo wrote.
    pred = np.asarray(mask_img.dataobj) > 0
    (truth_path,) = (out / "heldout" / "labelsTr").glob("*.nii.gz")
    truth = np.asarray(nib.load(str(truth_path)).dataobj) > 0
    tp, total = int((pred & truth).sum()), int(pred.sum() + truth.sum())
    assert report["heldout"]["dsc"] == pytest.approx(2 * tp / total if total else 0.0)
    # Training validation and dunet-eval of best.pt go through the same core: same numbers.
    assert report["train"]["val_dsc_best"] == report["eval_val"]["dsc_mean"]
    assert set(report["times_s"]) == {"synthesize", "train", "evaluate", "export", "infer",
                                      "overlay"}
    assert "held-out DSC" in proc.stdout and "## Artefacts" in (out / "report.md").read_text()


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    proc = subprocess.run(
        [sys.executable, "-m", "dunet_deploy.cli.demo", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "not written by dunet-demo" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
