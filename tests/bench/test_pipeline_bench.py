"""``dunet-bench --pipeline`` on tiny volumes: every figure present, finite and consistent.

Never asserts speed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from dunet_deploy.artifacts import read_artifact_info
from dunet_deploy.bench.pipeline_bench import (
    StandInRunner,
    parse_shape,
    pipeline_spec,
    standin_map,
    write_standin_onnx,
    write_volumes,
)
from dunet_deploy.cli.bench import main

TINY = ["--pipeline", "--volumes", "2", "--volume-shape", "40,48,24", "--image-size", "32",
        "--threads", "1", "--workers", "0,2", "--e2e-batch-size", "8"]  # fmt: skip
STAGES = ("read", "preprocess", "infer", "postprocess", "write")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    pytest.importorskip("torch")  # the 'real' model is a random-init export
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("pipe")
    args = [*TINY, "--base-filters", "16", "--pipeline-backend", "onnxruntime",
            "--cache-dir", str(root / "work"), "--out", str(root / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads((root / "out" / "pipeline.json").read_text()), root, result.output


def test_runs_cover_models_and_encodings(bench: tuple[dict[str, Any], Path, str]) -> None:
    doc, root, output = bench
    assert f"results in {root / 'out' / 'pipeline.md'}" in output
    runs = doc["runs"]
    assert {(r["model"], r["encoding"], r["workers"]) for r in runs} >= {
        ("standin", "float32", 0), ("standin", "int16", 0), ("real", "float32", 0),
        ("real", "int16", 0)}
    # workers=2 runs exactly when the pipeline offers worker processes; else it says why.
    with_workers = {(r["model"], r["encoding"]) for r in runs if r["workers"] == 2}
    skipped = {(s["model"], s["encoding"]) for s in doc["skipped"] if s["workers"] == 2}
    assert with_workers | skipped == {(m, e) for m in ("standin", "real")
                                      for e in ("float32", "int16")}
    assert not (with_workers & skipped)
    assert doc["workers_supported"] == bool(with_workers)
    assert doc["machine"]["cpu_model"] and doc["config"]["shape"] == [40, 48, 24]
    md = (root / "out" / "pipeline.md").read_text()
    assert md.startswith("# dunet-bench --pipeline") and md.count("| standin |") >= 2


def test_figures_finite_and_consistent(bench: tuple[dict[str, Any], Path, str]) -> None:
    doc, root, _ = bench
    for r in doc["runs"]:
        assert r["volumes"] == 2 and r["slabs"] > 0
        for key in ("wall_s", "volumes_per_s", "slabs_per_s", "core_s", "core_s_per_volume"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["volumes_per_s"] == pytest.approx(2 / r["wall_s"], rel=1e-2)
        assert r["slabs_per_s"] == pytest.approx(r["slabs"] / r["wall_s"], rel=1e-2)
        assert r["core_s_per_volume"] == pytest.approx(r["core_s"] / 2, rel=1e-2)
        assert set(r["stages_s_per_volume"]) == set(STAGES)
        assert all(v >= 0 for v in r["stages_s_per_volume"].values())
        assert r["peak_rss_mb"]["main"] > 10
        # The summary's stages happened inside the measured wall time.
        assert sum(r["stages_s_per_volume"].values()) * 2 <= r["wall_s"] * 1.05 + 0.05
    backends = {r["model"]: r["backend"] for r in doc["runs"]}
    assert backends == {"standin": "standin", "real": "onnxruntime"}
    # The real outputs exist and are masks on the input grid.
    masks = sorted((root / "work").glob("out_real_int16_w0_none/*_mask.nii.gz"))
    assert len(masks) == 2 and nib.load(str(masks[0])).shape == (40, 48, 24)


def test_standin_has_the_real_io_and_returns_its_map(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    spec = pipeline_spec((40, 48, 24), 32)
    path = write_standin_onnx(tmp_path / "standin.onnx", spec)
    info = read_artifact_info(path)
    assert info.spec == spec and info.model_name == "standin"
    slabs = np.random.default_rng(0).random((3, spec.in_channels, 32, 32), dtype=np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, out.name) == ("slabs", "prob")
    by_onnx = sess.run(None, {"slabs": slabs})[0]
    with StandInRunner(path, info) as runner:
        by_runner = runner.infer(slabs)
        assert by_runner.shape == (3, 1, 32, 32) and by_runner.dtype == np.float32
    np.testing.assert_array_equal(by_runner, by_onnx)
    m = standin_map(spec)
    assert (m >= spec.threshold).any() and (m < spec.threshold).any()  # a lesion and background


def test_volumes_written_both_ways_read_the_same(tmp_path: Path) -> None:
    from dunet_deploy.data.nifti import load_nifti

    paths = write_volumes(tmp_path, 1, (40, 48, 24), seed=3)
    f32, i16 = (load_nifti(paths[k][0]) for k in ("float32", "int16"))
    assert nib.load(str(paths["int16"][0])).get_data_dtype() == np.int16
    assert nib.load(str(paths["float32"][0])).get_data_dtype() == np.float32
    np.testing.assert_allclose(i16.data, f32.data, rtol=0, atol=float(f32.data.max()) / 32000)


@pytest.mark.parametrize(("args", "needle"), [
    (["--volumes", "0"], "--volumes 0"),
    (["--volume-shape", "40,48"], "--volume-shape '40,48'"),
    (["--pipeline-models", "standin,fast"], "--pipeline-models"),
    (["--encodings", "uint8"], "--encodings uint8"),
])  # fmt: skip
def test_bad_options_are_one_line_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [*TINY, *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and needle in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_baseline_runs_the_other_tree_first_on_the_same_files(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]  # this tree as its own baseline
    out = tmp_path / "out"
    args = [*TINY, "--workers", "0", "--pipeline-models", "standin", "--encodings", "int16",
            "--baseline", str(repo), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "pipeline.json").read_text())
    assert [r["source"] for r in doc["runs"]] == ["baseline", "current"]
    assert {r["code"] for r in doc["runs"]} == {str(repo)}
    assert doc["runs"][0]["slabs"] == doc["runs"][1]["slabs"] > 0
    bad = CliRunner().invoke(main, [*TINY, "--baseline", str(tmp_path), "--out", str(out)])
    assert bad.exit_code == 2 and "no dunet_deploy package" in bad.output


def test_tta_cost_is_measured_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [*TINY, "--workers", "0", "--pipeline-models", "real", "--encodings", "int16",
            "--base-filters", "8", "--pipeline-backend", "onnxruntime", "--tta", "none,flip",
            "--cache-dir", str(tmp_path / "work"), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "pipeline.json").read_text())
    assert [r["tta"] for r in doc["runs"]] == ["none", "flip"]
    plain, flip = doc["runs"]
    assert plain["slabs"] == flip["slabs"] > 0  # same slabs, each run twice with flip
    assert "| flip |" in (out / "pipeline.md").read_text()
    bad = CliRunner().invoke(main, [*TINY, "--tta", "rotate", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--tta" in bad.output


def test_parse_shape() -> None:
    assert parse_shape("197,233,189") == (197, 233, 189)
    assert parse_shape("64,64,32") == (64, 64, 32)  # repeated sizes are fine
