"""PyTorch -> ONNX export: I/O contract, dynamic batch, constant folding, metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, read_artifact_info
from dunet_deploy.errors import DunetError
from dunet_deploy.export.onnx_export import artifact_info, export_onnx, fold_constants
from dunet_deploy.export.verify import (
    compare,
    run_onnxruntime,
    run_torch,
    verification_inputs,
    verify_fp32,
)
from dunet_deploy.models import create_model, keras_param_count
from dunet_deploy.spec import PreprocessSpec


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_io_contract_and_metadata(tiny_onnx: Path, spec32: PreprocessSpec) -> None:
    model = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == INPUT_NAME and out.name == OUTPUT_NAME
    assert _dims(inp) == ["N", 4, 32, 32]
    assert _dims(out) == ["N", 1, 32, 32]
    for vi in (inp, out):
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    info = read_artifact_info(tiny_onnx)
    assert info.spec == spec32
    assert info.model_name == "dunet"
    assert info.model_args["base_filters"] == 8
    assert info.params == keras_param_count(create_model("dunet", base_filters=8))
    assert info.precision == "fp32"
    assert set(info.versions) == {"dunet_deploy", "torch", "onnx"}


def test_graph_is_folded(tiny_onnx: Path) -> None:
    """No run-time pad arithmetic, no Identity aliases, BN folded into the convolutions."""
    ops = {n.op_type for n in onnx.load(str(tiny_onnx)).graph.node}
    assert ops.isdisjoint(
        {
            "Constant",
            "ConstantOfShape",
            "Identity",
            "Slice",
            "Transpose",
            "Cast",
            "BatchNormalization",
            "Dropout",
        }
    )
    assert {"Conv", "Pad", "Resize", "ReduceMean", "MatMul", "Sigmoid"} <= ops


@pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::torch.jit.TracerWarning"
)
def test_fold_constants_keeps_the_function(spec32: PreprocessSpec, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("dunet", base_filters=8).eval()
    x = torch.randn(2, 4, 32, 32)
    raw = tmp_path / "raw.onnx"
    torch.onnx.export(
        model,
        (x,),
        str(raw),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=17,
    )
    before = onnx.load(str(raw))
    after = fold_constants(before)
    assert len(after.graph.node) < len(before.graph.node)
    a = run_onnxruntime(before.SerializeToString(), x.numpy())
    b = run_onnxruntime(after.SerializeToString(), x.numpy())
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_matches_torch(
    tiny_onnx: Path, trained_tiny: torch.nn.Module, batch: int
) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, 4, 32, 32), dtype=np.float32)
    out = run_onnxruntime(tiny_onnx, x, batch_size=batch)
    ref = run_torch(trained_tiny, x)
    assert out.shape == (batch, 1, 32, 32)
    assert np.abs(out - ref).max() < 1e-4


def test_synthetic_slabs_agree_with_torch(
    tiny_onnx: Path, trained_tiny: torch.nn.Module, spec32: PreprocessSpec
) -> None:
    slabs = verification_inputs(spec32, seed=3)["synthetic"]
    row = compare(
        run_torch(trained_tiny, slabs),
        run_onnxruntime(tiny_onnx, slabs),
        spec32.threshold,
        inputs="synthetic",
        backend="ort",
        reference_name="torch",
    )
    assert row.positives > 0  # the check means something only with lesion pixels
    assert row.max_abs < 1e-4 and row.mask_agreement == 1.0


def test_export_leaves_training_mode_alone(spec32: PreprocessSpec) -> None:
    model = create_model("dunet", base_filters=8).train()
    proto = export_onnx(model, spec32)
    assert model.training
    assert proto.graph.input[0].name == INPUT_NAME


def test_opset_below_17_is_refused(spec32: PreprocessSpec) -> None:
    with pytest.raises(DunetError, match="opset 16 is too old"):
        export_onnx(create_model("dunet", base_filters=8), spec32, opset=16)


def test_newer_opset_is_recorded(spec32: PreprocessSpec) -> None:
    proto = export_onnx(create_model("dunet", base_filters=8), spec32, opset=18)
    assert proto.opset_import[0].version == 18


def test_channel_mismatch_is_a_user_error(spec32: PreprocessSpec) -> None:
    one_slice = spec32.replace(slab_offsets=(0,))
    with pytest.raises(DunetError, match="4 channels but the spec stacks 1"):
        export_onnx(create_model("dunet", base_filters=8), one_slice)


def test_artifact_info_records_metrics(spec32: PreprocessSpec) -> None:
    info = artifact_info(create_model("unet2d", base_filters=8), spec32, metrics={"dice": 0.7})
    assert info.metrics == {"dice": 0.7}
    assert info.model_name == "unet2d"
    assert info.to_metadata()["dunet.metrics"] == '{"dice": 0.7}'


def test_verify_fp32_api(
    tiny_onnx: Path, trained_tiny: torch.nn.Module, spec32: PreprocessSpec
) -> None:
    lines: list[str] = []
    doc = verify_fp32(trained_tiny, tiny_onnx, spec32, seed=3, log=lines.append)
    assert doc["passed"] is True and doc["reference"] == "torch"
    assert {r["inputs"] for r in doc["rows"]} == {"random", "synthetic"}
    assert "model.onnx" in lines[0] and "synthetic" in lines[1]
    other = create_model("dunet", base_filters=8).eval()  # different weights: must fail
    with pytest.raises(DunetError, match="differs from PyTorch"):
        verify_fp32(other, tiny_onnx, spec32, seed=3)
