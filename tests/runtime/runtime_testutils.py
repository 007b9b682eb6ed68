"""Shared helpers for the runtime and dunet-infer tests (tiny models, tiny volumes).

Imported by ``tests/runtime/test_*.py`` directly and by
``tests/cli/test_infer_cli.py`` through ``sys.path`` (the test folders are not
packages).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from dunet_deploy.artifacts import ArtifactInfo, EngineSidecar, write_engine_sidecar
from dunet_deploy.cuda import CudaMemory, GpuInfo
from dunet_deploy.data.nifti import load_nifti
from dunet_deploy.data.preprocess import (
    binarize,
    nonempty_slab_indices,
    probs_to_volume,
    slices_to_slabs,
    volume_to_slices,
)
from dunet_deploy.data.synth import synth_affine, synthesize_case
from dunet_deploy.spec import PreprocessSpec

SHAPE = (40, 48, 24)
IMAGE_SIZE = 32
TRT_VERSION = "10.13.0.35"
GPU = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")


def tiny_spec() -> PreprocessSpec:
    """A spec for 40×48×24 volumes at 32×32."""
    return PreprocessSpec.for_geometry(SHAPE, image_size=IMAGE_SIZE)


def export_tiny_onnx(path: Path, seed: int = 0) -> Any:
    """Export a base_filters=8 dunet through the export library; returns the torch model."""
    import torch

    from dunet_deploy.export.onnx_export import export_onnx
    from dunet_deploy.models import create_model

    torch.manual_seed(seed)
    model = create_model("dunet", base_filters=8).eval()
    export_onnx(model, tiny_spec(), path)
    return model


def write_volume(path: Path, seed: int = 0, zooms: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 shape: tuple[int, ...] = SHAPE, data: np.ndarray | None = None) -> Path:
    """A synthetic T1 as int16 + scl_slope, qform code 1 and sform code 4 (like ATLAS)."""
    if data is None:
        data, _ = synthesize_case(shape, seed)
    affine = synth_affine(shape[:3]) @ np.diag([*zooms, 1.0])
    if np.issubdtype(np.asarray(data).dtype, np.floating) and np.isfinite(data).all():
        slope = max(float(np.abs(data).max()), 1e-6) / 32000.0
        raw = np.round(data / slope).astype(np.int16)
        img = nib.Nifti1Image(raw, affine)
        img.header.set_slope_inter(slope, 0.0)
    else:
        img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=4)
    nib.save(img, str(path))
    return path


def torch_reference(model: Any, path: Path, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch model on the same preprocessing: (probability volume, mask)."""
    import torch

    vol = load_nifti(path)
    idx = nonempty_slab_indices(vol.data, spec)
    slices = volume_to_slices(vol.data, spec)
    probs = np.zeros((slices.shape[0], 1, spec.image_size, spec.image_size), np.float32)
    with torch.no_grad():
        probs[idx] = model(torch.from_numpy(slices_to_slabs(slices, spec, idx))).numpy()
    prob_vol = probs_to_volume(probs, spec, vol.shape)
    return prob_vol, binarize(prob_vol, spec)


def assert_masks_match(mask: np.ndarray, ref_mask: np.ndarray, ref_prob: np.ndarray,
                       max_diff: int = 5, tol: float = 1e-4) -> int:
    """Masks equal, except at most ``max_diff`` voxels where the reference is within ``tol`` of 0.5.

    Returns:
        The number of differing voxels.
    """
    assert mask.shape == ref_mask.shape
    diff = mask != ref_mask
    n = int(diff.sum())
    assert n <= max_diff, f"{n} voxels differ"
    assert np.all(np.abs(ref_prob[diff] - 0.5) < tol), ref_prob[diff]
    return n


def assert_same_geometry(out_path: Path, in_path: Path) -> None:
    """Shape, affine, qform/sform (and codes) and zooms of ``out_path`` equal ``in_path``'s."""
    a, b = nib.load(str(out_path)), nib.load(str(in_path))
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    ha, hb = a.header, b.header
    assert int(ha["qform_code"]) == int(hb["qform_code"])
    assert int(ha["sform_code"]) == int(hb["sform_code"])
    np.testing.assert_allclose(ha.get_qform(), hb.get_qform(), atol=1e-6)
    np.testing.assert_allclose(ha.get_sform(), hb.get_sform(), atol=1e-6)
    np.testing.assert_allclose(ha.get_zooms()[:3], hb.get_zooms()[:3], atol=1e-6)


# ------------------------------------------------------------ fake TensorRT
def fake_engine_fn(x: np.ndarray) -> np.ndarray:
    """What the fake engine computes: sigmoid(4 * (mean over channels - 0.2))."""
    m = x.astype(np.float32).mean(axis=1, keepdims=True)
    return (1.0 / (1.0 + np.exp(np.clip(-4.0 * (m - 0.2), -60, 60)))).astype(np.float32)


class FakeMemory(CudaMemory):
    """Host-backed stand-in for device memory that records what the runner does.

    Stream work is executed at once, except while a CUDA graph is captured:
    then it is recorded (as real stream capture does) and only runs when the
    graph is launched.
    """

    package = "fake"

    def __init__(self, gpu: GpuInfo = GPU) -> None:
        self._gpu = gpu
        self.buffers: dict[int, np.ndarray] = {}
        self.allocs: list[int] = []
        self.pinned_shapes: list[tuple[int, ...]] = []
        self.copies: list[str] = []
        self.closed = False
        self.capturing: list[Any] | None = None
        self.graphs: list[list[Any]] = []
        self._next = 0x1000

    @property
    def gpu(self) -> GpuInfo:
        return self._gpu

    @property
    def stream_handle(self) -> int:
        return 42

    def alloc(self, nbytes: int) -> int:
        ptr = self._next
        self._next += nbytes + 256
        self.buffers[ptr] = np.zeros(nbytes, np.uint8)
        self.allocs.append(nbytes)
        return ptr

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        self.pinned_shapes.append(tuple(shape))
        return np.zeros(shape, dtype)

    def enqueue(self, op: Any) -> None:
        """Run ``op`` now, or record it while capturing."""
        if self.capturing is not None:
            self.capturing.append(op)
        else:
            op()

    def htod(self, dst: int, src: np.ndarray) -> None:
        assert self.capturing is None, "copies are not part of the captured graph"
        self.copies.append("htod")
        raw = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        self.buffers[dst][: raw.size] = raw

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        self.copies.append("dtoh")
        flat = dst.reshape(-1).view(np.uint8)
        flat[:] = self.buffers[src][: flat.size]

    def synchronize(self) -> None:
        assert self.capturing is None, "cudaStreamSynchronize is illegal during capture"
        self.copies.append("sync")

    def begin_capture(self) -> None:
        assert self.capturing is None
        self.capturing = []

    def end_capture(self) -> Any:
        assert self.capturing is not None
        graph, self.capturing = self.capturing, None
        self.graphs.append(graph)
        return graph

    def launch(self, graph: Any) -> None:
        self.copies.append("launch")
        for op in graph:
            op()

    def close(self) -> None:
        self.closed = True


def make_fake_tensorrt(memory: FakeMemory, spec: PreprocessSpec, max_batch: int = 16,
                       version: str = TRT_VERSION,
                       profiles: list[tuple[int, int]] | None = None) -> types.ModuleType:
    """A module with the part of the TensorRT 10 API the runner uses, computing fake_engine_fn.

    ``profiles`` are ``(min, max)`` batch ranges (default: one, ``1..max_batch``).
    Like the real API, calls return ``False`` / ``None`` on refusal rather than raise.
    """
    c, s = spec.in_channels, spec.image_size
    ranges = profiles or [(1, max_batch)]
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    calls: dict[str, list[Any]] = {"set_input_shape": [], "execute": [], "profile": []}
    trt.calls = calls  # type: ignore[attr-defined]

    class TensorIOMode:
        INPUT = "INPUT"
        OUTPUT = "OUTPUT"

    class Logger:
        WARNING, ERROR = 2, 1

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class Context:
        def __init__(self) -> None:
            self.addr: dict[str, int] = {}
            self.shape: tuple[int, ...] | None = None
            self.profile = 0

        def set_optimization_profile_async(self, index: int, stream: int) -> bool:
            calls["profile"].append(index)
            self.profile = index
            return 0 <= index < len(ranges) and stream == 42

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            calls["set_input_shape"].append((self.profile, tuple(shape)))
            self.shape = tuple(shape)
            lo, hi = ranges[self.profile]
            return lo <= shape[0] <= hi

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addr[name] = ptr
            return True

        def execute_async_v3(self, stream: int) -> bool:
            assert self.shape is not None and stream == 42
            n = self.shape[0]
            calls["execute"].append(n)

            def op() -> None:
                x = memory.buffers[self.addr["slabs"]][: n * c * s * s * 4].view(np.float32)
                y = fake_engine_fn(x.reshape(n, c, s, s))
                memory.buffers[self.addr["prob"]][: y.nbytes] = y.view(np.uint8).reshape(-1)

            memory.enqueue(op)
            return True

    class Engine:
        num_io_tensors = 2
        num_optimization_profiles = len(ranges)

        def get_tensor_name(self, i: int) -> str:
            return ["slabs", "prob"][i]

        def get_tensor_mode(self, name: str) -> str:
            return TensorIOMode.INPUT if name == "slabs" else TensorIOMode.OUTPUT

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1, c, s, s) if name == "slabs" else (-1, 1, s, s)

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
            lo, hi = ranges[profile]
            return [(lo, c, s, s), (lo, c, s, s), (hi, c, s, s)]

        def get_tensor_dtype(self, name: str) -> str:
            return "float32"

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, blob: bytes) -> Engine | None:
            return Engine() if bytes(blob).startswith(b"FAKEPLAN") else None

    trt.TensorIOMode = TensorIOMode  # type: ignore[attr-defined]
    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    trt.nptype = lambda dtype: np.float32  # type: ignore[attr-defined]
    return trt


def write_fake_engine(path: Path, spec: PreprocessSpec, *, trt_version: str = TRT_VERSION,
                      gpu: GpuInfo = GPU, blob: bytes = b"FAKEPLAN") -> Path:
    """A ``.plan`` plus its sidecar, written by the builder's own writer."""
    path.write_bytes(blob)
    info = ArtifactInfo(spec=spec, model_name="dunet", model_args={"base_filters": 8},
                        params=1, precision="fp32")
    chw = (spec.in_channels, spec.image_size, spec.image_size)
    engine = EngineSidecar(tensorrt=trt_version, gpu_name=gpu.name,
                           compute_capability=gpu.compute_capability, binding=gpu.binding,
                           profiles=(((1, *chw), (8, *chw), (16, *chw)),))
    write_engine_sidecar(path, info, engine)
    return path


def fake_reference(path: Path, spec: PreprocessSpec) -> np.ndarray:
    """The mask the fake engine should produce for a volume file."""
    vol = load_nifti(path)
    idx = nonempty_slab_indices(vol.data, spec)
    slices = volume_to_slices(vol.data, spec)
    probs = np.zeros((slices.shape[0], 1, spec.image_size, spec.image_size), np.float32)
    probs[idx] = fake_engine_fn(slices_to_slabs(slices, spec, idx))
    return binarize(probs_to_volume(probs, spec, vol.shape), spec)
