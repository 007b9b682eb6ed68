"""``benchmarks/gpu.sh`` and its click-free driver ``dunet_deploy.bench.script``, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dunet_deploy.bench.script import config_from_env
from dunet_deploy.errors import DunetError

REPO = Path(__file__).resolve().parents[2]


def test_quick_and_full_configs() -> None:
    quick = config_from_env({"QUICK": "1"})
    assert quick.models == ("dunet", "unet3d") and quick.batch_sizes == (1, 8, 32)
    assert quick.precisions == ("fp16", "bf16") and quick.deadline_s == 480.0
    assert quick.device == "cuda" and quick.backends[-1] == "torch-compile"
    assert "tensorrt" in quick.backends and quick.e2e
    full = config_from_env({"DEADLINE": "300", "CUDA_GRAPH": "1", "THREADS": "3"})
    assert full.models == ("dunet", "unet3d", "unet2d") and full.deadline_s == 300.0
    assert full.cuda_graph and full.threads == 3 and full.e2e
    with pytest.raises(DunetError, match=r"DEADLINE='soon': expected a number"):
        config_from_env({"DEADLINE": "soon"})
    with pytest.raises(DunetError, match="BATCHES"):
        config_from_env({"BATCHES": "1,x"})


def test_driver_runs_without_click_or_nibabel(tmp_path: Path) -> None:
    """Only torch, numpy, onnx, onnxruntime: records written, the rest skipped with reasons."""
    pytest.importorskip("torch")
    out = tmp_path / "out"
    blocker = ("import sys, runpy\n"
               "for m in ('click', 'nibabel', 'openvino', 'tensorrt'):\n"
               "    sys.modules[m] = None\n"
               "runpy.run_module('dunet_deploy.bench.script', run_name='__main__')\n")
    env = {**os.environ, "QUICK": "1", "DEVICE": "cpu", "OUT": str(out), "MODELS": "dunet",
           "BACKENDS": "torch,onnxruntime,tensorrt,torch-compile", "PRECISIONS": "fp32",
           "BATCHES": "1,2",
           "ITERS": "1", "WARMUP": "0", "MIN_ITERS": "1", "IMAGE_SIZE": "32",
           "BASE_FILTERS": "8", "PEAK_SIZES": "64", "THREADS": "1", "E2E": "1",
           "DEADLINE": "120"}
    proc = subprocess.run([sys.executable, "-c", blocker], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "bench.json").read_text())
    assert doc["complete"] is True
    assert [(r["backend"], r["batch_size"]) for r in doc["records"]] == [
        ("torch", 1), ("torch", 2), ("onnxruntime", 1), ("onnxruntime", 2)]
    reasons = {s["backend"]: s["reason"] for s in doc["skipped"]}
    assert "NVIDIA GPU" in reasons["tensorrt"] and "CUDA only" in reasons["torch-compile"]
    assert "nibabel" in reasons["(e2e)"] or "pipeline unavailable" in reasons["(e2e)"]
    assert (out / "bench.md").is_file()


def test_driver_user_error_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dunet_deploy.bench.script"],
                          env={**os.environ, "OUT": str(tmp_path), "DEADLINE": "-1",
                               "DEVICE": "cpu"},
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --deadline -1.0: must be > 0"


def test_gpu_sh_arguments_and_no_gpu() -> None:
    bad = subprocess.run(["bash", "benchmarks/gpu.sh", "--bogus"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "unknown argument '--bogus'" in bad.stderr
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--quick"], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        pytest.skip("a GPU is present: gpu.sh would run the benchmark")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu.sh: error: torch")
