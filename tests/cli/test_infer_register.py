"""``dunet-infer --register``: a native-space scan registered to the model's template and back.

The model is a real ONNX graph whose answer depends on WHERE a voxel is on the
model's grid: tissue inside one in-plane quadrant of the model's slices. Its
mask on a native scan therefore matches its mask on the registered head
(carried over by the KNOWN motion) only when the scan was registered to the
template; placed by its own affine (``--register never``) the quadrant cuts
the brain elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("SimpleITK")
pytest.importorskip("nilearn")
torch = pytest.importorskip("torch")

from dunet_deploy.artifacts import ArtifactInfo  # noqa: E402
from dunet_deploy.cli.infer import main  # noqa: E402
from dunet_deploy.data import anatomy as A  # noqa: E402
from dunet_deploy.data.registration import (  # noqa: E402
    TEMPLATE_FILE,
    Template,
    build_template,
)
from dunet_deploy.spec import PreprocessSpec  # noqa: E402

SHAPE = (99, 117, 95)  # the MNI box at 2 mm
MOTION = A.Motion(rotation_deg=(12.0, -6.0, 8.0), shift_mm=(14.0, -9.0, 6.0),
                  scale=(1.07, 1.04, 1.06))


class _QuadrantHead(torch.nn.Module):
    """Tissue (smoothed: mean of the slab, 7x7 in-plane) inside one in-plane quadrant.

    Smoothing and a threshold well away from the tissue intensities make the
    mask a blob that interpolation and intensity normalisation hardly move, so
    its agreement measures the registration.
    """

    def __init__(self, spec: PreprocessSpec) -> None:
        super().__init__()
        s = spec.image_size
        window = torch.zeros(1, 1, s, s)
        window[..., : s // 2, : s // 2] = 1.0
        self.register_buffer("window", window)
        self.centre = list(spec.slab_offsets).index(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.nn.functional.avg_pool2d(x.mean(dim=1, keepdim=True), 7, stride=1,
                                           padding=3, count_include_pad=False)
        return torch.sigmoid(8.0 * (c + 1.5)) * self.window


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _dsc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from dunet_deploy.export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("register")
    grid = A.mni152_grid(SHAPE)
    zooms = tuple(float(z) for z in np.sqrt((grid[:3, :3] ** 2).sum(axis=0)))
    spec = PreprocessSpec.for_geometry(SHAPE, orientation=("R", "A", "S"), voxel_size=zooms,
                                       grid_affine=grid)
    train = [A.synthesize_anatomy_case(300 + i, shape=SHAPE) for i in range(3)]
    template = build_template([(img, aff) for img, _m, aff in train], spec, grid=(SHAPE, grid))
    model = root / "model" / "model.onnx"
    model.parent.mkdir()
    template.save(model.parent / TEMPLATE_FILE)
    info = ArtifactInfo(spec=spec, model_name="quadrant-head", model_args={}, params=0,
                        template=template.describe())
    export_onnx(_QuadrantHead(spec), spec, model, info=info)

    head, _mask, aff = A.synthesize_anatomy_case(7, shape=SHAPE, warp_mm=0.0)
    scan = A.native_scan(head, aff, MOTION, layout="sagittal", voxel_mm=2.0)
    scans = root / "scans"
    scans.mkdir()
    _save(scans / "native.nii.gz", scan.data, scan.affine)
    _save(scans / "registered.nii.gz", np.round(head * 3).astype(np.int16), aff)
    return {"root": root, "model": model, "scans": scans, "head": head, "affine": aff,
            "scan": scan}


def _infer(setup: dict, out: str, *args: str) -> tuple[int, str, dict]:
    result = CliRunner().invoke(main, ["--engine", str(setup["model"]), str(setup["scans"]),
                                       "-o", str(setup["root"] / out), "--workers", "0", "-q",
                                       *args], catch_exceptions=False)
    summary = json.loads((setup["root"] / out / "summary.json").read_text())
    return result.exit_code, result.output, summary


def _carried_truth(setup: dict, out: str) -> np.ndarray:
    """The registered head's mask carried onto the native grid by the known motion."""
    mask = np.asarray(nib.load(str(setup["root"] / out / "registered_mask.nii.gz")).dataobj)
    return A.native_scan(setup["head"], setup["affine"], MOTION, mask=mask, layout="sagittal",
                         voxel_mm=2.0).mask


@pytest.mark.slow
def test_auto_registers_the_native_scan_only_and_its_mask_follows_the_motion(setup):
    code, output, summary = _infer(setup, "auto")
    assert code == 0, output
    cases = {Path(c["input"]).name: c for c in summary["cases"]}
    native, registered = cases["native.nii.gz"], cases["registered.nii.gz"]
    assert summary["inference"]["register"] == "auto"
    assert summary["inference"]["source"]["register"] == "model"
    # auto: the native scan is registered, the registered head is not (no false alarm).
    reg = native["registration"]
    assert reg["done"] and reg["method"] == "affine"
    assert reg["similarity_after"] > reg["similarity_before"]
    assert not registered["registration"]["done"] and registered["registration"]["checked"]
    # world_to_template is the inverse of the known motion (within ~2 mm over the head).
    w2t = np.asarray(reg["world_to_template"])
    pts = np.array([[x, y, z, 1.0] for x in (-50, 50) for y in (-80, 40) for z in (-30, 60)]).T
    err = np.linalg.norm((w2t @ MOTION.matrix() @ pts - pts)[:3], axis=0)
    assert err.max() < 4.0, err
    # The mask keeps the native scan's grid and header, and follows the motion.
    img = nib.load(str(setup["root"] / "auto" / "native_mask.nii.gz"))
    assert img.shape == setup["scan"].data.shape
    np.testing.assert_allclose(img.affine, setup["scan"].affine, atol=1e-4)
    mask = np.asarray(img.dataobj)
    truth = _carried_truth(setup, "auto")
    assert truth.sum() > 1000 and _dsc(mask, truth) >= 0.9


@pytest.mark.slow
def test_never_warns_and_its_mask_does_not_follow_the_motion(setup):
    code, output, summary = _infer(setup, "never", "--register", "never")
    assert code == 0, output
    native = {Path(c["input"]).name: c for c in summary["cases"]}["native.nii.gz"]
    assert not native["registration"]["done"]
    assert any("does not look registered" in w for w in native["warnings"])
    assert "warning:" in output and "does not look registered" in output
    assert summary["inference"]["source"]["register"] == "argument"
    mask = np.asarray(nib.load(str(setup["root"] / "never" / "native_mask.nii.gz")).dataobj)
    assert mask.shape == setup["scan"].data.shape
    assert _dsc(mask, _carried_truth(setup, "never")) < 0.8  # the model is position-dependent


@pytest.mark.slow
def test_workers_register_too_and_bias_correct_and_preview(setup):
    """The stage runs in the worker processes; --bias-correct (N4) runs before it."""
    pytest.importorskip("matplotlib")
    code, output, summary = _infer(setup, "workers", "--workers", "1", "--bias-correct",
                                   "--preview")
    assert code == 0, output
    # --preview: the template's outline over the registered scan, for registered cases only.
    out = setup["root"] / "workers"
    assert (out / "native_registration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "registered_registration.png").exists()
    cases = {Path(c["input"]).name: c for c in summary["cases"]}
    reg = cases["native.nii.gz"]["registration"]
    assert reg["done"] and reg["bias_corrected"] and reg["bias_correct_seconds"] > 0
    assert not cases["registered.nii.gz"]["registration"]["done"]
    assert summary["inference"]["bias_correct"] is True
    mask = np.asarray(nib.load(str(setup["root"] / "workers" / "native_mask.nii.gz")).dataobj)
    assert _dsc(mask, _carried_truth(setup, "workers")) >= 0.9


def test_a_scan_that_does_not_register_fails_alone_with_the_numbers(setup, tmp_path):
    """Non-convergence is a per-case error with both similarities, never a silent mask."""
    upside_down = setup["scan"].data[:, ::-1, :]  # PIR: axis 1 is inferior-superior
    scans = tmp_path / "scans"
    scans.mkdir()
    _save(scans / "flipped.nii.gz", np.ascontiguousarray(upside_down), setup["scan"].affine)
    _save(scans / "registered.nii.gz", np.round(setup["head"] * 3).astype(np.int16),
          setup["affine"])
    result = CliRunner().invoke(main, ["--engine", str(setup["model"]), str(scans), "-o",
                                       str(tmp_path / "out"), "--workers", "0", "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 1, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("error:"))
    assert "flipped.nii.gz" in line and "registration did not converge" in line
    assert "similarity" in line and "floor" in line
    assert not (tmp_path / "out" / "flipped_mask.nii.gz").exists()
    assert (tmp_path / "out" / "registered_mask.nii.gz").exists()
    # The summary records the failed registration with its numbers, not null.
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    case = {Path(c["input"]).name: c for c in summary["cases"]}["flipped.nii.gz"]
    assert case["status"] == "error"
    reg = case["registration"]
    assert reg["done"] is False and reg["method"] == "affine" and reg["checked"] is True
    assert reg["mode"] == "auto" and reg["bias_corrected"] is False and reg["seconds"] > 0
    template = Template.load(setup["model"].parent / TEMPLATE_FILE)
    assert reg["floor"] == pytest.approx(template.floor, abs=1e-4)
    assert reg["similarity_after"] < reg["floor"]
    for key in ("similarity_before", "similarity_after", "floor"):
        assert f"{reg[key]:.3f}" in line, (key, line)


def test_resample_never_refuses_a_native_scan_and_records_the_check(setup, tmp_path):
    result = CliRunner().invoke(main, ["--engine", str(setup["model"]),
                                       str(setup["scans"] / "native.nii.gz"), "-o",
                                       str(tmp_path / "out"), "--workers", "0", "-q",
                                       "--resample", "never"], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "forbids registering it" in result.output
    (case,) = json.loads((tmp_path / "out" / "summary.json").read_text())["cases"]
    reg = case["registration"]
    assert case["status"] == "error" and reg["done"] is False and reg["checked"] is True
    assert reg["similarity_before"] < reg["floor"]


def _biased(data: np.ndarray, across_x: float, across_y: float) -> np.ndarray:
    """``data`` times a smooth bias field: e^(+-across_x) across axis 0, e^(+-across_y) axis 1."""
    x = np.linspace(-1.0, 1.0, data.shape[0])[:, None, None]
    y = np.linspace(-1.0, 1.0, data.shape[1])[None, :, None]
    return np.round(data * np.exp(across_x * x + across_y * y)).astype(np.int16)


def test_a_registration_below_the_training_range_warns_with_both_numbers(setup, tmp_path):
    """Above the failure floor but below the training range: the mask, and a warning.

    The bias field (e^+-0.5 across x, e^+-0.35 across y, no --bias-correct) leaves the
    native scan registering to a similarity about midway between the floor (range
    minimum - 0.08) and the training range's minimum.
    """
    scans = tmp_path / "scans"
    scans.mkdir()
    _save(scans / "biased.nii.gz", _biased(setup["scan"].data, 0.5, 0.35), setup["scan"].affine)
    result = CliRunner().invoke(main, ["--engine", str(setup["model"]), str(scans), "-o",
                                       str(tmp_path / "out"), "--workers", "0", "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "biased_mask.nii.gz").exists()
    (case,) = json.loads((tmp_path / "out" / "summary.json").read_text())["cases"]
    reg = case["registration"]
    assert case["status"] == "ok" and reg["done"] and reg["method"] == "affine"
    template = Template.load(setup["model"].parent / TEMPLATE_FILE)
    low = template.range[0]
    after = reg["similarity_after"]
    # Clearly inside the band, not at one of its edges.
    assert template.floor + 0.02 < after < low - 0.02, (template.floor, after, low)
    (warning,) = [w for w in case["warnings"] if "below the training range" in w]
    assert reg["warnings"] == [warning]
    assert f"{after:.3f}" in warning and f"{low:.3f}" in warning
    assert f"{template.floor:.3f}" in warning
    assert "--bias-correct" in warning and "--preview" in warning
    line = next(x for x in result.output.splitlines() if "below the training range" in x)
    assert line.startswith("warning:") and "biased.nii.gz" in line and f"{after:.3f}" in line


def test_always_without_a_template_names_the_flag_that_provides_one(setup, tmp_path):
    import dataclasses

    import onnx

    from dunet_deploy.artifacts import read_artifact_info
    from dunet_deploy.export.onnx_export import set_metadata

    bare = tmp_path / "bare" / "model.onnx"
    bare.parent.mkdir()
    proto = onnx.load(str(setup["model"]))
    set_metadata(proto, dataclasses.replace(read_artifact_info(setup["model"]), template=None))
    onnx.save(proto, str(bare))
    result = CliRunner().invoke(main, ["--engine", str(bare), str(setup["scans"]), "-o",
                                       str(tmp_path / "out"), "--register", "always"])
    assert result.exit_code == 2
    assert "dunet-export --template FILE" in result.output and "Traceback" not in result.output
    # auto without a template: segmented as before, the summary says the scan was not checked.
    result = CliRunner().invoke(main, ["--engine", str(bare),
                                       str(setup["scans"] / "registered.nii.gz"), "-o",
                                       str(tmp_path / "auto"), "-q", "--workers", "0"])
    assert result.exit_code == 0, result.output
    case = json.loads((tmp_path / "auto" / "summary.json").read_text())["cases"][0]
    assert case["registration"]["checked"] is False
    assert "dunet-export --template" in case["registration"]["reason"]


@pytest.mark.slow
def test_dunet_eval_registers_native_scans_too(setup, tmp_path):
    """dunet-eval --engine scores native scans in their own space, registered like dunet-infer."""
    import csv
    import shutil

    from dunet_deploy.cli.eval import main as eval_main

    code, output, _ = _infer(setup, "eval_ref")
    assert code == 0, output
    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    shutil.copyfile(setup["scans"] / "native.nii.gz", data / "imagesTr" / "native.nii.gz")
    _save(data / "labelsTr" / "native.nii.gz", _carried_truth(setup, "eval_ref"),
          setup["scan"].affine)
    scores = {}
    for mode in ("auto", "never"):
        result = CliRunner().invoke(eval_main, ["--engine", str(setup["model"]), "--data",
                                                str(data), "--out", str(tmp_path / mode),
                                                "--register", mode, "--no-boxplot"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        with open(tmp_path / mode / "cases.csv", newline="") as f:
            scores[mode] = float(next(csv.DictReader(f))["dsc"])
    assert scores["auto"] >= 0.9 and scores["never"] < 0.8, scores


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "python"])
def test_dunet_volume_registers_with_the_template_the_repository_carries(setup, tmp_path,
                                                                        backend):
    """Server-side (``dunet_volume``): the template copied beside the network's model file
    registers the native scan; the mask equals dunet-infer's, the record comes back."""
    from dunet_deploy.artifacts import read_artifact_info
    from dunet_deploy.export.triton_repo import (
        read_config,
        write_triton_repo,
        write_volume_model,
    )
    from dunet_deploy.runtime.base import open_runner
    from dunet_deploy.runtime.options import InferenceOptions
    from dunet_deploy.serving.volume_model import TritonPythonModel, request_options
    from dunet_deploy.serving.volume_model import segment_nifti_bytes as segment

    info = read_artifact_info(setup["model"])
    repo = tmp_path / "repo"
    write_triton_repo(repo, setup["model"], info, backend=backend, max_batch_size=8)
    assert (repo / "dunet" / "1" / TEMPLATE_FILE).is_file()
    volume_dir = write_volume_model(repo, info, batch_size=8)
    params, _ = read_config(volume_dir / "config.pbtxt")
    served = TritonPythonModel()
    served.initialize({"model_repository": str(volume_dir), "model_config": json.dumps(
        {"name": "dunet_volume", "parameters": {k: {"string_value": v}
                                                for k, v in params.items()}})})
    assert served.model_file == repo / "dunet" / "1" / "model.onnx"

    code, output, _ = _infer(setup, "served_ref")
    assert code == 0, output
    native = setup["scans"] / "native.nii.gz"
    with open_runner(setup["model"], "onnxruntime", threads=1) as runner:
        for mode in ("auto", "never"):
            sent = json.dumps({"dunet_options": json.dumps(
                InferenceOptions(register=mode).to_dict())})
            blob, doc = segment(native.read_bytes(), native.name, served.settings,
                                runner.infer, request_options(sent, native.name), 8,
                                served.model_file)
            (tmp_path / f"{mode}.nii.gz").write_bytes(blob)
            mask = np.asarray(nib.load(str(tmp_path / f"{mode}.nii.gz")).dataobj)
            assert doc["inference"]["register"] == mode
            if mode == "auto":
                assert doc["registration"]["done"] and doc["registration"]["method"] == "affine"
                local = np.asarray(nib.load(str(setup["root"] / "served_ref" /
                                                "native_mask.nii.gz")).dataobj)
                assert np.array_equal(mask, local)
            else:
                assert not doc["registration"]["done"]
                assert any("does not look registered" in w for w in doc["warnings"])
                assert _dsc(mask, _carried_truth(setup, "served_ref")) < 0.8
