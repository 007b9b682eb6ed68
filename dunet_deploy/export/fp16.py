"""Mixed-precision (FP16) ONNX for strongly typed TensorRT and GPU ONNX Runtime.

:func:`convert_to_mixed_fp16` rewrites an FP32 graph so that most of it runs
in float16 while the graph's inputs and outputs stay float32 (``Cast`` nodes
at the boundary) and the numerically fragile parts stay float32. A strongly
typed TensorRT network (10.12+) executes exactly these types, so the policy
lives here, in the graph, rather than in builder flags.

The default policy (:data:`DEFAULT_POLICY`, evidence in ``docs/fp16.md``):

* float16: convolutions (BatchNorm is folded into them at export), ReLU,
  max-pooling, nearest ``Resize``, ``Pad``, ``Concat``, the SE re-weighting
  ``Mul`` and the fusion ``Add`` — the bulk of the FLOPs and memory traffic;
* float32: the squeeze-and-excitation branch (``ReduceMean`` over whole
  feature maps, its two ``MatMul`` and the gating ``Sigmoid``: a mean of
  ~9k values accumulated in float16 loses most of its digits or overflows,
  and the branch is a few hundred FLOPs), and the head — the last
  convolution and the output ``Sigmoid``, where float16 rounding of the
  logits is what moves probabilities across the threshold.

Layout/data-movement ops (``Unsqueeze``, ``Relu``, ``MaxPool``, ...) follow the
precision of their input so that no useless casts appear. Ops not known to be
safe stay float32. Initializers of float16 nodes are stored as float16, and a
convolution whose folded weights do not fit float16 stays float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "DEFAULT_POLICY",
    "FOLLOW_OPS",
    "FP16_OPS",
    "Fp16Policy",
    "Fp16Report",
    "convert_to_mixed_fp16",
    "emulate_fp16",
    "head_nodes",
    "nodes_in_precision",
]

FLOAT: int = int(TensorProto.FLOAT)
FLOAT16: int = int(TensorProto.FLOAT16)
_FP16_MAX = float(np.finfo(np.float16).max)

#: Ops that may run in float16 (their float inputs/outputs are converted).
FP16_OPS = frozenset(
    {
        "Add", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv", "ConvTranspose",
        "Div", "Flatten", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Identity", "LeakyRelu",
        "MatMul", "MaxPool", "Mul", "Pad", "ReduceMax", "ReduceMean", "ReduceSum", "Relu",
        "Reshape", "Resize", "Sigmoid", "Slice", "Split", "Squeeze", "Sub", "Tanh", "Transpose",
        "Unsqueeze",
    }
)  # fmt: skip
#: Ops that only move, select or clamp values (exact in any precision): they
#: take the precision of their first float input instead of forcing a cast.
FOLLOW_OPS = frozenset(
    {
        "Concat", "Flatten", "GlobalMaxPool", "Identity", "MaxPool", "Pad", "ReduceMax",
        "Relu", "Reshape", "Resize", "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze",
    }
)  # fmt: skip
# Inputs that are shapes, axes, pads, scales... and must keep their own type
# (Resize's ``scales`` is float32 by the ONNX schema).
_NON_DATA_INPUTS: Mapping[str, frozenset[int]] = {
    "Resize": frozenset({1, 2, 3}),
    "Pad": frozenset({1, 3}),
    "Reshape": frozenset({1}),
    "Unsqueeze": frozenset({1}),
    "Squeeze": frozenset({1}),
    "Slice": frozenset({1, 2, 3, 4}),
    "Split": frozenset({1}),
    "ReduceMean": frozenset({1}),
    "ReduceSum": frozenset({1}),
    "ReduceMax": frozenset({1}),
}


@dataclass(frozen=True)
class Fp16Policy:
    """Which parts of the graph stay float32.

    Attributes:
        keep_fp32_ops: op types always computed in float32.
        keep_head: keep the head (the last ``Conv`` before the output and
            everything after it) in float32.
        keep_fp32_nodes: node names always computed in float32.
        fp16_ops: op types allowed in float16 at all (others stay float32).
    """

    keep_fp32_ops: frozenset[str] = frozenset(
        {"ReduceMean", "GlobalAveragePool", "MatMul", "Gemm", "Sigmoid"}
    )
    keep_head: bool = True
    keep_fp32_nodes: frozenset[str] = frozenset()
    fp16_ops: frozenset[str] = FP16_OPS

    def to_dict(self) -> dict[str, Any]:
        """JSON form for sidecars."""
        return {
            "keep_fp32_ops": sorted(self.keep_fp32_ops),
            "keep_head": self.keep_head,
            "keep_fp32_nodes": sorted(self.keep_fp32_nodes),
        }


#: The policy ``dunet-export --format onnx-fp16`` uses (see docs/fp16.md).
DEFAULT_POLICY = Fp16Policy()


@dataclass
class Fp16Report:
    """What the conversion did.

    Attributes:
        fp16_nodes: nodes computing in float16, by op type.
        fp32_nodes: float nodes left in float32, by op type.
        casts: number of ``Cast`` nodes inserted.
        kept_for_range: convolutions kept float32 because a weight exceeds
            the float16 range.
        weights_underflow: initializer values that are nonzero in float32 but
            zero in float16 (flushed), over all converted initializers.
        weights_converted: number of converted initializer values.
    """

    fp16_nodes: dict[str, int] = field(default_factory=dict)
    fp32_nodes: dict[str, int] = field(default_factory=dict)
    casts: int = 0
    kept_for_range: list[str] = field(default_factory=list)
    weights_underflow: int = 0
    weights_converted: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form for sidecars."""
        return {
            "fp16_nodes": dict(sorted(self.fp16_nodes.items())),
            "fp32_nodes": dict(sorted(self.fp32_nodes.items())),
            "casts": self.casts,
            "kept_for_range": list(self.kept_for_range),
            "weights_underflow": self.weights_underflow,
            "weights_converted": self.weights_converted,
        }


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named value (inputs, initializers, inferred intermediates)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def head_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes from the last ``Conv`` before the first output to that output.

    Walks back from the graph output along the first float input of each
    node until it reaches a ``Conv``; for the zoo this is ``Conv -> Sigmoid``.
    Nodes must have names (the exporter names all of them).
    """
    producer = {o: n for n in graph.node for o in n.output}
    names: set[str] = set()
    cur = producer.get(graph.output[0].name)
    while cur is not None:
        names.add(cur.name)
        if cur.op_type == "Conv":
            return names
        cur = producer.get(cur.input[0]) if cur.input else None
    return set()  # no conv on the way: nothing to protect


class _Fp16Converter:
    """One pass over a graph's nodes, deciding and applying each node's float type."""

    def __init__(self, src: onnx.ModelProto, policy: Fp16Policy) -> None:
        graph = src.graph
        self.graph = graph
        self.policy = policy
        self.types = _elem_types(src)
        self.dtype: dict[str, int] = dict(self.types)  # current element type of each value
        self.protected = set(policy.keep_fp32_nodes) | (
            head_nodes(graph) if policy.keep_head else set())
        self.inits = {t.name: t for t in graph.initializer}
        # Layout ops right after a graph input go float16: the input is then cast
        # once, and not once per branch.
        self.graph_inputs = {vi.name for vi in graph.input}
        self.report = Fp16Report()
        self.cast_cache: dict[tuple[str, int], str] = {}
        self.converted_inits: dict[str, str] = {}
        self.new_nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []

    def float_inputs(self, node: onnx.NodeProto) -> list[int]:
        skip = _NON_DATA_INPUTS.get(node.op_type, frozenset())
        return [i for i, name in enumerate(node.input)
                if name and i not in skip and self.dtype.get(name) in (FLOAT, FLOAT16)]

    def fits_fp16(self, node: onnx.NodeProto) -> bool:
        for name in node.input:
            t = self.inits.get(name)
            if t is not None and t.data_type == FLOAT:
                arr = numpy_helper.to_array(t)
                if arr.size and float(np.abs(arr).max()) > _FP16_MAX:
                    return False
        return True

    def fp16_initializer(self, name: str) -> str:
        if name not in self.converted_inits:
            arr = numpy_helper.to_array(self.inits[name])
            half = arr.astype(np.float16)
            self.report.weights_converted += int(arr.size)
            self.report.weights_underflow += int(np.count_nonzero((half == 0) & (arr != 0)))
            new_name = f"{name}__fp16"
            self.new_inits.append(numpy_helper.from_array(half, new_name))
            self.converted_inits[name] = new_name
            self.dtype[new_name] = FLOAT16
        return self.converted_inits[name]

    def cast_to(self, name: str, to: int) -> str:
        key = (name, to)
        if key not in self.cast_cache:
            out = f"{name}__to_{'fp16' if to == FLOAT16 else 'fp32'}"
            self.new_nodes.append(helper.make_node("Cast", [name], [out], name=f"{out}__cast",
                                                   to=to))
            self.report.casts += 1
            self.cast_cache[key] = out
            self.dtype[out] = to
        return self.cast_cache[key]

    def target(self, node: onnx.NodeProto, fins: list[int]) -> int:
        """The element type ``node`` computes in under the policy."""
        policy = self.policy
        if node.op_type not in policy.fp16_ops or node.op_type in policy.keep_fp32_ops:
            return FLOAT
        if node.name in self.protected:
            return FLOAT
        if node.op_type in FOLLOW_OPS and node.input[fins[0]] not in self.graph_inputs:
            return self.dtype[node.input[fins[0]]]
        if not self.fits_fp16(node):
            self.report.kept_for_range.append(node.name)
            return FLOAT
        return FLOAT16

    def convert(self, node: onnx.NodeProto) -> None:
        """Retype one node's float inputs (casts or fp16 weights) and record it."""
        fins = self.float_inputs(node)
        if not fins:  # integer / shape node: untouched
            self.new_nodes.append(node)
            return
        target = self.target(node, fins)
        for i in fins:
            name = node.input[i]
            if self.dtype[name] == target:
                continue
            if target == FLOAT16 and name in self.inits and self.dtype[name] == FLOAT:
                node.input[i] = self.fp16_initializer(name)
            else:
                node.input[i] = self.cast_to(name, target)
        for out in node.output:
            if out and self.types.get(out) in (FLOAT, FLOAT16):
                self.dtype[out] = target
        bucket = self.report.fp16_nodes if target == FLOAT16 else self.report.fp32_nodes
        bucket[node.op_type] = bucket.get(node.op_type, 0) + 1
        self.new_nodes.append(node)

    def cast_outputs_back(self) -> None:
        """Outputs keep their float32 type: rename the producer's tensor and cast back."""
        for out in self.graph.output:
            if self.dtype.get(out.name) != FLOAT16:
                continue
            inner = f"{out.name}__fp16"
            for n in self.new_nodes:
                n.output[:] = [inner if o == out.name else o for o in n.output]
                n.input[:] = [inner if i == out.name else i for i in n.input]
            self.new_nodes.append(helper.make_node("Cast", [inner], [out.name],
                                                   name=f"{out.name}__cast", to=FLOAT))
            self.report.casts += 1

    def install(self) -> None:
        """Replace the graph's nodes and drop initializers nothing uses any more."""
        graph = self.graph
        del graph.node[:]
        graph.node.extend(self.new_nodes)
        graph.initializer.extend(self.new_inits)
        used = {i for n in graph.node for i in n.input}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        del graph.value_info[:]


def convert_to_mixed_fp16(
    model: onnx.ModelProto, policy: Fp16Policy = DEFAULT_POLICY
) -> tuple[onnx.ModelProto, Fp16Report]:
    """Convert an FP32 model into a mixed FP16/FP32 model with FP32 inputs and outputs.

    Args:
        model: a checked float32 model (e.g. from :func:`export_onnx`); every
            node must have a unique name.
        policy: what stays float32.

    Returns:
        ``(model, report)``: a new model with the same input/output names,
        shapes and float32 types, value_info re-inferred, passing
        ``onnx.checker.check_model(full_check=True)``; and what was converted.
    """
    src = onnx.ModelProto.FromString(model.SerializeToString())
    names = [n.name for n in src.graph.node]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError("every node needs a unique name for the FP16 conversion")
    conv = _Fp16Converter(src, policy)
    for node in src.graph.node:
        conv.convert(node)
    conv.cast_outputs_back()
    conv.install()
    out_model = onnx.shape_inference.infer_shapes(src, strict_mode=True, data_prop=True)
    onnx.checker.check_model(out_model, full_check=True)
    _check_boundary(out_model)
    return out_model, conv.report


def emulate_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 graph that rounds exactly where a mixed FP16 graph stores float16.

    CPU runtimes cannot be trusted to execute a float16 graph in float16:
    ONNX Runtime's CPU provider has no float16 kernels for most ops, wraps
    them in casts and then drops the cast pairs, so whole float16 regions
    silently run in float32; OpenVINO's CPU plugin upgrades them to float32
    unless the CPU has native float16. This transform makes the rounding
    explicit: every float16 initializer becomes a float32 initializer of the
    same (float16-representable) values and every float16 tensor is followed
    by a ``Cast(float16) -> Cast(float32)`` pair, which runtimes keep. The
    result computes each op in float32 from float16-rounded inputs and
    rounds its output to float16 — the storage model of GPU float16 kernels
    that accumulate in float32 (tensor cores, TensorRT).

    Args:
        model: a mixed-precision model from :func:`convert_to_mixed_fp16`.

    Returns:
        An all-float32 model with the same inputs and outputs.
    """
    src = onnx.ModelProto.FromString(model.SerializeToString())
    types = _elem_types(src)
    graph = src.graph
    nodes: list[onnx.NodeProto] = []

    def round_pair(raw: str, out: str) -> list[onnx.NodeProto]:
        half = f"{out}__emu16"
        return [
            helper.make_node("Cast", [raw], [half], name=f"{half}__a", to=FLOAT16),
            helper.make_node("Cast", [half], [out], name=f"{half}__b", to=FLOAT),
        ]

    for node in graph.node:
        if node.op_type == "Cast" and helper.get_attribute_value(node.attribute[0]) == FLOAT16:
            nodes += round_pair(node.input[0], node.output[0])
            continue
        extra: list[onnx.NodeProto] = []
        for i, out in enumerate(node.output):
            if out and types.get(out) == FLOAT16:
                node.output[i] = f"{out}__raw"
                extra += round_pair(node.output[i], out)
        nodes.append(node)
        nodes += extra
    del graph.node[:]
    graph.node.extend(nodes)
    inits = []
    for t in graph.initializer:
        if t.data_type == FLOAT16:
            t = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
        inits.append(t)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.value_info[:]
    out = onnx.shape_inference.infer_shapes(src, strict_mode=True)
    onnx.checker.check_model(out)
    return out


def _check_boundary(model: onnx.ModelProto) -> None:
    for vi in [*model.graph.input, *model.graph.output]:
        assert vi.type.tensor_type.elem_type == FLOAT, f"{vi.name} is not float32"


def nodes_in_precision(model: onnx.ModelProto, op_types: Iterable[str]) -> dict[str, int]:
    """Element type of the first output of every node of ``op_types`` (for tests/docs)."""
    types = _elem_types(model)
    wanted = set(op_types)
    return {n.name: types.get(n.output[0], 0) for n in model.graph.node if n.op_type in wanted}
