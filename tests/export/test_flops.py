"""ONNX FLOP counter against hand-computed counts and an independent torch count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dunet_deploy.flops import count_flops

F32 = TensorProto.FLOAT


def _init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.zeros(shape, np.float32), name)


@pytest.fixture
def small_model() -> onnx.ModelProto:
    """x[N,3,8,8] -Conv(3->4, 3x3, pad 1)-Relu-Conv(4->4, 3x3, groups 2, stride 2)
    -GlobalAveragePool-Flatten-Gemm(4->5)-MatMul(5->2)-Sigmoid."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node(
            "Conv", ["r1", "w2"], ["c2"], name="c2", group=2, strides=[2, 2], pads=[1, 1, 1, 1]
        ),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="g"),
        helper.make_node("Flatten", ["g"], ["f"], name="f"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y1"], name="gemm", transB=1),
        helper.make_node("MatMul", ["y1", "wm"], ["y2"], name="mm"),
        helper.make_node("Sigmoid", ["y2"], ["y"], name="s"),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", F32, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", F32, ["N", 2])],
        [
            _init("w1", (4, 3, 3, 3)),
            _init("b1", (4,)),
            _init("w2", (4, 2, 3, 3)),
            _init("wg", (5, 4)),
            _init("bg", (5,)),
            _init("wm", (5, 2)),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hand_computed_counts(small_model: onnx.ModelProto) -> None:
    got = count_flops(small_model, (3, 3, 8, 8))
    conv1 = 2 * (3 * 3) * 3 * 4 * (8 * 8)  # 2·K·Cin/g·Cout·outputs, per sample
    conv2 = 2 * (3 * 3) * (4 // 2) * 4 * (4 * 4)  # groups 2, stride 2 -> 4×4
    gemm = 2 * 4 * 5
    matmul = 2 * 5 * 2
    assert got["by_op"] == {"Conv": 3 * (conv1 + conv2), "Gemm": 3 * gemm, "MatMul": 3 * matmul}
    assert got["total"] == 3 * (conv1 + conv2 + gemm + matmul)
    assert got["per_sample"] == conv1 + conv2 + gemm + matmul
    assert got["batch"] == 3 and got["elementwise"] is False


def test_elementwise_is_optional(small_model: onnx.ModelProto) -> None:
    base = count_flops(small_model, (1, 3, 8, 8))
    more = count_flops(small_model, (1, 3, 8, 8), elementwise=True)
    relu, gap, sigmoid = 4 * 8 * 8, 4 * 4 * 4, 2
    assert more["by_op"]["Relu"] == relu
    assert more["by_op"]["GlobalAveragePool"] == gap
    assert more["by_op"]["Sigmoid"] == sigmoid
    assert more["total"] == base["total"] + relu + gap + sigmoid


def test_path_input_and_bad_shapes(small_model: onnx.ModelProto, tmp_path: Path) -> None:
    path = tmp_path / "small.onnx"
    onnx.save(small_model, str(path))
    assert (
        count_flops(path, (2, 3, 8, 8))["per_sample"]
        == count_flops(small_model, (1, 3, 8, 8))["total"]
    )
    with pytest.raises(ValueError, match="rank"):
        count_flops(path, (3, 8, 8))
    with pytest.raises(ValueError, match="fixed dims"):
        count_flops(path, (1, 4, 8, 8))


def _torch_conv_linear_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Independent count with forward hooks on the torch modules."""
    total = 0

    def conv_hook(mod: torch.nn.Module, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        w = mod.weight  # type: ignore[union-attr]
        total += 2 * w[0].numel() * out.numel()  # K·Cin/g per output element

    def linear_hook(mod: torch.nn.Module, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * mod.in_features * out.numel()  # type: ignore[operator]

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(linear_hook)
    with torch.no_grad():
        model(x)
    return total


def test_tiny_dunet_matches_torch_hooks(tiny_onnx: Path, trained_tiny: torch.nn.Module) -> None:
    got = count_flops(tiny_onnx, (2, 4, 32, 32))
    expected = _torch_conv_linear_flops(trained_tiny, torch.zeros(2, 4, 32, 32))
    assert got["total"] == expected
    assert set(got["by_op"]) == {"Conv", "MatMul"}
    assert got["per_sample"] == expected // 2
