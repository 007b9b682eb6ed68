"""What ``dunet-bench`` times: torch eager / CUDA graphs and the runtime's runners.

Every backend is wrapped in a :class:`Session` with one method that runs one
batch end to end — host ``float32`` slabs in, host probabilities out — so the
numbers compare like with like: the ONNX Runtime, OpenVINO and TensorRT
sessions are the runtime's own :class:`~dunet_deploy.runtime.base.Runner`
objects (what ``dunet-infer`` uses); the torch sessions include the host ->
device and device -> host copies on CUDA too.

A combination that cannot run here raises :class:`Unavailable` with the reason
(shown as a skipped entry in ``bench.json`` / ``bench.md``), never a crash.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.bench.core import BACKENDS, cpu_features
from dunet_deploy.errors import DunetError

__all__ = [
    "ModelArtifacts",
    "Session",
    "Unavailable",
    "backend_unavailable",
    "cuda_unavailable",
    "open_session",
]

#: Runtime backends reached through ``dunet_deploy.runtime.open_runner``.
RUNNER_BACKENDS = ("onnxruntime", "openvino", "tensorrt")


class Unavailable(Exception):
    """This model × backend × precision cannot run on this machine; ``str()`` says why."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cuda_unavailable() -> str | None:
    """Why ``--device cuda`` cannot work here; ``None`` when torch sees a GPU."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install torch with CUDA)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA (CPU-only wheel)"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU"
    return None


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def backend_unavailable(backend: str, precision: str, device: str) -> str | None:
    """Why ``backend`` at ``precision`` cannot be measured on ``device``, before building anything.

    Checks only what is known without a model (installed packages, device,
    CPU features); the runners may still refuse later (e.g. OpenVINO's own
    capability check), which :func:`open_session` turns into :class:`Unavailable` too.

    Returns:
        ``None`` when worth trying, else a one-line reason.
    """
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}"
    cpu = device == "cpu"
    feats = cpu_features() if cpu else {}
    if precision == "int8" and backend.startswith("torch"):
        return "int8 is measured on the calibrated QDQ ONNX (onnxruntime, openvino)"
    if backend == "torch":
        if cpu and precision == "bf16" and not feats["native_bf16"]:
            return (f"CPU '{feats['model']}' has no native bf16 (no avx512_bf16/amx_bf16); "
                    "torch autocast would emulate it")
        if cpu and precision == "fp16" and not feats["native_fp16"]:
            return (f"CPU '{feats['model']}' has no native fp16 (no avx512_fp16/amx_fp16); "
                    "torch fp16 on this CPU is an emulated slow path")
        return None
    if backend == "torch-cudagraphs":
        return "CUDA graphs need a GPU (--device cuda)" if cpu else None
    if backend == "torch-compile":
        # What a user tries before TensorRT; on the CPU it would measure Inductor's C++ codegen.
        return ("torch.compile (max-autotune, CUDA graphs) is measured on CUDA only "
                "(--device cuda)") if cpu else None
    if backend == "onnxruntime":
        if not _installed("onnxruntime"):
            return "onnxruntime is not installed (pip install 'dunet-deploy[cpu]')"
        if precision == "bf16":
            return ("ONNX Runtime has no bf16 export/execution path for this graph "
                    "(measure bf16 with openvino or torch)")
        if cpu and precision == "fp16":
            return ("ONNX Runtime's CPU provider has no fp16 convolution kernels (it would insert "
                    "casts and compute fp32); fp16 ONNX is measured on the CUDA provider")
        if not cpu and "CUDAExecutionProvider" not in _ort_providers():
            have = ", ".join(_ort_providers())
            return f"onnxruntime has no CUDAExecutionProvider ({have}); install onnxruntime-gpu"
        return None
    if backend == "openvino":
        if not cpu:
            return "the OpenVINO runner runs on the CPU only (--device cpu)"
        if not _installed("openvino"):
            return "openvino is not installed (pip install 'dunet-deploy[openvino]')"
        return None
    # tensorrt
    if cpu:
        return "TensorRT needs an NVIDIA GPU (--device cuda)"
    from dunet_deploy.export.tensorrt_build import check_tensorrt_available

    try:
        check_tensorrt_available()  # also catches tensorrt-stubs without the library
    except DunetError as exc:
        return str(exc)
    if precision == "bf16":
        return "the export module builds fp32 and fp16 TensorRT engines only"
    return None


# --------------------------------------------------------------------------- sessions
@dataclass
class Session:
    """One loaded model ready to be timed.

    Attributes:
        run: runs one batch (host float32 ``[N, C, S, S]``, ``N <= max_batch``) to
            host probabilities.
        prepare: untimed set-up for a batch size (CUDA graph capture).
        sync: waits for the device (no-op on CPU); called inside the timed region.
        close: releases the model.
        gpu_memory_mb: peak GPU memory of the last timed region, ``None`` on CPU.
        reset_gpu_memory: starts a new region for :attr:`gpu_memory_mb`.
        info: what actually runs (precision resolved by the backend, providers...).
    """

    run: Callable[[np.ndarray], Any]
    prepare: Callable[[int], None] = lambda n: None
    sync: Callable[[], None] = lambda: None
    close: Callable[[], None] = lambda: None
    gpu_memory_mb: Callable[[], float | None] = lambda: None
    reset_gpu_memory: Callable[[], None] = lambda: None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelArtifacts:
    """A model in every form the backends need, made on first use and cached.

    Attributes:
        name: registry name.
        model: the torch model (eval mode, CPU).
        spec: preprocessing spec matching the model and image size.
        cache_dir: where the ONNX files and engines go.
        max_batch: largest batch an engine must accept.
    """

    name: str
    model: Any
    spec: Any
    cache_dir: Path
    max_batch: int
    _paths: dict[str, Path] = field(default_factory=dict)

    def onnx(self) -> Path:
        """The fp32 ONNX (exported once)."""
        if "onnx" not in self._paths:
            from dunet_deploy.export.onnx_export import export_onnx

            path = self.cache_dir / f"{self.name}.onnx"
            export_onnx(self.model, self.spec, path)
            self._paths["onnx"] = path
        return self._paths["onnx"]

    def onnx_fp16(self) -> Path:
        """The mixed-precision fp16 ONNX (converted once from :meth:`onnx`)."""
        if "onnx_fp16" not in self._paths:
            import onnx

            from dunet_deploy.export.fp16 import convert_to_mixed_fp16
            from dunet_deploy.export.onnx_export import artifact_info, set_metadata

            proto, _ = convert_to_mixed_fp16(onnx.load(str(self.onnx())))
            set_metadata(proto, artifact_info(self.model, self.spec, precision="fp16"))
            path = self.cache_dir / f"{self.name}.fp16.onnx"
            path.write_bytes(proto.SerializeToString())
            self._paths["onnx_fp16"] = path
        return self._paths["onnx_fp16"]

    def onnx_int8(self) -> Path:
        """The QDQ int8 ONNX, calibrated on synthetic slabs (see dunet_deploy.export.int8)."""
        if "onnx_int8" not in self._paths:
            from dunet_deploy.export.int8 import bench_int8_onnx
            from dunet_deploy.export.onnx_export import artifact_info

            info = artifact_info(self.model, self.spec, precision="int8")
            path = self.cache_dir / f"{self.name}.int8.onnx"
            self._paths["onnx_int8"] = bench_int8_onnx(self.onnx(), info, path)
        return self._paths["onnx_int8"]

    def engine(self, precision: str) -> Path:
        """A TensorRT engine for ``precision`` built by the export module (once)."""
        key = f"engine_{precision}"
        if key not in self._paths:
            self._paths[key] = _build_engine(self, precision)
        return self._paths[key]


def _build_engine(art: ModelArtifacts, precision: str) -> Path:
    """Build a TensorRT engine and its sidecar with the export module's builder.

    Strongly typed from the ONNX of that precision: fp16 from the
    mixed-precision ONNX (the deployment engine), int8 from the QDQ ONNX
    (explicit quantization), fp32 from the FP32 ONNX (true FP32, TF32 off).
    Profiles: latency 1..8 and throughput up to the largest benchmarked batch.
    """

    from dunet_deploy.artifacts import write_engine_sidecar
    from dunet_deploy.export.onnx_export import artifact_info
    from dunet_deploy.export.tensorrt_build import (
        EngineOptions,
        build_engine,
        check_tensorrt_available,
    )

    try:
        check_tensorrt_available()
    except DunetError as exc:
        raise Unavailable(str(exc)) from None
    sources = {"fp16": art.onnx_fp16, "fp32": art.onnx, "int8": art.onnx_int8}
    if precision not in sources:
        raise Unavailable(f"the export module builds no {precision} TensorRT engines")
    spec = art.spec
    chw = (spec.in_channels, spec.image_size, spec.image_size)
    profile = (1, min(32, art.max_batch), art.max_batch)
    try:
        built = build_engine(sources[precision](), chw, EngineOptions(batch_range=profile))
    except DunetError as exc:
        raise Unavailable(f"TensorRT engine build failed: {exc}") from None
    out = art.cache_dir / f"{art.name}.{precision}.plan"
    out.write_bytes(built.plan)
    info = artifact_info(art.model, spec, precision=precision)
    write_engine_sidecar(out, info, built.sidecar)
    return out


def _torch_session(art: ModelArtifacts, precision: str, device: str, graphs: bool,
                   compiled: bool = False) -> Session:
    import torch

    cuda = device.startswith("cuda")
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = art.model.to(device).eval()
    if compiled:
        # max-autotune: Triton GEMM/conv autotuning plus CUDA graphs (Inductor's cudagraph
        # trees); the warm-up pays for compilation, per batch size (dynamic=False).
        model = torch.compile(model, mode="max-autotune", dynamic=False)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if dtype is None:
            return model(x)
        # The autocast weight cache must be off while a CUDA graph is captured.
        with torch.autocast("cuda" if cuda else "cpu", dtype=dtype, cache_enabled=not graphs):
            return model(x)

    info: dict[str, Any] = {"autocast": str(dtype).replace("torch.", "") if dtype else None}
    if compiled:
        info["torch_compile"] = "max-autotune (CUDA graphs)"
    if not cuda:
        def run_cpu(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return forward(torch.from_numpy(x)).float().numpy()

        return Session(run=run_cpu, info=info)

    # On CUDA: pinned host staging buffers (as the runners use) so copies run at full speed;
    # cuDNN autotuning as a performance-minded user enables it (warm-up pays for it).
    torch.backends.cudnn.benchmark = True
    info["cudnn_benchmark"] = True
    info["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
    c, s, nmax = art.spec.in_channels, art.spec.image_size, art.max_batch
    host_in = torch.empty((nmax, c, s, s), dtype=torch.float32).pin_memory()
    host_out = torch.empty((nmax, 1, s, s), dtype=torch.float32).pin_memory()
    dev_in = torch.empty((nmax, c, s, s), dtype=torch.float32, device=device)

    def sync() -> None:
        torch.cuda.synchronize()

    def gpu_mem() -> float:
        return torch.cuda.max_memory_allocated() / 2**20

    def reset_mem() -> None:
        torch.cuda.reset_peak_memory_stats()

    def close() -> None:
        art.model.to("cpu")
        torch.cuda.empty_cache()

    if not graphs:
        def run_eager(x: np.ndarray) -> torch.Tensor:
            n = len(x)
            host_in.numpy()[:n] = x
            dev_in[:n].copy_(host_in[:n], non_blocking=True)
            with torch.inference_mode():
                host_out[:n].copy_(forward(dev_in[:n]).float(), non_blocking=True)
            return host_out[:n]

        return Session(run=run_eager, sync=sync, close=close, gpu_memory_mb=gpu_mem,
                       reset_gpu_memory=reset_mem, info=info)

    return _graph_session(forward, host_in, host_out, dev_in,
                          Session(run=lambda x: None, sync=sync, close=close,
                                  gpu_memory_mb=gpu_mem, reset_gpu_memory=reset_mem, info=info))


def _graph_session(forward: Callable[[Any], Any], host_in: Any, host_out: Any, dev_in: Any,
                   base: Session) -> Session:
    """torch CUDA graphs: one static-shape graph per batch size, captured (untimed) by prepare().

    Args:
        forward: the model call (autocast included) on a device tensor.
        host_in: pinned host input staging ``[nmax, C, S, S]``.
        host_out: pinned host output staging ``[nmax, 1, S, S]``.
        dev_in: device input buffer ``[nmax, C, S, S]`` (graph inputs are its slices).
        base: the eager session's sync/close/memory callables and info.
    """
    import torch

    captured: dict[int, tuple[Any, Any, Any]] = {}

    def prepare(n: int) -> None:
        if n in captured:
            return
        # Batches are timed one after the other: free the previous graph's private
        # memory pool first, so the big batches of the 3D UNet still fit.
        for graph_old, _, _ in captured.values():
            graph_old.reset()
        captured.clear()
        torch.cuda.empty_cache()
        x_static = dev_in[:n]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode():
            # A few eager runs on a side stream first: cuDNN picks its algorithms there.
            with torch.cuda.stream(side):
                for _ in range(3):
                    forward(x_static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y_static = forward(x_static).float()
        captured[n] = (graph, x_static, y_static)

    def run_graph(x: np.ndarray) -> Any:
        n = len(x)
        prepare(n)
        graph, _, y_static = captured[n]
        host_in.numpy()[:n] = x
        dev_in[:n].copy_(host_in[:n], non_blocking=True)
        graph.replay()
        host_out[:n].copy_(y_static, non_blocking=True)
        return host_out[:n]

    def close_graphs() -> None:
        for graph, _, _ in captured.values():
            graph.reset()
        captured.clear()
        base.close()

    info = {**base.info, "cuda_graphs": "one static-shape graph per batch size"}
    return Session(run=run_graph, prepare=prepare, sync=base.sync, close=close_graphs,
                   gpu_memory_mb=base.gpu_memory_mb, reset_gpu_memory=base.reset_gpu_memory,
                   info=info)


def _runner_session(
    art: ModelArtifacts, backend: str, precision: str, device: str, threads: int | None,
    cuda_graph: bool = False,
) -> Session:
    from dunet_deploy.runtime.base import open_runner

    cuda = device.startswith("cuda")
    if backend == "tensorrt":
        path = art.engine(precision)
        opts: dict[str, Any] = {"cuda_graph": cuda_graph}
    else:
        path = art.onnx_fp16() if precision == "fp16" and backend == "onnxruntime" else art.onnx()
        path = art.onnx_int8() if precision == "int8" else path
        opts = {"threads": threads, "precision": precision, "device": "cuda" if cuda else "cpu"}
        if backend == "onnxruntime" and cuda:
            opts["cuda_graph"] = cuda_graph  # IOBinding is always on for the CUDA provider
    try:
        runner = open_runner(path, backend, **opts)
    except DunetError as exc:
        # e.g. OpenVINO's own check that the CPU computes bf16 natively
        raise Unavailable(str(exc)) from None
    if runner.precision != precision:
        runner.close()
        raise Unavailable(f"{backend} would compute in {runner.precision}, not {precision}")
    info = runner.describe()
    info.pop("path", None)
    gpu_mem: Callable[[], float | None] = lambda: None  # noqa: E731
    reset: Callable[[], None] = lambda: None  # noqa: E731
    if device.startswith("cuda"):
        gpu_mem, reset = _device_memory_probe()
    return Session(run=runner.infer, close=runner.close, gpu_memory_mb=gpu_mem,
                   reset_gpu_memory=reset, info=info)


def _device_memory_probe() -> tuple[Callable[[], float | None], Callable[[], None]]:
    """GPU memory in use on the device (all allocators), sampled after the timed region.

    Non-torch runtimes allocate outside torch's caching allocator, so the
    device-wide figure (``cudaMemGetInfo``) is the only common measure; it
    includes the CUDA context.
    """
    try:
        import torch
    except ImportError:
        return (lambda: None), (lambda: None)

    def used() -> float | None:
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20

    return used, (lambda: None)


def open_session(
    art: ModelArtifacts,
    backend: str,
    precision: str,
    *,
    device: str,
    threads: int | None,
    cuda_graph: bool = False,
) -> Session:
    """Load ``art`` for ``backend`` at ``precision``.

    Args:
        art: the model and its exports.
        backend: one of :data:`~dunet_deploy.bench.core.BACKENDS`.
        precision: ``fp32``, ``fp16`` or ``bf16``.
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``.
        threads: CPU threads for the runners (torch's are set globally).
        cuda_graph: CUDA graphs in the TensorRT and ONNX Runtime (CUDA) runners.

    Raises:
        Unavailable: when this combination cannot run here (with the reason).
    """
    reason = backend_unavailable(backend, precision, "cpu" if device == "cpu" else "cuda")
    if reason is not None:
        raise Unavailable(reason)
    if backend in ("torch", "torch-cudagraphs", "torch-compile"):
        return _torch_session(art, precision, device, backend == "torch-cudagraphs",
                              compiled=backend == "torch-compile")
    return _runner_session(art, backend, precision, device, threads, cuda_graph)
