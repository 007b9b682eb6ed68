"""Metrics against hand-computed TP/FP/FN."""

from __future__ import annotations

import numpy as np
import pytest

from dunet_deploy.metrics import (
    Counts,
    case_metrics,
    confusion,
    dsc,
    format_summary,
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
