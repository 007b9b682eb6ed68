"""TensorRT backend: a serialised engine (``model.plan``) run on one CUDA stream.

The engine's sidecar ``model.plan.json`` (:class:`~dunet_deploy.artifacts.EngineSidecar`)
names the TensorRT version and the GPU the engine was built with. A TensorRT
version mismatch and a compute-capability mismatch are refused with one line;
another SKU of the same compute capability (an H100 PCIe engine on an H100
SXM, a MIG slice) is accepted — TensorRT itself refuses an engine it cannot
run (``deserialize_cuda_engine`` returns ``None``), which is reported too.

Memory: device buffers for the largest batch of any optimisation profile and
page-locked host buffers are allocated once; each call copies host->device,
runs ``execute_async_v3`` (or replays a CUDA graph captured around it, with
``cuda_graph=True``) and copies device->host on one stream, then waits.
Engines built by :mod:`dunet_deploy.export.tensorrt_build` have two profiles
(latency: batch 1-8 tuned for 1; throughput: up to 64 tuned for 32); each call
runs on the profile with the smallest maximum that fits its batch, one
execution context per profile. Device memory goes through
:class:`dunet_deploy.cuda.CudaMemory` (cuda-python, else pycuda).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, ArtifactInfo, EngineSidecar
from dunet_deploy.cuda import CudaMemory, GpuInfo, default_memory
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.base import Runner, fixed_precision
from dunet_deploy.runtime.loaders import require_tensorrt, tensorrt_engine

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "CudaMemory",
    "GpuInfo",
    "TensorRTRunner",
    "check_sidecar",
    "default_memory",
]


# --------------------------------------------------------------- the sidecar
def check_sidecar(model_path: Path, info: ArtifactInfo, trt_version: str, gpu: GpuInfo) -> None:
    """Refuse an engine built for another TensorRT version or compute capability.

    The GPU's name is not compared: engines run on any device of the same
    compute capability (other SKUs, MIG slices); TensorRT itself refuses the
    rest at deserialisation.

    Args:
        model_path: The engine (for messages).
        info: Its sidecar.
        trt_version: ``tensorrt.__version__`` of this process.
        gpu: The GPU the engine would run on.

    Raises:
        DunetError: one line saying what differs (or what the sidecar lacks).
    """
    side = EngineSidecar.from_info(info, str(model_path))
    if side.tensorrt != trt_version:
        raise DunetError(
            f"{model_path}: engine was built with TensorRT {side.tensorrt}, this is TensorRT "
            f"{trt_version}; rebuild the engine here (dunet-export) or install TensorRT "
            f"{side.tensorrt}"
        )
    if side.compute_capability != gpu.compute_capability:
        built_on = f" ({side.gpu_name})" if side.gpu_name else ""
        raise DunetError(
            f"{model_path}: engine was built for a GPU of compute capability "
            f"{side.compute_capability}{built_on}, this GPU is {gpu.name} "
            f"({gpu.compute_capability}); rebuild the engine on this GPU"
        )


# ----------------------------------------------------------------- the runner
def _dims(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple (``Dims`` has ``len`` and indexing, no iterator)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


@dataclass
class _Profile:
    """One optimisation profile and the execution context that runs it."""

    index: int
    min_batch: int
    max_batch: int
    context: Any
    bound_batch: int = -1
    graphs: dict[int, Any] = field(default_factory=dict)


def pick_profile(profiles: list[tuple[int, int]], n: int) -> int:
    """Index of the profile for a batch of ``n``: the smallest maximum that fits.

    Args:
        profiles: ``(min_batch, max_batch)`` per profile, in profile order.
        n: batch size.

    Returns:
        The profile index; -1 when none accepts ``n``.
    """
    fits = [(hi, i) for i, (lo, hi) in enumerate(profiles) if lo <= n <= hi]
    return min(fits)[1] if fits else -1


class TensorRTRunner(Runner):
    """A TensorRT engine run with preallocated device and pinned host buffers.

    Args:
        model_path: The ``.plan`` / ``.engine`` file; its sidecar was read into ``info``.
        info: The sidecar's :class:`ArtifactInfo`.
        threads: Ignored (accepted for a uniform interface).
        precision: ``auto`` or the engine's precision (fixed when it was built).
        device: ``auto`` or ``cuda``.
        cuda_graph: Capture ``execute_async_v3`` in a CUDA graph per batch size
            (on its first call) and replay it afterwards; needs cuda-python.
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
        cuda_graph: bool = False,
        memory: CudaMemory | Callable[[], CudaMemory] | None = None,
    ) -> None:
        super().__init__(model_path, info)
        del threads  # TensorRT schedules the GPU itself
        if device not in ("auto", "cuda"):
            raise DunetError(f"tensorrt: engines run on a CUDA GPU, not --device {device}")
        self._precision = fixed_precision(self.model_path, self.backend, precision, info.precision)
        self._cuda_graph = bool(cuda_graph)
        self._mem: CudaMemory | None = None
        self._profiles: list[_Profile] = []
        self._trt_version = require_tensorrt()
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
        import tensorrt as trt  # checked by require_tensorrt

        check_sidecar(self.model_path, self.info, self._trt_version, mem.gpu)
        self._gpu = mem.gpu
        # ERROR, not WARNING: TensorRT's warnings are multi-line noise for CLI users.
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime, self._engine = tensorrt_engine(self.model_path, self._logger,
                                                      self._trt_version)
        self._bind(mem)

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
        shape = _dims(engine.get_tensor_shape(INPUT_NAME)) if INPUT_NAME in inputs else ()
        self._check_io(inputs, outputs, [d if d >= 0 else None for d in shape])
        self._c, self._s = shape[1], shape[2]
        self._dynamic = shape[0] < 0
        ranges = self._profile_ranges(shape)
        self._max_batch = max(hi for _, hi in ranges)
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(INPUT_NAME)))
        self._out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(OUTPUT_NAME)))
        nmax = self._max_batch
        self._h_in = mem.pinned((nmax, self._c, self._s, self._s), self._in_dtype)
        self._h_out = mem.pinned((nmax, 1, self._s, self._s), self._out_dtype)
        self._d_in = mem.alloc(self._h_in.nbytes)
        self._d_out = mem.alloc(self._h_out.nbytes)
        addresses = {INPUT_NAME: self._d_in, OUTPUT_NAME: self._d_out}
        for name in outputs:  # any extra outputs still need an address
            if name not in addresses:
                dims = [nmax if d < 0 else d for d in _dims(engine.get_tensor_shape(name))]
                itemsize = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).itemsize
                addresses[name] = mem.alloc(int(np.prod(dims)) * itemsize)
        for index, (lo, hi) in enumerate(ranges):
            context = self._create_context(engine)
            if index > 0 and not context.set_optimization_profile_async(index,
                                                                         mem.stream_handle):
                raise DunetError(f"{self.model_path}: TensorRT refused optimisation profile "
                                 f"{index}")
            for name, ptr in addresses.items():
                if not context.set_tensor_address(name, ptr):
                    raise DunetError(f"{self.model_path}: TensorRT refused the buffer for "
                                     f"'{name}'")
            self._profiles.append(_Profile(index, lo, hi, context))
        if len(ranges) > 1:
            mem.synchronize()  # the profile switches are stream operations

    def _profile_ranges(self, shape: tuple[int, ...]) -> list[tuple[int, int]]:
        """``(min_batch, max_batch)`` of each optimisation profile (one for a fixed batch)."""
        if shape[0] >= 0:
            return [(shape[0], shape[0])]
        engine = self._engine
        out = []
        for index in range(max(1, int(engine.num_optimization_profiles))):
            lo, _, hi = engine.get_tensor_profile_shape(INPUT_NAME, index)
            out.append((int(lo[0]), int(hi[0])))
        return out

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
        return {**super().describe(), "tensorrt": self._trt_version,
                "profiles": [[p.min_batch, p.max_batch] for p in self._profiles],
                "cuda_graph": self._cuda_graph}

    def _profile_for(self, n: int) -> _Profile:
        index = pick_profile([(p.min_batch, p.max_batch) for p in self._profiles], n)
        if index < 0:
            raise DunetError(f"{self.model_path}: no optimisation profile takes batch size {n} "
                             f"(profiles: {[(p.min_batch, p.max_batch) for p in self._profiles]})")
        return self._profiles[index]

    def _enqueue(self, mem: CudaMemory, profile: _Profile, run_n: int) -> None:
        """Enqueue the engine for ``run_n`` slabs: directly, or as a (new) CUDA graph."""
        context = profile.context
        if self._dynamic and run_n != profile.bound_batch:
            if not context.set_input_shape(INPUT_NAME, (run_n, self._c, self._s, self._s)):
                raise DunetError(f"{self.model_path}: TensorRT refused batch size {run_n}")
            profile.bound_batch = run_n
        graph = profile.graphs.get(run_n)
        if graph is not None:
            mem.launch(graph)
            return
        if not context.execute_async_v3(mem.stream_handle):
            raise DunetError(f"{self.model_path}: TensorRT execution failed")
        if self._cuda_graph:
            # The call above ran outside capture: TensorRT does its deferred
            # shape-dependent set-up there, which a captured call must not do.
            mem.begin_capture()
            ok = context.execute_async_v3(mem.stream_handle)
            graph = mem.end_capture()
            if not ok:
                raise DunetError(f"{self.model_path}: TensorRT execution failed under CUDA "
                                 "graph capture")
            profile.graphs[run_n] = graph

    def _run(self, slabs: np.ndarray) -> np.ndarray:
        mem = self._mem
        assert mem is not None
        n = slabs.shape[0]
        # Fixed-batch engines run the whole buffer; the tail stays from earlier calls.
        run_n = n if self._dynamic else self._max_batch
        profile = self._profile_for(run_n)
        h_in = self._h_in[:run_n]
        h_out = self._h_out[:run_n]
        h_in[:n] = slabs  # casts to the engine's input dtype
        mem.htod(self._d_in, h_in)
        self._enqueue(mem, profile, run_n)
        mem.dtoh(h_out, self._d_out)
        mem.synchronize()
        return np.array(h_out[:n], dtype=np.float32, copy=True)

    def close(self) -> None:
        # TensorRT objects first (they may reference device memory), then the memory.
        self._profiles = []
        for attr in ("_engine", "_runtime"):
            self.__dict__.pop(attr, None)
        if self._mem is not None:
            self._mem.close()
            self._mem = None
        super().close()
