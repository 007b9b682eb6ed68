"""``dunet-demo`` end to end on a tiny configuration (the real one is `make demo`).

The end-to-end run uses the default anatomy (mni152, the MNI box at 3 mm,
66×78×63) with a tiny network: about 16 s on 2 loaded EPYC cores, against
about 12.5 s for the same run on the 64×80×48 ellipsoid heads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dunet_deploy.data.anatomy import mni152_grid
from dunet_deploy.demo import DEMO_SHAPES, DemoConfig, _lesion_seed, _markdown
from dunet_deploy.errors import DunetError

pytest.importorskip("torch")

pytestmark = pytest.mark.slow


def test_demo_writes_every_artifact(tmp_path):
    pytest.importorskip("nilearn")
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "dunet_deploy.cli.demo", "--out", str(out), "--cases", "4",
         "--epochs", "1", "--image-size", "32", "--base-filters", "16", "--threads", "2"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    # The default anatomy is the MNI152 template, on the demo's 3 mm grid over the MNI box.
    assert report["anatomy"] == report["config"]["anatomy"] == "mni152"
    assert report["config"]["shape"] == list(DEMO_SHAPES["mni152"])
    assert "Anatomy: mni152" in (out / "report.md").read_text()
    for key, path in report["artifacts"].items():
        assert Path(path).exists(), key
    mask_img = nib.load(report["artifacts"]["mask"])
    held = nib.load(report["artifacts"]["heldout"])
    assert mask_img.shape == held.shape and np.allclose(mask_img.affine, held.affine)
    assert held.shape == DEMO_SHAPES["mni152"]
    assert np.allclose(held.affine, mni152_grid(DEMO_SHAPES["mni152"]), atol=1e-4)
    assert np.asarray(mask_img.dataobj).dtype == np.uint8
    assert (out / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    assert report["export"]["max_abs_error"] <= 1e-4
    # The held-out DSC, recomputed by hand from the files the demo wrote.
    pred = np.asarray(mask_img.dataobj) > 0
    (truth_path,) = (out / "heldout" / "labelsTr").glob("*.nii.gz")
    truth = np.asarray(nib.load(str(truth_path)).dataobj) > 0
    tp, total = int((pred & truth).sum()), int(pred.sum() + truth.sum())
    assert report["heldout"]["dsc"] == pytest.approx(2 * tp / total if total else 0.0)
    assert report["heldout"]["lesion_voxels_truth"] == int(truth.sum()) > 0
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


def test_demo_without_nilearn_asks_for_the_anatomy_extra(tmp_path, run_without):
    out = tmp_path / "demo"
    proc = run_without(("nilearn",), "demo", ["--out", str(out), "--cases", "4"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error:") and "nilearn" in line and "dunet-deploy[anatomy]" in line
    assert not out.exists()  # refused before anything was written


def test_demo_config_shape_follows_the_anatomy(tmp_path):
    assert DemoConfig(out=tmp_path).anatomy == "mni152"
    assert DemoConfig(out=tmp_path).shape == DEMO_SHAPES["mni152"] == (66, 78, 63)
    assert DemoConfig(out=tmp_path, anatomy="ellipsoid").shape == (64, 80, 48)
    assert DemoConfig(out=tmp_path, shape=(40, 48, 40)).volume_shape == (40, 48, 40)
    with pytest.raises(DunetError, match="anatomy 'mri'"):
        DemoConfig(out=tmp_path, anatomy="mri")


@pytest.mark.parametrize("anatomy", ["ellipsoid", "mni152"])
def test_heldout_seed_has_a_visible_lesion_in_that_anatomy(anatomy):
    shape = (40, 47, 38) if anatomy == "mni152" else (32, 40, 24)
    if anatomy == "mni152":
        pytest.importorskip("nilearn")
        from dunet_deploy.data.anatomy import synthesize_anatomy_case as make

        def lesion_mm3(seed: int) -> float:
            _, mask, affine = make(seed, shape)
            return float(mask.sum()) * abs(float(np.linalg.det(affine[:3, :3])))
    else:
        from dunet_deploy.data.synth import synthesize_case

        def lesion_mm3(seed: int) -> float:
            return float(synthesize_case(shape, seed=seed)[1].sum())  # 1 mm voxels

    seed = _lesion_seed(shape, 10_000, anatomy)
    assert lesion_mm3(seed) >= 200.0
    assert all(lesion_mm3(s) < 200.0 for s in range(10_000, seed))


def test_report_markdown_states_the_anatomy():
    demo = {
        "machine": {"cpu_model": "cpu", "cores": 2, "torch_threads": 2, "platform": "linux"},
        "config": {"shape": [66, 78, 63], "image_size": 64}, "anatomy": "mni152",
        "params": 1, "cases": 10, "times_s": {"train": 1.0},
        "train": {"epochs": 1, "best_epoch": 1, "val_dsc_first_epoch": 0.5, "val_dsc_best": 0.5},
        "eval_val": {"dsc_mean": 0.5, "dsc_std": 0.1, "dsc_global": 0.6, "recall_mean": 0.7,
                     "precision_mean": 0.8},
        "heldout": {"case": "c", "backend": "onnxruntime", "precision_run": "fp32", "dsc": 0.5,
                    "recall": 0.5, "precision": 0.5},
        "export": {"max_abs_error": 1e-6, "mask_agreement": 1.0}, "artifacts": {},
    }
    text = _markdown(demo)
    assert "66×78×63 voxels" in text
    assert "Anatomy: mni152 (the MNI152 2009a template" in text
    assert "Anatomy: ellipsoid (ellipsoid heads)" in _markdown({**demo, "anatomy": "ellipsoid"})
