"""``dunet-bench --precision int8``: int8 beside fp32/bf16 in one run, with an int8 peak."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from click.testing import CliRunner

from dunet_deploy.cli.bench import main
from dunet_deploy.export.int8 import qdq_matmul_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import runtime_testutils as rt


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


def _fake_tensorrt_for_bench(memory: Any, spec: Any, max_batch: int) -> Any:
    """The builder fake (export_helpers) that also runs its engines (runtime_testutils' fake).

    The runtime deserialises only plans the builder wrote (JSON, DETAILED
    verbosity), and their engines have the builder's two profiles.
    """
    import export_helpers

    builder = export_helpers.make_fake_tensorrt()
    runtime = rt.make_fake_tensorrt(memory, spec, profiles=[(1, 8), (1, max_batch)])
    run_engine = type(runtime.Runtime(None).deserialize_cuda_engine(b"FAKEPLAN"))
    inspect_engine = type(builder.Runtime(None).deserialize_cuda_engine(
        json.dumps({"verbosity": "DETAILED"}).encode()))

    class Engine(run_engine, inspect_engine):  # type: ignore[misc,valid-type]
        pass

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            return Engine() if json.loads(plan).get("verbosity") == "DETAILED" else None

    builder.Runtime = Runtime
    builder.Logger.ERROR = builder.Logger.Severity.ERROR  # the runner's logger level
    builder.TensorIOMode = runtime.TensorIOMode
    builder.nptype = runtime.nptype
    return builder


def test_bench_tensorrt_int8_with_fake_tensorrt(monkeypatch: Any, tmp_path: Path) -> None:
    """``dunet-bench --backends tensorrt --precision int8``'s session: a strongly typed engine
    from the QDQ ONNX, run by the TensorRT runner as int8 (#20.5)."""
    from dunet_deploy.bench.backends import ModelArtifacts, backend_unavailable, open_session
    from dunet_deploy.export import tensorrt_build as tb
    from dunet_deploy.models import create_model
    from dunet_deploy.runtime import tensorrt_runner

    spec = rt.tiny_spec()
    memory = rt.FakeMemory()
    trt = _fake_tensorrt_for_bench(memory, spec, 16)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tb, "probe_gpu", lambda: rt.GPU)
    monkeypatch.setattr(tensorrt_runner, "default_memory", lambda device=0: memory)
    assert backend_unavailable("tensorrt", "int8", "cuda") is None
    import torch

    torch.manual_seed(0)
    art = ModelArtifacts("dunet", create_model("dunet", base_filters=8).eval(), spec,
                         tmp_path, max_batch=16)
    session = open_session(art, "tensorrt", "int8", device="cuda", threads=1)
    try:
        assert session.info["precision"] == "int8"
        x = np.random.default_rng(2).standard_normal((12, 4, 32, 32)).astype(np.float32)
        np.testing.assert_allclose(session.run(x), rt.fake_engine_fn(x), rtol=1e-6)
    finally:
        session.close()
    assert ("parse_from_file", "dunet.int8.onnx") in trt.calls
    plan = json.loads((tmp_path / "dunet.int8.plan").read_bytes())
    # Explicit quantization: strongly typed from the QDQ ONNX, no INT8/FP16 builder flags.
    assert plan["source"] == "dunet.int8.onnx" and plan["network_flags"] == 1 << 1
    assert not {"INT8", "FP16"} & set(plan["flags"])
