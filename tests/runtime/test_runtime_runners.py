"""The Runner interface, the ONNX Runtime and OpenVINO backends, and backend choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import runtime_testutils as rt
import torch

from dunet_deploy.errors import DunetError
from dunet_deploy.runtime import base, open_runner
from dunet_deploy.runtime.base import backend_for
from dunet_deploy.runtime.openvino_runner import choose_precision_hint
from dunet_deploy.runtime.ort import pick_providers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    model = rt.export_tiny_onnx(path)
    return model, path


@pytest.fixture(scope="module")
def slabs() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((7, 4, 32, 32)).astype(np.float32)


@pytest.mark.parametrize(("backend", "precision"), [("onnxruntime", "auto"),
                                                    ("openvino", "fp32")])
def test_runner_matches_torch(tiny, slabs, backend, precision):
    model, path = tiny
    with torch.no_grad():
        ref = model(torch.from_numpy(slabs)).numpy()
    with open_runner(path, backend, precision=precision, threads=1) as runner:
        out = runner.infer(slabs)
        assert runner.backend == backend
        assert runner.precision == "fp32"
        assert runner.input_shape == (None, 4, 32, 32)
        assert runner.max_batch is None
        assert runner.info.model_name == "dunet" and runner.spec == rt.tiny_spec()
        assert runner.last_infer_s > 0
        assert runner.describe()["spec_digest"] == rt.tiny_spec().digest()
        # Any N, including a single slab and none at all.
        np.testing.assert_allclose(runner.infer(slabs[:1]), ref[:1], atol=1e-5)
        assert runner.infer(np.zeros((0, 4, 32, 32), np.float32)).shape == (0, 1, 32, 32)
        # A runner is a predict(slabs) -> probs callable.
        np.testing.assert_allclose(runner(slabs), out)
    assert out.dtype == np.float32 and out.shape == (7, 1, 32, 32)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    with pytest.raises(DunetError, match="closed"):
        runner.infer(slabs)


def test_runner_rejects_wrong_slab_shape(tiny):
    with open_runner(tiny[1], "onnxruntime") as runner, \
            pytest.raises(DunetError, match=r"slabs must be \[N, 4, 32, 32\]"):
        runner.infer(np.zeros((2, 3, 32, 32), np.float32))


def test_fixed_precision_backends_refuse_other_precisions(tiny):
    with pytest.raises(DunetError, match="exported precision fp32.*--precision bf16"):
        open_runner(tiny[1], "onnxruntime", precision="bf16")


def test_openvino_precision_choice():
    assert choose_precision_hint("auto", ["FP32", "BF16", "INT8"]) == "bf16"
    assert choose_precision_hint("auto", ["FP32", "INT8"]) == "f32"
    assert choose_precision_hint("fp32", ["FP32", "BF16"]) == "f32"
    assert choose_precision_hint("bf16", ["FP32", "BF16"]) == "bf16"
    with pytest.raises(DunetError, match="no native bf16"):
        choose_precision_hint("bf16", ["FP32"], "Some CPU")
    with pytest.raises(DunetError, match="no native fp16"):
        choose_precision_hint("fp16", ["FP32", "BF16"])


def test_openvino_bf16_vs_fp32_masks(tiny, tmp_path, capsys):
    """Reported, not asserted: how often bf16 and fp32 masks agree (needs a BF16 CPU)."""
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no native BF16 (OPTIMIZATION_CAPABILITIES lacks BF16)")
    from dunet_deploy.runtime.core import predict_grid
    from dunet_deploy.runtime.pipeline import InputItem, prepare_volume

    spec = rt.tiny_spec()
    masks = {}
    for precision in ("fp32", "bf16"):
        with open_runner(tiny[1], "openvino", precision=precision) as runner:
            assert runner.precision == precision
            voxels = []
            for seed in range(3):
                vol = rt.write_volume(tmp_path / f"v{seed}.nii.gz", seed=seed)
                prep = prepare_volume(InputItem(vol), spec)
                probs = predict_grid(prep.net, spec, runner, batch_size=16)
                voxels.append(probs[:, 0] >= spec.threshold)
            masks[precision] = np.stack(voxels)
    agree = float((masks["fp32"] == masks["bf16"]).mean())
    with capsys.disabled():
        print(f"\nopenvino bf16 vs fp32 mask agreement: {agree:.5f}")
    assert agree > 0.9


def test_pick_providers():
    cpu_only = ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert pick_providers("auto", cpu_only) == cpu_only
    assert pick_providers("auto", gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert pick_providers("cpu", gpu) == ["CPUExecutionProvider"]
    assert pick_providers("tensorrt", gpu) == gpu
    with pytest.raises(DunetError, match="needs CUDAExecutionProvider"):
        pick_providers("cuda", cpu_only)


def test_backend_auto_choice(monkeypatch):
    assert backend_for("m.plan") == "tensorrt"
    assert backend_for("m.engine") == "tensorrt"
    assert backend_for("m.onnx") == "openvino"  # both installed here: OpenVINO first
    assert backend_for("m.onnx", "onnxruntime") == "onnxruntime"
    with pytest.raises(DunetError, match="cannot choose a backend"):
        backend_for("m.pt")
    with pytest.raises(DunetError, match="only run with --backend tensorrt"):
        backend_for("m.plan", "openvino")
    with pytest.raises(DunetError, match="runs built engines"):
        backend_for("m.onnx", "tensorrt")
    monkeypatch.setattr(base, "is_installed", lambda name: name == "onnxruntime")
    assert backend_for("m.onnx") == "onnxruntime"
    monkeypatch.setattr(base, "is_installed", lambda name: False)
    with pytest.raises(DunetError, match="no ONNX backend installed"):
        backend_for("m.onnx")


def test_missing_backend_is_one_line(tiny, monkeypatch):
    monkeypatch.setattr(base, "is_installed", lambda name: name != "openvino")
    with pytest.raises(DunetError, match=r"backend 'openvino' is not installed: pip install") as e:
        open_runner(tiny[1], "openvino")
    assert "\n" not in str(e.value)


def test_bad_options_and_models(tiny, tmp_path):
    with pytest.raises(DunetError, match="model file not found"):
        open_runner(tmp_path / "nope.onnx")
    with pytest.raises(DunetError, match="unknown precision"):
        open_runner(tiny[1], precision="int4")
    with pytest.raises(DunetError, match="unknown backend"):
        open_runner(tiny[1], "tvm")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx file")
    with pytest.raises(DunetError, match="not a readable ONNX model"):
        open_runner(garbage)
