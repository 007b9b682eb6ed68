"""dunet_deploy.Segmenter: the in-process API over the one inference core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import runtime_testutils as rt

from dunet_deploy.data.nifti import load_nifti
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime import base
from dunet_deploy.runtime.segmenter import Segmenter

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("seg") / "model.onnx"
    torch_model = rt.export_tiny_onnx(path, seed=3)
    return path, torch_model


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    return rt.write_volume(tmp_path_factory.mktemp("scan") / "case_000.nii.gz", seed=5,
                           zooms=(1.0, 1.2, 0.9))


def test_import_is_lazy_and_torch_free():
    code = ("import sys\nfrom dunet_deploy import Segmenter, Prediction\n"
            "assert Segmenter.__name__ == 'Segmenter' and Prediction.__name__ == 'Prediction'\n"
            "bad = {'torch', 'onnxruntime', 'openvino', 'tensorrt'} & set(sys.modules)\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_predict_path_image_and_array_agree_with_torch(model, scan):
    path, torch_model = model
    ref_prob, ref_mask = rt.torch_reference(torch_model, scan, rt.tiny_spec())
    assert ref_mask.any(), "the fixture model should segment something"
    img = nib.load(str(scan))
    with Segmenter(path, backend="onnxruntime") as seg:
        by_path = seg.predict(scan)
        by_image = seg.predict(img)
        by_array = seg.predict(img.get_fdata(dtype=np.float32), affine=img.affine)
        assert seg.describe()["backend"] == "onnxruntime"
    for pred in (by_path, by_image, by_array):
        assert pred.mask.dtype == np.uint8 and pred.prob.dtype == np.float32
        assert pred.shape == rt.SHAPE
        np.testing.assert_array_equal(pred.affine, img.affine)
        rt.assert_masks_match(pred.mask, ref_mask, ref_prob)
        np.testing.assert_allclose(pred.prob, ref_prob, atol=1e-4)
        assert pred.lesion_voxels == int(pred.mask.sum())
        assert pred.lesion_volume_mm3 == pytest.approx(pred.lesion_voxels * 1.0 * 1.2 * 0.9)
        assert pred.slabs_run + pred.slabs_skipped == rt.SHAPE[2]
        assert set(pred.times) >= {"read", "preprocess", "infer", "postprocess"}
    np.testing.assert_array_equal(by_path.mask, by_array.mask)
    assert by_path.header is not None and by_array.header is None


def test_model_is_loaded_once(model, scan, monkeypatch):
    calls = []
    real = base.open_runner

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr("dunet_deploy.runtime.segmenter.open_runner", counting)
    seg = Segmenter(model[0], backend="onnxruntime", lazy=True)
    assert calls == []  # constructing reads metadata only
    with seg:
        for _ in range(3):
            seg.predict(scan)
    assert len(calls) == 1
    assert seg.spec.digest() == rt.tiny_spec().digest()


def test_save_writes_both_files_or_neither(model, scan, tmp_path):
    with Segmenter(model[0], backend="onnxruntime") as seg:
        pred = seg.predict(scan)
    mask, prob = tmp_path / "new" / "m_mask.nii.gz", tmp_path / "new" / "m_prob.nii.gz"
    assert pred.save(mask, prob=prob) == [mask, prob]
    rt.assert_same_geometry(mask, scan)
    rt.assert_same_geometry(prob, scan)
    np.testing.assert_array_equal(np.asarray(nib.load(str(mask)).dataobj), pred.mask)
    np.testing.assert_allclose(np.asarray(nib.load(str(prob)).dataobj), pred.prob)
    assert pred.times["write"] > 0
    lone = tmp_path / "lone_mask.nii.gz"
    with pytest.raises(DunetError, match="must end in .nii"):
        pred.save(lone, prob=tmp_path / "lone_prob.txt")
    assert not lone.exists() and not list(tmp_path.glob(".*tmp*"))


def test_predict_files_matches_dunet_infer(model, scan, tmp_path):
    with Segmenter(model[0], backend="onnxruntime", batch_size=5) as seg:
        summary = seg.predict_files([scan, tmp_path / "missing.nii.gz"], tmp_path / "api",
                                    save_prob=True)
        single = seg.predict(scan)
    assert (summary["ok"], summary["failed"], summary["batch_size"]) == (1, 1, 5)
    assert json.loads((tmp_path / "api" / "summary.json").read_text()) == summary
    case = summary["cases"][0]
    assert case["lesion_voxels"] == single.lesion_voxels
    assert "missing.nii.gz: no such file" in summary["cases"][1]["message"]
    cli = subprocess.run([sys.executable, "-m", "dunet_deploy.cli.infer", "--engine",
                          str(model[0]), str(scan), "-o", str(tmp_path / "cli"),
                          "--backend", "onnxruntime", "--batch-size", "5", "-q"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    api_mask = load_nifti(tmp_path / "api" / "case_000_mask.nii.gz").data
    cli_mask = load_nifti(tmp_path / "cli" / "case_000_mask.nii.gz").data
    np.testing.assert_array_equal(api_mask, cli_mask)
    np.testing.assert_array_equal(api_mask, single.mask)


def test_blank_volume_gives_an_empty_mask(model, tmp_path):
    blank = rt.write_volume(tmp_path / "blank.nii.gz", data=np.zeros(rt.SHAPE, np.float32))
    with Segmenter(model[0], backend="onnxruntime") as seg:
        pred = seg.predict(blank)
        summary = seg.predict_files([blank], tmp_path / "out")
    assert pred.lesion_voxels == 0 and pred.lesion_volume_mm3 == 0.0
    assert pred.slabs_run == 0 and pred.slabs_skipped == rt.SHAPE[2]
    assert not pred.prob.any() and pred.shape == rt.SHAPE
    assert summary["ok"] == 1 and summary["cases"][0]["lesion_voxels"] == 0


def test_bad_inputs_are_one_line_errors(model, scan, tmp_path):
    with pytest.raises(DunetError, match="model file not found|no such file"):
        Segmenter(tmp_path / "nope.onnx")
    with pytest.raises(DunetError, match="batch_size 0: must be >= 1"):
        Segmenter(model[0], batch_size=0)
    with Segmenter(model[0], backend="onnxruntime", lazy=True) as seg:
        with pytest.raises(DunetError, match="affine= is only for array inputs"):
            seg.predict(scan, affine=np.eye(4))
        with pytest.raises(DunetError, match="expected a 3D volume"):
            seg.predict(np.zeros((4, 4), np.float32))
        with pytest.raises(DunetError, match="NaN or Inf"):
            seg.predict(np.full(rt.SHAPE, np.nan, np.float32))
        with pytest.raises(DunetError, match="4x4"):
            seg.predict(np.zeros(rt.SHAPE, np.float32), affine=np.eye(3))
        with pytest.raises(DunetError, match="does not match|shape"):
            seg.predict(np.zeros((10, 10, 10), np.float32))


def test_array_without_affine_is_taken_on_the_models_grid(model, scan):
    from dunet_deploy.data.geometry import plan_model_space
    from dunet_deploy.runtime.core import predict_volume

    vol = load_nifti(scan)
    with Segmenter(model[0], backend="onnxruntime") as seg:
        space = plan_model_space(vol.shape, vol.affine, seg.spec)
        on_grid = np.ascontiguousarray(space.to_model(vol.data), dtype=np.float32)
        pred = seg.predict(on_grid)  # no affine: as core.to_network(affine=None) takes it
        prob = predict_volume(on_grid, seg.spec, seg.predictor(), affine=None)
    assert pred.shape == on_grid.shape and pred.geometry is None
    np.testing.assert_array_equal(pred.affine, np.eye(4))
    np.testing.assert_allclose(pred.prob, prob, atol=1e-6)
    assert pred.lesion_voxels > 0


def test_python_api_edges_are_one_line_errors(model, scan, tmp_path):
    with pytest.raises(DunetError, match="^backend 'foo': choose one of"):
        Segmenter(model[0], backend="foo")  # at construction, before any load
    with pytest.raises(DunetError, match="unknown option"):
        Segmenter(model[0], batchsize=2)
    with Segmenter(model[0], backend="onnxruntime") as seg:
        with pytest.raises(DunetError, match="bytes path"):
            seg.predict(str(scan).encode())
        singular = np.diag([1.0, 0.0, 1.0, 1.0])
        with pytest.raises(DunetError, match="affine is singular"):
            seg.predict(np.zeros(rt.SHAPE, np.float32), affine=singular)
        with pytest.raises(DunetError, match="fixed when the Segmenter is created"):
            seg.predict_files([scan], tmp_path / "x", backend="openvino")
    with pytest.raises(DunetError, match="Segmenter is closed"):
        seg.predict(scan)  # after the with block: no silent reload
    with pytest.raises(DunetError, match="Segmenter is closed"):
        seg.predict_files([scan], tmp_path / "closed")
    assert not (tmp_path / "closed").exists()


def test_predict_files_takes_one_string_as_one_input(model, scan, tmp_path):
    folder = tmp_path / "scans" / "imagesTr"
    folder.mkdir(parents=True)
    (folder / "case_000.nii.gz").write_bytes(scan.read_bytes())
    with Segmenter(model[0], backend="onnxruntime") as seg:
        summary = seg.predict_files(str(folder), tmp_path / "out")
        nested = seg.predict_files(str(tmp_path / "scans"), tmp_path / "rec", recursive=True,
                                   save_prob=True)
    assert (summary["total"], summary["ok"]) == (1, 1)
    assert (nested["total"], nested["ok"]) == (1, 1)
    assert nested["options"]["recursive"] is True and nested["options"]["save_prob"] is True
    assert (tmp_path / "rec" / "case_000_prob.nii.gz").is_file()


def test_more_python_api_edges_are_one_line_errors(model, scan, tmp_path):
    """Issue 19 items 5 and 9 on the other entry points: predict_files, nibabel images, files."""
    folder = tmp_path / "my scans é"
    folder.mkdir()
    (folder / "case_000.nii.gz").write_bytes(scan.read_bytes())
    img = nib.load(str(scan))
    flat = nib.Nifti1Image(np.asanyarray(img.dataobj), None)
    flat.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)  # qform: none
    flat = nib.Nifti1Image(np.asanyarray(img.dataobj), flat.header.get_sform(), flat.header)
    nib.save(flat, str(tmp_path / "flat.nii.gz"))
    with Segmenter(model[0], backend="onnxruntime") as seg:
        for bad in (str(folder).encode(), [str(folder).encode()]):
            with pytest.raises(DunetError, match="bytes path|is not a path"):
                seg.predict_files(bad, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        with pytest.raises(DunetError, match="affine is singular"):
            seg.predict(flat)  # a nibabel image: no raw nibabel ValueError
        with pytest.raises(DunetError, match=r"^.*flat\.nii\.gz: .*affine"):
            seg.predict(tmp_path / "flat.nii.gz")
        summary = seg.predict_files(folder, tmp_path / "out")  # a Path: one input
    assert (summary["total"], summary["ok"]) == (1, 1)
