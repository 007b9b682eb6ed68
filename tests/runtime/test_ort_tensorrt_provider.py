"""ONNX Runtime's TensorRT provider on an int8 model, through a fake provider (#20.5).

The provider compiles its nodes into TensorRT engines, which ONNX Runtime
cannot serialise: the executed precision is read from the runner's own
session (which provider took which node), never from a second session asked
for its optimised graph. ``ort_trt_fake`` fails the ways ONNX Runtime fails.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import ort_trt_fake as fake
import pytest
import runtime_testutils as rt
from click.testing import CliRunner

from dunet_deploy.artifacts import read_artifact_info
from dunet_deploy.errors import DunetError
from dunet_deploy.export.int8 import bench_int8_onnx, quantized_convs
from dunet_deploy.runtime import open_runner
from dunet_deploy.runtime.executed import onnxruntime_executed
from dunet_deploy.runtime.loaders import ort_session


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny fp32 ONNX and its QDQ int8 model (synthetic calibration)."""
    d = tmp_path_factory.mktemp("ort_trt")
    rt.export_tiny_onnx(d / "model.onnx")
    info = dataclasses.replace(read_artifact_info(d / "model.onnx"), precision="int8")
    bench_int8_onnx(d / "model.onnx", info, d / "model_int8.onnx", n_slabs=8)
    return d / "model.onnx", d / "model_int8.onnx"


def _slabs(n: int = 5) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((n, 4, 32, 32)).astype(np.float32)


def test_serialising_compiled_nodes_fails_as_in_onnxruntime(models, monkeypatch):
    """The old way (a second session writing its optimised graph) cannot work here."""
    fake.install(monkeypatch)
    providers = [fake.TRT_EP, fake.CUDA_EP, fake.CPU_EP]
    opts = {fake.TRT_EP: {"trt_int8_enable": "1"}}
    with pytest.raises(DunetError, match="Unable to serialize model as it contains compiled "
                                         "nodes") as err:
        onnxruntime_executed(lambda path: ort_session(models[1], providers,
                                                      provider_options=opts,
                                                      optimized_model_path=path), "fp32")
    assert "\n" not in str(err.value)
    # And TensorRT builds no Q/DQ layers without INT8 configured.
    with pytest.raises(DunetError, match="int8 is not configured in the builder"):
        ort_session(models[1], providers, provider_options={fake.TRT_EP: {}})


def test_int8_executed_precision_from_the_runner_session(models, monkeypatch):
    made = fake.install(monkeypatch)
    x = _slabs()
    with open_runner(models[1], "onnxruntime", device="tensorrt", precision="int8") as runner:
        out = runner.infer(x)
        assert runner.precision == "int8" and runner.device == "cuda (TensorRT EP)"
        executed = runner.describe()["executed"]
        assert runner.describe()["io_binding"] == "cuda"
    (session,) = made  # one session: no second one for the graph
    trt = session.provider_options[fake.TRT_EP]
    assert trt["trt_int8_enable"] == "1" and trt["trt_fp16_enable"] == "0"
    model = onnx.load(str(models[1]))
    n_convs = sum(n.op_type == "Conv" for n in model.graph.node)
    n_int8 = len(quantized_convs(model))
    assert n_int8 >= 25
    assert executed["precision"] == "int8" and executed["integer_layers"] == n_int8
    assert executed["float_layers"] == {"fp32": n_convs - n_int8 + sum(
        n.op_type in ("MatMul", "Gemm") for n in model.graph.node)}  # head, SE branch
    assert executed["ops"][f"{fake.TRT_EP}/Conv"] == n_convs
    assert not any(k.startswith(fake.CPU_EP) for k in executed["ops"])
    ref = ort.InferenceSession(str(models[1]), providers=[fake.CPU_EP]).run(None, {"slabs": x})
    np.testing.assert_array_equal(out, ref[0])  # IOBinding path, computed by the CPU session


def test_nodes_tensorrt_did_not_take_are_not_reported_int8(models, monkeypatch):
    model = onnx.load(str(models[1]))
    refused = quantized_convs(model)[:2]
    fake.install(monkeypatch, refused=set(refused))
    with open_runner(models[1], "onnxruntime", device="tensorrt", precision="int8") as runner:
        executed = runner.describe()["executed"]
    assert executed["integer_layers"] == len(quantized_convs(model)) - 2
    assert executed["ops"][f"{fake.CPU_EP}/Conv"] == 2


def test_onnxruntime_without_assignment_info_is_one_line(models, monkeypatch):
    fake.install(monkeypatch, assignment_api=False)
    with pytest.raises(DunetError, match=r"cannot report which nodes its TensorRT provider "
                                         r"runs .*--trt-precision int8") as err:
        open_runner(models[1], "onnxruntime", device="tensorrt", precision="int8")
    assert "\n" not in str(err.value)


def test_fp32_model_on_the_provider_stays_fp32(models, monkeypatch):
    made = fake.install(monkeypatch)
    with open_runner(models[0], "onnxruntime", device="tensorrt") as runner:
        assert runner.precision == "fp32" and "executed" not in runner.describe()
    trt = made[0].provider_options[fake.TRT_EP]
    assert trt["trt_fp16_enable"] == "0" and trt["trt_int8_enable"] == "0"


def test_fp16_model_is_refused_before_any_session(models, monkeypatch, tmp_path):
    made = fake.install(monkeypatch)
    model = onnx.load(str(models[0]))
    for p in model.metadata_props:  # the label is what the runner decides on
        if p.key == "dunet.precision":
            p.value = "fp16"
    onnx.save(model, str(tmp_path / "model_fp16.onnx"))
    assert read_artifact_info(tmp_path / "model_fp16.onnx").precision == "fp16"
    with pytest.raises(DunetError, match="cannot run an fp16 model as typed"):
        open_runner(tmp_path / "model_fp16.onnx", "onnxruntime", device="tensorrt")
    assert made == []


def test_dunet_infer_reports_the_int8_provider_run(models, monkeypatch, tmp_path):
    """``dunet-infer --backend onnxruntime --device tensorrt --precision int8``, as users run it."""
    from dunet_deploy.cli.infer import main

    fake.install(monkeypatch)
    vol = rt.write_volume(tmp_path / "case.nii.gz", seed=2)
    res = CliRunner().invoke(main, ["--engine", str(models[1]), str(vol), "-o",
                                    str(tmp_path / "out"), "--backend", "onnxruntime",
                                    "--device", "tensorrt", "--precision", "int8"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["precision"] == "int8"
    details = summary["backend_details"]
    assert details["providers"][0] == fake.TRT_EP
    assert details["executed"]["integer_layers"] == len(quantized_convs(onnx.load(
        str(models[1]))))
