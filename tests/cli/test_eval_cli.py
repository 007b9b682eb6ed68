"""``dunet-eval``: per-case CSV, Table-2 summary, box plot, and one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from dunet_deploy.cli.eval import main  # noqa: E402
from dunet_deploy.data.synth import write_dataset  # noqa: E402
from dunet_deploy.metrics import summarize  # noqa: E402
from dunet_deploy.models import keras_param_count  # noqa: E402
from dunet_deploy.training.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from dunet_deploy.training.evaluate import evaluate_checkpoint  # noqa: E402
from dunet_deploy.training.trainer import TrainConfig, train  # noqa: E402

SHAPE = (32, 40, 16)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalcli")
    write_dataset(root / "data", cases=4, shape=SHAPE, seed=3)
    train(TrainConfig(data=str(root / "data"), out=str(root / "run"), image_size=32,
                      base_filters=8, batch_size=8, epochs=1, device="cpu", progress=False))
    return {"data": root / "data", "ckpt": root / "run" / "best.pt"}


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny D-UNet that segments the synthetic lesions (masks of lesion size, DSC ~0.7)
    on four of the cases it was trained on: eval numbers that mean something."""
    import export_helpers

    from dunet_deploy.training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("evallesion")
    spec = export_helpers.tiny_spec()
    # synthesize_case(seed=1..4): cases of train_tiny's training set
    write_dataset(root / "data", cases=4, shape=export_helpers.TINY_SHAPE, seed=1)
    save_checkpoint(root / "lesion.pt", model=export_helpers.train_tiny(spec, steps=150),
                    spec=spec, epoch=1, metrics={})
    return {"data": root / "data", "ckpt": root / "lesion.pt"}


def assert_lesion_sized(rows: list[dict[str, str]]) -> None:
    """Each case's mask is about its lesion's size, not a large share of the volume."""
    for row in rows:
        tp, fp, fn = (int(row[k]) for k in ("tp", "fp", "fn"))
        assert 0 < tp + fp <= 3 * (tp + fn) + 20, row
    assert sum(float(r["dsc"]) for r in rows) / len(rows) > 0.4, rows


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_eval_writes_the_report_and_matches_the_library(lesion_run, tmp_path):
    run_dir = lesion_run
    out = tmp_path / "eval"
    result = run("--checkpoint", run_dir["ckpt"], "--data", run_dir["data"], "--out", out,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    header = "| Method | DSC | DSC (global) | Recall | Precision | Total parameters |"
    assert header in result.stdout
    for name in ("cases.csv", "summary.md", "summary.json", "dsc_boxplot.png"):
        assert (out / name).is_file(), name
    assert (out / "dsc_boxplot.png").read_bytes()[:4] == b"\x89PNG"

    direct = evaluate_checkpoint(run_dir["ckpt"], run_dir["data"], device="cpu")
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert [r["case_id"] for r in rows] == [m.case_id for m in direct] and len(rows) == 4
    assert_lesion_sized(rows)
    for row, m in zip(rows, direct):
        assert (int(row["tp"]), int(row["fp"]), int(row["fn"])) == (m.tp, m.fp, m.fn)
        assert float(row["dsc"]) == m.dsc
    doc = json.loads((out / "summary.json").read_text())
    want = summarize(direct)
    for key in ("dsc_mean", "dsc_std", "dsc_global", "recall_mean", "precision_mean"):
        assert doc[key] == want[key], key
    ckpt = load_checkpoint(run_dir["ckpt"])
    params = keras_param_count(model_from_checkpoint(ckpt))
    assert doc["params"] == params and f"{params:,}" in result.stdout
    assert doc["split"] == "all" and doc["space"] == "native volume"
    assert f"{want['dsc_mean']:.4f}±{want['dsc_std']:.4f}" in (out / "summary.md").read_text()


def test_eval_on_the_checkpoints_own_validation_split(run_dir, tmp_path):
    out = tmp_path / "val"
    result = run("--checkpoint", run_dir["ckpt"], "--data", run_dir["data"], "--out", out,
                 "--split", "val", "--device", "cpu", "--no-boxplot")
    assert result.exit_code == 0, result.output
    val_ids = load_checkpoint(run_dir["ckpt"])["config"]["split"]["val"]
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert [r["case_id"] for r in rows] == val_ids
    assert not (out / "dsc_boxplot.png").exists()
    # Training validation of that epoch went through the same core: identical numbers.
    (record,) = [json.loads(line) for line in
                 (run_dir["ckpt"].parent / "metrics.jsonl").read_text().splitlines()]
    assert [(c["case_id"], c["tp"], c["fp"], c["fn"]) for c in record["val_cases"]] == \
        [(r["case_id"], int(r["tp"]), int(r["fp"]), int(r["fn"])) for r in rows]
    doc = json.loads((out / "summary.json").read_text())
    assert record["val"]["dsc_mean"] == doc["dsc_mean"]
    assert record["val"]["dsc_global"] == doc["dsc_global"]
    # Issue 19.11e: one case has no sample spread; summary.json and summary.md agree on it.
    assert len(val_ids) == 1 and doc["cases"] == 1
    md = (out / "summary.md").read_text()
    for key in ("dsc", "recall", "precision", "lesion_f1", "lesion_count_diff",
                "volume_diff_ml"):
        assert doc[f"{key}_std"] is None and record["val"][f"{key}_std"] is None, key
    assert md.count("±n/a") == 6 and "±0.0" not in md


@pytest.mark.parametrize("case", ["missing-ckpt", "corrupt-ckpt", "missing-data", "out-is-file",
                                  "bad-batch"])
def test_bad_inputs(case, run_dir, tmp_path):
    ckpt, data, out = run_dir["ckpt"], run_dir["data"], tmp_path / "out"
    extra: list[object] = []
    if case == "missing-ckpt":
        ckpt = tmp_path / "none.pt"
    elif case == "corrupt-ckpt":
        ckpt = tmp_path / "bad.pt"
        ckpt.write_bytes(b"garbage")
    elif case == "missing-data":
        data = tmp_path / "nodata"
    elif case == "out-is-file":
        out.write_text("x")
    elif case == "bad-batch":
        extra = ["--batch-size", "0"]
    result = run("--checkpoint", ckpt, "--data", data, "--out", out, "--device", "cpu", *extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    if case != "out-is-file":
        assert not out.exists()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_eval_engine_agrees_with_checkpoint(lesion_run, tmp_path, backend):
    from dunet_deploy.export.onnx_export import export_onnx

    run_dir = lesion_run
    doc = load_checkpoint(run_dir["ckpt"])
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model_from_checkpoint(doc), doc["spec_obj"], onnx_path)
    ck, en = tmp_path / "ck", tmp_path / "en"
    assert run("--checkpoint", run_dir["ckpt"], "--data", run_dir["data"], "--out", ck,
               "--device", "cpu", "--no-boxplot").exit_code == 0
    result = run("--engine", onnx_path, "--backend", backend, "--precision", "fp32",
                 "--data", run_dir["data"], "--out", en, "--no-boxplot")
    assert result.exit_code == 0, result.output
    a = list(csv.DictReader((ck / "cases.csv").open()))
    b = list(csv.DictReader((en / "cases.csv").open()))
    assert_lesion_sized(a)
    assert [r["case_id"] for r in a] == [r["case_id"] for r in b]
    for ra, rb in zip(a, b):
        # Same voxels up to a handful at p ~= 0.5 (fp32 kernels differ in summation order).
        for key in ("tp", "fp", "fn"):
            assert abs(int(ra[key]) - int(rb[key])) <= 3, (key, ra, rb)
    summary = json.loads((en / "summary.json").read_text())
    assert summary["backend"] == backend and summary["engine"] == str(onnx_path)


def test_eval_needs_exactly_one_model(run_dir, tmp_path):
    result = run("--data", run_dir["data"], "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: give exactly one of --checkpoint or --engine"
    result = run("--engine", tmp_path / "nope.onnx", "--data", run_dir["data"],
                 "--out", tmp_path / "y")
    assert result.exit_code == 2 and "model file not found" in result.stderr
    assert not (tmp_path / "y").exists()
