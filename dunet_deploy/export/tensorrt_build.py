"""Build a TensorRT engine (``model.plan``) from an exported ONNX.

TensorRT and the CUDA bindings are imported lazily: the rest of dunet-deploy
works without them, and without them :func:`check_tensorrt_available` raises a
one-line :class:`~dunet_deploy.errors.DunetError` that says which is missing.

Precision lives in the ONNX graph, and the builder follows it: every engine is
built as a *strongly typed* network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``,
available on every TensorRT 10 and the only mode of 11), which executes exactly
the types of the graph. The FP16 engine is built from the mixed-precision ONNX
(``model_fp16.onnx``, :mod:`dunet_deploy.export.fp16`) with its FP32 islands
(SE branch, sigmoid, head) kept FP32; an INT8 engine from a QDQ ONNX
(``dunet.precision = int8``: explicit quantization). ``BuilderFlag.FP16``
(weak typing: TensorRT free to run any layer in FP16; deprecated in 10.12,
removed in 11) is never used. TF32 is cleared by default, so FP32 layers run
true FP32 (in the FP16 engine they are ~0.007 % of the FLOPs).

The engine has two optimisation profiles over the batch dimension of input
``slabs`` (:func:`engine_profiles`): latency (``min..8``, tuned for ``min``) and
throughput (``min..max``, tuned for ``opt``); the runner picks one per call.
Built with detailed profiling verbosity, so the engine inspector reports every
layer's precision (:func:`layer_report`, written beside the engine).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dunet_deploy.artifacts import INPUT_NAME, EngineSidecar, atomic_write_bytes
from dunet_deploy.cuda import GpuInfo, probe_gpu
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.loaders import require_tensorrt, tensorrt_engine

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "DEFAULT_BATCH_RANGE",
    "LATENCY_MAX_BATCH",
    "BuiltEngine",
    "EngineOptions",
    "GpuInfo",
    "build_engine",
    "check_tensorrt_available",
    "engine_profiles",
    "format_layer_counts",
    "layer_report",
    "layer_report_path",
    "parse_batch_range",
    "probe_gpu",
    "uses_strong_typing",
    "write_layer_report",
]

#: ``(min, opt, max)`` of the throughput profile.
DEFAULT_BATCH_RANGE: tuple[int, int, int] = (1, 32, 64)
#: Largest batch of the latency profile (tuned for the smallest batch).
LATENCY_MAX_BATCH = 8

#: The one TensorRT check (missing, stubs only, older than 10).
check_tensorrt_available = require_tensorrt


@dataclass(frozen=True)
class EngineOptions:
    """Builder settings.

    Attributes:
        batch_range: ``(min, opt, max)`` batch sizes of the throughput profile
            (see :func:`engine_profiles`).
        workspace_mb: workspace memory pool limit in MiB (TensorRT's default
            when ``None``: the whole device).
        opt_level: ``builder_optimization_level`` 0..5 (TensorRT's default,
            3, when ``None``).
        timing_cache: timing cache file loaded before the build if it exists.
        timing_cache_out: where to save the updated cache (default: ``timing_cache``).
        tf32: allow TF32 math in FP32 layers (off: they compute true FP32).
    """

    batch_range: tuple[int, int, int] = DEFAULT_BATCH_RANGE
    workspace_mb: int | None = None
    opt_level: int | None = None
    timing_cache: Path | None = None
    timing_cache_out: Path | None = None
    tf32: bool = False


@dataclass(frozen=True)
class BuiltEngine:
    """What :func:`build_engine` produced.

    Attributes:
        plan: the serialized engine.
        precision: the source ONNX's ``dunet.precision`` (the engine's precision).
        sidecar: the engine keys of the sidecar.
        layers: per-layer report (name, type, precision), see :func:`layer_report`.
    """

    plan: bytes
    precision: str
    sidecar: EngineSidecar
    layers: list[dict[str, str]]


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


def engine_profiles(batch_range: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """The optimisation profiles for a batch range, in profile order.

    ``(1, 32, 64)`` gives latency ``(1, 1, 8)`` and throughput ``(1, 32, 64)``;
    a range whose maximum is at most :data:`LATENCY_MAX_BATCH` (or whose
    minimum is above it) gives that one profile.
    """
    lo, _, hi = batch_range
    if hi <= LATENCY_MAX_BATCH or lo > LATENCY_MAX_BATCH:
        return [batch_range]
    return [(lo, lo, LATENCY_MAX_BATCH), batch_range]


def uses_strong_typing(version: str) -> bool:
    """Whether TensorRT ``version`` builds strongly typed networks: every release >= 10."""
    major = version.split(".")[0]
    return major.isdigit() and int(major) >= 10


def _onnx_precision(path: Path) -> str:
    """``dunet.precision`` of an ONNX file (``fp32`` when absent), without loading weights."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except OSError as e:
        raise DunetError(f"{path}: cannot read the ONNX ({e.strerror})") from None
    except DecodeError:
        raise DunetError(f"{path}: not a readable ONNX model") from None
    meta = {p.key: p.value for p in model.metadata_props}
    return meta.get("dunet.precision", "fp32")


def _parse(trt_mod: Any, builder: trt.Builder, logger: trt.ILogger,
           source: Path) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """The strongly typed network of ``source`` and its parser (keep both alive).

    Raises:
        DunetError: when parsing fails or the network's one input is not ``slabs``.
    """
    flags = 1 << int(trt_mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt_mod.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        raise DunetError(_parser_errors(parser, source.name))
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != [INPUT_NAME]:
        raise DunetError(f"{source.name}: the network must have one input '{INPUT_NAME}', "
                         f"TensorRT parsed {names}")
    return network, parser


def _add_profiles(trt_mod: Any, builder: trt.Builder, config: trt.IBuilderConfig,
                  profiles: list[tuple[int, int, int]], chw: tuple[int, int, int]) -> None:
    """One optimisation profile per ``(min, opt, max)`` batch triple.

    Raises:
        DunetError: when TensorRT refuses a profile (``add_optimization_profile`` -> -1).
    """

    def trt_dims(batch: int, rest: tuple[int, int, int]) -> trt.Dims:
        return trt_mod.Dims([batch, *rest])

    for lo, opt, hi in profiles:
        profile = builder.create_optimization_profile()
        shapes = [trt_dims(b, chw) for b in (lo, opt, hi)]
        profile.set_shape(INPUT_NAME, *shapes)
        if config.add_optimization_profile(profile) < 0:
            raise DunetError(f"TensorRT refused the optimisation profile {lo}..{hi} (opt {opt}) "
                             f"for '{INPUT_NAME}' [N, {chw[0]}, {chw[1]}, {chw[2]}]")


def _set_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> str:
    """Load the timing cache into ``config``; falls back to an empty cache.

    A cache from another GPU or TensorRT version is not used (``ignore_mismatch``
    off): TensorRT refuses it and the build starts from an empty cache.

    Returns:
        ``"loaded"``, ``"empty"`` (no file) or ``"rejected"`` (stale or corrupt file).

    Raises:
        DunetError: when the file cannot be read or TensorRT cannot make even an
            empty cache.
    """
    try:
        data = path.read_bytes() if path is not None and path.is_file() else b""
    except OSError as e:
        raise DunetError(f"{path}: cannot read the timing cache ({e.strerror})") from None
    state = "loaded" if data else "empty"
    cache = config.create_timing_cache(data) if data else None
    if cache is None or not config.set_timing_cache(cache, False):
        state = "rejected" if data else state
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            raise DunetError("TensorRT cannot create an empty timing cache")
    return state


def _config(trt_mod: Any, builder: trt.Builder, options: EngineOptions,
            chw: tuple[int, int, int]) -> tuple[trt.IBuilderConfig, str]:
    config = builder.create_builder_config()
    _add_profiles(trt_mod, builder, config, engine_profiles(options.batch_range), chw)
    tf32 = getattr(trt_mod.BuilderFlag, "TF32", None)  # a math mode, allowed when strongly typed
    if not options.tf32 and tf32 is not None:
        config.clear_flag(tf32)
    config.profiling_verbosity = trt_mod.ProfilingVerbosity.DETAILED
    if options.workspace_mb is not None:
        config.set_memory_pool_limit(trt_mod.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    return config, _set_timing_cache(config, options.timing_cache)


def build_engine(
    source_onnx: str | os.PathLike[str],
    chw: tuple[int, int, int],
    options: EngineOptions = EngineOptions(),
) -> BuiltEngine:
    """Build and serialize a strongly typed TensorRT engine.

    Args:
        source_onnx: the ONNX whose types the engine follows: the mixed FP16
            ONNX for the deployment engine, a QDQ ONNX for INT8, the FP32 ONNX
            for an FP32 reference engine.
        chw: ``(C, S, S)`` of input ``slabs``.
        options: profiles, memory, optimisation level, timing cache, TF32.

    Returns:
        The plan, its precision, the sidecar's engine keys and the layer report.

    Raises:
        DunetError: one line when TensorRT or a GPU is missing, the ONNX
            cannot be parsed, a profile is refused, or the build fails.
    """
    version = check_tensorrt_available()
    gpu = probe_gpu()
    import tensorrt as trt

    source = Path(source_onnx)
    precision = _onnx_precision(source)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, source)
    config, cache_state = _config(trt, builder, options, chw)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DunetError(
            f"TensorRT {version} failed to build an engine from {source.name} "
            "(see the TensorRT messages above)"
        )
    plan_bytes = bytes(memoryview(plan))
    layers = layer_report(trt, logger, plan_bytes, version)
    cache_out = options.timing_cache_out or options.timing_cache
    if cache_out is not None:
        atomic_write_bytes(cache_out, bytes(memoryview(config.get_timing_cache().serialize())))
    sidecar = EngineSidecar(
        tensorrt=version,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        binding=gpu.binding,
        profiles=tuple(((lo, *chw), (opt, *chw), (hi, *chw))
                       for lo, opt, hi in engine_profiles(options.batch_range)),
        strongly_typed=True,
        source_onnx=source.name,
        builder={"workspace_mb": options.workspace_mb, "opt_level": options.opt_level,
                 "tf32": options.tf32, "timing_cache": cache_state},
        layer_precisions=dict(Counter(layer["precision"] for layer in layers)),
    )
    return BuiltEngine(plan_bytes, precision, sidecar, layers)


# ------------------------------------------------------------- layer report
#: Words of TensorRT's ``Format/Datatype`` strings -> our precision names.
_DTYPE_WORDS = (("FP32", "fp32"), ("Float", "fp32"), ("FP16", "fp16"), ("Half", "fp16"),
                ("BF16", "bf16"), ("FP8", "fp8"), ("Int8", "int8"), ("INT8", "int8"),
                ("Int32", "int32"), ("INT32", "int32"), ("Int64", "int64"), ("Bool", "bool"))


def _layer_precision(layer: Any) -> str:
    """The precision of one inspector layer entry: the data type of its first output."""
    if not isinstance(layer, dict):
        return "unknown"  # not built with detailed profiling verbosity
    outputs = layer.get("Outputs") or []
    text = str(outputs[0].get("Format/Datatype", "")) if outputs else ""
    for word, name in _DTYPE_WORDS:
        if word in text:
            return name
    return "unknown"


def layer_report(trt_mod: Any, logger: trt.ILogger, plan: bytes,
                 version: str) -> list[dict[str, str]]:
    """Every engine layer's name, type and precision, from TensorRT's engine inspector.

    Raises:
        DunetError: when TensorRT cannot deserialise the engine it just built.
    """
    _runtime, engine = tensorrt_engine(plan, logger, version)
    inspector = engine.create_engine_inspector()
    if inspector is None:
        return []
    doc = json.loads(inspector.get_engine_information(trt_mod.LayerInformationFormat.JSON))
    out = []
    for layer in doc.get("Layers", []):
        name = layer.get("Name", "") if isinstance(layer, dict) else str(layer)
        kind = layer.get("LayerType", "") if isinstance(layer, dict) else ""
        out.append({"name": str(name), "type": str(kind), "precision": _layer_precision(layer)})
    return out


def layer_report_path(plan_path: str | os.PathLike[str]) -> Path:
    """``model.plan`` -> ``model.plan.layers.json``."""
    p = Path(plan_path)
    return p.with_name(p.name + ".layers.json")


def write_layer_report(plan_path: str | os.PathLike[str], layers: list[dict[str, str]]) -> Path:
    """Write the layer report beside the engine; returns its path."""
    path = layer_report_path(plan_path)
    counts = dict(Counter(layer["precision"] for layer in layers))
    doc = {"engine": Path(plan_path).name, "counts": counts, "layers": layers}
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())
    return path


def format_layer_counts(counts: dict[str, int]) -> str:
    """``"TensorRT engine: 412 layers (fp16 401, fp32 11)"``."""
    total = sum(counts.values())
    parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"TensorRT engine: {total} layers ({parts or 'no layer report'})"


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
