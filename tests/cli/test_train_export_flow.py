"""The issue's path as a user walks it: dunet-train -> dunet-export (ONNX, FP16 ONNX, Triton)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.slow


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_checkpoint_from_dunet_train_exports_every_cpu_format(tmp_path):
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "export"
    assert _run("dunet_deploy.cli.synth", str(data), "--cases", "4", "--shape", "32,40,16",
                "--seed", "3").returncode == 0
    train = _run("dunet_deploy.cli.train", "--data", str(data), "--out", str(run),
                 "--image-size", "32", "--base-filters", "8", "--epochs", "2",
                 "--batch-size", "8", "--device", "cpu", "--no-progress")
    assert train.returncode == 0, train.stderr[-2000:]
    export = _run("dunet_deploy.cli.export", str(run / "best.pt"), "-o", str(out),
                  "--format", "onnx", "--format", "onnx-fp16", "--format", "triton")
    assert export.returncode == 0, export.stderr[-2000:]
    for name in ("model.onnx", "model.json", "model_fp16.onnx", "model_fp16.json",
                 "triton/dunet/config.pbtxt", "triton/dunet/1/model.onnx"):
        assert (out / name).is_file(), name
    m32 = json.loads((out / "model.json").read_text())
    m16 = json.loads((out / "model_fp16.json").read_text())
    assert m32["verification"]["passed"] and m16["verification"]["passed"]
    assert m32["model_name"] == "dunet" and m16["precision"] == "fp16"
    assert all(r["max_abs"] <= 1e-4 for r in m32["verification"]["rows"])
    # The registration template dunet-train computed travels beside the models.
    assert "registration template" in train.stdout + train.stderr
    from dunet_deploy.data.registration import load_template

    template = load_template(out / "model_fp16.onnx")
    assert m32["template"]["digest"] == template.digest() == m16["template"]["digest"]
    lo, hi = template.similarity_range
    assert -1.0 <= lo <= hi <= 1.0
    # Only this last check needs Triton's protobuf definitions.
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse((out / "triton/dunet/config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    assert cfg.platform == "onnxruntime_onnx"
    assert [i.name for i in cfg.input] == ["slabs"] and [o.name for o in cfg.output] == ["prob"]
