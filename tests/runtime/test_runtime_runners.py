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
    """bf16 and fp32 masks agree on the lesion region (needs a BF16 CPU).

    Compared where either mask is lesion (intersection over union): agreement
    over all voxels would pass for two all-background masks.
    """
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
    fp32, bf16 = masks["fp32"], masks["bf16"]
    lesion = fp32 | bf16
    assert fp32.sum() > 100, "the reference mask has (almost) no lesion: nothing is compared"
    iou = float((fp32 & bf16).sum() / lesion.sum())
    with capsys.disabled():
        print(f"\nopenvino bf16 vs fp32 lesion IoU: {iou:.5f} ({int(lesion.sum())} voxels)")
    assert iou > 0.9


def test_ort_io_binding_matches_plain_run(tiny, slabs):
    """The IOBinding path (what a GPU provider uses), exercised on the CPU provider."""
    with open_runner(tiny[1], "onnxruntime", threads=1) as plain:
        ref = plain.infer(slabs)
    from dunet_deploy.runtime.ort import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(tiny[1], plain.info, threads=1, device="cpu", io_binding=True)
    with runner:
        assert runner.describe()["io_binding"] == "cpu"
        out = runner.infer(slabs)
        again = runner.infer(slabs[:3])  # another batch size: its own bound buffers
        np.testing.assert_allclose(runner.infer(slabs), ref, atol=1e-6)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(again, ref[:3], atol=1e-6)
    assert out is not again and not np.shares_memory(out, again)


def test_ort_run_errors_become_one_line(tiny, slabs):
    """ONNX Runtime's own exceptions (e.g. CUDA OOM is a Fail) derive from Exception only."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    class OomSession:
        def run(self, *args, **kwargs):
            raise Fail("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 2: out of memory\n...")

    with open_runner(tiny[1], "onnxruntime", threads=1) as runner:
        runner._session = OomSession()
        with pytest.raises(DunetError, match=r"onnxruntime failed on a batch of 7 .*out of memory"):
            runner.infer(slabs)


def test_cuda_provider_that_does_not_load_is_refused(tiny, monkeypatch):
    """A real ONNX Runtime told CUDA is available: its session falls back to the CPU."""
    import onnxruntime as ort

    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", *real()])
    with pytest.raises(DunetError, match=r"did not activate CUDAExecutionProvider \(active: "
                                         r"CPUExecutionProvider\).*run on the CPU"):
        open_runner(tiny[1], "onnxruntime", device="cuda")
    # auto may fall back, and says where it runs.
    with open_runner(tiny[1], "onnxruntime", device="auto") as runner:
        assert runner.device == "cpu"


def test_provider_options(tmp_path):
    from dunet_deploy.runtime.ort import provider_options

    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    # Weakly typed FP16 (trt_fp16_enable) would run the FP32 islands in fp16: refused.
    with pytest.raises(DunetError, match=r"TensorRT provider cannot run an fp16 model as typed"):
        provider_options(gpu, tmp_path / "m.onnx", "fp16", (4, 192, 192))
    opts = provider_options(gpu, tmp_path / "m.onnx", "int8", (4, 192, 192))
    trt = opts["TensorrtExecutionProvider"]
    assert trt["trt_fp16_enable"] == "0" and trt["trt_engine_cache_enable"] == "1"
    assert trt["trt_int8_enable"] == "1"  # Q/DQ layers build only with INT8 configured
    assert trt["trt_engine_cache_path"] == str(tmp_path / "m.onnx.trt-ep-cache")
    assert trt["trt_timing_cache_enable"] == "1"
    assert trt["trt_profile_opt_shapes"] == "slabs:32x4x192x192"
    assert trt["trt_profile_max_shapes"] == "slabs:64x4x192x192"
    assert "CUDAExecutionProvider" not in opts
    fp32 = provider_options(gpu, tmp_path / "m.onnx", "fp32", (4, 192, 192), cuda_graph=True)
    assert fp32["TensorrtExecutionProvider"]["trt_fp16_enable"] == "0"
    assert fp32["TensorrtExecutionProvider"]["trt_int8_enable"] == "0"
    assert fp32["CUDAExecutionProvider"] == {"enable_cuda_graph": "1"}
    assert provider_options(["CPUExecutionProvider"], tmp_path / "m.onnx", "fp32",
                            (4, 32, 32)) == {}


def test_cuda_graph_needs_cuda_provider(tiny):
    with pytest.raises(DunetError, match="--cuda-graph needs the CUDA provider"):
        open_runner(tiny[1], "onnxruntime", device="cpu", cuda_graph=True)


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


def test_loaders_turn_backend_errors_into_one_line(tmp_path):
    """The loaders every caller uses: ONNX Runtime's and OpenVINO's own exceptions -> DunetError."""
    import openvino as ov

    from dunet_deploy.runtime.loaders import CPU_EP, openvino_read, ort_session

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(DunetError, match=r"bad.onnx: onnxruntime cannot load the model") as e:
        ort_session(bad, [CPU_EP])
    assert "\n" not in str(e.value)
    with pytest.raises(DunetError, match=r"bad.onnx: openvino cannot read the model") as e:
        openvino_read(ov.Core(), bad)
    assert "\n" not in str(e.value)
