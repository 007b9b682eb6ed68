"""Native-space evaluation with a pluggable predictor, reports, and checkpoints."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from dunet_deploy.data.layouts import discover_cases
from dunet_deploy.data.preprocess import (
    nonempty_slab_indices,
    probs_to_volume,
    slices_to_slabs,
    volume_to_slices,
)
from dunet_deploy.data.synth import write_dataset
from dunet_deploy.errors import DunetError
from dunet_deploy.metrics import summarize
from dunet_deploy.runtime.core import predict_grid, to_network
from dunet_deploy.spec import PreprocessSpec
from dunet_deploy.training.evaluate import (
    evaluate_cases,
    predict_volume,
    select_cases,
    table2_markdown,
    write_report,
)

SHAPE = (32, 40, 16)
SPEC = PreprocessSpec.for_geometry(SHAPE, image_size=32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata") / "data"
    write_dataset(root, cases=3, shape=SHAPE, seed=4)
    return root


def _volume() -> np.ndarray:
    vol = np.random.default_rng(0).uniform(1, 2, SHAPE).astype(np.float32)
    vol[:, :, :5] = 0  # empty slices at the bottom
    return vol


def test_module_does_not_import_torch():
    code = ("import sys, dunet_deploy.training.evaluate as e; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_slab_grid_skips_empty_slabs():
    vol = _volume()
    calls = []

    def ones(slabs: np.ndarray) -> np.ndarray:
        calls.append(slabs.shape)
        assert slabs.dtype == np.float32
        return np.ones((slabs.shape[0], 1, 32, 32), np.float32)

    grid = predict_grid(to_network(vol, SPEC), SPEC, ones, batch_size=4)
    assert grid.shape == (16, 1, 32, 32) and grid.dtype == np.float32
    keep = nonempty_slab_indices(vol, SPEC)
    # slab 4 stacks slices 2..5 and slice 5 is the first non-empty one
    assert keep.tolist() == list(range(4, 16))
    assert all(s[1:] == (4, 32, 32) and s[0] <= 4 for s in calls)
    assert sum(s[0] for s in calls) == keep.size
    assert grid[keep].min() == 1 and grid[:4].max() == 0

    probs = predict_volume(vol, SPEC, ones)
    assert probs.shape == SHAPE
    (r0, r1), (c0, c1) = SPEC.crop_rows, SPEC.crop_cols
    # Oriented slice = vol[:, :, z].T: rows are y, columns x.
    inside = probs[c0:c1, r0:r1, 4:]
    assert np.allclose(inside, 1.0) and probs[:, :, :4].max() == 0
    assert probs.sum() == pytest.approx(inside.size, rel=1e-5)


def test_bad_predictor_output_is_a_user_error():
    with pytest.raises(DunetError, match="the model returned shape"):
        predict_grid(to_network(_volume(), SPEC), SPEC,
                     lambda s: np.zeros((s.shape[0], 32, 32), np.float32))


def test_evaluate_cases_and_report(data, tmp_path):
    cases = select_cases(data)
    one = cases[2].case_id
    assert [c.case_id for c in select_cases(data, case_ids=[one])] == [one]
    with pytest.raises(DunetError, match="not in the dataset"):
        select_cases(data, case_ids=["nope"])

    def ones(slabs: np.ndarray) -> np.ndarray:  # "lesion" wherever a slab is run
        return np.ones((slabs.shape[0], 1, 32, 32), np.float32)

    done = []
    metrics = evaluate_cases(cases, SPEC, ones, progress=lambda *a: done.append(a))
    assert [m.case_id for m in metrics] == [c.case_id for c in cases]
    assert [d[:2] for d in done] == [(1, 3), (2, 3), (3, 3)]
    (r0, r1), (c0, c1) = SPEC.crop_rows, SPEC.crop_cols
    for case, m in zip(cases, metrics):
        image = np.asarray(nib.load(str(case.image)).get_fdata(), np.float32)
        truth = np.zeros(SHAPE, bool)
        for mask_path in case.masks:
            truth |= np.asarray(nib.load(str(mask_path)).get_fdata()) > 0
        # By hand: predicted = the crop box (oriented slice = vol[:, :, z].T) on run slabs.
        pred = np.zeros(SHAPE, bool)
        pred[c0:c1, r0:r1, nonempty_slab_indices(image, SPEC)] = True
        tp = int((pred & truth).sum())
        fp, fn = int((pred & ~truth).sum()), int((~pred & truth).sum())
        assert (m.tp, m.fp, m.fn) == (tp, fp, fn) and tp > 0
        assert m.dsc == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert m.recall == pytest.approx(tp / (tp + fn))
        assert m.precision == pytest.approx(tp / (tp + fp))

    paths = write_report(metrics, tmp_path / "rep", method="thresholder", params=1234,
                         meta={"split": "all"})
    assert set(paths) == {"csv", "json", "markdown", "boxplot"}
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["case_id"] for r in rows] == [m.case_id for m in metrics]
    for row, m in zip(rows, metrics):
        assert float(row["dsc"]) == m.dsc and int(row["tp"]) == m.tp
        assert float(row["recall"]) == m.recall and float(row["precision"]) == m.precision
        assert float(row["lesion_f1"]) == m.lesion_f1
        assert int(row["lesion_count_diff"]) == m.lesion_count_diff
        assert int(row["volume_diff_voxels"]) == m.volume_diff_voxels
        assert float(row["volume_diff_ml"]) == m.volume_diff_ml
    doc = json.loads(paths["json"].read_text())
    for key, value in summarize(metrics).items():
        assert doc[key] == value
    assert doc["params"] == 1234 and doc["split"] == "all"
    md = paths["markdown"].read_text()
    assert ("| Method | DSC | DSC (global) | Recall | Precision | Total parameters | Lesion F1 | "
            "Lesion count diff | Volume diff (ml) |") in md
    for key in ("lesion_f1", "lesion_count_diff", "volume_diff_voxels", "volume_diff_ml"):
        assert f"{key}_mean" in doc and f"{key}_std" in doc
    f1 = summarize(metrics)["lesion_f1_mean"]
    assert f"| {f1:.4f}±" in md
    assert "| thresholder |" in md and "1,234" in md
    assert paths["boxplot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "rep").glob(".*.tmp"))


def test_table2_row_format():
    s = {"dsc_mean": 0.5349, "dsc_std": 0.2763, "dsc_global": 0.7231, "recall_mean": 0.5243,
         "recall_std": 0.291, "precision_mean": 0.6331, "precision_std": 0.2958,
         "lesion_f1_mean": 0.61, "lesion_f1_std": 0.25, "lesion_count_diff_mean": 1.5,
         "lesion_count_diff_std": 2.25, "volume_diff_ml_mean": 4.5, "volume_diff_ml_std": 6.0}
    row = table2_markdown(s, method="Ours", params=8_640_163).splitlines()[2]
    assert row == ("| Ours | 0.5349±0.2763 | 0.7231 | 0.5243±0.2910 | 0.6331±0.2958 | "
                   "8,640,163 | 0.6100±0.2500 | 1.50±2.25 | 4.5000±6.0000 |")


def test_checkpoint_evaluation_matches_a_direct_computation(data, tmp_path):
    torch = pytest.importorskip("torch")
    from dunet_deploy.models import create_model
    from dunet_deploy.training.checkpoint import save_checkpoint
    from dunet_deploy.training.evaluate import evaluate_checkpoint

    torch.manual_seed(0)
    model = create_model("dunet", base_filters=8).eval()
    with torch.no_grad():  # push the output away from 0.5 so the masks are not trivial
        model.head.bias.fill_(-0.2)
    cases = select_cases(data)
    split = {"train": [cases[0].case_id, cases[1].case_id], "val": [cases[2].case_id]}
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model=model, spec=SPEC, config={"split": split})

    got = evaluate_checkpoint(ckpt, data, device="cpu", batch_size=1000)
    assert [m.case_id for m in got] == [c.case_id for c in cases]
    for case, m in zip(cases, got):
        image = np.asarray(nib.load(str(case.image)).get_fdata(dtype=np.float32))
        mask = np.asarray(nib.load(str(case.masks[0])).get_fdata()) > 0
        for extra in case.masks[1:]:
            mask |= np.asarray(nib.load(str(extra)).get_fdata()) > 0
        slices = volume_to_slices(image, SPEC)
        keep = nonempty_slab_indices(image, SPEC)
        grid = np.zeros((SHAPE[2], 1, 32, 32), np.float32)
        with torch.no_grad():
            grid[keep] = model(torch.from_numpy(slices_to_slabs(slices, SPEC, keep))).numpy()
        pred = probs_to_volume(grid, SPEC, image.shape) >= 0.5
        tp = int((pred & mask).sum())
        fp, fn = int((pred & ~mask).sum()), int((~pred & mask).sum())
        assert (m.tp, m.fp, m.fn) == (tp, fp, fn)
        assert m.dsc == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert any(m.tp > 0 for m in got) and any(m.fp > 0 for m in got)

    val = evaluate_checkpoint(ckpt, data, split="val", device="cpu")
    assert [m.case_id for m in val] == split["val"]
    save_checkpoint(tmp_path / "nosplit.pt", model=model, spec=SPEC)
    with pytest.raises(DunetError, match="no 'val' split"):
        evaluate_checkpoint(tmp_path / "nosplit.pt", data, split="val", device="cpu")
    _, found = discover_cases(data)
    assert len(found) == 3
