"""The one place that talks to CUDA from Python: GPU info, device memory, streams, graphs.

Used by the TensorRT engine builder (:mod:`dunet_deploy.export.tensorrt_build`)
and the TensorRT runner (:mod:`dunet_deploy.runtime.tensorrt_runner`); torch-free.

Two bindings are supported, tried in this order:

* cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6) —
  pinned in the ``gpu`` extra to TensorRT's CUDA major (cuda-python 13 needs
  an R580+ driver and would otherwise report "no usable GPU" on older ones);
* pycuda — tried when cuda-python is missing **or** its runtime cannot talk to
  the driver (e.g. ``cudaErrorInsufficientDriver``).

Every failure is a one-line :class:`~dunet_deploy.errors.DunetError` naming
what is missing (no binding, no driver, no GPU).
"""

from __future__ import annotations

import abc
import ctypes
import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from dunet_deploy.errors import DunetError, one_line

__all__ = [
    "CudaMemory",
    "CudaPythonMemory",
    "GpuInfo",
    "PyCudaMemory",
    "default_memory",
    "import_cudart",
    "native_handle",
    "probe_gpu",
]


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device.

    Attributes:
        name: marketing name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        compute_capability: ``"major.minor"``, e.g. ``"9.0"``.
        binding: the Python binding that answered (``"cuda-python"``/``"pycuda"``).
        index: CUDA device ordinal (``CUDA_VISIBLE_DEVICES`` applies).
    """

    name: str
    compute_capability: str
    binding: str = "cuda-python"
    index: int = 0

    def to_dict(self) -> dict[str, str]:
        """JSON form for the engine sidecar (the device ordinal is not a property of it)."""
        return {"name": self.name, "compute_capability": self.compute_capability,
                "binding": self.binding}


def import_cudart() -> Any:
    """cuda-python's runtime API module: ``cuda.bindings.runtime``, else legacy ``cuda.cudart``.

    Raises:
        ImportError: when neither is importable.
    """
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return importlib.import_module("cuda.cudart")  # cuda-python < 12.6 layout


def native_handle(obj: Any) -> int:
    """The raw address of a cuda-python object (stream, graph...) as an ``int``.

    cuda-bindings >= 12.9.1 deprecates ``int(obj)`` for this in favour of
    ``cuda.bindings.utils.get_cuda_native_handle``; older releases only have ``int()``.
    """
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def _text(raw: Any) -> str:
    """A C string from cuda-python (``bytes``, NUL-padded) as ``str``."""
    if isinstance(raw, bytes):
        raw = raw.split(b"\0", 1)[0].decode(errors="replace")
    return str(raw).rstrip("\x00")


class CudaMemory(abc.ABC):
    """Device and pinned host memory, one stream and CUDA graphs, released by :meth:`close`."""

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

    def begin_capture(self) -> None:
        """Start capturing the stream's work into a CUDA graph.

        Raises:
            DunetError: when the binding has no CUDA graph support.
        """
        raise DunetError(f"CUDA graphs need cuda-python; {self.package} cannot capture them")

    def end_capture(self) -> Any:
        """Stop capturing; returns an instantiated, launchable graph."""
        raise DunetError(f"CUDA graphs need cuda-python; {self.package} cannot capture them")

    def launch(self, graph: Any) -> None:
        """Enqueue an instantiated graph on the stream."""
        raise DunetError(f"CUDA graphs need cuda-python; {self.package} cannot launch them")

    @abc.abstractmethod
    def close(self) -> None:
        """Free every allocation, graph and the stream (idempotent)."""


class CudaPythonMemory(CudaMemory):
    """:class:`CudaMemory` on NVIDIA's cuda-python runtime bindings.

    Args:
        device: CUDA device ordinal.

    Raises:
        ImportError: when cuda-python is not installed.
        DunetError: when no usable GPU is found (no driver, no device).
    """

    package = "cuda-python"

    def __init__(self, device: int = 0) -> None:
        self._rt = import_cudart()
        self._device_ptrs: list[int] = []
        self._host_ptrs: list[int] = []
        self._graphs: list[tuple[Any, Any]] = []
        self._stream: Any = None
        count = self._call("cudaGetDeviceCount", no_gpu=True)
        if count <= device:
            raise DunetError(f"TensorRT needs an NVIDIA GPU: CUDA sees {count} device(s)")
        self._call("cudaSetDevice", device, no_gpu=True)
        prop = self._call("cudaGetDeviceProperties", device)
        self._gpu = GpuInfo(_text(prop.name), f"{prop.major}.{prop.minor}", self.package, device)
        self._stream = self._call("cudaStreamCreate")

    def _call(self, func: str, *args: Any, no_gpu: bool = False) -> Any:
        """Call ``cudart.<func>``; raise a one-line DunetError unless it succeeded."""
        result = getattr(self._rt, func)(*args)
        err, rest = result[0], result[1:]
        if err != self._rt.cudaError_t.cudaSuccess:
            what = _text(self._rt.cudaGetErrorName(err)[1])
            text = _text(self._rt.cudaGetErrorString(err)[1])
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
        return native_handle(self._stream)

    def alloc(self, nbytes: int) -> int:
        ptr = int(self._call("cudaMalloc", max(int(nbytes), 1)))
        self._device_ptrs.append(ptr)
        return ptr

    def pinned(self, shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
        dt = np.dtype(dtype)
        count = int(np.prod(shape))
        nbytes = max(count * dt.itemsize, 1)
        ptr = int(self._call("cudaMallocHost", nbytes))
        self._host_ptrs.append(ptr)
        raw = (ctypes.c_byte * nbytes).from_address(ptr)
        return np.frombuffer(memoryview(raw), dtype=dt, count=count).reshape(shape)

    def htod(self, dst: int, src: np.ndarray) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", dst, src.ctypes.data, src.nbytes, kind, self._stream)

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", dst.ctypes.data, src, dst.nbytes, kind, self._stream)

    def synchronize(self) -> None:
        self._call("cudaStreamSynchronize", self._stream)

    def begin_capture(self) -> None:
        mode = self._rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        self._call("cudaStreamBeginCapture", self._stream, mode)

    def end_capture(self) -> Any:
        graph = self._call("cudaStreamEndCapture", self._stream)
        try:
            graph_exec = self._call("cudaGraphInstantiate", graph, 0)
        except DunetError:
            self._rt.cudaGraphDestroy(graph)
            raise
        self._graphs.append((graph, graph_exec))
        return graph_exec

    def launch(self, graph: Any) -> None:
        self._call("cudaGraphLaunch", graph, self._stream)

    def close(self) -> None:
        # Best effort: a failing free must not hide the error that led here.
        for graph, graph_exec in self._graphs:
            self._rt.cudaGraphExecDestroy(graph_exec)
            self._rt.cudaGraphDestroy(graph)
        for ptr in self._device_ptrs:
            self._rt.cudaFree(ptr)
        for ptr in self._host_ptrs:
            self._rt.cudaFreeHost(ptr)
        self._graphs, self._device_ptrs, self._host_ptrs = [], [], []
        if self._stream is not None:
            self._rt.cudaStreamDestroy(self._stream)
            self._stream = None


class PyCudaMemory(CudaMemory):
    """:class:`CudaMemory` on pycuda, using (and pushing) the device's primary context.

    No CUDA graphs (pycuda has no stream capture): :meth:`begin_capture` raises.

    Args:
        device: CUDA device ordinal.

    Raises:
        ImportError: when pycuda is not installed.
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
            self._gpu = GpuInfo(str(dev.name()), f"{major}.{minor}", self.package, device)
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
    """The first working :class:`CudaMemory`: cuda-python, else pycuda.

    pycuda is tried when cuda-python is missing and also when it is installed
    but cannot use the driver (a cuda-python newer than the driver supports).

    Raises:
        DunetError: one line naming what each binding said.
    """
    failures: list[str] = []  # installed, but no usable GPU through it
    missing: list[str] = []
    for factory in (CudaPythonMemory, PyCudaMemory):
        try:
            return factory(device)
        except ImportError as exc:
            missing.append(f"{factory.package}: {one_line(exc)}")
        except DunetError as exc:
            failures.append(str(exc) if not failures else f"{factory.package}: {exc}")
    if failures:
        tail = f" [{'; '.join(missing)}]" if missing else ""
        raise DunetError("; ".join(failures) + tail)
    raise DunetError(
        "TensorRT backend needs CUDA Python bindings: pip install cuda-python (or pycuda) "
        f"[{'; '.join(missing)}]"
    )


def probe_gpu(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device``, without keeping a stream.

    Raises:
        DunetError: when no binding is installed or no GPU is usable.
    """
    mem = default_memory(device)
    try:
        return mem.gpu
    finally:
        mem.close()
