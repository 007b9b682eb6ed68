"""``dunet-bench`` end to end on a tiny configuration, and its argument errors.

Never asserts speed: only that every figure is present, finite and consistent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from dunet_deploy.cli.bench import main

# One thread: the CI machine has two cores and may run other jobs; an OpenMP
# team of two on a busy machine spends seconds in barriers.
SMALL = [
    "--models", "dunet,unet3d", "--base-filters", "8", "--image-size", "32",
    "--backends", "torch,onnxruntime,openvino,tensorrt", "--precision", "fp32,bf16",
    "--batch-sizes", "1,2", "--iters", "2", "--warmup", "1", "--threads", "1",
    "--peak-sizes", "128,256", "--e2e-batch-size", "16", "--e2e-repeats", "1",
]  # fmt: skip
RECORD_FIELDS = (
    "model", "backend", "precision", "batch_size", "ms_per_slab_p50", "latency_ms_p50",
    "latency_ms_p95", "latency_ms_p99", "slabs_per_s", "volumes_per_s", "gflop_per_slab",
    "gflops_achieved", "peak_gflops", "pct_of_peak", "device", "rss_mb",
)  # fmt: skip


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench") / "out"
    result = CliRunner().invoke(main, [*SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result, json.loads((out / "bench.json").read_text()), out


def test_outputs_written(bench: tuple[Any, dict[str, Any], Path]) -> None:
    result, doc, out = bench
    assert (out / "bench.md").read_text().startswith("# dunet-bench results")
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert f"results in {out}" in result.output
    assert set(doc) >= {"machine", "peak", "records", "ratios", "skipped"}
    assert doc["machine"]["cpu_model"] and doc["machine"]["cores"] >= 1
    assert doc["machine"]["versions"]["torch"] and doc["machine"]["versions"]["onnxruntime"]
    peak = doc["peak"]["fp32"]
    assert peak["gflops"] == max(peak["gflops_at_start"], peak["gflops_at_end"]) > 0


def test_bench_md_says_only_what_ran(bench: tuple[Any, dict[str, Any], Path]) -> None:
    """Issue 19.11f: no volumes/s for 32×32 slabs (÷ 189 is an ATLAS volume at 192×192), and a
    command line without the --pipeline options this run ignored."""
    from dunet_deploy.bench.report import render_markdown

    _, doc, out = bench
    md = (out / "bench.md").read_text()
    assert "volumes/s" not in md.split("### End-to-end")[0].replace(
        "no volumes/s: 32×32 slabs are not an ATLAS volume's 192×192", "")
    assert "no volumes/s: 32×32 slabs are not an ATLAS volume's 192×192" in md
    command = doc["command"].split()
    for ignored in ("--volumes", "--volume-shape", "--workers", "--pipeline-models",
                    "--encodings", "--pipeline-backend", "--tta", "--save-prob", "--pipeline"):
        assert ignored not in command, ignored
    for used in ("--image-size", "--base-filters", "--e2e", "--e2e-batch-size", "--threads"):
        assert used in command, used
    # The same document at the paper's slab size: volumes/s = slabs/s ÷ 189 in both tables.
    atlas = render_markdown({**doc, "config": {**doc["config"], "image_size": 192}})
    assert "volumes/s = slabs/s ÷ 189" in atlas
    assert atlas.split("### End-to-end")[0].count("| volumes/s |") == 3  # 2 models + best


def test_records_complete_finite_consistent(bench: tuple[Any, dict[str, Any], Path]) -> None:
    _, doc, _ = bench
    recs = doc["records"]
    combos = {(r["model"], r["backend"], r["precision"], r["batch_size"]) for r in recs}
    for model in ("dunet", "unet3d"):
        for backend in ("torch", "onnxruntime", "openvino"):
            for batch in (1, 2):
                assert (model, backend, "fp32", batch) in combos
    for r in recs:
        for key in RECORD_FIELDS:
            assert key in r, key
            if not isinstance(r[key], str):
                assert r[key] is not None and math.isfinite(r[key]), (key, r)
        assert r["device"] == "cpu" and r["iters"] == 2
        assert r["latency_ms_p50"] <= r["latency_ms_p95"] <= r["latency_ms_p99"]
        assert r["slabs_per_s"] == pytest.approx(1000 * r["batch_size"] / r["latency_ms_p50"],
                                                 rel=1e-4)
        assert r["ms_per_slab_p50"] == pytest.approx(r["latency_ms_p50"] / r["batch_size"],
                                                     rel=1e-4)
        assert r["volumes_per_s"] == pytest.approx(r["slabs_per_s"] / 189, rel=1e-4)
        assert r["gflops_achieved"] == pytest.approx(r["gflop_per_slab"] * r["slabs_per_s"],
                                                     rel=1e-4)
        assert r["pct_of_peak"] == pytest.approx(
            r["gflops_achieved"] / r["peak_gflops"] * 100, rel=1e-4)
        assert r["peak_gflops"] == pytest.approx(doc["peak"][r["precision"]]["gflops"], rel=1e-4)
        assert r["gflop_per_slab"] > 0 and r["rss_mb"] > 0
    # The same graph is counted for every backend of a model; the 3D UNet costs more.
    g = {r["model"]: r["gflop_per_slab"] for r in recs}
    assert g["unet3d"] > g["dunet"]


def test_skipped_have_reasons(bench: tuple[Any, dict[str, Any], Path]) -> None:
    _, doc, _ = bench
    skipped = doc["skipped"]
    trt = [s for s in skipped if s["backend"] == "tensorrt"]
    assert {(s["model"], s["precision"]) for s in trt} == {
        (m, p) for m in ("dunet", "unet3d") for p in ("fp32", "bf16")}
    assert all("GPU" in s["reason"] for s in trt)
    for s in skipped:
        assert s["reason"] and "\n" not in s["reason"]
    # bf16 either ran (native bf16 CPU) or was skipped with a reason, never silently dropped.
    for model in ("dunet", "unet3d"):
        for backend in ("torch", "openvino", "onnxruntime"):
            ran = any(r["model"] == model and r["backend"] == backend and r["precision"] == "bf16"
                      for r in doc["records"])
            sk = any(s["model"] == model and s["backend"] == backend and s["precision"] == "bf16"
                     for s in skipped)
            assert ran != sk, (model, backend)


def test_ratios(bench: tuple[Any, dict[str, Any], Path]) -> None:
    _, doc, _ = bench
    ratios = doc["ratios"]
    d3 = {(e["backend"], e["precision"]): e for e in ratios["dunet_vs_unet3d"]}
    assert {("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32")} <= set(d3)
    best = {}
    for r in doc["records"]:
        k = (r["model"], r["backend"], r["precision"])
        best[k] = min(best.get(k, math.inf), r["ms_per_slab_p50"])
    for (backend, prec), e in d3.items():
        want = best[("dunet", backend, prec)] / best[("unet3d", backend, prec)]
        assert e["ratio"] == pytest.approx(want, rel=1e-4)
    vt = {(e["model"], e["backend"], e["precision"]) for e in ratios["vs_torch_eager"]}
    assert ("dunet", "onnxruntime", "fp32") in vt and ("unet3d", "openvino", "fp32") in vt
    for e in ratios["vs_torch_eager"]:
        assert e["speedup"] == pytest.approx(e["torch_ms_per_slab"] / e["backend_ms_per_slab"],
                                             rel=1e-4)
    e2e = {(e["backend"], e["precision"]): e for e in ratios["e2e"]}
    assert ("onnxruntime", "fp32") in e2e and ("openvino", "fp32") in e2e
    for e in e2e.values():
        assert e["model"] == "dunet" and e["volume_shape"] == [32, 40, 189]
        assert 0 < e["slabs_run"] <= 189 and e["model_s"] > 0 and e["pipeline_s"] > 0
        assert e["ratio"] == pytest.approx(e["pipeline_s"] / e["model_s"], rel=1e-4)
        assert e["meets_goal"] == (e["ratio"] <= 1.15)
        assert e["model_s"] == pytest.approx(min(e["model_s_runs"]), abs=1e-3)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--models", "dunet,nope"], "unknown model 'nope'"),
        (["--backends", "torch,tflite"], "unknown backend 'tflite'"),
        (["--precision", "fp8"], "unknown precision 'fp8'"),
        (["--batch-sizes", "1,0"], "must be >= 1"),
        (["--batch-sizes", "a"], "expected integers"),
        (["--image-size", "40"], "multiple of 16"),
        (["--iters", "0"], "--iters 0"),
        (["--threads", "0"], "--threads 0"),
        (["--device", "tpu"], "tpu"),
    ],
)
def test_bad_arguments_one_line_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_device_cuda_without_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = CliRunner().invoke(main, ["--device", "cuda", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --device cuda:") and "CUDA" in line


def test_command_line_leaves_out_the_end_to_end_options_with_no_e2e() -> None:
    from dunet_deploy.cli.bench import _command_line

    ctx = main.make_context("dunet-bench", ["--no-e2e", "--image-size", "64"])
    words = _command_line(ctx).split()
    assert "--no-e2e" in words and words[words.index("--image-size") + 1] == "64"
    assert not [w for w in words if w.startswith("--e2e-")]
    ctx = main.make_context("dunet-bench", [])
    assert "--e2e-model" in _command_line(ctx).split()
