"""Metrics against hand-computed TP/FP/FN and hand-built lesion masks."""

from __future__ import annotations

import numpy as np
import pytest

from dunet_deploy.metrics import (
    Counts,
    LesionCounts,
    case_metrics,
    confusion,
    dsc,
    format_summary,
    label_lesions,
    lesion_counts,
    lesion_f1,
    mean_std,
    precision,
    recall,
    summarize,
)


def test_confusion_hand_computed():
    pred = np.array([0.9, 0.5, 0.49, 0.1, 0.7, 0.0])
    truth = np.array([1, 1, 1, 0, 0, 0])
    c = confusion(pred, truth)
    assert c == Counts(tp=2, fp=1, fn=1)  # 0.5 counts as lesion, 0.49 does not
    assert dsc(c) == pytest.approx(4 / 6)
    assert recall(c) == pytest.approx(2 / 3)
    assert precision(c) == pytest.approx(2 / 3)


def test_empty_prediction_precision_is_zero_and_empty_case_dsc_zero():
    truth = np.zeros((4, 4), np.uint8)
    truth[0, 0] = 1
    m = case_metrics("a", np.zeros((4, 4)), truth)
    assert (m.dsc, m.recall, m.precision, m.fn) == (0.0, 0.0, 0.0, 1)
    both_empty = case_metrics("b", np.zeros(3), np.zeros(3))
    assert both_empty.dsc == 0.0 and both_empty.precision == 0.0


def test_summary_global_dsc_pools_voxels_and_uses_sample_std():
    a = case_metrics("a", np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))  # tp1 fp1 fn0
    b = case_metrics("b", np.array([0, 0, 0, 1]), np.array([1, 1, 0, 1]))  # tp1 fp0 fn2
    s = summarize([a, b])
    assert s["cases"] == 2
    assert s["dsc_global"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert s["dsc_mean"] == pytest.approx((2 / 3 + 2 / 4) / 2)
    assert s["dsc_std"] == pytest.approx(np.std([2 / 3, 0.5], ddof=1))
    row = format_summary(s, params=8_640_163)
    assert row.startswith("0.5833±0.1179") and row.endswith("8,640,163")


def test_mean_std_edge_cases_and_shape_check():
    assert mean_std([]) == (0.0, 0.0)
    assert mean_std([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        confusion(np.zeros(3), np.zeros(4))


# ------------------------------------------------------------ ATLAS v2.0 scores
def _vol(*boxes, shape=(8, 8, 8)) -> np.ndarray:
    """A 0/1 volume with the given index boxes set."""
    out = np.zeros(shape, np.uint8)
    for box in boxes:
        out[box] = 1
    return out


def test_lesions_are_face_connected_components():
    # Two voxels touching only along an edge are two lesions; sharing a face, one.
    diagonal = _vol((1, 1, 1), (2, 2, 1))
    face = _vol((1, 1, 1), (2, 1, 1))
    assert label_lesions(diagonal)[1] == 2 and label_lesions(face)[1] == 1
    assert label_lesions(_vol((1, 1, 1), (2, 2, 2)))[1] == 2  # corner only
    # A singleton axis (slab grids [Z, 1, S, S]) changes nothing.
    assert label_lesions(diagonal[:, None])[1] == 2


def test_touching_lesions_hand_counted():
    truth = _vol((1, 1, 1), (2, 2, 1))  # two lesions touching diagonally
    pred = _vol((slice(1, 3), slice(1, 3), 1))  # one 2x2 component covering both
    c = lesion_counts(pred, truth)
    assert c == LesionCounts(tp=2, fn=0, fp=0, n_pred=1, n_true=2)
    m = case_metrics("t", pred, truth)
    assert m.lesion_f1 == 1.0 and m.lesion_count_diff == 1
    assert m.volume_diff_voxels == 2 and m.volume_diff_ml == pytest.approx(0.002)


def test_nested_lesions_hand_counted():
    # A hollow true lesion (shell) with a prediction in its cavity: touching nothing.
    shell = _vol((slice(1, 6), slice(1, 6), slice(1, 6)))
    shell[2:5, 2:5, 2:5] = 0
    inside = _vol((3, 3, 3))
    c = lesion_counts(inside, shell)
    assert c == LesionCounts(tp=0, fn=1, fp=1, n_pred=1, n_true=1)
    assert lesion_f1(c) == 0.0
    # A predicted component that contains a small true lesion detects it.
    big = _vol((slice(1, 6), slice(1, 6), slice(1, 6)))
    m = case_metrics("n", big, inside)
    assert (m.lesion_f1, m.lesion_count_diff, m.volume_diff_voxels) == (1.0, 0, 124)


def test_one_voxel_and_false_positive_lesions():
    truth = _vol((4, 4, 4))
    assert case_metrics("hit", truth, truth).lesion_f1 == 1.0
    pred = _vol((4, 4, 4), (0, 0, 0))  # the hit plus a one-voxel FP far away
    m = case_metrics("fp", pred, truth)
    assert m.lesion_f1 == pytest.approx(1 / (1 + 0.5))  # TP 1, FP 1, FN 0
    assert m.lesion_count_diff == 1 and m.volume_diff_voxels == 1
    # Three true lesions, one found, two spurious components: 1 / (1 + (2 + 2) / 2).
    truth3 = _vol((0, 0, 0), (0, 4, 0), (0, 7, 7))
    pred3 = _vol((0, 0, 0), (7, 7, 7), (7, 0, 7))
    assert lesion_f1(lesion_counts(pred3, truth3)) == pytest.approx(1 / 3)


def test_empty_and_all_empty_cases():
    empty = np.zeros((8, 8, 8), np.uint8)
    two = _vol((1, 1, 1), (5, 5, 5))
    both = case_metrics("none", empty, empty)
    assert (both.lesion_f1, both.lesion_count_diff, both.volume_diff_voxels) == (1.0, 0, 0)
    assert both.volume_diff_ml == 0.0
    missed = case_metrics("missed", empty, two)
    assert missed.lesion_f1 == 0.0 and missed.lesion_count_diff == 2
    spurious = case_metrics("spurious", two, empty, zooms=(1.0, 1.0, 2.0))
    assert spurious.lesion_f1 == 0.0 and spurious.lesion_count_diff == 2
    assert spurious.volume_diff_voxels == 2 and spurious.volume_diff_ml == pytest.approx(0.004)


def test_probabilities_are_thresholded_before_counting_lesions():
    truth = _vol((1, 1, 1), (6, 6, 6))
    prob = np.zeros((8, 8, 8), np.float32)
    prob[1, 1, 1], prob[6, 6, 6], prob[3, 3, 3] = 0.9, 0.49, 0.5
    m = case_metrics("p", prob, truth)
    assert m.lesion_f1 == pytest.approx(1 / (1 + 1))  # TP 1, FN 1, FP 1
    with pytest.raises(ValueError, match="shapes differ"):
        lesion_counts(np.zeros(3), np.zeros(4))


def test_summary_and_row_carry_the_challenge_scores():
    truth = _vol((1, 1, 1), (6, 6, 6))
    a = case_metrics("a", truth, truth)  # F1 1, count diff 0, volume diff 0
    b = case_metrics("b", _vol((1, 1, 1)), truth, zooms=(2.0, 2.0, 2.0))  # F1 2/3, 1, 1 voxel
    s = summarize([a, b])
    assert s["lesion_f1_mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert s["lesion_f1_std"] == pytest.approx(np.std([1, 2 / 3], ddof=1))
    assert s["lesion_count_diff_mean"] == 0.5 and s["volume_diff_voxels_mean"] == 0.5
    assert s["volume_diff_ml_mean"] == pytest.approx(0.004)
    row = format_summary(s)
    assert "0.8333±0.2357" in row and "0.50±0.71" in row and "0.0040±0.0057" in row
