"""TensorRT engine builder: availability errors and build mechanics (with a fake TensorRT)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from export_helpers import make_fake_tensorrt

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
    [
        ("10.0.1.6", False),
        ("10.11.0.33", False),
        ("10.12.0.36", True),
        ("10.13.0.35", True),
        ("11.4.0.106", True),
    ],
)
def test_strong_typing_from_10_12(version: str, strong: bool) -> None:
    assert tb.uses_strong_typing(version) is strong


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


class _FakeCudart:
    """cuda-python's runtime API surface used by probe_gpu."""

    class cudaError_t:
        cudaSuccess = "ok"

    def __init__(self, err: object, count: int = 1) -> None:
        self.err, self.count = err, count

    def cudaGetDeviceCount(self) -> tuple[object, int]:
        return self.err, self.count

    def cudaGetDeviceProperties(self, device: int) -> tuple[object, object]:
        prop = types.SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\0\0", major=9, minor=0)
        return self.cudaError_t.cudaSuccess, prop


def test_probe_gpu_reads_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        tb, "_cuda_runtime", lambda: _FakeCudart(_FakeCudart.cudaError_t.cudaSuccess)
    )
    gpu = tb.probe_gpu()
    assert (gpu.name, gpu.compute_capability, gpu.binding) == (
        "NVIDIA H100 80GB HBM3",
        "9.0",
        "cuda-python",
    )


def test_probe_gpu_without_driver_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    err = types.SimpleNamespace(name="cudaErrorInsufficientDriver")
    monkeypatch.setattr(tb, "_cuda_runtime", lambda: _FakeCudart(err))
    with pytest.raises(DunetError, match="no CUDA GPU available.*InsufficientDriver") as e:
        tb.probe_gpu()
    assert "\n" not in str(e.value)


def test_probe_gpu_zero_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb, "_cuda_runtime", lambda: _FakeCudart("ok", count=0))
    with pytest.raises(DunetError, match="0 devices"):
        tb.probe_gpu()


def test_probe_gpu_without_any_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb, "_cuda_runtime", lambda: None)
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(DunetError, match="no CUDA Python binding"):
        tb.probe_gpu()


def test_probe_gpu_on_this_machine_is_a_dunet_error_or_a_gpu() -> None:
    # CI has no GPU: the real cuda-python answers with an error we report.
    try:
        gpu = tb.probe_gpu()
    except DunetError as e:
        assert "\n" not in str(e)
        assert "CUDA" in str(e)
    else:
        assert gpu.name and "." in gpu.compute_capability


# ------------------------------------------------------------------ building
@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb, "probe_gpu", lambda: tb.GpuInfo("Fake GPU", "8.9", "cuda-python"))


def _onnx_pair(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "model.onnx", tmp_path / "model_fp16.onnx"
    a.write_bytes(b"fp32")
    b.write_bytes(b"fp16")
    return a, b


def test_build_strongly_typed_from_fp16_onnx(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None
) -> None:
    trt = make_fake_tensorrt("10.13.0.35")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    fp32, fp16 = _onnx_pair(tmp_path)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old-cache")
    opts = tb.EngineOptions(
        batch_range=(1, 4, 16),
        workspace_mb=512,
        opt_level=5,
        timing_cache=cache,
        timing_cache_out=tmp_path / "new.cache",
    )
    plan, fields = tb.build_engine(fp32, fp16, (4, 32, 32), opts)
    built = json.loads(plan)
    assert built["source"] == "model_fp16.onnx"
    assert built["network_flags"] == 1 << 1  # STRONGLY_TYPED
    assert built["flags"] == []  # no weak-typing FP16 flag
    assert built["workspace"] == 512 << 20
    assert built["opt_level"] == 5
    assert built["profile"] == ["slabs", [1, 4, 32, 32], [4, 4, 32, 32], [16, 4, 32, 32]]
    assert ("create_timing_cache", b"old-cache") in trt.calls  # type: ignore[attr-defined]
    assert (tmp_path / "new.cache").read_bytes() == b"old-cache+tuned"
    assert fields["tensorrt_version"] == "10.13.0.35"
    assert fields["gpu"] == {
        "name": "Fake GPU",
        "compute_capability": "8.9",
        "binding": "cuda-python",
    }
    assert fields["strongly_typed"] is True
    assert fields["profile"]["max"] == [16, 4, 32, 32]
    assert fields["builder"]["timing_cache_loaded"] is True


def test_build_before_10_12_uses_fp16_flag_on_fp32_onnx(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt("10.8.0.43"))
    fp32, _ = _onnx_pair(tmp_path)
    plan, fields = tb.build_engine(fp32, None, (4, 32, 32), tb.EngineOptions())
    built = json.loads(plan)
    assert built["source"] == "model.onnx"
    assert built["network_flags"] == 0
    assert built["flags"] == ["FP16"]
    assert built["workspace"] is None and built["opt_level"] == 3  # TensorRT defaults kept
    assert built["profile"][1:] == [[1, 4, 32, 32], [8, 4, 32, 32], [32, 4, 32, 32]]
    assert fields["strongly_typed"] is False
    assert fields["builder"]["timing_cache_loaded"] is False


def test_parser_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(parse_ok=False))
    fp32, fp16 = _onnx_pair(tmp_path)
    with pytest.raises(DunetError) as e:
        tb.build_engine(fp32, fp16, (4, 32, 32))
    msg = str(e.value)
    assert msg == (
        "TensorRT could not parse model_fp16.onnx at node 7 (Pad '/decoder/Pad'): "
        "unsupported pads value (+1 more)"
    )


def test_failed_build_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gpu: None
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(build_ok=False))
    fp32, fp16 = _onnx_pair(tmp_path)
    with pytest.raises(DunetError, match="failed to build an engine from model_fp16.onnx"):
        tb.build_engine(fp32, fp16, (4, 32, 32))
