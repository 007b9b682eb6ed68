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


# ------------------------------------------- python backend and dunet_volume
def test_python_backend_and_volume_model(tiny_onnx: Path, tmp_path: Path) -> None:
    from dunet_deploy.data.nifti import NiftiLimits
    from dunet_deploy.export.triton_repo import read_config, write_volume_model

    info = read_artifact_info(tiny_onnx)
    net = write_triton_repo(tmp_path, tiny_onnx, info, backend="python", max_batch_size=8,
                            runtime={"runtime.backend": "onnxruntime", "runtime.threads": "1"})
    assert (net / "1" / "model.onnx").read_bytes() == tiny_onnx.read_bytes()
    assert "from dunet_deploy.serving.network_model import TritonPythonModel" in (
        net / "1" / "model.py").read_text()
    cfg = _parse(net / "config.pbtxt")
    assert cfg.backend == "python" and not cfg.platform and cfg.max_batch_size == 8
    assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["runtime.backend"] == "onnxruntime"
    assert params["runtime.model_file"] == "model.onnx"
    # Our reader (used by dunet_volume at load) agrees with Triton's protobuf parser.
    assert read_config(net / "config.pbtxt") == (params, 8)

    vol = write_volume_model(tmp_path, info, batch_size=4,
                             limits=NiftiLimits(max_voxels=10**6, max_file_bytes=5 << 20))
    vcfg = _parse(vol / "config.pbtxt")
    assert vcfg.name == "dunet_volume" and vcfg.backend == "python" and vcfg.max_batch_size == 0
    io = {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims))
          for t in [*vcfg.input, *vcfg.output]}
    assert io == {"nifti": ("TYPE_STRING", [1]), "mask": ("TYPE_STRING", [1]),
                  "summary": ("TYPE_STRING", [1])}
    vparams = {k: v.string_value for k, v in vcfg.parameters.items()}
    assert vparams["volume.batch_size"] == "4" and vparams["volume.max_voxels"] == str(10**6)
    assert vparams["volume.max_request_bytes"] == str(5 << 20)
    assert ArtifactInfo.from_metadata(vparams, "v").spec == info.spec


def test_volume_settings_are_checked_against_the_network(tiny_onnx: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from dunet_deploy.export.triton_repo import read_config, write_volume_model
    from dunet_deploy.serving.volume_model import VolumeSettings

    info = read_artifact_info(tiny_onnx)
    write_triton_repo(tmp_path, tiny_onnx, info, backend="onnx", max_batch_size=8)
    vol = write_volume_model(tmp_path, info, batch_size=16)
    settings = VolumeSettings.from_parameters(read_config(vol / "config.pbtxt")[0], "dunet_volume")
    net_params, net_max = read_config(tmp_path / "dunet" / "config.pbtxt")
    with pytest.raises(DunetError, match="batch_size 16 exceeds the max_batch_size 8"):
        settings.check_network(net_params, net_max, "dunet_volume")
    ok = replace(settings, batch_size=8)
    assert ok.check_network(net_params, net_max, "dunet_volume").spec == info.spec
    other = replace(info, spec=info.spec.replace(threshold=0.3))
    with pytest.raises(DunetError, match="network model 'dunet' has spec digest"):
        ok.check_network(other.to_metadata(), 8, "dunet_volume")
    bad = read_config(vol / "config.pbtxt")[0] | {"volume.batch_size": "many"}
    with pytest.raises(DunetError, match="'volume.batch_size' = 'many' is not an integer"):
        VolumeSettings.from_parameters(bad, "dunet_volume")


def test_export_cli_writes_a_python_backend_repository(tiny_ckpt: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dunet_deploy.cli import export as cli

    out = tmp_path / "out"
    res = CliRunner().invoke(cli.main, [str(tiny_ckpt), "-o", str(out), "--format", "triton",
                                        "--triton-backend", "python", "--no-verify"])
    assert res.exit_code == 0, res.output
    files = sorted(str(p.relative_to(out)) for p in (out / "triton").rglob("*") if p.is_file())
    assert files == ["triton/dunet/1/model.onnx", "triton/dunet/1/model.py",
                     "triton/dunet/config.pbtxt", "triton/dunet_volume/1/model.py",
                     "triton/dunet_volume/config.pbtxt"]
    assert _parse(out / "triton/dunet/config.pbtxt").backend == "python"
    params = {k: v.string_value
              for k, v in _parse(out / "triton/dunet_volume/config.pbtxt").parameters.items()}
    net = read_artifact_info(out / "triton/dunet/1/model.onnx")
    assert ArtifactInfo.from_metadata(params, "dunet_volume").spec == net.spec
