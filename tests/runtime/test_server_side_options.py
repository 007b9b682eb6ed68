"""Server-side runs take the run's options (issue 18.5) without a tritonserver.

``dunet_volume``'s pipeline (``segment_nifti_bytes``) on a local ONNX Runtime runner
against the Segmenter with the same options; the request-parameter parser; and the
one-line refusals of ``dunet-infer`` for what a server cannot apply, which come before
any connection (the live tests are in test_triton_repository_live.py and
test_triton_records_live.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runtime_testutils import export_tiny_onnx, write_volume

from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.options import InferenceOptions


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("server_side_opts") / "model.onnx"
    export_tiny_onnx(path, seed=0)
    return path


@pytest.fixture(scope="module")
def spaced_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose spec has a training voxel size (1 mm): others are resampled."""
    import torch
    from runtime_testutils import SHAPE

    from dunet_deploy.export.onnx_export import export_onnx
    from dunet_deploy.models import create_model
    from dunet_deploy.spec import PreprocessSpec

    path = tmp_path_factory.mktemp("server_side_spaced") / "model.onnx"
    torch.manual_seed(0)
    spec = PreprocessSpec.for_geometry(SHAPE, image_size=32, orientation=("R", "A", "S"),
                                       voxel_size=(1.0, 1.0, 1.0))
    export_onnx(create_model("dunet", base_filters=8).eval(), spec, path)
    return path


def _settings(model: Path, root: Path):
    from dunet_deploy.artifacts import read_artifact_info
    from dunet_deploy.export.triton_repo import read_config, write_volume_model
    from dunet_deploy.serving.volume_model import VolumeSettings

    vol = write_volume_model(root, read_artifact_info(model), batch_size=8)
    return VolumeSettings.from_parameters(read_config(vol / "config.pbtxt")[0], "dunet_volume")


@pytest.mark.parametrize("changes", [{}, {"tta": "flip"}, {"min_lesion_mm3": 1e5},
                                     {"batch_size": 3}])
def test_volume_pipeline_applies_the_requested_options(model: Path, tmp_path: Path,
                                                       changes: dict) -> None:
    from dunet_deploy.runtime.base import open_runner
    from dunet_deploy.runtime.segmenter import Segmenter
    from dunet_deploy.serving.volume_model import request_options, segment_nifti_bytes

    scan = write_volume(tmp_path / "case0.nii.gz", seed=0)
    options = InferenceOptions(backend="onnxruntime", **changes)
    params = json.dumps({"dunet_options": json.dumps(options.replace(backend="auto").to_dict())})
    sent = request_options(params, scan.name)
    assert sent == options.replace(backend="auto")
    calls: list[int] = []
    with open_runner(model, "onnxruntime", threads=1) as runner:
        def predict(slabs: np.ndarray) -> np.ndarray:
            calls.append(len(slabs))
            return runner.infer(slabs)

        blob, doc = segment_nifti_bytes(scan.read_bytes(), scan.name, _settings(model, tmp_path),
                                        predict, sent, max_batch=16)
    with Segmenter(model, options, threads=1) as seg:
        ref = seg.predict(str(scan))
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(blob)
    assert np.array_equal(np.asarray(nib.load(out).dataobj), ref.mask)
    assert doc["lesion_voxels"] == ref.lesion_voxels
    assert doc["inference"]["tta"] == changes.get("tta", "none")
    assert doc["inference"]["source"]["tta"] == ("argument" if "tta" in changes else "model")
    assert doc["batch_size"] == changes.get("batch_size", 16) and max(calls) <= doc["batch_size"]
    if "min_lesion_mm3" in changes:  # the whole (single, huge) component goes
        assert doc["lesion_voxels"] == 0 and doc["lesions_removed"] == 1
    else:
        assert doc["lesion_voxels"] > 0


def test_volume_pipeline_resample_never_refuses_like_a_local_run(spaced_model: Path,
                                                                  tmp_path: Path) -> None:
    from dunet_deploy.runtime.segmenter import Segmenter
    from dunet_deploy.serving.volume_model import segment_nifti_bytes

    scan = write_volume(tmp_path / "coarse.nii.gz", seed=1, zooms=(1.5, 1.0, 1.0))
    model = spaced_model
    never = InferenceOptions(resample="never")
    with Segmenter(model, never, backend="onnxruntime", threads=1) as seg:
        with pytest.raises(DunetError) as local:
            seg.predict(str(scan))
        with pytest.raises(DunetError) as served:
            segment_nifti_bytes(scan.read_bytes(), scan.name, _settings(model, tmp_path),
                                seg.runner.infer, never, max_batch=16)
        # and "auto" (the default of a request without options) resamples it
        _, doc = segment_nifti_bytes(scan.read_bytes(), scan.name, _settings(model, tmp_path),
                                     seg.runner.infer, None, max_batch=16)
    reason = str(local.value).split(": ", 1)[1]
    assert str(served.value) == f"{scan.name}: {reason}", (served.value, local.value)
    assert doc["inference"]["resample"] == "auto" and doc["lesion_voxels"] > 0


@pytest.mark.parametrize("sent, message", [
    ({"tta": "sideways"}, "case.nii: tta 'sideways': choose one of"),
    ({"min_lesion_mm3": -1}, "case.nii: min_lesion_mm3 -1: must be a finite number >= 0"),
    ({"batch_size": 0}, "case.nii: batch_size 0: must be >= 1"),
    ({"colour": "red"}, "case.nii: inference options: unknown key(s) colour"),
    ({"save_prob": True}, "case.nii: save_prob True: not possible server-side (the server "
                          "returns masks only"),
    ({"precision": "fp16"}, "case.nii: precision 'fp16': not possible server-side (the server "
                            "decides how its model runs)"),
    ({"workers": 2}, "case.nii: workers 2: not possible server-side"),
    ("[1, 2]", "case.nii: inference options: expected a JSON object, got list"),
    ("{not json", "case.nii: request parameter 'dunet_options': not a JSON object"),
])
def test_bad_request_options_are_one_line_naming_the_option(sent: object,
                                                             message: str) -> None:
    from dunet_deploy.serving.volume_model import request_options

    raw = sent if isinstance(sent, str) else json.dumps(sent)
    with pytest.raises(DunetError) as err:
        request_options(json.dumps({"dunet_options": raw}), "case.nii")
    assert str(err.value).startswith(message), err.value
    assert "\n" not in str(err.value)
    assert request_options(json.dumps({"other": 1}), "case.nii") is None
    assert request_options(None, "case.nii") is None


def _infer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dunet_deploy.cli.infer", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


# Nothing listens on port 9 of the loopback: every refusal must come before a connection.
URL = "grpc://127.0.0.1:9"


@pytest.mark.parametrize("args, line", [
    (["--server-side", "--save-prob"], "error: --save-prob True: not possible server-side (the "
                                       "server returns masks only, no probability maps)"),
    (["--server-side", "--workers", "2"], "error: --workers 2: not possible server-side (the "
                                          "server reads and writes; the client only sends files)"),
    (["--server-side", "--precision", "fp32"], "error: --precision 'fp32': not possible "
                                               "server-side (the server decides how its model "
                                               "runs)"),
    (["--server-side", "--threads", "2"], "error: --threads 2: not possible server-side (the "
                                          "server decides how its model runs)"),
    (["--backend", "onnxruntime"], "error: --backend 'onnxruntime': set by the Triton server "
                                   "that runs the model, not by its client"),
    (["--triton-url", "grpc://127.0.0.1:99999"], "error: --triton-url 'grpc://127.0.0.1:99999': "
                                                 "expected http://HOST:PORT or grpc://HOST:PORT"),
])
def test_cli_refuses_what_a_server_cannot_apply(model: Path, tmp_path: Path, args: list[str],
                                                line: str) -> None:
    scan = write_volume(tmp_path / "scan.nii.gz")
    res = _infer("--engine", str(model), str(scan), "-o", "out", "--triton-url", URL, *args,
                 cwd=tmp_path)
    assert (res.returncode, res.stderr.strip()) == (2, line), res.stderr
    assert not (tmp_path / "out").exists()


def test_cli_server_side_needs_the_url_not_the_model(model: Path, tmp_path: Path) -> None:
    scan = write_volume(tmp_path / "scan.nii.gz")
    # --save-prob with --server-side but no URL: the URL is what is missing (issue 19.11d)
    res = _infer("--engine", str(model), str(scan), "-o", "out", "--server-side", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: --server-side needs --triton-url URL (the dunet-serve server that runs the "
        "pipeline)")
    # ... and with the URL given, --save-prob is what is refused, not the URL
    res = _infer("--engine", str(model), str(scan), "-o", "out", "--server-side", "--save-prob",
                 "--triton-url", URL, cwd=tmp_path)
    assert res.returncode == 2 and "--triton-url" not in res.stderr
    assert res.stderr.startswith("error: --save-prob True: not possible server-side")
    # a local run still needs the model
    res = _infer(str(scan), "-o", "out", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: missing option --engine MODEL (only a run on a Triton server, --triton-url, can "
        "do without a local copy of the model)")
    # without --engine, a client goes as far as the server (nothing listens there)
    for mode in ([], ["--server-side"]):
        res = _infer(str(scan), "-o", "out", "--triton-url", URL, *mode, cwd=tmp_path)
        assert res.returncode == 2 and res.stderr.startswith(
            f"error: Triton server {URL}: connection refused on 127.0.0.1:9"), res.stderr
    assert not (tmp_path / "out").exists()


def test_a_bug_while_serving_one_request_fails_that_request_only(
        model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """``execute`` answers every request: an exception that is not a DunetError (a bug of
    ours) becomes that request's one-line error, its traceback goes to the server's log,
    and the other requests of the batch are still segmented."""
    import types

    from dunet_deploy.artifacts import read_artifact_info
    from dunet_deploy.export.triton_repo import read_config, write_triton_repo, write_volume_model
    from dunet_deploy.serving import volume_model as vm

    class Response:
        def __init__(self, output_tensors: list | None = None, error: object = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    class Request:
        def __init__(self, name: str, blob: bytes) -> None:
            self.name, self.blob = name, blob

        def request_id(self) -> str:
            return self.name

        def parameters(self) -> str:
            return "{}"

    fake = types.SimpleNamespace(
        TritonError=lambda text: text, InferenceResponse=Response,
        Tensor=lambda name, array: (name, array),
        get_input_tensor_by_name=lambda request, _: types.SimpleNamespace(
            as_numpy=lambda: np.array([request.blob], dtype=np.object_)))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    repo = tmp_path / "repo"
    info = read_artifact_info(model)
    write_triton_repo(repo, model, info, backend="onnx", max_batch_size=8)
    volume_dir = write_volume_model(repo, info, batch_size=8)
    params, _ = read_config(volume_dir / "config.pbtxt")
    served = vm.TritonPythonModel()
    served.initialize({"model_repository": str(volume_dir), "model_config": json.dumps(
        {"name": "dunet_volume", "parameters": {k: {"string_value": v}
                                                for k, v in params.items()}})})
    real = vm.segment_nifti_bytes

    def buggy(data: bytes, name: str, *args: object) -> object:
        if name == "b.nii.gz":
            raise KeyError("spacing")
        return real(data, name, *args)

    monkeypatch.setattr(vm, "segment_nifti_bytes", buggy)
    monkeypatch.setattr(served, "_predict", lambda slabs: np.zeros(
        (slabs.shape[0], 1, *slabs.shape[2:]), np.float32))
    scan = write_volume(tmp_path / "a.nii.gz")
    blob = scan.read_bytes()
    good, bad = served.execute([Request("a.nii.gz", blob), Request("b.nii.gz", blob)])
    assert good.error is None and [t[0] for t in good.output_tensors] == [vm.MASK_OUTPUT,
                                                                          vm.SUMMARY_OUTPUT]
    assert bad.error == "b.nii.gz: internal error in dunet_volume (KeyError: 'spacing')"
    assert "Traceback" in capfd.readouterr().err
