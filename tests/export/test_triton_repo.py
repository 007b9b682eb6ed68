"""Triton model repository: config.pbtxt parsed with Triton's own ModelConfig protobuf."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


#: The engine profiles dunet-export builds for batch range 1,8,32 (slabs [N, 4, 32, 32]).
PROFILES_1_8_32 = (((1, 4, 32, 32), (1, 4, 32, 32), (8, 4, 32, 32)),
                   ((1, 4, 32, 32), (8, 4, 32, 32), (32, 4, 32, 32)))


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
        profiles=PROFILES_1_8_32,
    )
    assert (model_dir / "1" / "model.plan").read_bytes() == b"engine"
    cfg = _parse(model_dir / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert [(g.count, g.kind, list(g.profile)) for g in cfg.instance_group] == [
        (2, model_config_pb2.ModelInstanceGroup.KIND_GPU, ["0", "1"])
    ]
    assert cfg.parameters["dunet.precision"].string_value == "fp16"
    assert triton_trt_load_errors(cfg, PROFILES_1_8_32) == []


# ------------------------------------------- TensorRT models: Triton's load rules
def triton_trt_load_errors(cfg: Any, profiles: Sequence[Sequence[Sequence[int]]]) -> list[str]:
    """What Triton's TensorRT backend would refuse in ``cfg`` for an engine with ``profiles``.

    Written from triton-inference-server/tensorrt_backend (``src/model_state.cc``:
    ``GetProfileIndices`` takes the profiles the instance groups name, profile 0
    when none does, and refuses a name outside the engine; ``AutoCompleteConfigHelper``
    refuses ``max_batch_size`` above the largest batch of those profiles.
    ``src/instance_state.cc``: ``InitOptimizationProfiles`` makes one context per
    profile an instance names (profile 0 when none); ``ConfigureInputDimensions``
    needs the configured dims within each profile's min..max;
    ``GetMostOptimizedProfile`` fails a batch no profile of the instance holds, and the
    dynamic batcher may form any batch from 1 to ``max_batch_size``).

    Args:
        cfg: a parsed ``ModelConfig``.
        profiles: the sidecar's ``(min, opt, max)`` input shapes ``[N, C, S, S]``.
    """
    named = [p for group in cfg.instance_group for p in group.profile]
    bad = [p for p in named if not p.lstrip("-").isdigit() or not 0 <= int(p) < len(profiles)]
    if bad:
        return [f"configuration specified invalid profile {bad[0]}"]
    used = {int(p) for p in named} or {0}
    engine_max = max(profiles[i][2][0] for i in used)
    if cfg.max_batch_size > engine_max:  # the model does not load: no instance is made
        return [f"configuration specified max-batch {cfg.max_batch_size} but TensorRT "
                f"engine only supports max-batch {engine_max}"]
    errors = []
    for g, group in enumerate(cfg.instance_group):
        indices = [int(p) for p in group.profile] or [0]
        for i in indices:
            lo, _, hi = profiles[i]
            for t in cfg.input:
                if len(t.dims) + 1 != len(lo) or not all(
                        a <= d <= b for d, a, b in zip(t.dims, lo[1:], hi[1:], strict=True)):
                    errors.append(f"input {t.name} dims {list(t.dims)} outside profile {i} "
                                  f"{list(lo)}..{list(hi)}")
        for batch in range(1, cfg.max_batch_size + 1):
            if not any(profiles[i][0][0] <= batch <= profiles[i][2][0] for i in indices):
                errors.append(f"instance group {g}: no profile among {indices} holds batch {batch}")
                break
    return errors


def test_the_checker_refuses_what_triton_refuses() -> None:
    """Yesterday's config (no profile named, max 64, profile 0 stops at 8) and its kin."""
    profiles = (((1, 4, 32, 32), (1, 4, 32, 32), (8, 4, 32, 32)),
                ((1, 4, 32, 32), (32, 4, 32, 32), (64, 4, 32, 32)))
    text = """max_batch_size: 64
        input [ { name: "slabs" data_type: TYPE_FP32 dims: [ 4, 32, 32 ] } ]
        instance_group [ { count: 1 kind: KIND_GPU } ]"""
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert triton_trt_load_errors(cfg, profiles) == [
        "configuration specified max-batch 64 but TensorRT engine only supports max-batch 8"]
    cfg.instance_group[0].profile.append("1")  # loads, but a batch of 1..64 works only ...
    assert triton_trt_load_errors(cfg, profiles) == []
    cfg.instance_group.add(count=1, kind=model_config_pb2.ModelInstanceGroup.KIND_GPU,
                           profile=["0"])  # ... not on an instance holding profile 0 alone
    assert triton_trt_load_errors(cfg, profiles) == [
        "instance group 1: no profile among [0] holds batch 9"]
    cfg.instance_group[1].profile[:] = ["2"]
    assert triton_trt_load_errors(cfg, profiles) == [
        "configuration specified invalid profile 2"]
    cfg.instance_group.pop()
    cfg.input[0].dims[:] = [4, 64, 64]
    assert triton_trt_load_errors(cfg, profiles) == [
        "input slabs dims [4, 64, 64] outside profile 1 [1, 4, 32, 32]..[64, 4, 32, 32]"]


@pytest.mark.parametrize("batch_range", ["1,8,32", "1,32,64", "1,2,8", "1,4,4"])
def test_every_exported_config_loads_on_triton_tensorrt(
        tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_range: str) -> None:
    """dunet-export --format trt --format triton --triton-backend trt (TensorRT faked)."""
    import export_helpers

    from dunet_deploy.artifacts import EngineSidecar
    from dunet_deploy.export import tensorrt_build as tb
    from dunet_deploy.export.triton_repo import read_config

    monkeypatch.setitem(sys.modules, "tensorrt", export_helpers.make_fake_tensorrt())
    monkeypatch.setattr(tb, "probe_gpu", lambda: tb.GpuInfo("Fake GPU", "9.0", "cuda-python"))
    out = tmp_path / "out"
    code, _, err = export_helpers.run_export_cli(
        tiny_ckpt, "-o", out, "--format", "trt", "--format", "triton", "--triton-backend", "trt",
        "--batch-range", batch_range, "--no-verify")
    assert code == 0, err
    engine = out / "triton" / "dunet" / "1" / "model.plan"
    profiles = EngineSidecar.from_info(read_artifact_info(out / "model.plan"), "sidecar").profiles
    assert engine.read_bytes() == (out / "model.plan").read_bytes()
    configs = sorted((out / "triton").glob("*/config.pbtxt"))
    assert [c.parent.name for c in configs] == ["dunet", "dunet_volume"]
    net = _parse(configs[0])
    assert net.platform == "tensorrt_plan"
    assert net.max_batch_size == int(batch_range.split(",")[2])
    assert triton_trt_load_errors(net, profiles) == []
    # dunet_volume's BLS batches (volume.batch_size slabs, the last one smaller) go to
    # the network model: each must be a batch its instances can run.
    volume_batch = int(read_config(configs[1])[0]["volume.batch_size"])
    assert 1 <= volume_batch <= net.max_batch_size


def test_trt_config_refuses_profiles_that_cannot_serve_it(tiny_onnx: Path) -> None:
    info = read_artifact_info(tiny_onnx)
    with pytest.raises(DunetError, match=r"max_batch_size 64 is not served by the engine's "
                                         r"profiles \(batches 1..8, 1..32\)"):
        triton_config_text(info, backend="trt", max_batch_size=64, profiles=PROFILES_1_8_32)
    with pytest.raises(DunetError, match="needs the engine's optimisation profiles"):
        triton_config_text(info, backend="trt", max_batch_size=8)
    gap = (PROFILES_1_8_32[0], ((16, 4, 32, 32), (16, 4, 32, 32), (32, 4, 32, 32)))
    with pytest.raises(DunetError, match="not served"):
        triton_config_text(info, backend="trt", max_batch_size=32, profiles=gap)
    wrong = (((1, 4, 64, 64), (1, 4, 64, 64), (8, 4, 64, 64)),)
    with pytest.raises(DunetError, match=r"engine profile 0 is for inputs \[1, 4, 64, 64\]"):
        triton_config_text(info, backend="trt", max_batch_size=8, profiles=wrong)


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


def test_the_registration_template_goes_beside_the_served_model(tiny_onnx: Path,
                                                                 tmp_path: Path) -> None:
    """The template beside the model is copied next to its copy (dunet_volume reads it there)."""
    import shutil
    from dataclasses import replace

    import numpy as np

    from dunet_deploy.data.registration import TEMPLATE_FILE, Template

    rng = np.random.default_rng(0)
    template = Template(rng.random((8, 9, 10), dtype=np.float32), np.diag([2.0, 2, 2, 1]))
    model = tmp_path / "export" / "model.onnx"
    model.parent.mkdir()
    shutil.copyfile(tiny_onnx, model)
    info = replace(read_artifact_info(tiny_onnx), template=template.describe())
    with pytest.raises(DunetError, match="template.nii.gz is missing beside it"):
        write_triton_repo(tmp_path / "bad", model, info, backend="onnx", max_batch_size=8)
    template.save(model.parent / TEMPLATE_FILE)
    net = write_triton_repo(tmp_path / "repo", model, info, backend="onnx", max_batch_size=8)
    assert Template.load(net / "1" / TEMPLATE_FILE).digest() == template.digest()
    plain = write_triton_repo(tmp_path / "plain", tiny_onnx, read_artifact_info(tiny_onnx),
                              backend="onnx", max_batch_size=8)
    assert not (plain / "1" / TEMPLATE_FILE).exists()  # a model without one gets none
