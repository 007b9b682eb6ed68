"""Triton model repository: config.pbtxt parsed with Triton's own ModelConfig protobuf."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from dunet_deploy.artifacts import ArtifactInfo, read_artifact_info
from dunet_deploy.errors import DunetError
from dunet_deploy.export.triton_repo import triton_config_text, write_triton_repo

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

_ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


def _parse(path: Path) -> object:
    cfg = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), cfg)
    return cfg


def _onnx_io(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (Triton dtype, dims without the batch dimension)."""
    g = onnx.load(str(path)).graph
    out = {}
    for vi in [*g.input, *g.output]:
        tt = vi.type.tensor_type
        out[vi.name] = (_ONNX_TO_TRITON[tt.elem_type], [d.dim_value for d in tt.shape.dim[1:]])
    return out


def test_onnx_repository_matches_the_model(tiny_onnx: Path, tmp_path: Path) -> None:
    info = read_artifact_info(tiny_onnx)
    model_dir = write_triton_repo(
        tmp_path / "triton",
        tiny_onnx,
        info,
        backend="onnx",
        max_batch_size=32,
        preferred_batch_sizes=(8, 32, 64),
    )
    assert model_dir == tmp_path / "triton" / "dunet"
    assert (model_dir / "1" / "model.onnx").read_bytes() == tiny_onnx.read_bytes()
    cfg = _parse(model_dir / "config.pbtxt")
    assert cfg.name == "dunet" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 32
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 32]  # 64 > max dropped
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.count, g.kind) for g in cfg.instance_group] == [
        (1, model_config_pb2.ModelInstanceGroup.KIND_AUTO)
    ]
    io = _onnx_io(tiny_onnx)
    declared = {}
    for t in [*cfg.input, *cfg.output]:
        declared[t.name] = (model_config_pb2.DataType.Name(t.data_type), list(t.dims))
    assert (
        declared == io == {"slabs": ("TYPE_FP32", [4, 32, 32]), "prob": ("TYPE_FP32", [1, 32, 32])}
    )
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert ArtifactInfo.from_metadata(params, "triton") == info
    assert "dunet.spec" in params


def test_plan_repository(tiny_onnx: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    info = replace(read_artifact_info(tiny_onnx), precision="fp16")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    model_dir = write_triton_repo(
        tmp_path / "repo",
        plan,
        info,
        backend="trt",
        max_batch_size=16,
        preferred_batch_sizes=(8, 16),
        instances=2,
    )
    assert (model_dir / "1" / "model.plan").read_bytes() == b"engine"
    cfg = _parse(model_dir / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert [(g.count, g.kind) for g in cfg.instance_group] == [
        (2, model_config_pb2.ModelInstanceGroup.KIND_GPU)
    ]
    assert cfg.parameters["dunet.precision"].string_value == "fp16"


def test_strings_are_escaped(tiny_onnx: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    info = replace(read_artifact_info(tiny_onnx), metrics={"note": 'a "quoted" \\ path\nline'})
    (tmp_path / "config.pbtxt").write_text(
        triton_config_text(info, backend="onnx", max_batch_size=4)
    )
    cfg = _parse(tmp_path / "config.pbtxt")
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert ArtifactInfo.from_metadata(params, "triton").metrics == info.metrics


def test_bad_arguments(tiny_onnx: Path) -> None:
    info = read_artifact_info(tiny_onnx)
    with pytest.raises(DunetError, match="unknown Triton backend"):
        triton_config_text(info, backend="tflite", max_batch_size=4)
    with pytest.raises(DunetError, match="max_batch_size must be >= 1"):
        triton_config_text(info, backend="onnx", max_batch_size=0)
