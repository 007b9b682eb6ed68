"""TensorRT engine builder: availability errors and build mechanics (with a fake TensorRT)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from export_helpers import FAKE_LAYERS, make_fake_tensorrt, write_typed_onnx

from dunet_deploy import cuda as cuda_mod
from dunet_deploy.artifacts import read_artifact_info
from dunet_deploy.errors import DunetError
from dunet_deploy.export import tensorrt_build as tb


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,8,32", (1, 8, 32)), (" 2, 2 ,2", (2, 2, 2)), ("1,1,64", (1, 1, 64))],
)
def test_parse_batch_range_accepts(text: str, expected: tuple[int, int, int]) -> None:
    assert tb.parse_batch_range(text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("1,8", "three integers"),
        ("1,8,32,64", "three integers"),
        ("a,b,c", "three integers"),
        ("1.5,2,3", "three integers"),
        ("0,8,32", ">= 1"),
        ("-1,8,32", ">= 1"),
        ("8,4,32", "MIN <= OPT <= MAX"),
        ("1,64,32", "MIN <= OPT <= MAX"),
    ],
)
def test_parse_batch_range_rejects(text: str, needle: str) -> None:
    with pytest.raises(DunetError, match=needle) as e:
        tb.parse_batch_range(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("version", "strong"),
    [("10.0.1.6", True), ("10.11.0.33", True), ("10.13.0.35", True), ("11.4.0.106", True),
     ("8.6.1", False)],
)
def test_strong_typing_on_every_10x(version: str, strong: bool) -> None:
    assert tb.uses_strong_typing(version) is strong


def test_engine_profiles() -> None:
    assert tb.engine_profiles(tb.DEFAULT_BATCH_RANGE) == [(1, 1, 8), (1, 32, 64)]
    assert tb.engine_profiles((1, 8, 32)) == [(1, 1, 8), (1, 8, 32)]
    assert tb.engine_profiles((1, 4, 8)) == [(1, 4, 8)]
    assert tb.engine_profiles((16, 16, 32)) == [(16, 16, 32)]


def test_missing_tensorrt_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    with pytest.raises(DunetError, match="TensorRT is not installed") as e:
        tb.check_tensorrt_available()
    assert "\n" not in str(e.value)


def test_stub_only_tensorrt_is_not_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    # What tensorrt-stubs installs: an importable namespace package, no library.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(DunetError, match="only type stubs"):
        tb.check_tensorrt_available()


def test_old_tensorrt_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt("8.6.1"))
    with pytest.raises(DunetError, match=r"TensorRT 8\.6\.1 is too old"):
        tb.check_tensorrt_available()


# ------------------------------------------------------------- GPU discovery
class _FakeCudart:
    """cuda-python's runtime API surface (tuples of (error, value), like the real one)."""

    class cudaError_t:
        cudaSuccess = 0
        cudaErrorInsufficientDriver = 35

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeGlobal = 0

    def __init__(self, err: int = 0, count: int = 1) -> None:
        self.err, self.count, self.freed = err, count, []

    def cudaGetDeviceCount(self) -> tuple[int, int]:
        return self.err, self.count

    def cudaSetDevice(self, device: int) -> tuple[int]:
        return (self.err,)

    def cudaGetDeviceProperties(self, device: int) -> tuple[int, object]:
        prop = types.SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\0\0", major=9, minor=0)
        return self.cudaError_t.cudaSuccess, prop

    def cudaStreamCreate(self) -> tuple[int, int]:
        return 0, 77

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:
        self.freed.append(("stream", stream))
        return (0,)

    def cudaGetErrorName(self, err: int) -> tuple[int, bytes]:
        return 0, b"cudaErrorInsufficientDriver"

    def cudaGetErrorString(self, err: int) -> tuple[int, bytes]:
        return 0, b"CUDA driver version is insufficient for CUDA runtime version"


def _fake_pycuda(monkeypatch: pytest.MonkeyPatch, count: int = 1) -> None:
    """A pycuda.driver with one working A100."""
    drv = types.ModuleType("pycuda.driver")

    class Error(Exception):
        pass

    class Ctx:
        def push(self) -> None:
            pass

        def pop(self) -> None:
            pass

    class Device:
        @staticmethod
        def count() -> int:
            return count

        def __init__(self, index: int) -> None:
            self.index = index

        def name(self) -> str:
            return "NVIDIA A100-SXM4-80GB"

        def compute_capability(self) -> tuple[int, int]:
            return 8, 0

        def retain_primary_context(self) -> Ctx:
            return Ctx()

    drv.Error = Error  # type: ignore[attr-defined]
    drv.init = lambda: None  # type: ignore[attr-defined]
    drv.Device = Device  # type: ignore[attr-defined]
    drv.Stream = lambda: types.SimpleNamespace(handle=5)  # type: ignore[attr-defined]
    pkg = types.ModuleType("pycuda")
    pkg.driver = drv  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)


def _no_pycuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)


def test_probe_gpu_reads_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCudart()
    monkeypatch.setattr(cuda_mod, "import_cudart", lambda: fake)
    gpu = tb.probe_gpu()
    assert (gpu.name, gpu.compute_capability, gpu.binding) == (
        "NVIDIA H100 80GB HBM3", "9.0", "cuda-python")
    assert fake.freed == [("stream", 77)]  # the probe keeps nothing


def test_probe_gpu_without_driver_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_mod, "import_cudart", lambda: _FakeCudart(err=35))
    _no_pycuda(monkeypatch)
    with pytest.raises(DunetError, match="usable NVIDIA GPU.*InsufficientDriver") as e:
        tb.probe_gpu()
    assert "\n" not in str(e.value) and "pycuda" in str(e.value)


def test_failing_driver_falls_back_to_pycuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda-python 13 on an R570 driver: cudaErrorInsufficientDriver; pycuda still works."""
    monkeypatch.setattr(cuda_mod, "import_cudart", lambda: _FakeCudart(err=35))
    _fake_pycuda(monkeypatch)
    gpu = tb.probe_gpu()
    assert (gpu.name, gpu.compute_capability, gpu.binding) == (
        "NVIDIA A100-SXM4-80GB", "8.0", "pycuda")


def test_probe_gpu_zero_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_mod, "import_cudart", lambda: _FakeCudart(count=0))
    _no_pycuda(monkeypatch)
    with pytest.raises(DunetError, match="CUDA sees 0 device"):
        tb.probe_gpu()


def test_probe_gpu_without_any_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise ImportError("No module named 'cuda'")

    monkeypatch.setattr(cuda_mod, "import_cudart", missing)
    _no_pycuda(monkeypatch)
    with pytest.raises(DunetError, match="needs CUDA Python bindings"):
        tb.probe_gpu()


def test_probe_gpu_on_this_gpu_less_machine_raises() -> None:
    """The real cuda-python here: no GPU, so probe_gpu must raise (not return)."""
    try:
        rt = cuda_mod.import_cudart()
    except ImportError:
        pytest.skip("cuda-python is not installed")
    err, count = rt.cudaGetDeviceCount()
    if err == rt.cudaError_t.cudaSuccess and count > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(DunetError, match="NVIDIA GPU") as e:
        tb.probe_gpu()
    assert "\n" not in str(e.value)


def test_native_handle_without_deprecated_int() -> None:
    pytest.importorskip("cuda.bindings.runtime")
    import warnings

    from cuda.bindings import runtime as rt

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cuda_mod.native_handle(rt.cudaStream_t(1234)) == 1234


# ------------------------------------------------------------------ building
@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb, "probe_gpu", lambda: tb.GpuInfo("Fake GPU", "8.9", "cuda-python"))


def _onnx(tmp_path: Path, precision: str = "fp16") -> Path:
    name = {"fp16": "model_fp16.onnx", "fp32": "model.onnx", "int8": "model_int8.onnx"}
    return write_typed_onnx(tmp_path / name[precision], precision)


def test_build_strongly_typed_from_fp16_onnx(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None
) -> None:
    trt = make_fake_tensorrt("10.13.0.35")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old-cache")
    opts = tb.EngineOptions(
        batch_range=(1, 4, 16),
        workspace_mb=512,
        opt_level=5,
        timing_cache=cache,
        timing_cache_out=tmp_path / "new.cache",
    )
    built = tb.build_engine(_onnx(tmp_path), (4, 32, 32), opts)
    plan = json.loads(built.plan)
    assert plan["source"] == "model_fp16.onnx"
    assert plan["network_flags"] == 1 << 1  # STRONGLY_TYPED
    assert plan["flags"] == []  # no weak-typing FP16 flag, TF32 cleared
    assert plan["workspace"] == 512 << 20
    assert plan["opt_level"] == 5
    assert plan["verbosity"] == "DETAILED"
    assert plan["profiles"] == [["slabs", [1, 4, 32, 32], [1, 4, 32, 32], [8, 4, 32, 32]],
                                ["slabs", [1, 4, 32, 32], [4, 4, 32, 32], [16, 4, 32, 32]]]
    # The existing cache is used, and only if it matches (ignore_mismatch=False).
    assert ("set_timing_cache", b"old-cache", False) in trt.calls  # type: ignore[attr-defined]
    assert (tmp_path / "new.cache").read_bytes() == b"old-cache+tuned"
    side = built.sidecar
    assert built.precision == "fp16"
    assert (side.tensorrt, side.gpu_name, side.compute_capability) == ("10.13.0.35", "Fake GPU",
                                                                       "8.9")
    assert side.strongly_typed is True and side.builder["timing_cache"] == "loaded"
    assert side.profiles[1][2] == (16, 4, 32, 32)
    assert side.layer_precisions == {"fp16": 3, "fp32": 2}
    assert [layer["name"] for layer in built.layers] == [n for n, _, _ in FAKE_LAYERS]


def test_every_10x_builds_strongly_typed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None
) -> None:
    """TensorRT 10.0-10.11 too: never BuilderFlag.FP16 on the fp32 graph."""
    trt = make_fake_tensorrt("10.8.0.43")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    built = tb.build_engine(_onnx(tmp_path), (4, 32, 32), tb.EngineOptions())
    plan = json.loads(built.plan)
    assert plan["source"] == "model_fp16.onnx" and plan["network_flags"] == 2
    assert "FP16" not in plan["flags"] and "TF32" not in plan["flags"]
    assert plan["workspace"] is None and plan["opt_level"] == 3  # TensorRT defaults kept
    assert [p[1:] for p in plan["profiles"]] == [
        [[1, 4, 32, 32], [1, 4, 32, 32], [8, 4, 32, 32]],
        [[1, 4, 32, 32], [32, 4, 32, 32], [64, 4, 32, 32]]]
    assert built.sidecar.builder["timing_cache"] == "empty"


def test_int8_engine_from_qdq_onnx(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None
) -> None:
    trt = make_fake_tensorrt("11.4.0.106")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    built = tb.build_engine(_onnx(tmp_path, "int8"), (4, 32, 32))
    plan = json.loads(built.plan)
    # Explicit quantization: strongly typed, no INT8 (implicit calibration) flag.
    assert plan["source"] == "model_int8.onnx" and plan["network_flags"] == 2
    assert "INT8" not in plan["flags"]
    assert built.precision == "int8"


def test_tf32_on_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt())
    built = tb.build_engine(_onnx(tmp_path, "fp32"), (4, 32, 32), tb.EngineOptions(tf32=True))
    assert json.loads(built.plan)["flags"] == ["TF32"]


@pytest.mark.parametrize(("state", "expected"), [("corrupt", "rejected"), ("mismatch", "rejected")])
def test_stale_timing_cache_falls_back_to_empty(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None, state: str, expected: str
) -> None:
    trt = make_fake_tensorrt(cache_state=state)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from-another-gpu")
    built = tb.build_engine(_onnx(tmp_path), (4, 32, 32), tb.EngineOptions(timing_cache=cache))
    assert built.sidecar.builder["timing_cache"] == expected
    assert ("set_timing_cache", b"", False) in trt.calls  # type: ignore[attr-defined]
    assert cache.read_bytes() == b"+tuned"  # rewritten from the fresh cache


def test_refused_profile_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(profile_ok=False))
    with pytest.raises(DunetError, match=r"refused the optimisation profile 1\.\.8 \(opt 1\)"):
        tb.build_engine(_onnx(tmp_path), (4, 32, 32))


def test_wrong_network_input_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(input_names=("input.1",)))
    with pytest.raises(DunetError, match=r"one input 'slabs', TensorRT parsed \['input.1'\]"):
        tb.build_engine(_onnx(tmp_path), (4, 32, 32))


def test_parser_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(parse_ok=False))
    with pytest.raises(DunetError) as e:
        tb.build_engine(_onnx(tmp_path), (4, 32, 32))
    assert str(e.value) == (
        "TensorRT could not parse model_fp16.onnx at node 7 (Pad '/decoder/Pad'): "
        "unsupported pads value (+1 more)"
    )


def test_failed_build_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(build_ok=False))
    with pytest.raises(DunetError, match="failed to build an engine from model_fp16.onnx"):
        tb.build_engine(_onnx(tmp_path), (4, 32, 32))


def test_garbage_onnx_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt())
    bad = tmp_path / "model_fp16.onnx"
    bad.write_bytes(b"\x00\xffnot onnx")
    with pytest.raises(DunetError, match="not a readable ONNX model"):
        tb.build_engine(bad, (4, 32, 32))


def test_layer_report_file_and_counts(tmp_path: Path) -> None:
    layers = [{"name": "a", "type": "Conv", "precision": "fp16"},
              {"name": "b", "type": "Conv", "precision": "fp16"},
              {"name": "c", "type": "PointWise", "precision": "fp32"}]
    path = tb.write_layer_report(tmp_path / "model.plan", layers)
    assert path.name == "model.plan.layers.json"
    doc = json.loads(path.read_text())
    assert doc["counts"] == {"fp16": 2, "fp32": 1} and doc["layers"] == layers
    assert tb.format_layer_counts(doc["counts"]) == "TensorRT engine: 3 layers (fp16 2, fp32 1)"


# ------------------------------------------------- the built engine is checked
class _EngineRunner:
    """Stands in for the TensorRT runner on the built plan (no GPU here)."""

    def __init__(self, predict: object) -> None:
        self.infer = predict

    def __enter__(self) -> _EngineRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.mark.parametrize("faithful", [True, False])
def test_verify_engine_gates_the_plan(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_onnx: Path, spec32: object,
    faithful: bool,
) -> None:
    from dunet_deploy.export import verify as ver
    from dunet_deploy.runtime import base

    def engine(x: object) -> object:
        out = ver.run_onnxruntime(tiny_onnx, x)  # type: ignore[arg-type]
        return out if faithful else 1.0 - out  # a broken engine flips every mask pixel

    opened: list[tuple[Path, str]] = []

    def fake_open(path: Path, backend: str) -> _EngineRunner:
        opened.append((path, backend))
        return _EngineRunner(engine)

    monkeypatch.setattr(base, "open_runner", fake_open)
    plan = tmp_path / "model.plan"
    if faithful:
        doc = ver.verify_engine(plan, tiny_onnx, spec32)  # type: ignore[arg-type]
        assert doc["passed"] and {r["backend"] for r in doc["rows"]} == {"tensorrt"}
    else:
        with pytest.raises(DunetError, match=r"TensorRT verification failed: model.plan agrees"):
            ver.verify_engine(plan, tiny_onnx, spec32)  # type: ignore[arg-type]
    assert opened == [(plan, "tensorrt")]


@pytest.mark.parametrize("engine_ok", [True, False])
def test_export_verifies_the_built_engine_before_writing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_ckpt: Path, fake_gpu: None,
    engine_ok: bool,
) -> None:
    """dunet-export --format trt: the new engine is checked on the GPU; below the gate, no file."""
    from dunet_deploy.export import verify as ver
    from dunet_deploy.export.pipeline import ExportRequest, run_export

    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt())
    checked: list[str] = []

    def verify_engine(plan: Path, onnx32: Path, spec: object, **kw: object) -> dict[str, bool]:
        checked.append(Path(plan).name)
        assert Path(plan).is_file() and (Path(plan).parent / "model.plan.json").is_file()
        if not engine_ok:
            raise DunetError("TensorRT verification failed: model.plan agrees with the FP32 "
                             "masks on 91.000% < 99.9% of the synthetic-volume pixels")
        return {"passed": True}

    monkeypatch.setattr(ver, "verify_engine", verify_engine)
    out = tmp_path / "out"
    req = ExportRequest(checkpoint=tiny_ckpt, out_dir=out, formats=("trt",),
                        batch_range=(1, 32, 64), opset=17, verify=True, triton_backend="onnx",
                        timing_cache=None, workspace_mb=None, opt_level=None, verify_slabs=4,
                        seed=0)
    lines: list[str] = []
    if engine_ok:
        written = run_export(req, log=lines.append)
        assert {p.name for p in written} >= {"model.plan", "model.plan.json",
                                             "model.plan.layers.json"}
        assert "TensorRT engine: 5 layers (fp16 3, fp32 2)" in lines
    else:
        with pytest.raises(DunetError, match=r"TensorRT verification failed.*; nothing written"):
            run_export(req, log=lines.append)
        assert not out.exists()
    assert checked == ["model.plan"]


@pytest.mark.slow
def test_export_builds_an_int8_engine_from_the_gated_qdq_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, int8_ckpt: Path, int8_data: Path,
    fake_gpu: None,
) -> None:
    """``--format trt --trt-precision int8``: strongly typed from model_int8.onnx, no FP16/INT8
    builder flag (deprecated in 10.12, gone in 11: precision lives in the Q/DQ graph), and the
    Triton ``trt`` model serves that engine as int8."""
    from click.testing import CliRunner

    from dunet_deploy.cli import export as cli
    from dunet_deploy.export import verify as ver

    trt = make_fake_tensorrt("11.4.0.106")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(ver, "verify_engine", lambda *a, **k: {"passed": True})
    out = tmp_path / "out"
    res = CliRunner().invoke(cli.main, [
        str(int8_ckpt), "-o", str(out), "--format", "onnx-int8", "--calibration", str(int8_data),
        "--format", "trt", "--trt-precision", "int8", "--format", "triton",
        "--triton-backend", "trt"])
    assert res.exit_code == 0, res.output
    assert ("parse_from_file", "model_int8.onnx") in trt.calls
    assert not [c for c in trt.calls if c[0] == "set_flag"]
    plan = json.loads((out / "model.plan").read_bytes())
    assert plan["source"] == "model_int8.onnx" and plan["network_flags"] == 1 << 1
    assert read_artifact_info(out / "model.plan").precision == "int8"
    assert not (out / "model_fp16.onnx").exists()  # not built: the int8 engine needs none
    config = (out / "triton" / "dunet" / "config.pbtxt").read_text()
    assert "(int8)" in config


def test_int8_engine_needs_the_int8_export(tiny_ckpt: Path, tmp_path: Path) -> None:
    from dunet_deploy.export.pipeline import ExportRequest, run_export

    req = ExportRequest(checkpoint=tiny_ckpt, out_dir=tmp_path / "out", formats=("trt",),
                        trt_precision="int8")
    with pytest.raises(DunetError, match=r"--trt-precision int8 needs --format onnx-int8"):
        run_export(req)
    assert not (tmp_path / "out").exists()
