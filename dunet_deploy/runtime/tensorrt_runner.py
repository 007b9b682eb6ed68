"""TensorRT backend: a serialised engine (``model.plan``) run on one CUDA stream.

The engine's sidecar ``model.plan.json`` (see :mod:`dunet_deploy.artifacts`)
must name the TensorRT version and GPU the engine was built with; an engine
is only valid for that TensorRT version and GPU, so a mismatch is refused
with one line before TensorRT would fail or silently run slowly. Fields read
from the sidecar (any of the spellings):

* TensorRT version: ``tensorrt`` (what :mod:`dunet_deploy.export.tensorrt_build`
  writes), ``tensorrt_version`` or ``tensorrt.version``;
* GPU: ``gpu.name`` (what the builder writes), ``gpu_name`` or ``gpu`` as a
  string; ``gpu.compute_capability`` or ``compute_capability`` (``"9.0"`` or
  ``[9, 0]``).

Memory: device buffers for the optimisation profile's largest batch and
page-locked host buffers are allocated once; each call copies host->device,
runs ``execute_async_v3`` and copies device->host on one stream, then waits.
Device memory goes through a small :class:`CudaMemory` abstraction with a
cuda-python (``cuda.bindings.runtime`` or legacy ``cuda.cudart``) and a pycuda
implementation; whichever is installed is used.
"""

from __future__ import annotations

import abc
import ctypes
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, ArtifactInfo
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.base import Runner, fixed_precision, one_line

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "CudaMemory",
    "CudaPythonMemory",
    "GpuInfo",
    "PyCudaMemory",
    "TensorRTRunner",
    "check_sidecar",
    "default_memory",
]


# ---------------------------------------------------------------- CUDA memory
@dataclass(frozen=True)
class GpuInfo:
    """The GPU a :class:`CudaMemory` works on.

    Attributes:
        index: CUDA device ordinal.
        name: Marketing name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        compute_capability: ``"major.minor"``, e.g. ``"9.0"``.
    """

    index: int
    name: str
    compute_capability: str


class CudaMemory(abc.ABC):
    """Device and pinned host memory plus one stream, released by :meth:`close`.

    Everything allocated through an instance is freed by its :meth:`close`.
    """

    #: Name of the Python package behind the implementation.
    package: ClassVar[str] = ""

    @property
    @abc.abstractmethod
    def gpu(self) -> GpuInfo:
        """The device in use."""

    @property
    @abc.abstractmethod
    def stream_handle(self) -> int:
        """The ``cudaStream_t`` as an integer, for ``execute_async_v3``."""

    @abc.abstractmethod
    def alloc(self, nbytes: int) -> int:
        """Allocate ``nbytes`` of device memory; returns the device pointer."""

    @abc.abstractmethod
    def pinned(self, shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
        """A page-locked host array (needed for truly asynchronous copies)."""

    @abc.abstractmethod
    def htod(self, dst: int, src: np.ndarray) -> None:
        """Enqueue a copy of contiguous ``src`` to device pointer ``dst`` on the stream."""

    @abc.abstractmethod
    def dtoh(self, dst: np.ndarray, src: int) -> None:
        """Enqueue a copy from device pointer ``src`` into contiguous ``dst`` on the stream."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait until everything enqueued on the stream has finished."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free every allocation and the stream (idempotent)."""


def _import_cudart() -> Any:
    """cuda-python's runtime API module: new location first, then the legacy one."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6 layout

        return cudart


class CudaPythonMemory(CudaMemory):
    """:class:`CudaMemory` on NVIDIA's cuda-python runtime bindings.

    Args:
        device: CUDA device ordinal.

    Raises:
        DunetError: when no usable GPU is found (no driver, no device).
    """

    package = "cuda-python"

    def __init__(self, device: int = 0) -> None:
        self._rt = _import_cudart()
        self._device_ptrs: list[int] = []
        self._host_ptrs: list[int] = []
        self._stream: Any = None
        count = self._call("cudaGetDeviceCount", no_gpu=True)
        if count <= device:
            raise DunetError(f"TensorRT needs an NVIDIA GPU: CUDA sees {count} device(s)")
        self._call("cudaSetDevice", device, no_gpu=True)
        prop = self._call("cudaGetDeviceProperties", device)
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else prop.name
        self._gpu = GpuInfo(device, str(name).rstrip("\x00"), f"{prop.major}.{prop.minor}")
        self._stream = self._call("cudaStreamCreate")

    def _call(self, func: str, *args: Any, no_gpu: bool = False) -> Any:
        """Call ``cudart.<func>``; raise a one-line DunetError unless it succeeded."""
        result = getattr(self._rt, func)(*args)
        err, rest = result[0], result[1:]
        if err != self._rt.cudaError_t.cudaSuccess:
            _, raw = self._rt.cudaGetErrorName(err)
            what = raw.decode() if isinstance(raw, bytes) else str(raw)
            _, raw_text = self._rt.cudaGetErrorString(err)
            text = raw_text.decode() if isinstance(raw_text, bytes) else str(raw_text)
            prefix = "TensorRT needs a usable NVIDIA GPU: " if no_gpu else "CUDA error: "
            raise DunetError(f"{prefix}{func} failed with {what} ({text})")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    @property
    def gpu(self) -> GpuInfo:
        return self._gpu

    @property
    def stream_handle(self) -> int:
        return int(self._stream)

    def alloc(self, nbytes: int) -> int:
        ptr = int(self._call("cudaMalloc", max(int(nbytes), 1)))
        self._device_ptrs.append(ptr)
        return ptr

    def pinned(self, shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
        dt = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dt.itemsize, 1)
        ptr = int(self._call("cudaMallocHost", nbytes))
        self._host_ptrs.append(ptr)
        raw = (ctypes.c_byte * nbytes).from_address(ptr)
        return np.frombuffer(memoryview(raw), dtype=dt, count=int(np.prod(shape))).reshape(shape)

    def htod(self, dst: int, src: np.ndarray) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", dst, src.ctypes.data, src.nbytes, kind, self._stream)

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", dst.ctypes.data, src, dst.nbytes, kind, self._stream)

    def synchronize(self) -> None:
        self._call("cudaStreamSynchronize", self._stream)

    def close(self) -> None:
        # Best effort: a failing free must not hide the error that led here.
        for ptr in self._device_ptrs:
            self._rt.cudaFree(ptr)
        for ptr in self._host_ptrs:
            self._rt.cudaFreeHost(ptr)
        self._device_ptrs, self._host_ptrs = [], []
        if self._stream is not None:
            self._rt.cudaStreamDestroy(self._stream)
            self._stream = None


class PyCudaMemory(CudaMemory):
    """:class:`CudaMemory` on pycuda, using (and pushing) the device's primary context.

    Args:
        device: CUDA device ordinal.

    Raises:
        DunetError: when no usable GPU is found.
    """

    package = "pycuda"

    def __init__(self, device: int = 0) -> None:
        import pycuda.driver as cuda

        self._cuda = cuda
        self._allocs: list[Any] = []
        self._ctx: Any = None
        try:
            cuda.init()
            count = cuda.Device.count()
            if count <= device:
                raise DunetError(f"TensorRT needs an NVIDIA GPU: CUDA sees {count} device(s)")
            dev = cuda.Device(device)
            # The primary context is the one the CUDA runtime (and TensorRT) uses.
            self._ctx = dev.retain_primary_context()
            self._ctx.push()
            major, minor = dev.compute_capability()
            self._gpu = GpuInfo(device, str(dev.name()), f"{major}.{minor}")
            self._stream = cuda.Stream()
        except cuda.Error as exc:
            self.close()
            raise DunetError(f"TensorRT needs a usable NVIDIA GPU: {one_line(exc)}") from None

    @property
    def gpu(self) -> GpuInfo:
        return self._gpu

    @property
    def stream_handle(self) -> int:
        return int(self._stream.handle)

    def alloc(self, nbytes: int) -> int:
        mem = self._cuda.mem_alloc(max(int(nbytes), 1))
        self._allocs.append(mem)
        return int(mem)

    def pinned(self, shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
        arr: np.ndarray = self._cuda.pagelocked_empty(shape, np.dtype(dtype))
        return arr

    def htod(self, dst: int, src: np.ndarray) -> None:
        self._cuda.memcpy_htod_async(dst, src, self._stream)

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        self._cuda.memcpy_dtoh_async(dst, src, self._stream)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        for mem in self._allocs:
            mem.free()
        self._allocs = []
        if self._ctx is not None:
            self._ctx.pop()
            self._ctx = None


def default_memory(device: int = 0) -> CudaMemory:
    """The first available :class:`CudaMemory`: cuda-python, else pycuda.

    Raises:
        DunetError: naming what is missing (no bindings, no driver, no GPU).
    """
    errors = []
    for factory, module in ((CudaPythonMemory, "cuda-python"), (PyCudaMemory, "pycuda")):
        try:
            return factory(device)
        except ImportError as exc:
            errors.append(f"{module}: {one_line(exc)}")
    raise DunetError(
        "TensorRT backend needs CUDA Python bindings: pip install cuda-python (or pycuda) "
        f"[{'; '.join(errors)}]"
    )


# --------------------------------------------------------------- the sidecar
def _lookup(extra: Mapping[str, Any], *paths: tuple[str, ...]) -> Any:
    for path in paths:
        node: Any = extra
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None and not isinstance(node, Mapping):
            return node
    return None


def _cc_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ".".join(str(int(v)) for v in value)
    return str(value)


def check_sidecar(model_path: Path, info: ArtifactInfo, trt_version: str, gpu: GpuInfo) -> None:
    """Refuse an engine built for another TensorRT version or GPU.

    Args:
        model_path: The engine (for messages).
        info: Its sidecar.
        trt_version: ``tensorrt.__version__`` of this process.
        gpu: The GPU the engine would run on.

    Raises:
        DunetError: one line saying what differs (or what the sidecar lacks).
    """
    built_trt = _lookup(info.extra, ("tensorrt",), ("tensorrt_version",), ("tensorrt", "version"))
    if built_trt is None:
        raise DunetError(
            f"{model_path}: sidecar does not say which TensorRT built the engine "
            "(no 'tensorrt' field); rebuild it with dunet-export"
        )
    if str(built_trt) != trt_version:
        raise DunetError(
            f"{model_path}: engine was built with TensorRT {built_trt}, this is TensorRT "
            f"{trt_version}; rebuild the engine here (dunet-export) or install TensorRT "
            f"{built_trt}"
        )
    built_cc = _lookup(info.extra, ("gpu", "compute_capability"), ("compute_capability",))
    built_gpu = _lookup(info.extra, ("gpu", "name"), ("gpu_name",), ("gpu",))
    if built_cc is not None and _cc_text(built_cc) != gpu.compute_capability:
        raise DunetError(
            f"{model_path}: engine was built for a GPU of compute capability {_cc_text(built_cc)}"
            f"{f' ({built_gpu})' if built_gpu else ''}, this GPU is {gpu.name} "
            f"({gpu.compute_capability}); rebuild the engine on this GPU"
        )
    if built_gpu is not None and str(built_gpu) != gpu.name:
        raise DunetError(
            f"{model_path}: engine was built on {built_gpu}, this GPU is {gpu.name}; "
            "rebuild the engine on this GPU (engines are tuned per GPU model)"
        )


# ----------------------------------------------------------------- the runner
def _dims(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple (``Dims`` has ``len`` and indexing, no iterator)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def _require_tensorrt() -> str:
    """Check that the real TensorRT is importable; returns its version.

    Raises:
        DunetError: naming what is missing.
    """
    try:
        import tensorrt
    except ImportError as exc:
        raise DunetError(
            f"TensorRT is not installed ({one_line(exc)}): pip install 'dunet-deploy[gpu]'"
        ) from None
    # tensorrt-stubs alone installs an importable but empty `tensorrt` namespace package.
    if not hasattr(tensorrt, "Runtime"):
        raise DunetError(
            "TensorRT is not installed (only type stubs found): pip install 'dunet-deploy[gpu]'"
        )
    return str(tensorrt.__version__)


class TensorRTRunner(Runner):
    """A TensorRT engine run with preallocated device and pinned host buffers.

    Args:
        model_path: The ``.plan`` / ``.engine`` file; its sidecar was read into ``info``.
        info: The sidecar's :class:`ArtifactInfo`.
        threads: Ignored (accepted for a uniform interface).
        precision: ``auto`` or the engine's precision (fixed when it was built).
        device: ``auto`` or ``cuda``.
        memory: A :class:`CudaMemory` to use (default: :func:`default_memory`);
            the runner closes it.

    Raises:
        DunetError: one line when TensorRT, the CUDA bindings or a GPU is
            missing, the sidecar names another TensorRT/GPU, or the engine is
            unusable.
    """

    backend = "tensorrt"

    def __init__(
        self,
        model_path: str | Path,
        info: ArtifactInfo,
        *,
        threads: int | None = None,
        precision: str = "auto",
        device: str = "auto",
        memory: CudaMemory | Callable[[], CudaMemory] | None = None,
    ) -> None:
        super().__init__(model_path, info)
        del threads  # TensorRT schedules the GPU itself
        if device not in ("auto", "cuda"):
            raise DunetError(f"tensorrt: engines run on a CUDA GPU, not --device {device}")
        self._precision = fixed_precision(self.model_path, self.backend, precision, info.precision)
        self._mem: CudaMemory | None = None
        self._trt_version = _require_tensorrt()
        if memory is None:
            self._mem = default_memory()
        else:
            self._mem = memory if isinstance(memory, CudaMemory) else memory()
        try:
            self._setup(self._mem)
        except BaseException:
            self.close()
            raise

    def _setup(self, mem: CudaMemory) -> None:
        import tensorrt as trt  # checked by _require_tensorrt

        check_sidecar(self.model_path, self.info, self._trt_version, mem.gpu)
        self._gpu = mem.gpu
        # ERROR, not WARNING: TensorRT's warnings are multi-line noise for CLI users.
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._deserialize(self._runtime)
        self._context = self._create_context(self._engine)
        self._bind(mem)

    def _deserialize(self, runtime: trt.Runtime) -> trt.ICudaEngine:
        try:
            blob = self.model_path.read_bytes()
        except OSError as exc:
            raise DunetError(f"{self.model_path}: cannot read engine ({exc.strerror})") from None
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise DunetError(
                f"{self.model_path}: TensorRT {self._trt_version} cannot deserialise this engine "
                "(corrupt, or built with another TensorRT/GPU); rebuild it with dunet-export"
            )
        return engine

    def _create_context(self, engine: trt.ICudaEngine) -> trt.IExecutionContext:
        context = engine.create_execution_context()
        if context is None:
            raise DunetError(f"{self.model_path}: TensorRT cannot create an execution context "
                             "(out of GPU memory?)")
        return context

    def _bind(self, mem: CudaMemory) -> None:
        import tensorrt as trt

        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
            raise DunetError(
                f"{self.model_path}: engine must have input '{INPUT_NAME}' and output "
                f"'{OUTPUT_NAME}', has {inputs} -> {outputs}"
            )
        shape = _dims(engine.get_tensor_shape(INPUT_NAME))
        if len(shape) != 4:
            raise DunetError(f"{self.model_path}: input '{INPUT_NAME}' must be 4D, got {shape}")
        self._check_graph_shape([d if d >= 0 else None for d in shape])
        if shape[0] >= 0:
            max_batch = shape[0]
        else:
            # Profile 0 gives (min, opt, max) shapes; buffers are sized for max.
            _, _, max_shape = engine.get_tensor_profile_shape(INPUT_NAME, 0)
            max_batch = int(max_shape[0])
        self._max_batch = max_batch
        self._c, self._s = shape[1], shape[2]
        self._dynamic = shape[0] < 0
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(INPUT_NAME)))
        self._out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(OUTPUT_NAME)))
        in_shape = (max_batch, self._c, self._s, self._s)
        out_shape = (max_batch, 1, self._s, self._s)
        self._h_in = mem.pinned(in_shape, self._in_dtype)
        self._h_out = mem.pinned(out_shape, self._out_dtype)
        self._d_in = mem.alloc(self._h_in.nbytes)
        self._d_out = mem.alloc(self._h_out.nbytes)
        for name, ptr in ((INPUT_NAME, self._d_in), (OUTPUT_NAME, self._d_out)):
            if not self._context.set_tensor_address(name, ptr):
                raise DunetError(f"{self.model_path}: TensorRT refused the buffer for '{name}'")
        # Any extra outputs still need an address; give each its own buffer.
        for name in outputs:
            if name != OUTPUT_NAME:
                dims = [max_batch if d < 0 else d for d in _dims(engine.get_tensor_shape(name))]
                size = int(np.prod(dims)) * np.dtype(
                    trt.nptype(engine.get_tensor_dtype(name))).itemsize
                self._context.set_tensor_address(name, mem.alloc(size))
        self._bound_batch = -1

    @property
    def input_shape(self) -> tuple[int | None, int, int, int]:
        return (None if self._dynamic else self._max_batch, self._c, self._s, self._s)

    @property
    def max_batch(self) -> int | None:
        return self._max_batch

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def device(self) -> str:
        return f"cuda:{self._gpu.index} ({self._gpu.name}, sm {self._gpu.compute_capability})"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tensorrt": self._trt_version}

    def _run(self, slabs: np.ndarray) -> np.ndarray:
        mem = self._mem
        assert mem is not None
        n = slabs.shape[0]
        # Fixed-batch engines run the whole buffer; the tail stays from earlier calls.
        run_n = n if self._dynamic else self._max_batch
        if self._dynamic and run_n != self._bound_batch:
            if not self._context.set_input_shape(INPUT_NAME, (run_n, self._c, self._s, self._s)):
                raise DunetError(f"{self.model_path}: TensorRT refused batch size {run_n}")
            self._bound_batch = run_n
        h_in = self._h_in[:run_n]
        h_out = self._h_out[:run_n]
        h_in[:n] = slabs  # casts to the engine's input dtype
        mem.htod(self._d_in, h_in)
        if not self._context.execute_async_v3(mem.stream_handle):
            raise DunetError(f"{self.model_path}: TensorRT execution failed")
        mem.dtoh(h_out, self._d_out)
        mem.synchronize()
        return np.array(h_out[:n], dtype=np.float32, copy=True)

    def close(self) -> None:
        # TensorRT objects first (they may reference device memory), then the memory.
        for attr in ("_context", "_engine", "_runtime"):
            self.__dict__.pop(attr, None)
        if self._mem is not None:
            self._mem.close()
            self._mem = None
        super().close()
