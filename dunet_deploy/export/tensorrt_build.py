"""Build a TensorRT engine (``model.plan``) from the exported ONNX.

TensorRT and the CUDA bindings are imported lazily: the rest of dunet-deploy
works without them, and without them :func:`check_tensorrt_available` raises a
one-line :class:`~dunet_deploy.errors.DunetError` that says which is missing.

Precision: TensorRT 10.12 deprecated "weak typing" (``BuilderFlag.FP16``,
TensorRT picks per layer) and 11.x removed it. From 10.12 on the engine is
built from the mixed-precision ONNX (``model_fp16.onnx``, see
:mod:`dunet_deploy.export.fp16`) as a *strongly typed* network, which executes
exactly the types of the graph (the FP32 islands included). Older TensorRT 10
releases build the FP32 ONNX with ``BuilderFlag.FP16``.

The engine has one optimisation profile over the batch dimension of input
``slabs``: ``[min, C, S, S]`` .. ``[max, C, S, S]``, tuned for ``opt``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dunet_deploy.artifacts import INPUT_NAME
from dunet_deploy.errors import DunetError

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "DEFAULT_BATCH_RANGE",
    "STRONGLY_TYPED_SINCE",
    "EngineOptions",
    "GpuInfo",
    "build_engine",
    "check_tensorrt_available",
    "parse_batch_range",
    "probe_gpu",
    "uses_strong_typing",
]

DEFAULT_BATCH_RANGE: tuple[int, int, int] = (1, 8, 32)
#: First TensorRT release whose strongly typed networks replace ``BuilderFlag.FP16``.
STRONGLY_TYPED_SINCE: tuple[int, int] = (10, 12)


@dataclass(frozen=True)
class GpuInfo:
    """The GPU an engine is built for (engines are specific to it).

    Attributes:
        name: device name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        compute_capability: ``"major.minor"``, e.g. ``"9.0"``.
        binding: which Python CUDA binding answered (``"cuda-python"``/``"pycuda"``).
    """

    name: str
    compute_capability: str
    binding: str

    def to_dict(self) -> dict[str, str]:
        """JSON form for the sidecar."""
        return {
            "name": self.name,
            "compute_capability": self.compute_capability,
            "binding": self.binding,
        }


@dataclass(frozen=True)
class EngineOptions:
    """Builder settings.

    Attributes:
        batch_range: ``(min, opt, max)`` batch sizes of the optimisation profile.
        workspace_mb: workspace memory pool limit in MiB (TensorRT's default
            when ``None``: the whole device).
        opt_level: ``builder_optimization_level`` 0..5 (TensorRT's default,
            3, when ``None``).
        timing_cache: timing cache file loaded before the build if it exists.
        timing_cache_out: where to save the updated cache (default: ``timing_cache``).
    """

    batch_range: tuple[int, int, int] = DEFAULT_BATCH_RANGE
    workspace_mb: int | None = None
    opt_level: int | None = None
    timing_cache: Path | None = None
    timing_cache_out: Path | None = None


def parse_batch_range(text: str) -> tuple[int, int, int]:
    """Parse ``"MIN,OPT,MAX"``; ``DunetError`` unless ``1 <= MIN <= OPT <= MAX``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or len(parts) != 3:
        raise DunetError(f"--batch-range {text!r}: expected three integers MIN,OPT,MAX")
    lo, opt, hi = values
    if lo < 1:
        raise DunetError(f"--batch-range {text!r}: batch sizes must be >= 1")
    if not lo <= opt <= hi:
        raise DunetError(f"--batch-range {text!r}: need MIN <= OPT <= MAX")
    return lo, opt, hi


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def uses_strong_typing(version: str) -> bool:
    """Whether TensorRT ``version`` builds strongly typed FP16 networks (>= 10.12)."""
    return _version_tuple(version)[:2] >= STRONGLY_TYPED_SINCE


def check_tensorrt_available() -> str:
    """The installed TensorRT version.

    Raises:
        DunetError: when the ``tensorrt`` package is missing, is only type
            stubs (a namespace package without the library), or is older than 10.
    """
    try:
        import tensorrt as trt
    except ImportError as e:
        raise DunetError(
            f"TensorRT is not installed ({e.msg if hasattr(e, 'msg') else e}); "
            "install the 'tensorrt' wheel (pip install 'dunet-deploy[gpu]') on a machine "
            "with an NVIDIA GPU"
        ) from None
    # tensorrt-stubs installs a bare `tensorrt` namespace package for type
    # checkers; it imports fine but has no library behind it.
    if not hasattr(trt, "Builder"):
        raise DunetError(
            "TensorRT is not installed (only type stubs found); install the 'tensorrt' wheel "
            "(pip install 'dunet-deploy[gpu]') on a machine with an NVIDIA GPU"
        )
    version = str(trt.__version__)
    if _version_tuple(version)[0] < 10:
        raise DunetError(f"TensorRT {version} is too old: dunet-deploy needs TensorRT >= 10")
    return version


def _cuda_runtime() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart``
    before cuda-python 12.6), or ``None``."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def probe_gpu() -> GpuInfo:
    """Name and compute capability of CUDA device 0 (``CUDA_VISIBLE_DEVICES`` picks it).

    Uses cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` of older
    releases) when importable, else pycuda.

    Raises:
        DunetError: when no CUDA binding is installed or no GPU is usable.
    """
    cudart = _cuda_runtime()
    if cudart is not None:
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess:
            raise DunetError(f"no CUDA GPU available (cudaGetDeviceCount: {err.name})")
        if count < 1:
            raise DunetError("no CUDA GPU available (cudaGetDeviceCount: 0 devices)")
        err, prop = cudart.cudaGetDeviceProperties(0)
        if err != cudart.cudaError_t.cudaSuccess:
            raise DunetError(f"no CUDA GPU available (cudaGetDeviceProperties: {err.name})")
        name = prop.name
        if isinstance(name, bytes):
            name = name.split(b"\0", 1)[0].decode(errors="replace")
        return GpuInfo(str(name), f"{prop.major}.{prop.minor}", "cuda-python")
    try:
        import pycuda.driver as drv
    except ImportError:
        raise DunetError(
            "no CUDA Python binding to find the GPU: install cuda-python (or pycuda)"
        ) from None
    try:
        drv.init()
        if drv.Device.count() < 1:
            raise DunetError("no CUDA GPU available (pycuda: 0 devices)")
        dev = drv.Device(0)
        major, minor = dev.compute_capability()
        return GpuInfo(str(dev.name()), f"{major}.{minor}", "pycuda")
    except drv.Error as e:
        raise DunetError(f"no CUDA GPU available (pycuda: {str(e).splitlines()[0]})") from None


def _profile_shapes(
    batch_range: tuple[int, int, int], chw: tuple[int, int, int]
) -> dict[str, list[int]]:
    return {k: [b, *chw] for k, b in zip(("min", "opt", "max"), batch_range)}


def build_engine(
    onnx_fp32: str | os.PathLike[str],
    onnx_fp16: str | os.PathLike[str] | None,
    chw: tuple[int, int, int],
    options: EngineOptions = EngineOptions(),
) -> tuple[bytes, dict[str, Any]]:
    """Build and serialize a TensorRT engine.

    Args:
        onnx_fp32: the FP32 ONNX (used by TensorRT < 10.12 with ``BuilderFlag.FP16``).
        onnx_fp16: the mixed-precision ONNX (used, strongly typed, by TensorRT
            >= 10.12; required there).
        chw: ``(C, S, S)`` of input ``slabs``.
        options: profile, memory, optimisation level, timing cache.

    Returns:
        ``(plan, sidecar_fields)``: the serialized engine and what the
        sidecar records about the build (TensorRT version, GPU, profile,
        typing mode, builder settings, source ONNX).

    Raises:
        DunetError: one line when TensorRT or a GPU is missing, the ONNX
            cannot be parsed, or the build fails.
    """
    version = check_tensorrt_available()
    gpu = probe_gpu()
    import tensorrt as trt

    strong = uses_strong_typing(version)
    source = Path(onnx_fp16) if strong and onnx_fp16 is not None else Path(onnx_fp32)
    if strong and onnx_fp16 is None:
        raise ValueError("TensorRT >= 10.12 builds from the FP16 ONNX: pass onnx_fp16")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strong:
        # Accepted (and ignored: always on) by TensorRT 11.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        raise DunetError(_parser_errors(parser, source.name))

    profile = builder.create_optimization_profile()
    shapes = _profile_shapes(options.batch_range, chw)
    profile.set_shape(
        INPUT_NAME, trt.Dims(shapes["min"]), trt.Dims(shapes["opt"]), trt.Dims(shapes["max"])
    )
    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    if not strong:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level

    cache_in = options.timing_cache
    cache_bytes = cache_in.read_bytes() if cache_in is not None and cache_in.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    # A cache from another GPU or TensorRT version is ignored, not an error.
    config.set_timing_cache(cache, True)  # ignore_mismatch

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DunetError(
            f"TensorRT {version} failed to build an engine from {source.name} "
            "(see the TensorRT messages above)"
        )
    cache_out = options.timing_cache_out or options.timing_cache
    if cache_out is not None:
        cache_out.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))

    fields: dict[str, Any] = {
        "tensorrt_version": version,
        "gpu": gpu.to_dict(),
        "profile": {"input": INPUT_NAME, **shapes},
        "strongly_typed": strong,
        "source_onnx": source.name,
        "builder": {
            "workspace_mb": options.workspace_mb,
            "opt_level": options.opt_level,
            "timing_cache_loaded": bool(cache_bytes),
        },
    }
    return bytes(memoryview(plan)), fields


def _parser_errors(parser: trt.OnnxParser, source: str) -> str:
    """One line naming the first parser error (and how many more there are)."""
    n = int(parser.num_errors)
    if n == 0:
        return f"TensorRT could not parse {source} (no parser error recorded)"
    err = parser.get_error(0)
    where = ""
    try:
        where = f" at node {err.node()} ({err.node_operator()} {err.node_name()!r})"
    except Exception:  # older parsers lack node_name/node_operator
        where = f" at node {err.node()}" if hasattr(err, "node") else ""
    desc = " ".join(str(err.desc()).split())
    more = f" (+{n - 1} more)" if n > 1 else ""
    return f"TensorRT could not parse {source}{where}: {desc}{more}"
