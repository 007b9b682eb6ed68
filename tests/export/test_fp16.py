"""The mixed-precision FP16 rewrite: structure, policy and numerics on ORT and OpenVINO."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dunet_deploy.export.fp16 import (
    DEFAULT_POLICY,
    Fp16Policy,
    convert_to_mixed_fp16,
    emulate_fp16,
    head_nodes,
    nodes_in_precision,
)
from dunet_deploy.export.verify import (
    FP16_MIN_AGREEMENT,
    compare,
    openvino_available,
    run_onnxruntime,
    run_openvino,
    verification_inputs,
    verify_fp16,
)
from dunet_deploy.spec import PreprocessSpec

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


@pytest.fixture(scope="module")
def converted(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    model16, report = convert_to_mixed_fp16(onnx.load(str(tiny_onnx)))
    path = tmp_path_factory.mktemp("fp16") / "model_fp16.onnx"
    onnx.save(model16, str(path))
    return path, report


def test_boundary_stays_fp32(converted: tuple[Path, object], tiny_onnx: Path) -> None:
    path, _ = converted
    m16, m32 = onnx.load(str(path)), onnx.load(str(tiny_onnx))
    onnx.checker.check_model(m16, full_check=True)
    for a, b in zip([*m16.graph.input, *m16.graph.output], [*m32.graph.input, *m32.graph.output]):
        assert a == b  # same names, float32, same (dynamic) shapes
    # The input is cast to float16 once, for every branch.
    consumers = [n for n in m16.graph.node if "slabs" in n.input]
    assert [n.op_type for n in consumers] == ["Cast"]
    # The output comes from the float32 head: no final cast.
    assert m16.graph.node[-1].op_type == "Sigmoid" and m16.graph.node[-1].output[0] == "prob"


def test_policy_is_applied(converted: tuple[Path, object]) -> None:
    path, report = converted
    m16 = onnx.load(str(path))
    prec = nodes_in_precision(
        m16,
        {
            "Conv",
            "ReduceMean",
            "MatMul",
            "Sigmoid",
            "Pad",
            "Resize",
            "MaxPool",
            "Add",
            "Mul",
            "Concat",
        },
    )
    head = head_nodes(m16.graph)
    by_op: dict[str, set[int]] = {}
    for node in m16.graph.node:
        if node.name in prec and node.name not in head:
            by_op.setdefault(node.op_type, set()).add(prec[node.name])
    assert by_op["Conv"] == {F16}
    for op in ("Pad", "Resize", "MaxPool", "Add", "Mul", "Concat"):
        assert by_op[op] == {F16}, op
    for op in ("ReduceMean", "MatMul", "Sigmoid"):  # the SE branch
        assert by_op[op] == {F32}, op
    assert sorted(n.op_type for n in m16.graph.node if n.name in head) == ["Conv", "Sigmoid"]
    assert all(prec[h] == F32 for h in head if h in prec)
    # float16 convolution weights are stored as float16
    inits = {t.name: t.data_type for t in m16.graph.initializer}
    conv_w = [n.input[1] for n in m16.graph.node if n.op_type == "Conv" and n.name not in head]
    assert conv_w and all(inits[w] == F16 for w in conv_w)
    assert report.casts > 0 and report.fp16_nodes["Conv"] == len(conv_w)  # type: ignore[attr-defined]


def test_head_can_be_converted_too(tiny_onnx: Path) -> None:
    m32 = onnx.load(str(tiny_onnx))
    head = head_nodes(m32.graph)
    conv = next(n.name for n in m32.graph.node if n.name in head and n.op_type == "Conv")
    # Head conv in float16, the output Sigmoid still float32 (a policy op type).
    m16, _ = convert_to_mixed_fp16(m32, Fp16Policy(keep_head=False))
    assert nodes_in_precision(m16, {"Conv"})[conv] == F16
    assert m16.graph.node[-1].op_type == "Sigmoid"
    # Everything float16: the output is cast back to float32.
    m16, _ = convert_to_mixed_fp16(m32, Fp16Policy(keep_fp32_ops=frozenset(), keep_head=False))
    assert nodes_in_precision(m16, {"Sigmoid"})[m32.graph.node[-1].name] == F16
    assert m16.graph.node[-1].op_type == "Cast"
    assert m16.graph.output[0].type.tensor_type.elem_type == F32


def test_out_of_range_weights_keep_their_conv_fp32() -> None:
    w_big = np.full((2, 1, 1, 1), 1e5, np.float32)  # beyond float16's 65504
    w_ok = np.full((1, 2, 1, 1), 0.5, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["slabs", "w_big"], ["h"], name="big"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w_ok"], ["y"], name="ok"),
        ],
        "g",
        [helper.make_tensor_value_info("slabs", F32, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", F32, [1, 1, 4, 4])],
        [numpy_helper.from_array(w_big, "w_big"), numpy_helper.from_array(w_ok, "w_ok")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m16, report = convert_to_mixed_fp16(model, Fp16Policy(keep_head=False))
    assert report.kept_for_range == ["big"]
    prec = nodes_in_precision(m16, {"Conv", "Relu"})
    assert prec == {"big": F32, "relu": F32, "ok": F16}
    x = np.ones((1, 1, 4, 4), np.float32)
    np.testing.assert_allclose(run_onnxruntime(m16.SerializeToString(), x), 1e5, rtol=1e-3)


def test_weight_underflow_is_counted() -> None:
    w = np.array([1e-9, 1.0], np.float32).reshape(2, 1, 1, 1)  # 1e-9 flushes to 0 in fp16
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c")],
        "g",
        [helper.make_tensor_value_info("x", F32, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", F32, [1, 2, 2, 2])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = convert_to_mixed_fp16(model, Fp16Policy(keep_head=False))
    assert (report.weights_underflow, report.weights_converted) == (1, 2)


def _backends(path: Path) -> list[tuple[str, object]]:
    emulated = emulate_fp16(onnx.load(str(path))).SerializeToString()
    out: list[tuple[str, object]] = [
        ("fp16-emulation", lambda x: run_onnxruntime(emulated, x)),
        ("onnxruntime", lambda x: run_onnxruntime(path, x)),
    ]
    if openvino_available():
        out.append(("openvino-f32", lambda x: run_openvino(path, x)))
    return out


def test_fp16_agrees_with_fp32(
    converted: tuple[Path, object], tiny_onnx: Path, spec32: PreprocessSpec
) -> None:
    path, _ = converted
    inputs = verification_inputs(spec32, seed=3)
    for name, slabs in inputs.items():
        ref = run_onnxruntime(tiny_onnx, slabs)
        for backend, run in _backends(path):
            out = run(slabs)  # type: ignore[operator]
            row = compare(
                ref, out, spec32.threshold, inputs=name, backend=backend, reference_name="fp32"
            )
            assert row.max_abs > 0  # float16 weights at least: not the fp32 graph
            assert row.max_abs < 5e-3, (name, backend, row)
            if name == "synthetic":
                assert row.positives > 0
                assert row.mask_agreement >= FP16_MIN_AGREEMENT, (backend, row)


def _add_mul_graph() -> onnx.ModelProto:
    """y = (x + x) * (1/3), all of it float16 after conversion."""
    c = numpy_helper.from_array(np.array([1 / 3], np.float32), "c")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["slabs", "slabs"], ["a"], name="add"),
            helper.make_node("Mul", ["a", "c"], ["y"], name="mul"),
        ],
        "g",
        [helper.make_tensor_value_info("slabs", F32, [5])],
        [helper.make_tensor_value_info("y", F32, [5])],
        [c],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("optimization", ["basic", "all"])
def test_emulation_rounds_like_numpy_float16(optimization: str) -> None:
    m16, _ = convert_to_mixed_fp16(_add_mul_graph(), Fp16Policy(keep_head=False))
    emu = emulate_fp16(m16)
    assert {i.data_type for i in emu.graph.initializer} == {F32}
    x = np.array([0.1, 1 / 3, 1000.1, 3.14159, 65000.0], np.float32)
    h = np.float16
    with np.errstate(over="ignore"):  # 65000 * 2 overflows float16, as it should
        expected = np.float32(h(np.float32(h(x)) * 2)) * np.float32(h(1 / 3))
        expected = expected.astype(h).astype(np.float32)
    got = run_onnxruntime(emu.SerializeToString(), x, batch_size=5, optimization=optimization)
    np.testing.assert_array_equal(got, expected)


def test_onnxruntime_cpu_does_not_round_float16_regions() -> None:
    """Why the emulation exists: ORT's CPU provider runs float16 Add/Mul in float32."""
    m16, _ = convert_to_mixed_fp16(_add_mul_graph(), Fp16Policy(keep_head=False))
    x = np.array([1000.1, 0.1, 3.0, 7.0, 9.0], np.float32)
    as_is = run_onnxruntime(m16.SerializeToString(), x, batch_size=5)
    emu = run_onnxruntime(emulate_fp16(m16).SerializeToString(), x, batch_size=5)
    assert as_is[0] != emu[0]  # 1000.1 survives in as-is: it was never rounded to float16


def test_default_policy_documented() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "fp16.md"
    text = doc.read_text()
    for op in DEFAULT_POLICY.keep_fp32_ops - {"Gemm", "GlobalAveragePool"}:
        assert op in text


def test_verify_fp16_api(
    converted: tuple[Path, object], tiny_onnx: Path, spec32: PreprocessSpec
) -> None:
    path, _ = converted
    doc = verify_fp16(tiny_onnx, path, spec32, seed=3)
    assert doc["passed"] is True
    backends = {r["backend"] for r in doc["rows"]}
    assert {"fp16-emulation", "onnxruntime-cpu"} <= backends
    syn = [r for r in doc["rows"] if r["inputs"] == "synthetic"]
    assert all(r["passed"] and r["positives"] > 0 for r in syn)
