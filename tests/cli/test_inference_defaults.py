"""TTA and post-processing defaults: set at export, applied and reported by dunet-infer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import runtime_testutils as rt

from dunet_deploy.artifacts import read_artifact_info, read_sidecar
from dunet_deploy.data.nifti import load_nifti
from dunet_deploy.metrics import label_lesions

torch = pytest.importorskip("torch")


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from dunet_deploy.models import create_model
    from dunet_deploy.training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("defaults")
    torch.manual_seed(4)
    save_checkpoint(root / "tiny.pt", model=create_model("dunet", base_filters=8),
                    spec=rt.tiny_spec(), epoch=1, metrics={})
    run = _run("dunet_deploy.cli.export", root / "tiny.pt", "-o", root / "export",
               "--tta", "flip", "--min-lesion-mm3", "30", "--format", "onnx",
               "--format", "triton")
    assert run.returncode == 0, run.stderr
    scan = rt.write_volume(root / "case.nii.gz", seed=6)
    return root, root / "export" / "model.onnx", scan


def test_defaults_travel_in_every_artefact(exported):
    root, onnx_path, _ = exported
    for info in (read_artifact_info(onnx_path), read_sidecar(root / "export" / "model.json")):
        assert (info.inference.tta, info.inference.min_lesion_mm3) == ("flip", 30.0)
    config = (root / "export" / "triton" / "dunet" / "config.pbtxt").read_text()
    assert "dunet.inference.tta" in config and "flip" in config


def test_dunet_infer_applies_and_reports_them_and_flags_override(exported, tmp_path):
    _, onnx_path, scan = exported
    runs = {"model": (), "no_tta": ("--tta", "none"),
            "plain": ("--tta", "none", "--min-lesion-mm3", "0")}
    summaries = {}
    for name, extra in runs.items():
        out = tmp_path / name
        run = _run("dunet_deploy.cli.infer", "--engine", onnx_path, scan, "-o", out,
                   "--backend", "onnxruntime", "-q", "--save-prob", *extra)
        assert run.returncode == 0, run.stderr
        summaries[name] = json.loads((out / "summary.json").read_text())
    assert summaries["model"]["inference"] == {
        "tta": "flip", "min_lesion_mm3": 30.0, "resample": "auto", "register": "auto",
        "bias_correct": False,
        "source": {"tta": "model", "min_lesion_mm3": "model", "register": "model"}}
    assert summaries["no_tta"]["inference"]["source"] == {"tta": "argument",
                                                          "min_lesion_mm3": "model",
                                                          "register": "model"}
    assert summaries["plain"]["inference"]["source"] == {"tta": "argument",
                                                         "min_lesion_mm3": "argument",
                                                         "register": "model"}
    # The shipped minimum, by hand: the plain mask without its components under 30 mm3.
    plain = load_nifti(tmp_path / "plain" / "case_mask.nii.gz").data > 0
    labels, count = label_lesions(plain)
    sizes = np.bincount(labels.ravel(), minlength=count + 1) * float(np.prod(
        load_nifti(scan).zooms))
    small = np.flatnonzero(sizes < 30.0)
    small = small[small > 0]
    assert small.size > 0, "the fixture model should leave small components"
    expected = plain & ~np.isin(labels, small)
    got = load_nifti(tmp_path / "no_tta" / "case_mask.nii.gz").data > 0
    np.testing.assert_array_equal(got, expected)
    assert summaries["no_tta"]["cases"][0]["lesions_removed"] == small.size
    # TTA changes the probabilities (the mean with the mirror), not the geometry.
    p_flip = load_nifti(tmp_path / "model" / "case_prob.nii.gz").data
    p_plain = load_nifti(tmp_path / "plain" / "case_prob.nii.gz").data
    assert p_flip.shape == p_plain.shape and not np.allclose(p_flip, p_plain, atol=1e-3)
