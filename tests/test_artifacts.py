"""Artefact metadata: ONNX metadata_props and sidecars round-trip, foreign files refused."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from dunet_deploy.artifacts import (
    ArtifactInfo,
    read_artifact_info,
    read_sidecar,
    sidecar_path,
    write_json,
)
from dunet_deploy.errors import DunetError
from dunet_deploy.spec import PreprocessSpec

INFO = ArtifactInfo(
    spec=PreprocessSpec.for_geometry((40, 48, 24), image_size=32),
    model_name="dunet",
    model_args={"base_filters": 8, "fusion_levels": [2, 3]},
    params=123,
    metrics={"dsc_mean": 0.4},
    versions={"onnx": onnx.__version__},
)


def _tiny_onnx(path, meta):
    node = helper.make_node("Identity", ["slabs"], ["prob"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("slabs", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, 4, 4])],
    )
    model = helper.make_model(graph)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


def test_onnx_metadata_round_trip(tmp_path):
    p = tmp_path / "model.onnx"
    _tiny_onnx(p, INFO.to_metadata())
    assert read_artifact_info(p) == INFO


def test_sidecar_round_trip_keeps_extra_fields(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    doc = {**INFO.to_json_dict(), "tensorrt_version": "10.13.0"}
    write_json(sidecar_path(plan), doc)
    info = read_artifact_info(plan)
    assert info.extra == {"tensorrt_version": "10.13.0"}
    assert info.spec == INFO.spec and info.params == 123


def test_foreign_and_broken_artifacts(tmp_path):
    p = tmp_path / "other.onnx"
    _tiny_onnx(p, {})
    with pytest.raises(DunetError, match="not a dunet-deploy model"):
        read_artifact_info(p)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DunetError, match="not a readable ONNX model|not a dunet-deploy"):
        read_artifact_info(bad)
    with pytest.raises(DunetError, match="model file not found"):
        read_artifact_info(tmp_path / "missing.onnx")
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"e")
    with pytest.raises(DunetError, match="no sidecar"):
        read_artifact_info(plan)
    sidecar_path(plan).write_text("{not json")
    with pytest.raises(DunetError, match="unreadable sidecar"):
        read_sidecar(sidecar_path(plan))
    meta = INFO.to_metadata()
    meta["dunet.spec"] = json.dumps({"version": 1})
    _tiny_onnx(p, meta)
    with pytest.raises(DunetError, match="bad preprocessing spec"):
        read_artifact_info(p)


def test_inference_defaults_travel_in_metadata_and_sidecars(tmp_path):
    from dataclasses import replace

    from dunet_deploy.spec import InferenceDefaults

    assert INFO.inference == InferenceDefaults()  # absent = defaults
    shipped = replace(INFO, inference=InferenceDefaults(tta="flip", min_lesion_mm3=12.5))
    meta = shipped.to_metadata()
    assert meta["dunet.inference.tta"] == "flip"
    assert meta["dunet.inference.min_lesion_mm3"] == "12.5"
    p = tmp_path / "model.onnx"
    _tiny_onnx(p, meta)
    assert read_artifact_info(p).inference == shipped.inference
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    write_json(sidecar_path(plan), shipped.to_json_dict())
    info = read_artifact_info(plan)
    assert info.inference == shipped.inference and "inference" not in info.extra
    # Artefacts written before the defaults existed read as the defaults.
    old = {k: v for k, v in meta.items() if not k.startswith("dunet.inference.")}
    _tiny_onnx(p, old)
    assert read_artifact_info(p).inference == InferenceDefaults()
    doc = shipped.to_json_dict()
    del doc["inference"]
    write_json(sidecar_path(plan), doc)
    assert read_artifact_info(plan).inference == InferenceDefaults()
    # Bad stored values are one-line errors naming the file.
    _tiny_onnx(p, {**meta, "dunet.inference.tta": "spin"})
    with pytest.raises(DunetError, match=r"model.onnx: bad inference defaults: .*tta"):
        read_artifact_info(p)
    write_json(sidecar_path(plan), {**doc, "inference": {"min_lesion_mm3": -3}})
    with pytest.raises(DunetError, match=r"model.plan.json: bad inference defaults"):
        read_artifact_info(plan)


def test_deferred_interrupts_leaves_handlers_installed_outside_python(monkeypatch):
    """In Triton's python-backend stub SIGINT/SIGTERM have handlers set in C, which Python
    reports as ``None`` and cannot restore: the block runs without touching them (it used to
    fail every model load with "signal handler must be signal.SIG_IGN, ...")."""
    import signal

    from dunet_deploy.artifacts import deferred_interrupts

    real = signal.getsignal
    monkeypatch.setattr(signal, "getsignal",
                        lambda sig: None if sig == signal.SIGTERM else real(sig))
    before = real(signal.SIGINT)
    ran = []
    with deferred_interrupts():
        ran.append(real(signal.SIGINT))
    assert ran == [before] and real(signal.SIGINT) is before
