"""The bench's end-to-end run with torch as the model (what gpu.sh reports on CUDA)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dunet_deploy.bench.backends import ModelArtifacts  # noqa: E402
from dunet_deploy.bench.e2e import _torch_runner_factory  # noqa: E402
from dunet_deploy.data.nifti import load_nifti  # noqa: E402
from dunet_deploy.data.synth import write_dataset  # noqa: E402
from dunet_deploy.models import create_model  # noqa: E402
from dunet_deploy.runtime.segmenter import segment_files  # noqa: E402
from dunet_deploy.spec import PreprocessSpec  # noqa: E402


def test_torch_runner_drives_the_pipeline_like_onnxruntime(tmp_path):
    spec = PreprocessSpec.for_geometry((40, 48, 24), image_size=32)
    torch.manual_seed(0)
    art = ModelArtifacts("dunet", create_model("dunet", base_filters=8).eval(), spec,
                         tmp_path / "cache", 16)
    art.cache_dir.mkdir()
    (case,) = write_dataset(tmp_path / "data", cases=1, layout="pairs", shape=(40, 48, 24),
                            seed=1)
    factory = _torch_runner_factory(art, "fp32", "cpu")
    by_torch = segment_files(art.onnx(), [case.image], tmp_path / "torch", batch_size=8,
                             runner_factory=factory, save_prob=True)
    by_ort = segment_files(art.onnx(), [case.image], tmp_path / "ort", batch_size=8,
                           backend="onnxruntime", precision="fp32", save_prob=True)
    assert by_torch["backend"] == "torch" and by_torch["ok"] == 1 == by_ort["ok"]
    p_torch = load_nifti(by_torch["cases"][0]["prob"]).data
    p_ort = load_nifti(by_ort["cases"][0]["prob"]).data
    np.testing.assert_allclose(p_torch, p_ort, atol=1e-4)
