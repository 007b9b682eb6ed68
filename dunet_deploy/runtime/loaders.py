"""Loaders (Polygraphy's pattern): functions that build a backend's model object.

One function per backend object — an ONNX Runtime session, an OpenVINO
compiled model, a deserialised TensorRT engine — used by the runners
(:mod:`dunet_deploy.runtime`), export verification
(:mod:`dunet_deploy.export.verify`) and the bench alike, so every caller gets
the same options, the same checks and the same one-line errors.

Torch-free; each backend is imported inside its loader.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from dunet_deploy.artifacts import deferred_interrupts
from dunet_deploy.errors import DunetError, one_line

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "ASSIGNMENT_ENTRY",
    "CPU_EP",
    "CUDA_EP",
    "TRT_EP",
    "import_backend",
    "openvino_compile",
    "openvino_read",
    "ort_errors",
    "ort_session",
    "require_tensorrt",
    "tensorrt_engine",
]

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
#: Session config entry that makes ONNX Runtime keep which provider took which node.
ASSIGNMENT_ENTRY = "session.record_ep_graph_assignment_info"


def import_backend(module: str, *, missing: str | None = None, hint: str = "") -> ModuleType:
    """Import a backend's package (``onnxruntime``, ``openvino``, ``tensorrt``), holding signals.

    A SIGINT/SIGTERM handler that runs inside a pybind11 extension's
    initialisation makes the import fail with ``ImportError: initialization
    failed``: a ``timeout`` or Ctrl-C during the import would end the run as a
    missing backend (exit 2, no ``summary.json``). Held until the import is done
    (:func:`~dunet_deploy.artifacts.deferred_interrupts`), the signal then stops
    the run as it does anywhere else.

    Args:
        module: The package to import.
        missing: What the message says when it cannot be imported
            (default ``<module> is not importable``); the reason follows in brackets.
        hint: Advice after the reason (``: pip install ...``).

    Raises:
        DunetError: when the import fails.
        KeyboardInterrupt: :class:`~dunet_deploy.errors.Interrupted` for a
            SIGTERM, ``KeyboardInterrupt`` for a SIGINT received during the import
            (also when the import failed meanwhile: the interrupt comes first).
    """
    why = ""
    with deferred_interrupts():
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            why = one_line(exc)
    message = f"{missing or f'{module} is not importable'} ({why})"
    raise DunetError(f"{message}: {hint}" if hint else message)


# --------------------------------------------------------------- ONNX Runtime
def ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own exception types (``Fail``, ``EPFail``...; they derive from ``Exception``).

    Caught where a session is created or run, so that e.g. a CUDA out-of-memory
    becomes a :class:`DunetError` without catching ``Exception`` (our bugs keep
    their tracebacks).
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "RuntimeException", "EPFail", "InvalidArgument", "NoSuchFile",
             "NoModel", "InvalidGraph", "InvalidProtobuf", "ModelLoaded", "NotImplemented",
             "EngineError")
    found = tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))
    return found


def _preload_gpu_libraries(ort: Any) -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels before a GPU session (ORT >= 1.21)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()


def ort_session(
    model: str | os.PathLike[str] | bytes,
    providers: Sequence[str],
    *,
    provider_options: Mapping[str, Mapping[str, Any]] | None = None,
    threads: int | None = None,
    optimization: str = "all",
    source: str | None = None,
    require_providers: bool = True,
    optimized_model_path: str | None = None,
    record_assignment: bool = False,
) -> Any:
    """An ``onnxruntime.InferenceSession`` whose requested providers really are active.

    ONNX Runtime silently falls back to the CPU when the CUDA provider's
    libraries do not load; this refuses that instead of timing the CPU as
    ``cuda``.

    Args:
        model: ``.onnx`` path or serialized bytes.
        providers: execution providers, best first (``CPUExecutionProvider`` last).
        provider_options: options per provider name.
        threads: intra-op threads (ONNX Runtime's default when ``None``).
        optimization: ``"all"`` or ``"basic"`` graph optimisation.
        source: the name used in messages (default: the path).
        require_providers: refuse a session in which the first requested GPU
            provider is not active (``False``: accept the fallback).
        optimized_model_path: also write the optimised graph ONNX Runtime will
            run there (to inspect which kernels execute). ONNX Runtime refuses
            this when a provider compiles nodes (TensorRT): use ``record_assignment``.
        record_assignment: record which provider runs which node, for
            ``session.get_provider_graph_assignment_info()``.

    Returns:
        The session.

    Raises:
        DunetError: onnxruntime missing, the model not loadable, or the first
            requested provider not active in the session.
    """
    ort = import_backend("onnxruntime")
    name = source or (str(model) if not isinstance(model, bytes) else "<onnx bytes>")
    gpu = [p for p in providers if p != CPU_EP]
    if gpu:
        _preload_gpu_libraries(ort)
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1  # one sequential graph: inter-op threads only idle
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3  # errors only; ORT warns about every cast around fp16 ops
    if optimized_model_path is not None:
        so.optimized_model_filepath = optimized_model_path
    if record_assignment:
        so.add_session_config_entry(ASSIGNMENT_ENTRY, "1")
    opts = provider_options or {}
    plist: list[Any] = [(p, dict(opts[p])) if p in opts else p for p in providers]
    src = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(src, sess_options=so, providers=plist)
    except ort_errors() as exc:
        raise DunetError(f"{name}: onnxruntime cannot load the model ({one_line(exc)})") from None
    active = list(session.get_providers())
    if require_providers and gpu and gpu[0] not in active:
        raise DunetError(
            f"{name}: onnxruntime did not activate {gpu[0]} (active: {', '.join(active)}); its "
            "CUDA/cuDNN/TensorRT libraries did not load, and the model would run on the CPU"
        )
    return session


# ------------------------------------------------------------------- OpenVINO
def openvino_read(core: Any, model: str | os.PathLike[str] | bytes) -> Any:
    """``core.read_model`` of an ONNX path or serialized ONNX bytes, with a one-line error.

    Raises:
        DunetError: when OpenVINO cannot read the model.
    """
    name = "<onnx bytes>" if isinstance(model, bytes) else str(model)
    try:
        if isinstance(model, bytes):
            return core.read_model(model, b"")
        return core.read_model(str(Path(model)))
    except RuntimeError as exc:  # openvino raises RuntimeError/GeneralFailure subclasses
        raise DunetError(f"{name}: openvino cannot read the model ({one_line(exc)})") from None


def openvino_compile(core: Any, model: Any, device: str, config: Mapping[str, Any],
                     source: str | os.PathLike[str]) -> Any:
    """``core.compile_model(model, device, config)`` with a one-line error.

    Raises:
        DunetError: when OpenVINO cannot compile the model.
    """
    try:
        return core.compile_model(model, device, dict(config))
    except RuntimeError as exc:
        raise DunetError(f"{source}: openvino cannot compile the model ({one_line(exc)})") from None


# ------------------------------------------------------------------- TensorRT
_TRT_HINT = "pip install 'dunet-deploy[gpu]' on a machine with an NVIDIA GPU"


def require_tensorrt() -> str:
    """The installed TensorRT version (>= 10).

    Raises:
        DunetError: when the ``tensorrt`` package is missing, is only type
            stubs (a namespace package without the library), or is older than 10.
    """
    tensorrt = import_backend("tensorrt", missing="TensorRT is not installed", hint=_TRT_HINT)
    # tensorrt-stubs alone installs an importable but empty `tensorrt` namespace package.
    if not hasattr(tensorrt, "Logger"):
        raise DunetError(f"TensorRT is not installed (only type stubs found): {_TRT_HINT}")
    version = str(tensorrt.__version__)
    digits = version.split(".")[0]
    if not digits.isdigit() or int(digits) < 10:
        raise DunetError(f"TensorRT {version} is too old: dunet-deploy needs TensorRT >= 10")
    return version


def tensorrt_engine(
    source: str | os.PathLike[str] | bytes, logger: trt.ILogger, version: str
) -> tuple[trt.Runtime, trt.ICudaEngine]:
    """Deserialise an engine file (or a serialized plan just built).

    Returns:
        ``(runtime, engine)``; keep the runtime alive as long as the engine.

    Raises:
        DunetError: when the file cannot be read or TensorRT refuses it
            (``deserialize_cuda_engine`` returns ``None``).
    """
    import tensorrt as trt

    if isinstance(source, bytes):
        name, blob = "the engine just built", source
    else:
        name = str(source)
        try:
            blob = Path(source).read_bytes()
        except OSError as exc:
            raise DunetError(f"{name}: cannot read engine ({exc.strerror})") from None
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        raise DunetError(
            f"{name}: TensorRT {version} cannot deserialise this engine (corrupt, or built "
            "with another TensorRT/GPU); rebuild it with dunet-export"
        )
    return runtime, engine
