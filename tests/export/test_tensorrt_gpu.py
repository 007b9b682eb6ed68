"""On a real GPU with TensorRT: a tiny engine built by the builder agrees with ONNX Runtime.

Skipped where TensorRT (the library, not only its type stubs) or a usable GPU is
missing — everywhere except a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dunet_deploy.errors import DunetError


def _gpu_and_tensorrt() -> str | None:
    """Why this cannot run here, or None."""
    from dunet_deploy.cuda import probe_gpu
    from dunet_deploy.runtime.loaders import require_tensorrt

    try:
        require_tensorrt()
        probe_gpu()
    except DunetError as exc:
        return str(exc)
    return None


pytestmark = pytest.mark.skipif(_gpu_and_tensorrt() is not None,
                                reason=f"needs TensorRT and an NVIDIA GPU: {_gpu_and_tensorrt()}")


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_tiny_engine_agrees_with_onnxruntime(
    tmp_path: Path, spec32: object, trained_tiny: torch.nn.Module, tiny_onnx: Path, precision: str
) -> None:
    import onnx

    from dunet_deploy.artifacts import write_engine_sidecar
    from dunet_deploy.export.fp16 import convert_to_mixed_fp16
    from dunet_deploy.export.onnx_export import artifact_info, set_metadata
    from dunet_deploy.export.tensorrt_build import EngineOptions, build_engine
    from dunet_deploy.export.verify import compare, run_onnxruntime, verification_inputs
    from dunet_deploy.runtime import open_runner

    source = tiny_onnx
    info = artifact_info(trained_tiny, spec32, precision=precision)  # type: ignore[arg-type]
    if precision == "fp16":
        proto, _ = convert_to_mixed_fp16(onnx.load(str(tiny_onnx)))
        set_metadata(proto, info)
        source = tmp_path / "model_fp16.onnx"
        source.write_bytes(proto.SerializeToString())
    built = build_engine(source, (4, 32, 32), EngineOptions(batch_range=(1, 16, 32)))
    assert built.precision == precision and sum(built.sidecar.layer_precisions.values()) > 0
    plan = tmp_path / "model.plan"
    plan.write_bytes(built.plan)
    write_engine_sidecar(plan, info, built.sidecar)
    inputs = verification_inputs(spec32)  # type: ignore[arg-type]
    for cuda_graph in (False, True):
        with open_runner(plan, cuda_graph=cuda_graph) as runner:
            assert runner.max_batch == 32
            for name, slabs in inputs.items():
                ref = run_onnxruntime(tiny_onnx, slabs)
                out = runner.infer(slabs)
                again = runner.infer(slabs)  # replayed graph / second profile use
                np.testing.assert_array_equal(out, again)
                row = compare(ref, out, 0.5, inputs=name, backend="tensorrt",
                              reference_name="onnxruntime")
                if precision == "fp32":
                    assert row.max_abs < 1e-3, row
                elif name == "synthetic":
                    assert row.positives > 0 and row.mask_agreement >= 0.999, row
