"""INT8: ``dunet-export --format onnx-int8`` end to end, its gate, QDQ placement, calibration."""

from __future__ import annotations

import json
from pathlib import Path

import export_helpers
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from dunet_deploy.artifacts import read_artifact_info
from dunet_deploy.data.layouts import discover_cases, load_case
from dunet_deploy.data.synth import write_dataset
from dunet_deploy.errors import DunetError
from dunet_deploy.export import int8
from dunet_deploy.runtime import open_runner
from dunet_deploy.spec import PreprocessSpec
from dunet_deploy.training.evaluate import predict_volume

H = export_helpers


run = H.run_export_cli
_error_line = H.one_line_error


@pytest.fixture(scope="module")
def exported(int8_ckpt: Path, int8_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dunet-export CKPT --format onnx --format onnx-int8 --calibration DATA`` (training set)."""
    out = tmp_path_factory.mktemp("int8out") / "export"
    code, stdout, err = run(int8_ckpt, "-o", out, "--format", "onnx", "--format", "onnx-int8",
                            "--calibration", int8_data)
    assert code == 0, err
    assert "int8 gate of model_int8.onnx" in stdout
    return out


# ------------------------------------------------------------------ export
def test_export_writes_a_gated_int8_model(exported: Path, int8_ckpt: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == [
        "model.json", "model.onnx", "model_int8.json", "model_int8.onnx"]
    info = read_artifact_info(exported / "model_int8.onnx")
    assert info.precision == "int8"
    meta = {p.key: p.value for p in onnx.load(str(exported / "model_int8.onnx")).metadata_props}
    in_meta = json.loads(meta[int8.METADATA_KEY])
    doc = json.loads((exported / "model_int8.json").read_text())
    assert doc["precision"] == "int8" and doc["onnx"]["file"] == "model_int8.onnx"
    gate = doc["int8"]["gate"]
    assert in_meta["gate"]["rows"] == gate["rows"] and gate["passed"] is True
    # Held-out = the checkpoint's validation split; calibration = its training cases.
    import torch

    split = torch.load(int8_ckpt, weights_only=True)["config"]["split"]
    assert gate["cases"] == split["val"]
    calib = doc["int8"]["calibration"]
    assert calib["cases"] == split["train"] and calib["slabs"] > 0
    assert {r["backend"] for r in gate["rows"]} == {"onnxruntime", "openvino"}
    for row in gate["rows"]:
        assert row["executed_precision"] == "int8", row
        assert row["dsc_drop"] <= 0.01 and row["voxel_agreement"] >= 0.999
        assert 0.0 < row["dsc_fp32"] < 1.0  # the model finds lesions: the DSC means something


def test_lesion_slabs_are_over_represented(exported: Path, int8_data: Path) -> None:
    doc = json.loads((exported / "model_int8.json").read_text())
    calib = doc["int8"]["calibration"]
    spec = read_artifact_info(exported / "model_int8.onnx").spec
    from dunet_deploy.data.preprocess import mask_to_labels, nonempty_slab_indices

    _, cases = discover_cases(int8_data)
    natural, total = 0, 0
    for case in cases:
        if case.case_id not in calib["cases"]:
            continue
        image, mask = load_case(case)
        idx = nonempty_slab_indices(image.data, spec)
        natural += int(mask_to_labels(mask, spec)[idx].reshape(idx.size, -1).any(axis=1).sum())
        total += idx.size
    assert calib["slabs"] == total  # fewer slabs than the default 512: all of them
    assert calib["lesion_slabs"] == natural
    # With a budget below the data, lesion slabs get up to half of each case's quota.
    slabs, stats = int8.calibration_slabs(
        [c for c in cases if c.case_id in calib["cases"]], spec, 24)
    assert slabs.shape == (24, 4, 32, 32) and slabs.dtype == np.float32
    assert stats["lesion_slabs"] / 24 > natural / total


def _dq_inputs(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}


def test_qdq_placement_suits_tensorrt(exported: Path) -> None:
    """Per-channel symmetric int8 Conv weights, per-tensor symmetric int8 activations,
    SE branch and head float."""
    g = onnx.load(str(exported / "model_int8.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    dq = _dq_inputs(g)
    convs = [n for n in g.node if n.op_type == "Conv"]
    quantized = [n for n in convs if n.input[1] in dq]
    assert len(quantized) == len(convs) - 1  # all but the head
    for conv in quantized:
        w, x = dq[conv.input[1]], dq[conv.input[0]]
        scale, zp = inits[w.input[1]], inits[w.input[2]]
        out_channels = inits[w.input[0]].shape[0]
        assert inits[w.input[0]].dtype == np.int8 and scale.shape == (out_channels,)
        assert zp.dtype == np.int8 and not zp.any()
        assert x.input[1] in inits and inits[x.input[1]].size == 1  # per-tensor activation
        assert inits[x.input[2]].dtype == np.int8 and not inits[x.input[2]].any()
    head = next(n for n in g.node if n.name == "/head/Conv")
    assert head.input[1] in inits and inits[head.input[1]].dtype == np.float32
    for node in g.node:
        if node.op_type in ("ReduceMean", "MatMul", "Sigmoid"):
            assert not any(i in dq for i in node.input), node.name
    assert all(n.op_type != "QuantizeLinear" or inits[n.input[2]].dtype == np.int8
               for n in g.node)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_masks_agree_with_fp32_on_the_lesion(
    exported: Path, int8_data: Path, backend: str
) -> None:
    _, cases = discover_cases(int8_data)
    spec = read_artifact_info(exported / "model.onnx").spec
    ref = "fp32" if backend == "openvino" else "auto"
    masks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    with open_runner(exported / "model.onnx", backend, precision=ref) as r32, \
            open_runner(exported / "model_int8.onnx", backend, precision="int8") as r8:
        assert r8.precision == "int8"
        executed = r8.describe()["executed"]
        assert executed["integer_layers"] >= 30, executed
        for case in cases[6:]:  # the validation cases
            image, truth = load_case(case)
            masks.append((predict_volume(image.data, spec, r32) >= spec.threshold,
                          predict_volume(image.data, spec, r8) >= spec.threshold, truth > 0))
    m32, m8, truth = (np.concatenate([m[k].ravel() for m in masks]) for k in range(3))
    region = m32 | m8 | truth
    assert m32.sum() > 20 and region.sum() > 20
    agreement = float((m32 == m8)[region].mean())
    assert agreement >= 0.9, agreement
    assert 2 * (m32 & m8).sum() / (m32.sum() + m8.sum()) >= 0.9


def test_runner_refuses_int8_for_a_float_model(exported: Path) -> None:
    with pytest.raises(DunetError, match="needs an int8 export"):
        open_runner(exported / "model.onnx", "openvino", precision="int8")
    with pytest.raises(DunetError, match="exported precision fp32"):
        open_runner(exported / "model.onnx", "onnxruntime", precision="int8")


# -------------------------------------------------------------------- gate
def test_gate_refuses_and_writes_nothing(
    int8_ckpt: Path, int8_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, stdout, err = run(int8_ckpt, "-o", out, "--format", "onnx-int8", "--calibration",
                            int8_data, "--gate-max-dsc-drop", "-0.5")
    line = _error_line(code, err)
    assert "int8 gate refused model_int8.onnx" in line and "max -0.5" in line
    assert "voxel agreement" in line and "nothing written" in line
    assert "NO" in stdout  # the table with the numbers
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_calibration_fails_the_gate(
    exported: Path, int8_data: Path, spec32: PreprocessSpec, tmp_path: Path
) -> None:
    """Ranges calibrated on inputs 1000x too small clip every activation: refused."""
    m32 = onnx.load(str(exported / "model.onnx"))
    _, cases = discover_cases(int8_data)
    slabs, _ = int8.calibration_slabs(cases[:6], spec32, 64)
    bad = int8.quantize_qdq(m32, slabs * 1e-3)
    onnx.save(bad, str(tmp_path / "bad_int8.onnx"))
    gate = int8.run_gate(exported / "model.onnx", tmp_path / "bad_int8.onnx", cases[6:], spec32)
    assert gate["passed"] is False
    assert all(r["voxel_agreement"] < 0.999 for r in gate["rows"])
    with pytest.raises(DunetError, match="int8 gate refused bad_int8.onnx"):
        int8.check_gate(gate, "bad_int8.onnx")


def test_gate_data_when_calibrating_elsewhere(
    int8_ckpt: Path, spec32: PreprocessSpec, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    write_dataset(other, cases=3, layout="pairs", shape=H.TINY_SHAPE, seed=30)
    out = tmp_path / "out"
    line = _error_line(*run(int8_ckpt, "-o", out, "--format", "onnx-int8", "--calibration",
                            other)[::2])
    assert "not the checkpoint's training set" in line and "--gate-data" in line
    assert not out.exists()
    held = tmp_path / "held"
    write_dataset(held, cases=2, layout="atlas-v2", shape=H.TINY_SHAPE, seed=7)
    code, _, err = run(int8_ckpt, "-o", out, "--format", "onnx-int8", "--calibration", other,
                       "--gate-data", held, "--calibration-slabs", "40", "--calibration-cases",
                       "2")
    assert code == 0, err
    doc = json.loads((out / "model_int8.json").read_text())
    assert doc["int8"]["gate"]["cases_from"].startswith("--gate-data")
    assert len(doc["int8"]["calibration"]["cases"]) == 2
    assert doc["int8"]["calibration"]["slabs"] == 40


def test_gate_data_must_be_held_out(int8_ckpt: Path, int8_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = _error_line(*run(int8_ckpt, "-o", out, "--format", "onnx-int8", "--calibration",
                            int8_data, "--gate-data", int8_data)[::2])
    assert "are also calibration cases" in line and "held-out" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--format", "onnx-int8"], "needs --calibration"),
        (["--calibration", "."], "--calibration is for --format onnx-int8"),
        (["--format", "onnx-int8", "--calibration", ".", "--no-verify"], "cannot skip"),
        (["--format", "onnx-int8", "--calibration-slabs", "0"], "--calibration-slabs"),
    ],
)
def test_int8_option_rules(args: list[str], needle: str, int8_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = _error_line(*run(int8_ckpt, "-o", out, *args)[::2])
    assert needle in line
    assert not out.exists()


# ------------------------------------------------------------- calibration
@pytest.mark.parametrize("layout", ["atlas-r1.1", "atlas-v2", "pairs"])
def test_calibration_reads_every_layout(layout: str, spec32: PreprocessSpec,
                                        tmp_path: Path) -> None:
    write_dataset(tmp_path, cases=2, layout=layout, shape=H.TINY_SHAPE, seed=3)
    _, cases = discover_cases(tmp_path)
    slabs, stats = int8.calibration_slabs(cases, spec32, 10, seed=1)
    assert slabs.shape == (10, 4, 32, 32) and stats["volumes"] == 2
    assert np.isfinite(slabs).all() and float(np.abs(slabs).max()) > 0.5
    again, _ = int8.calibration_slabs(cases, spec32, 10, seed=1)
    np.testing.assert_array_equal(slabs, again)  # seeded


def test_synthetic_calibration_slabs(spec32: PreprocessSpec) -> None:
    slabs = int8.synthetic_calibration_slabs(spec32, 16, seed=2)
    assert slabs.shape == (16, 4, 32, 32) and np.isfinite(slabs).all()


# ------------------------------------------------------- the runtime's CLIs
def test_infer_and_eval_run_the_int8_model(exported: Path, int8_data: Path,
                                           tmp_path: Path) -> None:
    from dunet_deploy.cli.eval import main as eval_main
    from dunet_deploy.cli.infer import main as infer_main

    _, cases = discover_cases(int8_data)
    res = CliRunner().invoke(infer_main, ["--engine", str(exported / "model_int8.onnx"),
                                          str(cases[-1].image), "-o", str(tmp_path / "masks"),
                                          "--precision", "int8"])
    assert res.exit_code == 0, res.output
    assert any(p.name.endswith("_mask.nii.gz") for p in (tmp_path / "masks").iterdir())
    summary = json.loads((tmp_path / "masks" / "summary.json").read_text())
    assert summary["precision"] == "int8" and summary["model"]["model_precision"] == "int8"
    assert summary["backend_details"]["executed"]["integer_layers"] >= 30
    res = CliRunner().invoke(eval_main, ["--engine", str(exported / "model_int8.onnx"),
                                         "--data", str(int8_data), "--out", str(tmp_path / "ev"),
                                         "--backend", "onnxruntime", "--no-boxplot"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ev").is_dir() and any((tmp_path / "ev").iterdir())


def test_auto_backend_runs_int8_on_openvino(exported: Path) -> None:
    """OpenVINO runs the QDQ model ~8x faster than ONNX Runtime (docs/int8.md): auto picks it."""
    with open_runner(exported / "model_int8.onnx") as runner:
        assert runner.backend == "openvino" and runner.precision == "int8"
