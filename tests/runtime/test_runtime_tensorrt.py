"""The TensorRT backend without TensorRT or a GPU: real absence, fakes, and mypy on the stubs."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import runtime_testutils as rt
import trt_stubs  # tests/trt_stubs.py (tests/ is on sys.path through its conftest)

from dunet_deploy import cuda as cuda_mod
from dunet_deploy.artifacts import read_artifact_info
from dunet_deploy.cuda import GpuInfo
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime import open_runner
from dunet_deploy.runtime import tensorrt_runner as trt_runner
from dunet_deploy.runtime.tensorrt_runner import check_sidecar, pick_profile

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine(tmp_path: Path) -> Path:
    return rt.write_fake_engine(tmp_path / "model.plan", rt.tiny_spec())


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> tuple[types.ModuleType, rt.FakeMemory]:
    memory = rt.FakeMemory()
    module = rt.make_fake_tensorrt(memory, rt.tiny_spec(), max_batch=16)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(trt_runner, "default_memory", lambda device=0: memory)
    return module, memory


def test_runner_with_fake_tensorrt(engine, fake_trt):
    module, memory = fake_trt
    x = np.random.default_rng(1).standard_normal((37, 4, 32, 32)).astype(np.float32)
    with open_runner(engine) as runner:  # auto: .plan -> tensorrt
        assert runner.backend == "tensorrt"
        assert runner.max_batch == 16 and runner.input_shape == (None, 4, 32, 32)
        assert runner.precision == "fp32"
        assert "NVIDIA H100" in runner.device
        out = runner.infer(x)
        again = runner.infer(x[:5])
    np.testing.assert_allclose(out, rt.fake_engine_fn(x), rtol=1e-6)
    np.testing.assert_allclose(again, rt.fake_engine_fn(x[:5]), rtol=1e-6)
    # Buffers once, for the profile's max batch; shapes rebound only when N changes.
    assert len(memory.allocs) == 2 and memory.pinned_shapes == [(16, 4, 32, 32), (16, 1, 32, 32)]
    assert module.calls["execute"] == [16, 16, 5, 5]
    assert module.calls["set_input_shape"] == [(0, (16, 4, 32, 32)), (0, (5, 4, 32, 32))]
    assert memory.copies[:3] == ["htod", "dtoh", "sync"]
    assert memory.closed


def test_fixed_precision_of_engine(engine, fake_trt):
    with pytest.raises(DunetError, match="exported precision fp32"):
        open_runner(engine, precision="fp16")
    assert fake_trt[1].closed is False  # refused before touching the GPU


@pytest.mark.parametrize(
    ("trt_version", "gpu", "match"),
    [
        ("10.9.0.34", rt.GPU, r"built with TensorRT 10\.9\.0\.34, this is TensorRT 10\.13\.0\.35"),
        (rt.TRT_VERSION, GpuInfo("NVIDIA A100-SXM4-80GB", "8.0"),
         r"compute capability 8\.0 \(NVIDIA A100-SXM4-80GB\), this GPU is NVIDIA H100"),
    ],
)
def test_sidecar_mismatch_is_refused(tmp_path, fake_trt, trt_version, gpu, match):
    plan = rt.write_fake_engine(tmp_path / "model.plan", rt.tiny_spec(), trt_version=trt_version,
                                gpu=gpu)
    with pytest.raises(DunetError, match=match) as exc:
        open_runner(plan)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(str(plan))
    assert fake_trt[1].closed


def test_same_compute_capability_other_sku_runs(tmp_path, fake_trt):
    """An H100 PCIe engine on an H100 SXM (or a MIG slice): same SM, accepted."""
    plan = rt.write_fake_engine(tmp_path / "model.plan", rt.tiny_spec(),
                                gpu=GpuInfo("NVIDIA H100 PCIe", "9.0"))
    with open_runner(plan) as runner:
        assert runner.infer(np.zeros((2, 4, 32, 32), np.float32)).shape == (2, 1, 32, 32)


def test_sidecar_without_version(tmp_path):
    plan = rt.write_fake_engine(tmp_path / "m.plan", rt.tiny_spec())
    info = read_artifact_info(plan)
    assert info.extra["tensorrt"] == rt.TRT_VERSION  # the one spelling the builder writes
    bare = type(info)(**{**info.__dict__, "extra": {}})
    with pytest.raises(DunetError, match="does not say which TensorRT"):
        check_sidecar(plan, bare, rt.TRT_VERSION, rt.GPU)
    no_gpu = type(info)(**{**info.__dict__, "extra": {"tensorrt": rt.TRT_VERSION}})
    with pytest.raises(DunetError, match="does not say which GPU"):
        check_sidecar(plan, no_gpu, rt.TRT_VERSION, rt.GPU)
    # Sidecars written before the typed sidecar named the version tensorrt_version.
    legacy = {k: v for k, v in info.extra.items() if k != "tensorrt"}
    old = type(info)(**{**info.__dict__, "extra": {**legacy, "tensorrt_version": rt.TRT_VERSION}})
    check_sidecar(plan, old, rt.TRT_VERSION, rt.GPU)


def test_pick_profile():
    profiles = [(1, 8), (1, 64)]
    assert [pick_profile(profiles, n) for n in (1, 8, 9, 64, 65)] == [0, 0, 1, 1, -1]
    assert pick_profile([(4, 4)], 4) == 0 and pick_profile([(4, 4)], 3) == -1


def test_two_profiles_chosen_by_batch(engine, monkeypatch):
    memory = rt.FakeMemory()
    module = rt.make_fake_tensorrt(memory, rt.tiny_spec(), profiles=[(1, 8), (1, 64)])
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(trt_runner, "default_memory", lambda device=0: memory)
    x = np.random.default_rng(2).standard_normal((40, 4, 32, 32)).astype(np.float32)
    with open_runner(engine) as runner:
        assert runner.max_batch == 64
        np.testing.assert_allclose(runner.infer(x[:3]), rt.fake_engine_fn(x[:3]), rtol=1e-6)
        np.testing.assert_allclose(runner.infer(x), rt.fake_engine_fn(x), rtol=1e-6)
        assert runner.describe()["profiles"] == [[1, 8], [1, 64]]
    # Context 1 switched to profile 1 once; batch 3 ran on profile 0, batch 40 on profile 1.
    assert module.calls["profile"] == [1]
    assert module.calls["set_input_shape"] == [(0, (3, 4, 32, 32)), (1, (40, 4, 32, 32))]


def test_refused_profile_switch(engine, monkeypatch):
    memory = rt.FakeMemory()
    module = rt.make_fake_tensorrt(memory, rt.tiny_spec(), profiles=[(1, 8), (1, 64)])
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(trt_runner, "default_memory", lambda device=0: memory)
    monkeypatch.setattr(type(memory), "stream_handle", property(lambda self: 7))
    with pytest.raises(DunetError, match="refused optimisation profile 1"):
        open_runner(engine)
    assert memory.closed


def test_cuda_graph_replays_captured_engine(engine, fake_trt):
    module, memory = fake_trt
    x = np.random.default_rng(3).standard_normal((21, 4, 32, 32)).astype(np.float32)
    with open_runner(engine, cuda_graph=True) as runner:
        outs = [runner.infer(x[:5]), runner.infer(x[5:10]), runner.infer(x[10:15]),
                runner.infer(x)]
    np.testing.assert_allclose(outs[0], rt.fake_engine_fn(x[:5]), rtol=1e-6)
    np.testing.assert_allclose(outs[1], rt.fake_engine_fn(x[5:10]), rtol=1e-6)  # replayed
    np.testing.assert_allclose(outs[2], rt.fake_engine_fn(x[10:15]), rtol=1e-6)
    np.testing.assert_allclose(outs[3], rt.fake_engine_fn(x), rtol=1e-6)
    # Per batch size (5, then 16 for x's first 16): one eager run and one captured run,
    # then only graph launches (x[5:10], x[10:15] and the 5-slab tail of x).
    assert len(memory.graphs) == 2 and all(len(g) == 1 for g in memory.graphs)
    assert module.calls["execute"] == [5, 5, 16, 16]
    assert memory.copies.count("launch") == 3


def test_cuda_graph_without_capture_support(engine, fake_trt, monkeypatch):
    memory = fake_trt[1]
    monkeypatch.setattr(type(memory), "begin_capture", cuda_mod.CudaMemory.begin_capture)
    with open_runner(engine, cuda_graph=True) as runner, pytest.raises(
            DunetError, match="CUDA graphs need cuda-python; fake cannot capture"):
        runner.infer(np.zeros((2, 4, 32, 32), np.float32))


def test_corrupt_engine(tmp_path, fake_trt):
    plan = rt.write_fake_engine(tmp_path / "model.plan", rt.tiny_spec(), blob=b"garbage")
    with pytest.raises(DunetError, match="cannot deserialise this engine"):
        open_runner(plan)


def test_real_absence_of_tensorrt(engine, monkeypatch):
    """Here (and in CI) TensorRT is absent, or only its type stubs are installed."""
    try:
        import tensorrt

        if hasattr(tensorrt, "Runtime"):
            pytest.skip("a real TensorRT is installed")
    except ImportError:
        pass
    with pytest.raises(DunetError, match=r"^TensorRT is not installed .*pip install") as exc:
        open_runner(engine)
    assert "\n" not in str(exc.value)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not even the stubs
    with pytest.raises(DunetError, match=r"^TensorRT is not installed \("):
        open_runner(engine)


def test_no_cuda_bindings(engine, fake_trt, monkeypatch):
    monkeypatch.undo()  # keep the fake tensorrt, use the real default_memory
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt[0])
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", "pycuda",
                 "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(DunetError, match=r"needs CUDA Python bindings: pip install cuda-python"):
        open_runner(engine)


class _FakeCudart:
    """cuda-python's runtime module on a machine whose driver is missing."""

    class cudaError_t:
        cudaSuccess = 0
        cudaErrorInsufficientDriver = 35

    def cudaGetDeviceCount(self):
        return (self.cudaError_t.cudaErrorInsufficientDriver, 0)

    def cudaGetErrorName(self, err):
        return (0, b"cudaErrorInsufficientDriver")

    def cudaGetErrorString(self, err):
        return (0, b"CUDA driver version is insufficient for CUDA runtime version")


def test_no_gpu(engine, fake_trt, monkeypatch):
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt[0])
    monkeypatch.setattr(cuda_mod, "import_cudart", lambda: _FakeCudart())
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(DunetError, match=r"^TensorRT needs a usable NVIDIA GPU: cudaGetDeviceCount "
                                         r"failed with cudaErrorInsufficientDriver"):
        open_runner(engine)


def test_no_gpu_real_cuda_python(engine, fake_trt, monkeypatch):
    """The real cuda-python on this GPU-less machine."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        pytest.skip("cuda-python is not installed")
    err, count = cudart.cudaGetDeviceCount()
    if err == cudart.cudaError_t.cudaSuccess and count > 0:
        pytest.skip("a GPU is present")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt[0])
    with pytest.raises(DunetError, match=r"^TensorRT needs .*NVIDIA GPU"):
        open_runner(engine)


def test_typechecks_against_tensorrt_stubs(tmp_path):
    """mypy with the (patched) tensorrt-stubs: the runner is clean and the stubs are live."""
    if trt_stubs.stubs_site() is None:
        pytest.skip("tensorrt-stubs is not installed")
    config = trt_stubs.build(tmp_path)
    probe = tmp_path / "probe_stubs_live.py"
    probe.write_text(
        "import tensorrt as trt\n\n\n"
        "def probe(engine: trt.ICudaEngine) -> int:\n"
        "    return engine.no_such_attribute\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--no-incremental",
         "--cache-dir", str(tmp_path / "cache"), "dunet_deploy/runtime", str(probe)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    # Exactly the probe's error: stubs resolved (not Any), runtime package clean.
    assert len(errors) == 1, proc.stdout + proc.stderr
    assert "probe_stubs_live.py:5" in errors[0] and "no_such_attribute" in errors[0]
