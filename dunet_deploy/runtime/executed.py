"""What precision a loaded model really executes in, read from the backend itself.

A model's ``dunet.precision`` label says what was exported; whether a runtime
runs its convolutions in int8 is the runtime's decision (ONNX Runtime fuses
``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv`` only where
it has a kernel; OpenVINO's low-precision transformations may leave a layer in
bf16/f32). So the runners report what this module reads back:

* ONNX Runtime (CPU, CUDA providers): the graph after its optimisations (the
  session writes it to ``optimized_model_filepath``), counted by op type —
  ``QLinearConv``, ``ConvInteger``, ``QLinearMatMul``... are integer kernels;
* ONNX Runtime's TensorRT provider: its nodes are compiled into TensorRT
  engines, which ONNX Runtime cannot serialise (it refuses
  ``optimized_model_filepath`` then). The runner's own session records which
  provider took which node (``get_provider_graph_assignment_info``); TensorRT
  runs a Q/DQ-wrapped convolution in int8 (explicit quantization: the Q/DQ
  nodes, not TensorRT, decide the precision), so the int8 layers are the QDQ
  convolutions TensorRT took;
* OpenVINO: the compiled model's runtime graph, where every layer carries its
  ``layerType`` and ``runtimePrecision``.

Torch-free; the backends are imported by the caller (the runners).
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.loaders import TRT_EP

__all__ = [
    "ORT_INTEGER_OPS",
    "Executed",
    "int8_float_request",
    "onnxruntime_executed",
    "openvino_executed",
    "provider_assignment",
    "tensorrt_provider_executed",
]

#: ONNX Runtime op types that compute in integer arithmetic.
ORT_INTEGER_OPS = frozenset(
    {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm", "QLinearAdd",
     "QLinearMul", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
     "QLinearSigmoid", "QLinearLeakyRelu", "DynamicQuantizeMatMul"}
)  # fmt: skip
# OpenVINO runtime precisions that are integer compute.
_OV_INTEGER = frozenset({"i8", "u8"})
# Layers whose precision decides the name we report (the FLOPs are there).
_OV_COMPUTE = frozenset({"Convolution", "FullyConnected", "MatMul", "Deconvolution"})
_OV_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
# ONNX op types whose FLOPs decide the precision we report.
_ONNX_COMPUTE = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})

#: ``[(provider, [(op_type, node name), ...]), ...]``, one entry per assigned subgraph.
Assignment = list[tuple[str, list[tuple[str, str]]]]


@dataclass(frozen=True)
class Executed:
    """The executed precision of one loaded model.

    Attributes:
        precision: ``"int8"`` when the convolutions run integer kernels, else
            the float precision that runs (``"fp32"``, ``"bf16"``...).
        integer_layers: compute layers (convolutions, matmuls) running integer kernels.
        float_layers: compute layers running a float kernel, by precision.
        ops: op/layer counts of the executed graph (``"QLinearConv": 30``,
            ``"Convolution/i8": 32``, or per provider for ONNX Runtime's
            TensorRT provider: ``"TensorrtExecutionProvider/Conv": 32``).
    """

    precision: str
    integer_layers: int
    float_layers: dict[str, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``describe()`` and summaries."""
        return {
            "precision": self.precision,
            "integer_layers": self.integer_layers,
            "float_layers": dict(sorted(self.float_layers.items())),
            "ops": dict(sorted(self.ops.items())),
        }


def int8_float_request(model_path: Path, requested: str, model_precision: str) -> str:
    """The float precision request for the non-quantized rest of an int8 model.

    ``--precision int8`` is honoured only for an int8 export (quantization
    happens at export, with calibration and the accuracy gate, never at load
    time); it then means "the backend's best float precision elsewhere".

    Returns:
        ``requested`` itself, or ``"auto"`` for an ``int8`` request.

    Raises:
        DunetError: for ``int8`` on a model that is not an int8 export.
    """
    if requested != "int8":
        return requested
    if model_precision != "int8":
        raise DunetError(
            f"{model_path}: --precision int8 needs an int8 export (dunet-export --format "
            f"onnx-int8 --calibration DATA); this model is {model_precision}"
        )
    return "auto"


def _summarise(
    counts: collections.Counter[str], integer: Iterable[str], floats: dict[str, int], fallback: str
) -> Executed:
    n_int = sum(counts[k] for k in integer)
    precision = "int8" if n_int else fallback
    return Executed(precision, n_int, floats, dict(counts))


def onnxruntime_executed(make_session: Callable[[str], Any], fallback: str) -> Executed:
    """Inspect the graph ONNX Runtime really runs.

    Args:
        make_session: ``make_session(path)`` opens a session like the runner's
            (same providers and optimisation level) that writes its optimised
            graph to ``path``.
        fallback: the precision reported when no integer kernel runs.

    Returns:
        The executed precision and op counts of the optimised graph.
    """
    import onnx

    with tempfile.TemporaryDirectory(prefix="dunet-ort-graph-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        make_session(path)
        graph = onnx.load(path, load_external_data=False).graph
    counts = collections.Counter(n.op_type for n in graph.node)
    floats = {fallback: counts["Conv"] + counts["FusedConv"] + counts["MatMul"] + counts["Gemm"]}
    return _summarise(counts, ORT_INTEGER_OPS, floats, fallback)


def openvino_executed(compiled: Any, fallback: str) -> Executed:
    """Inspect an OpenVINO ``CompiledModel``'s runtime graph.

    Args:
        compiled: ``ov.CompiledModel``.
        fallback: our name of the float precision hint that was compiled.

    Returns:
        The executed precision; ``ops`` counts ``"<layerType>/<runtimePrecision>"``
        of the compute layers.
    """
    counts: collections.Counter[str] = collections.Counter()
    floats: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = str(info["layerType"].astype(str))
        prec = str(info["runtimePrecision"].astype(str))
        if kind not in _OV_COMPUTE:
            continue
        counts[f"{kind}/{prec}"] += 1
        if prec not in _OV_INTEGER:
            name = _OV_NAMES.get(prec, prec)
            floats[name] = floats.get(name, 0) + 1
    integer = [k for k in counts if k.split("/")[1] in _OV_INTEGER]
    return _summarise(counts, integer, floats, fallback)


def provider_assignment(session: Any, version: str) -> Assignment:
    """Which execution provider runs which node of ``session``'s graph.

    Args:
        session: an ``InferenceSession`` opened with
            :data:`~dunet_deploy.runtime.loaders.ASSIGNMENT_ENTRY` set to ``"1"``.
        version: ``onnxruntime.__version__``, for the message.

    Returns:
        One ``(provider, [(op_type, name), ...])`` per assigned subgraph: the
        graph as partitioned, before each provider's own fusions.

    Raises:
        DunetError: when this onnxruntime cannot report the assignment.
    """
    read = getattr(session, "get_provider_graph_assignment_info", None)
    if read is None:
        raise DunetError(
            f"onnxruntime {version} cannot report which nodes its TensorRT provider runs (no "
            "get_provider_graph_assignment_info), so the int8 model's executed precision is "
            "unknown; upgrade onnxruntime-gpu, or run an int8 engine (dunet-export --format trt "
            "--trt-precision int8)"
        )
    return [(str(sub.ep_name), [(str(n.op_type), str(n.name)) for n in sub.get_nodes()])
            for sub in read()]


def _quantized(node: Any, dq_outputs: set[str]) -> bool:
    """Data and weight come through ``DequantizeLinear``: a Q/DQ-wrapped compute node."""
    return len(node.input) >= 2 and node.input[0] in dq_outputs and node.input[1] in dq_outputs


def tensorrt_provider_executed(graph: Any, assignment: Assignment, fallback: str) -> Executed:
    """The executed precision of a QDQ model under ONNX Runtime's TensorRT provider.

    TensorRT compiles the nodes it takes with explicit quantization: a compute
    node whose data and weight come through ``DequantizeLinear`` runs an int8
    kernel. A compute node left to another provider (TensorRT could not take
    it) counts as ``fallback`` precision whatever it is: only TensorRT's int8
    is reported, and ``ops`` names the provider that took each node.

    Args:
        graph: the model's ``onnx.GraphProto``.
        assignment: from :func:`provider_assignment`.
        fallback: the float precision TensorRT runs unquantized layers in.

    Returns:
        The executed precision; ``ops`` counts ``"<provider>/<op_type>"``.
    """
    on_trt = {name for ep, nodes in assignment if ep == TRT_EP for _, name in nodes}
    whole = bool(assignment) and all(ep == TRT_EP for ep, _ in assignment)
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    n_int = n_float = 0
    for node in graph.node:
        if node.op_type not in _ONNX_COMPUTE:
            continue
        # Unnamed nodes cannot be matched: they are on TensorRT only if all of the graph is.
        if (whole or (node.name and node.name in on_trt)) and _quantized(node, dq_outputs):
            n_int += 1
        else:
            n_float += 1
    counts = collections.Counter(f"{ep}/{op}" for ep, nodes in assignment for op, _ in nodes)
    floats = {fallback: n_float} if n_float else {}
    return Executed("int8" if n_int else fallback, n_int, floats, dict(counts))
