"""``dunet-bench --precision int8``: int8 beside fp32/bf16 in one run, with an int8 peak."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from click.testing import CliRunner

from dunet_deploy.cli.bench import main
from dunet_deploy.export.int8 import qdq_matmul_onnx


def test_bench_measures_int8_beside_fp32_and_bf16(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ["--models", "dunet", "--base-filters", "8", "--image-size", "32",
            "--backends", "torch,onnxruntime,openvino", "--precision", "fp32,bf16,int8",
            "--batch-sizes", "2", "--iters", "1", "--warmup", "1", "--threads", "1",
            "--peak-sizes", "64,128", "--no-e2e", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "bench.json").read_text())
    int8 = {r["backend"]: r for r in doc["records"] if r["precision"] == "int8"}
    assert set(int8) == {"onnxruntime", "openvino"}
    for rec in int8.values():
        assert rec["peak_precision"] == "int8" and rec["ms_per_slab_p50"] > 0
    assert doc["peak"]["int8"]["gflops"] > 0
    assert {"fp32", "int8"} <= {r["precision"] for r in doc["records"]
                                if r["backend"] == "openvino"}
    torch_int8 = [s for s in doc["skipped"] if s["backend"] == "torch" and
                  s["precision"] == "int8"]
    assert torch_int8 and "QDQ ONNX" in torch_int8[0]["reason"]


def test_qdq_matmul_runs_an_integer_gemm(tmp_path: Path) -> None:
    """The peak graph computes A @ B of the quantized operands, through an integer kernel."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(qdq_matmul_onnx(32), opts, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((32, 32), dtype=np.float32)
    y = sess.run(None, {"A": a})[0]
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(tmp_path / "opt.onnx")).graph
    ops = {n.op_type for n in g.node}
    assert ops & {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger"}, ops
    src = onnx.load_from_string(qdq_matmul_onnx(32)).graph
    b = numpy_helper.to_array(next(t for t in src.initializer if t.name == "B_q"))
    a_q = np.clip(np.round(a / 0.05), -128, 127)
    np.testing.assert_allclose(y, (a_q * 0.05) @ (b.astype(np.float32) * 0.01), rtol=1e-4,
                               atol=1e-3)
