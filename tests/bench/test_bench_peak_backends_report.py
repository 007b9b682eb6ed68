"""Peak microbenchmark, backend availability and report rendering (tiny, no full models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dunet_deploy.bench.backends import backend_unavailable, cuda_unavailable
from dunet_deploy.bench.core import Skip, compute_ratios, cpu_features, make_record
from dunet_deploy.bench.peak import (
    libraries_for,
    matmul_peak,
    measure_peaks,
    precision_unavailable,
)
from dunet_deploy.bench.report import render_markdown, render_png, write_outputs, write_report

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("library", ["torch", "onnxruntime", "openvino"])
def test_matmul_peak_small_sizes(library: str) -> None:
    pytest.importorskip(library)
    p = matmul_peak("cpu", "fp32", threads=1, sizes=(64, 128), min_time_s=0.01, library=library)
    assert p["gflops"] > 0 and p["best_size"] in (64, 128) and p["library"] == library
    assert p["gflops"] == max(p["by_size"].values())
    assert p["threads"] == 1


def test_measure_peaks_skips_what_the_cpu_lacks() -> None:
    peaks, skipped = measure_peaks("cpu", ["fp32", "bf16"], threads=1, sizes=(64,),
                                   min_time_s=0.01)
    assert "fp32" in peaks
    fp32 = peaks["fp32"]
    assert set(fp32["by_library"]) == set(libraries_for("cpu", "fp32"))
    numbers = [v for v in fp32["by_library"].values() if isinstance(v, float)]
    assert fp32["gflops"] == max(numbers) and fp32["by_library"][fp32["library"]] == fp32["gflops"]
    assert libraries_for("cuda", "fp16") == ("torch",)
    if cpu_features()["native_bf16"]:
        assert "bf16" in peaks
    else:
        (s,) = skipped
        assert s.precision == "bf16" and "bf16" in s.reason
        assert precision_unavailable("cpu", "bf16") == s.reason
    assert precision_unavailable("cpu", "fp32") is None


def test_backend_unavailable_reasons() -> None:
    assert "GPU" in (backend_unavailable("tensorrt", "fp16", "cpu") or "")
    assert "CUDA graphs" in (backend_unavailable("torch-cudagraphs", "fp32", "cpu") or "")
    assert "unknown backend" in (backend_unavailable("tflite", "fp32", "cpu") or "")
    assert backend_unavailable("torch", "fp32", "cpu") is None
    assert "bf16" in (backend_unavailable("onnxruntime", "bf16", "cpu") or "")
    assert "fp16" in (backend_unavailable("onnxruntime", "fp16", "cpu") or "")
    assert "CPU only" in (backend_unavailable("openvino", "fp32", "cuda") or "")
    if not cpu_features()["native_bf16"]:
        assert "bf16" in (backend_unavailable("torch", "bf16", "cpu") or "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_unavailable_says_why() -> None:
    reason = cuda_unavailable()
    assert reason and "\n" not in reason


def _doc() -> dict:
    recs = [
        make_record(model=m, backend=b, precision="fp32", batch_size=n, device="cpu",
                    image_size=32, in_channels=4, threads=1, warmup=1,
                    latencies_ms=[t * n, t * n * 1.1], gflop_per_slab=g, peak_gflops=50.0,
                    peak_precision="fp32", rss_mb=123.0)
        for m, g, t in (("dunet", 1.0, 2.0), ("unet3d", 4.0, 9.0))
        for b in ("torch", "openvino")
        for n in (1, 2)
    ]
    e2e = [{"model": "dunet", "backend": "openvino", "precision": "fp32",
            "volume_shape": [32, 40, 189], "slabs_run": 150, "batch_size": 16,
            "pipeline_s": 1.2, "model_s": 1.0, "ratio": 1.2, "goal": 1.15,
            "meets_goal": False, "ratio_with_load": 1.5}]
    return {
        "config": {"models": ["dunet", "unet3d"], "device": "cpu", "threads": 1,
                   "image_size": 32, "warmup": 1, "iters": 2},
        "machine": {"cpu_model": "Test CPU", "cores": 2, "versions": {"torch": "x"},
                    "loadavg_start": [0.1, 0.2, 0.3], "loadavg_end": [0.4, 0.5, 0.6]},
        "peak": {"fp32": {"device": "cpu", "gflops": 50.0, "best_size": 64,
                          "by_size": {"64": 50.0}}},
        "records": [r.to_dict() for r in recs],
        "ratios": compute_ratios(recs, e2e),
        "skipped": [Skip("dunet", "tensorrt", "fp16", "TensorRT needs an NVIDIA GPU").to_dict()],
    }


def test_render_markdown_tables() -> None:
    md = render_markdown(_doc())
    assert "## dunet (1.00 GFLOP per slab" in md
    assert "## Skipped" in md and "TensorRT needs an NVIDIA GPU" in md
    assert "D-UNet / 3D UNet" in md and "| openvino | fp32 |" in md
    assert "Test CPU" in md and "0.10/0.20/0.30" in md
    # Every table row has the same number of cells as its header.
    for block in md.split("\n\n"):
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        if rows:
            assert len({ln.count(" | ") for ln in rows}) == 1, block


def test_render_png_and_write_outputs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert render_png(_doc())[:8] == b"\x89PNG\r\n\x1a\n"
    paths = write_outputs(tmp_path / "out", _doc())
    assert sorted(paths) == ["json", "md", "png"]
    doc = json.loads(paths["json"].read_text())
    assert doc["records"] and not list((tmp_path / "out").glob(".*tmp"))
    paths["md"].unlink()
    write_report(paths["json"])
    assert paths["md"].read_text().startswith("# dunet-bench results")
