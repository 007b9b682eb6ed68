"""Count the floating-point operations of an ONNX graph (numpy + onnx only).

Conventions (one multiply-add = 2 FLOPs, the usual "FLOPs = 2 x MACs"):

* ``Conv``: ``2 * prod(kernel) * C_in / groups * C_out * prod(output spatial) * N``
  (bias additions are not counted);
* ``ConvTranspose``: ``2 * prod(kernel) * C_in * C_out / groups * prod(input spatial) * N``;
* ``MatMul``: ``2 * M * K * N_cols`` times the broadcast batch;
* ``Gemm``: ``2 * M * K * N_cols`` (the ``C`` addition is not counted);
* with ``elementwise=True`` also: one FLOP per output element of elementwise
  arithmetic and activations (``Add``, ``Mul``, ``Relu``, ``Sigmoid``...),
  ``BatchNormalization`` (2 per element), and one per *input* element of
  pooling and reductions (``MaxPool``, ``ReduceMean``, ``GlobalAveragePool``...).

Shapes come from ONNX shape inference on a copy of the model whose input has
the fixed shape you pass, so a dynamic batch dimension is fine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import onnx

__all__ = ["count_flops"]

_ELEMENTWISE = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Sqrt",
        "Exp", "Log", "Pow", "Neg", "Abs", "Erf", "HardSigmoid", "Softplus", "Elu", "Selu",
        "Max", "Min", "Sum", "Mean",
    }
)  # fmt: skip
_PER_INPUT = frozenset(
    {
        "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
        "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "Softmax",
    }
)  # fmt: skip


def _load(model: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return onnx.ModelProto.FromString(model.SerializeToString())
    return onnx.load(os.fspath(model))


def _fix_input(model: onnx.ModelProto, input_shape: Sequence[int]) -> None:
    inits = {t.name for t in model.graph.initializer}
    real = [vi for vi in model.graph.input if vi.name not in inits]
    if len(real) != 1:
        raise ValueError(f"count_flops needs a single-input model, got {[v.name for v in real]}")
    dims = real[0].type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ValueError(
            f"input {real[0].name!r} has rank {len(dims)}, got shape {tuple(input_shape)}"
        )
    for d, n in zip(dims, input_shape):
        if d.HasField("dim_value") and d.dim_value != int(n):
            raise ValueError(
                f"input {real[0].name!r} has fixed dims "
                f"{[x.dim_value or x.dim_param for x in dims]}; got shape {tuple(input_shape)}"
            )
        d.Clear()
        d.dim_value = int(n)
    for vi in [*model.graph.output]:  # let inference recompute output shapes
        vi.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    g = inferred.graph
    out: dict[str, list[int]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[vi.name] = [d.dim_value for d in dims]
    for t in g.initializer:
        out[t.name] = list(t.dims)
    return out


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_flops(node: onnx.NodeProto, shape: dict[str, list[int]], elementwise: bool) -> int:
    op = node.op_type

    def need(name: str) -> list[int]:
        if name not in shape:
            raise ValueError(f"no static shape for {name!r} (input of {op} node {node.name!r})")
        return shape[name]

    if op == "Conv":
        w = need(node.input[1])  # [C_out, C_in / g, k...]
        y = need(node.output[0])  # [N, C_out, spatial...]
        return 2 * math.prod(w[2:]) * w[1] * w[0] * y[0] * math.prod(y[2:])
    if op == "ConvTranspose":
        x = need(node.input[0])
        w = need(node.input[1])  # [C_in, C_out / g, k...]
        return 2 * math.prod(w[2:]) * w[0] * w[1] * x[0] * math.prod(x[2:])
    if op in ("MatMul", "Gemm"):
        # Every output element is a dot product of length K.
        a = need(node.input[0])
        trans_a = op == "Gemm" and _attr(node, "transA", 0)
        k = a[0] if trans_a else a[-1]
        return 2 * math.prod(need(node.output[0])) * k
    if not elementwise:
        return 0
    if op in _ELEMENTWISE:
        return math.prod(need(node.output[0]))
    if op == "BatchNormalization":
        return 2 * math.prod(need(node.output[0]))
    if op in _PER_INPUT:
        return math.prod(need(node.input[0]))
    return 0


def count_flops(
    model: str | os.PathLike[str] | onnx.ModelProto,
    input_shape: Sequence[int],
    *,
    elementwise: bool = False,
) -> dict[str, Any]:
    """Count the FLOPs of one forward pass.

    Args:
        model: ONNX path or model with one (non-initializer) input.
        input_shape: full input shape, batch first, e.g. ``(1, 4, 192, 192)``.
        elementwise: also count elementwise ops, pooling and reductions.

    Returns:
        ``{"total": int, "per_sample": int, "batch": int, "by_op": {op: int},
        "elementwise": bool}``; ``per_sample`` is ``total / batch`` (per slab
        for the zoo).

    Raises:
        ValueError: when the shape does not fit the model's input, or a
            counted node has no static shape.
    """
    proto = _load(model)
    _fix_input(proto, input_shape)
    shape = _shapes(proto)
    by_op: dict[str, int] = {}
    for node in proto.graph.node:
        f = _node_flops(node, shape, elementwise)
        if f:
            by_op[node.op_type] = by_op.get(node.op_type, 0) + f
    total = sum(by_op.values())
    batch = int(input_shape[0]) if len(input_shape) else 1
    return {
        "total": total,
        "per_sample": total // max(1, batch),
        "batch": batch,
        "by_op": dict(sorted(by_op.items())),
        "elementwise": elementwise,
    }
