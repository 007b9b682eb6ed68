"""PyTorch -> ONNX export of a registry model, with its self-description.

The exported graph has one input ``slabs`` ``float32[N, C, S, S]`` and one
output ``prob`` ``float32[N, 1, S, S]`` (probabilities: the sigmoid is part of
the model). ``N`` is dynamic; ``C`` comes from the model and ``S`` from the
spec's ``image_size`` and are fixed, which lets TensorRT and OpenVINO plan
every layer ahead of time.

torch 2.13 defaults to the ``torch.export``-based exporter, which needs the
``onnxscript`` package; the legacy TorchScript exporter (``dynamo=False``)
handles every layer of the zoo and needs nothing beyond torch, so it is used
here. It folds eval-mode BatchNorm into the preceding convolution itself. Its
``F.pad`` translation leaves a small integer sub-graph (ConstantOfShape, Slice,
Transpose, ...) that computes constant pads at run time; :func:`fold_constants`
evaluates such sub-graphs once so that every consumer (TensorRT, the FP16
converter, the FLOP counter) sees plain ``Pad`` nodes with constant pads.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from dunet_deploy import __version__
from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, ArtifactInfo
from dunet_deploy.errors import DunetError
from dunet_deploy.models import keras_param_count
from dunet_deploy.spec import PreprocessSpec

__all__ = [
    "BATCH_DIM",
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "artifact_info",
    "export_onnx",
    "export_versions",
    "fold_constants",
    "set_metadata",
]

#: Lowest opset we export (Pad/Resize/ReduceMean forms TensorRT 10 parses best).
MIN_OPSET = 17
DEFAULT_OPSET = 17
#: Name of the dynamic batch dimension in the exported graph.
BATCH_DIM = "N"

# Ops that may be evaluated once at export time when all inputs are constant.
# Anything random or with sub-graphs is left alone.
_FOLDABLE = frozenset(
    {
        "Cast", "Concat", "Constant", "ConstantOfShape", "Div", "Gather", "Identity", "Mul",
        "Range", "Reshape", "Shape", "Slice", "Squeeze", "Sub", "Add", "Transpose", "Unsqueeze",
    }
)  # fmt: skip


def export_versions() -> dict[str, str]:
    """Versions of the packages that shape an exported graph."""
    return {"dunet_deploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__}


def artifact_info(
    model: nn.Module,
    spec: PreprocessSpec,
    *,
    metrics: dict[str, Any] | None = None,
    precision: str = "fp32",
    extra: dict[str, Any] | None = None,
) -> ArtifactInfo:
    """The :class:`ArtifactInfo` of an exported registry model.

    Args:
        model: a model built by ``create_model`` (carries ``model_name``/``model_args``).
        spec: the preprocessing it expects.
        metrics: validation metrics of the source checkpoint.
        precision: ``"fp32"`` or ``"fp16"``.
        extra: more sidecar fields.
    """
    name = getattr(model, "model_name", None)
    if name is None:
        raise ValueError("model was not built by create_model(): no model_name")
    return ArtifactInfo(
        spec=spec,
        model_name=str(name),
        model_args=dict(model.model_args),  # type: ignore[arg-type]
        params=keras_param_count(model),
        metrics=dict(metrics or {}),
        versions=export_versions(),
        precision=precision,
        extra=dict(extra or {}),
    )


def set_metadata(model: onnx.ModelProto, info: ArtifactInfo) -> None:
    """Replace the ``dunet.*`` entries of ``model.metadata_props`` with ``info``'s."""
    others = {p.key: p.value for p in model.metadata_props if not p.key.startswith("dunet.")}
    onnx.helper.set_model_props(model, {**others, **info.to_metadata()})


def _input_channels(model: nn.Module, spec: PreprocessSpec) -> int:
    c = getattr(model, "in_channels", None)
    c = spec.in_channels if c is None else int(c)
    if c != spec.in_channels:
        raise DunetError(
            f"model takes {c} channels but the spec stacks {spec.in_channels} slices "
            f"(slab_offsets {spec.slab_offsets})"
        )
    return c


def export_onnx(
    model: nn.Module,
    spec: PreprocessSpec,
    path: str | os.PathLike[str] | None = None,
    *,
    info: ArtifactInfo | None = None,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Export ``model`` to ONNX: dynamic batch, folded constants, metadata, full check.

    Args:
        model: a registry model (any mode; exported in eval mode and left as it was).
        spec: preprocessing contract; ``spec.image_size`` fixes ``S``.
        path: where to write the ``.onnx`` (not written when ``None``).
        info: self-description for ``metadata_props``; built from ``model`` and
            ``spec`` when ``None``.
        opset: ONNX opset, ``>= MIN_OPSET``.

    Returns:
        The checked model: input ``slabs`` ``float32[N, C, S, S]``, output
        ``prob`` ``float32[N, 1, S, S]``.

    Raises:
        DunetError: for an opset below ``MIN_OPSET`` or a model/spec mismatch.
    """
    if opset < MIN_OPSET:
        raise DunetError(f"opset {opset} is too old: dunet-deploy exports opset >= {MIN_OPSET}")
    channels = _input_channels(model, spec)
    s = spec.image_size
    # Batch 2 so that nothing gets specialised to a batch of one while tracing.
    dummy = torch.randn(2, channels, s, s)
    was_training = model.training
    model.eval()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="dunet-export-") as tmp,
            warnings.catch_warnings(),
            torch.no_grad(),
        ):
            # The legacy exporter announces its deprecation and that it cannot
            # fold reversed slices; fold_constants below handles those.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (dummy,),
                os.path.join(tmp, "raw.onnx"),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
                opset_version=opset,
                do_constant_folding=True,
            )
            proto = onnx.load(os.path.join(tmp, "raw.onnx"))
    finally:
        model.train(was_training)
    proto = fold_constants(proto)
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    proto.producer_name = "dunet-deploy"
    proto.producer_version = __version__
    set_metadata(proto, info if info is not None else artifact_info(model, spec))
    onnx.checker.check_model(proto, full_check=True)
    _check_io(proto, channels, s)
    if path is not None:
        Path(path).write_bytes(proto.SerializeToString())
    return proto


def _check_io(proto: onnx.ModelProto, channels: int, s: int) -> None:
    """Assert the I/O contract (a bug in the exporter, not a user error, if violated)."""

    def dims(vi: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == INPUT_NAME and dims(inp) == [BATCH_DIM, channels, s, s], dims(inp)
    assert out.name == OUTPUT_NAME and dims(out) == [BATCH_DIM, 1, s, s], dims(out)
    assert (
        inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    )


# ------------------------------------------------------------ constant folding
def _aliases_to_initializers(graph: onnx.GraphProto) -> None:
    """Drop ``Identity(initializer)`` nodes: consumers read the initializer itself.

    The exporter emits them when it de-duplicates equal initializers (e.g.
    zero biases); they are harmless but hide weights from per-node passes.
    """
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    keep = []
    for node in graph.node:
        src = alias.get(node.input[0], node.input[0]) if node.input else ""
        if node.op_type == "Identity" and src in inits and node.output[0] not in outputs:
            alias[node.output[0]] = src
            continue
        keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all constant and store results as initializers.

    Only cheap, deterministic ops (:data:`_FOLDABLE`) are folded, with
    ``onnx.reference``; ``Constant`` nodes become initializers. Unused
    initializers are dropped.

    Args:
        model: any ONNX model without sub-graphs in the folded nodes.

    Returns:
        A new model computing the same function.
    """
    from onnx.reference import ReferenceEvaluator  # heavy import, only needed here

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    _aliases_to_initializers(graph)
    const = {t.name for t in graph.initializer}
    folded: list[onnx.NodeProto] = []
    rest: list[onnx.NodeProto] = []
    for node in graph.node:
        inputs = [n for n in node.input if n]
        if (
            node.op_type in _FOLDABLE
            and node.domain in ("", "ai.onnx")
            and all(n in const for n in inputs)
        ):
            folded.append(node)
            const.update(node.output)
        else:
            rest.append(node)
    if not folded:
        return model
    needed = {n for node in rest for n in node.input} | {o.name for o in graph.output}
    produced = [o for node in folded for o in node.output if o in needed]
    init_by_name = {t.name: t for t in graph.initializer}
    used_inits = {n for node in folded for n in node.input if n in init_by_name}
    sub = onnx.helper.make_model(
        onnx.helper.make_graph(
            folded,
            "fold",
            [],
            [onnx.helper.make_empty_tensor_value_info(n) for n in produced],
            initializer=[init_by_name[n] for n in sorted(used_inits)],
        ),
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
    )
    values = ReferenceEvaluator(sub).run(None, {})
    new_inits = [numpy_helper.from_array(np.asarray(v), name) for name, v in zip(produced, values)]
    del graph.node[:]
    graph.node.extend(rest)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph, rest)
    # Stale shapes of removed values would confuse shape inference.
    del graph.value_info[:]
    return model


def _drop_unused_initializers(graph: onnx.GraphProto, nodes: Iterable[onnx.NodeProto]) -> None:
    used = {n for node in nodes for n in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
